"""Route-level request shapes built from a parsed request (serve/schemas.py) and a model's info.

Kept out of serve/app.py: Serve's ingress wrapper rebuilds the Gateway class, and functions
defined in that module after the class were not found by the rebuilt methods at runtime.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from serve.schemas import RequestError, parse_named_values, parse_vector


def need_images(images: list[np.ndarray]) -> list[np.ndarray]:
    if not images:
        raise RequestError(422, "images", "send at least one image: multipart `image` / `images` files or "
                                          "JSON {\"images\": [base64, ...]}")
    return images


def latent_queries(req: Any, info: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """One query per image, or one for `latent`: adjust (target intensities in [0, 1], unnamed = keep)
    and prefer (weights >= 0, default 1) as {attribute: value} or full vectors."""
    names = info["attributes"]
    f = req.fields
    adjust = np.full(len(names), np.nan)
    if f.get("adjust") is not None:
        if isinstance(f["adjust"], Mapping):
            for n, v in parse_named_values(f["adjust"], "adjust", names, 0.0, 1.0).items():
                adjust[names.index(n)] = v
        else:
            adjust = parse_vector(f["adjust"], "adjust", len(names), 0.0, 1.0).astype(np.float64)
    prefer = np.ones(len(names))
    if f.get("prefer") is not None:
        if isinstance(f["prefer"], Mapping):
            for n, v in parse_named_values(f["prefer"], "prefer", names, 0.0, None).items():
                prefer[names.index(n)] = v
        else:
            prefer = parse_vector(f["prefer"], "prefer", len(names), 0.0, None).astype(np.float64)
    base = {"adjust": adjust, "prefer": prefer, "k": k}
    if f.get("latent") is not None:
        if req.images:
            raise RequestError(422, "latent", "send an image or a latent, not both")
        w = parse_vector(f["latent"], "latent", int(info["latent_dim"]))
        return [{**base, "latent": w.astype(np.float64), "image": None}]
    return [{**base, "image": im, "latent": None} for im in need_images(req.images)]
