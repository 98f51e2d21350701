"""A dataset plan: what the writer needs to build a shard set, from a generator or an importer.

A plan is light: per split an iterable of JSON-able *specs* (one small dict per sample, keys
ascending), plus a picklable `load` function that turns one spec into a `Sample` (reads or
renders the image). The writer chunks the specs into shards and runs `load` in worker
processes, so image bytes never accumulate in memory and the result does not depend on how
many processes ran.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from shards.format import DatasetMeta, Pair, Sample, ShardError

Spec = Mapping[str, Any]


@dataclass(frozen=True)
class DatasetPlan:
    """meta + per-split spec streams (ascending keys) + a picklable spec -> Sample loader."""

    meta: DatasetMeta
    splits: Mapping[str, Iterable[Spec]]
    load: Callable[[Spec], Sample]
    pairs: Iterable[Pair] | None = None
    # Changes whenever the same specs would produce different bytes (generator version, seed,
    # image options); part of every shard's resume fingerprint.
    fingerprint: str = ""
    extra_files: Mapping[str, bytes] = field(default_factory=dict)


def fingerprint_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_inside(root: Path, path: Path) -> bool:
    """Whether the resolved `path` is `root` or lies under it (both already resolved)."""
    return path == root or root in path.parents


def safe_join(root: Path, rel: str, what: str = "path") -> Path:
    """root/rel resolved: the one path check of every importer (annotation and list files name
    images relative to a source folder). Refuses an absolute `rel`, and any `rel` that leaves
    `root` through '..' or through a symlink, with one line naming `what` (file:line) and the fix."""
    root = Path(root).resolve()
    text = str(rel)
    fix = "name files relative to that folder and keep them inside it (copy them in rather than linking)"
    if "\0" in text:
        raise ShardError(f"{what} {text!r}: contains a NUL byte; fix the entry")
    if Path(text).is_absolute():
        raise ShardError(f"{what} {text!r} escapes {root} (an absolute path); {fix}")
    try:
        p = (root / text).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ShardError(f"{what} {text!r}: cannot be resolved under {root} ({e}); {fix}") from None
    if not is_inside(root, p):
        how = "'..'" if ".." in Path(text).parts else "a symlink"
        raise ShardError(f"{what} {text!r} escapes {root} (through {how}, to {p}); {fix}")
    return p


def plain_name(name: str, what: str) -> str:
    """`name` when it is one plain file name, safe to join under an output directory or to use as
    a tar member name: no '/' or '\\', not '', '.' or '..', no NUL. Else a ShardError naming it."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ShardError(f"{what} {name!r}: not a plain file name (no '/', '\\', '..' or NUL); "
                         "refusing to write outside the output directory")
    return name


def image_ext_of(data: bytes, where: str) -> str:
    """'jpg' or 'png' from the magic bytes; anything else must be re-encoded by the caller."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    raise ShardError(f"{where}: not a JPEG or PNG file")


def encode_image(img: Any, ext: str = "png", quality: int = 95) -> bytes:
    """Encode a PIL image or HxW[xC] uint8 array deterministically (no timestamps in PNG/JPEG)."""
    from PIL import Image
    import numpy as np

    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img))
    buf = io.BytesIO()
    if ext == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif ext == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    else:
        raise ShardError(f"image format {ext!r} is not one of jpg, png")
    return buf.getvalue()


def load_image_file(spec: Spec) -> Sample:
    """The generic importer loader: read spec['path'] (keep original bytes when JPEG/PNG,
    re-encode other formats or when spec['resize'] asks) and attach the spec's labels.

    Spec keys: key, path (absolute), split, and optional instance, category, attributes, boxes,
    extra, resize (max side in px), crop ([x0, y0, x1, y1] pixels, applied before resize).
    """
    path = Path(spec["path"])
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{path}: cannot read image ({e.strerror})") from None
    resize, crop = spec.get("resize"), spec.get("crop")
    try:
        ext = None if (resize or crop) else image_ext_of(data, str(path))
    except ShardError:
        ext = None
    if ext is None:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ShardError(f"{path}: not a decodable image ({e})") from None
        img = img.convert("RGB")
        if crop:
            img = img.crop(tuple(int(round(v)) for v in crop))
        if resize:
            w, h = img.size
            s = float(resize) / max(w, h)
            if s < 1:
                img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        ext = "jpg"
        data = encode_image(img, ext)
    return Sample(
        key=spec["key"], image=data, ext=ext, split=spec["split"],
        instance=spec.get("instance"), category=spec.get("category"),
        attributes=spec.get("attributes") or {}, boxes={k: tuple(v) for k, v in (spec.get("boxes") or {}).items()},
        extra=spec.get("extra") or {},
    )
