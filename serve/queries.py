"""Route-level request shapes built from a parsed request (serve/schemas.py) and a model's info.

Kept out of serve/app.py: Serve's ingress wrapper rebuilds the Gateway class, and functions
defined in that module after the class were not found by the rebuilt methods at runtime.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from serve.schemas import RequestError, parse_choice, parse_named_values, parse_vector


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


def _terms(info: dict[str, Any], field: str) -> dict[str, Any]:
    if not info.get("terms"):
        raise RequestError(422, field, f"model {info['name']!r} has no query terms (coop_embed only; rebuild its "
                                       "index with `attrlab index` to add them)")
    return info["terms"]


def term_query(fields: dict[str, Any], images: list[np.ndarray] | None = None,
               info: dict[str, Any] | None = None) -> Any:
    """coop_embed's term queries: {"attribute": name, "value": v} (searched in that attribute's
    subspace) or {"category": c} (in the whole space). Without `info`: whether the request is one."""
    is_term = fields.get("attribute") is not None or fields.get("category") is not None
    if info is None or not is_term:
        return is_term
    if images:
        raise RequestError(422, "image", "send an image or a query term (attribute / category), not both")
    if fields.get("category") is not None:
        terms = _terms(info, "category")
        return "category", "", parse_choice(str(fields["category"]), "category", terms["categories"])
    terms = _terms(info, "attribute")
    name = parse_choice(fields["attribute"], "attribute", sorted(terms["attributes"]))
    if fields.get("value") is None:
        raise RequestError(422, "value", f"an attribute term needs a value; {name} has {terms['attributes'][name]}")
    return "attribute", name, parse_choice(str(fields["value"]), "value", terms["attributes"][name])


def subspace_of(fields: dict[str, Any], info: dict[str, Any]) -> str | None:
    """An image searched in one attribute's subspace only ({"subspace": name}), or None."""
    if fields.get("subspace") is None:
        return None
    terms = _terms(info, "subspace")
    return parse_choice(fields["subspace"], "subspace", sorted(terms["attributes"]))
