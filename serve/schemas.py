"""Request parsing and validation for the serving ingress (pure: no Ray in here).

Every malformed request must end as a 4xx JSON error naming the offending field, never a 500:
the ingress calls `read_request` and the `parse_*` helpers, which raise `RequestError`, and
`install_handlers` turns that (and FastAPI's/Starlette's own errors) into one body shape:
``{"error": {"status": 422, "field": "k", "message": "..."}}``.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field as dc_field, fields as dc_fields
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from PIL import Image, ImageOps, features
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

# Formats PIL may try. An allowlist, not PIL's default of everything: EPS would run Ghostscript.
_FORMATS = tuple(f for f in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
                 if f != "WEBP" or features.check("webp"))
_FILE_KEYS = ("image", "images", "image_a", "image_b")
_F32_MAX = float(np.finfo(np.float32).max)
_INT_RE = re.compile(r"[+-]?[0-9]{1,18}")  # int() alone also takes "1_000" and non-ASCII digits


class RequestError(Exception):
    """A client error: HTTP status (4xx), the offending field, a message saying what to send instead."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{status} {field}: {message}")
        self.status = status
        self.field = field
        self.message = message

    def body(self) -> dict:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16_000_000   # whole request
    max_image_bytes: int = 4_000_000   # one encoded image
    max_image_side: int = 4096         # decoded width or height
    max_images: int = 32               # images (or pairs) in one request
    max_k: int = 100
    max_steps: int = 16                # translation strip length
    max_total_pixels: int = 64_000_000  # decoded pixels in one request (~190 MB of RGB)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Limits":
        known = {f.name for f in dc_fields(cls)}
        for key, value in d.items():
            if key not in known:
                raise ValueError(f"limits: unknown key {key!r} (known: {', '.join(sorted(known))})")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"limits: {key} must be a positive integer, got {value!r}")
        return cls(**dict(d))


@dataclass
class ParsedRequest:
    images: list[np.ndarray] = dc_field(default_factory=list)   # from `image` / `images`
    pairs: list[tuple[np.ndarray, np.ndarray]] = dc_field(default_factory=list)
    fields: dict[str, Any] = dc_field(default_factory=dict)     # everything else


def decode_image(data: bytes, field: str, limits: Limits) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB array [H, W, 3], or a RequestError naming `field`."""
    if not data:
        raise RequestError(400, field, "image is empty")
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, field, f"image is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    too_big = f"the limit is {limits.max_image_side} px per side"
    # Anything PIL raises on client bytes is the client's bad input, never a 500.
    try:
        img = Image.open(io.BytesIO(data), formats=list(_FORMATS))
    except Image.DecompressionBombError:
        raise RequestError(413, field, f"image dimensions are too large; {too_big}") from None
    except Exception:
        raise RequestError(415, field, f"not a decodable image; send one of: {', '.join(_FORMATS)}") from None
    # Size comes from the header: refuse before decoding pixels (a small file can claim 100k x 100k).
    w, h = img.size
    max_pixels = min(limits.max_image_side ** 2, Image.MAX_IMAGE_PIXELS or math.inf)
    if w > limits.max_image_side or h > limits.max_image_side or w * h > max_pixels:
        raise RequestError(413, field, f"image is {w}x{h} px; {too_big}")
    if w < 1 or h < 1:
        raise RequestError(400, field, f"image is {w}x{h} px")
    fmt = img.format
    try:
        img.seek(0)  # animated GIF/WebP/APNG, multi-page TIFF: first frame only
        img.load()
        img = ImageOps.exif_transpose(img)  # phone photos: pixels as the user sees them
        # Alpha is dropped, not composited: the same convert("RGB") the training shards went through.
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception:  # the header parsed, the pixel data did not: truncated or corrupt
        raise RequestError(400, field, f"{fmt} data is corrupt or truncated") from None


def decode_b64_image(value: Any, field: str, limits: Limits) -> np.ndarray:
    """A base64 string (optionally a data: URL) -> uint8 RGB array, via decode_image."""
    if not isinstance(value, str):
        raise RequestError(422, field, f"must be a base64 string (or data: URL), got {type(value).__name__}")
    s = value
    if s[:5].lower() == "data:":
        head, sep, s = s.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise RequestError(400, field, "data: URL must be of the form data:image/png;base64,<data>")
    s = "".join(s.split())  # MIME-style line breaks
    # Refuse oversized payloads before spending memory on decoding them.
    if len(s) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
        raise RequestError(413, field, f"image is over the limit of {limits.max_image_bytes} bytes")
    if "-" in s or "_" in s:  # URL-safe alphabet
        s = s.replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, field, "invalid base64; send the image file base64-encoded") from None
    return decode_image(data, field, limits)


_Slot = tuple[str, Any]  # (field name for errors, encoded bytes or a base64 str)


async def read_request(request: Request, limits: Limits) -> ParsedRequest:
    """Read and validate a multipart/form-data or application/json request into a ParsedRequest."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype not in ("application/json", "multipart/form-data"):
        raise RequestError(415, "Content-Type", f"got {ctype or 'none'!r}; send multipart/form-data "
                                                f"(files) or application/json (base64 images)")
    length = request.headers.get("content-length")
    if length is not None and not length.strip().isdigit():
        raise RequestError(400, "Content-Length", f"not a byte count: {length!r}")
    if length is not None and int(length) > limits.max_body_bytes:
        raise RequestError(413, "body", f"request is {length} bytes; the limit is {limits.max_body_bytes}")
    # Parsing and decoding are CPU-bound: a worker thread keeps the ingress event loop serving.
    if ctype == "application/json":
        body = b"".join([chunk async for chunk in _limited_stream(request, limits)])
        return await run_in_threadpool(lambda: _decode(*_json_slots(body, limits), limits))
    return await run_in_threadpool(_decode, *await _multipart_slots(request, limits), limits)


async def _limited_stream(request: Request, limits: Limits) -> AsyncIterator[bytes]:
    # Content-Length may be absent (chunked) or wrong: count what actually arrives.
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limits.max_body_bytes:
            raise RequestError(413, "body", f"request is over the limit of {limits.max_body_bytes} bytes")
        yield chunk


def _check_counts(images: int, pairs: int, limits: Limits) -> None:
    for name, n in (("images", images), ("pairs", pairs)):
        if n > limits.max_images:
            raise RequestError(413, name, f"got {n}; at most {limits.max_images} images (or pairs) per request")


def _decode(images: list[_Slot], pairs: list[tuple[_Slot, _Slot]], fields: dict[str, Any],
            limits: Limits) -> ParsedRequest:
    total = 0

    def one(slot: _Slot) -> np.ndarray:
        nonlocal total
        name, v = slot
        img = decode_image(v, name, limits) if isinstance(v, bytes) else decode_b64_image(v, name, limits)
        total += img.shape[0] * img.shape[1]
        if total > limits.max_total_pixels:  # each image is within its own limit; together they are not
            raise RequestError(413, name, f"the request's images exceed {limits.max_total_pixels} pixels in all; "
                                          "send fewer or smaller images")
        return img
    return ParsedRequest([one(s) for s in images], [(one(a), one(b)) for a, b in pairs], fields)


def _json_slots(body: bytes, limits: Limits) -> tuple[list[_Slot], list[tuple[_Slot, _Slot]], dict[str, Any]]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, 5000-digit ints, nesting
        raise RequestError(400, "body", f"invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "body", f"JSON body must be an object, got {type(doc).__name__}")
    if "image" in doc and "images" in doc:
        raise RequestError(422, "image", "send either image (one) or images (a list), not both")
    single = "image" in doc
    images: Any = [doc.pop("image")] if single else doc.pop("images", [])
    pairs = doc.pop("pairs", [])
    if not isinstance(images, list):
        raise RequestError(422, "images", "must be a list of base64 strings")
    if not isinstance(pairs, list):
        raise RequestError(422, "pairs", "must be a list of [base64, base64] pairs")
    _check_counts(len(images), len(pairs), limits)
    for i, p in enumerate(pairs):
        if not isinstance(p, list) or len(p) != 2:
            raise RequestError(422, f"pairs[{i}]", "must be a list of two base64 images [a, b]")
    return ([("image" if single else f"images[{i}]", v) for i, v in enumerate(images)],
            [((f"pairs[{i}][0]", a), (f"pairs[{i}][1]", b)) for i, (a, b) in enumerate(pairs)], doc)


async def _multipart_slots(request: Request, limits: Limits
                           ) -> tuple[list[_Slot], list[tuple[_Slot, _Slot]], dict[str, Any]]:
    # Enough file parts for max_images images plus max_images pairs; beyond that stop parsing early.
    parser = MultiPartParser(request.headers, _limited_stream(request, limits),
                             max_files=3 * limits.max_images, max_fields=1000, max_part_size=1024 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            raise RequestError(413, "images", f"at most {limits.max_images} images (or pairs) per request") from None
        where = "Content-Type" if "boundary" in e.message else "body"
        raise RequestError(400, where, f"malformed multipart/form-data: {e.message}") from None
    uploads: list[tuple[str, bytes]] = []
    fields: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in _FILE_KEYS:
                    raise RequestError(422, name, "unexpected file; send image/images, or image_a/image_b")
                uploads.append((name, await value.read()))  # bounded: the body is capped
            elif name in _FILE_KEYS:
                raise RequestError(422, name, "must be a file upload (curl -F image=@photo.png)")
            elif name in fields:
                raise RequestError(422, name, "given more than once; send each form field once")
            else:
                fields[name] = _form_value(value)
    finally:
        await form.close()
    # Errors name "image" for a lone file, "images[2]" for the third of several.
    total, seen = Counter(n for n, _ in uploads), Counter[str]()
    slots: dict[str, list[_Slot]] = {"images": [], "image_a": [], "image_b": []}
    for name, data in uploads:  # image and images interleave in upload order
        slots["images" if name == "image" else name].append(
            (name if total[name] == 1 else f"{name}[{seen[name]}]", data))
        seen[name] += 1
    a, b = slots["image_a"], slots["image_b"]
    if len(a) != len(b):
        raise RequestError(422, "image_b" if len(b) < len(a) else "image_a",
                           f"got {len(a)} image_a and {len(b)} image_b files; send one image_b per image_a")
    _check_counts(len(slots["images"]), len(a), limits)
    return slots["images"], list(zip(a, b)), fields


def _form_value(s: str) -> Any:
    # Form fields are strings; lists/objects ("[0.5, 1]", '{"smile": 1}') arrive JSON-encoded.
    if s.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(s)
        except (ValueError, RecursionError):
            pass
    return s


def _range(lo: float | None, hi: float | None) -> str:
    lo_, hi_ = -math.inf if lo is None else lo, math.inf if hi is None else hi
    return "" if lo is None and hi is None else f" in [{lo_}, {hi_}]"


def _missing(field: str, default: Any, expect: str) -> Any:
    if default is None:
        raise RequestError(422, field, f"required; {expect}")
    return default


def _check_number(v: Any, field: str, what: str, expect: str, lo: float | None, hi: float | None) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):  # True is an int to Python
        raise RequestError(422, field, f"{expect}; {what} is {json.dumps(v, default=repr)}, not a number")
    try:
        f = float(v)
    except OverflowError:  # an int beyond float range
        f = math.inf
    if not math.isfinite(f) or abs(f) > _F32_MAX:  # models take float32: 1e39 would become inf
        raise RequestError(422, field, f"{expect}; {what} is {v}, not a finite (32-bit) number")
    if (lo is not None and f < lo) or (hi is not None and f > hi):
        raise RequestError(422, field, f"{expect}; {what} is {v}, out of range")
    return f


def _maybe_json(value: Any) -> Any:
    return _form_value(value) if isinstance(value, str) else value


def parse_vector(value: Any, field: str, length: int, lo: float | None = None,
                 hi: float | None = None) -> np.ndarray:
    """A list of exactly `length` finite numbers (or a JSON string of one) -> float32 array."""
    expect = f"must be a list of {length} numbers{_range(lo, hi)}"
    value = _maybe_json(_missing(field, value, expect))
    if not isinstance(value, (list, tuple)):
        raise RequestError(422, field, f"{expect}; got {type(value).__name__}")
    if len(value) != length:
        raise RequestError(422, field, f"{expect}; got {len(value)} items")
    return np.array([_check_number(v, field, f"item {i}", expect, lo, hi) for i, v in enumerate(value)],
                    dtype=np.float32)


def parse_int(value: Any, field: str, lo: int, hi: int, default: int | None = None) -> int:
    """An integer in [lo, hi] (int, integral float, or decimal string); None -> default."""
    expect = f"must be an integer in [{lo}, {hi}]"
    if value is None:
        return _missing(field, default, expect)
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        n = int(value.strip())
    elif isinstance(value, float) and value.is_integer():  # 3.0 from a JSON client
        n = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        raise RequestError(422, field, f"{expect}; got {json.dumps(value, default=repr)}")
    if not lo <= n <= hi:
        raise RequestError(422, field, f"{expect}; got {n}")
    return n


def parse_choice(value: Any, field: str, choices: Sequence[str], default: str | None = None) -> str:
    """One of `choices` (exact string match); None -> default."""
    expect = f"must be one of: {', '.join(choices)}"
    if value is None:
        return _missing(field, default, expect)
    if not isinstance(value, str) or value not in choices:
        raise RequestError(422, field, f"{expect}; got {json.dumps(value, default=repr)}")
    return value


def parse_named_values(value: Any, field: str, names: Sequence[str], lo: float | None,
                       hi: float | None) -> dict[str, float]:
    """A mapping {name: number} (or a JSON string of one), each name one of `names`."""
    expect = f"must be an object {{attribute: number}}{_range(lo, hi)}"
    value = _maybe_json(_missing(field, value, expect))
    if not isinstance(value, Mapping):
        raise RequestError(422, field, f"{expect}; got {type(value).__name__}")
    out: dict[str, float] = {}
    for key, v in value.items():
        if key not in names:
            raise RequestError(422, field, f"unknown attribute {key!r}; valid: {', '.join(names)}")
        out[key] = _check_number(v, field, f"{key!r}", f"values must be numbers{_range(lo, hi)}", lo, hi)
    return out


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def install_handlers(app: FastAPI) -> None:
    """Give every error the app can produce the same JSON body shape (and never a bare traceback)."""
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = list(exc.errors()) or [{"loc": ("body",), "msg": "invalid request"}]
        loc = [str(p) for p in errs[0].get("loc", ())]
        if len(loc) > 1 and loc[0] in ("body", "query", "path", "header", "cookie"):
            loc = loc[1:]  # "k", not "query.k"
        msg = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in errs)
        return error_response(RequestError(422, ".".join(loc) or "body", msg))

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        where = {404: "path", 405: "method"}.get(exc.status_code, "request")
        resp = error_response(RequestError(exc.status_code, where, str(exc.detail)))
        resp.headers.update(exc.headers or {})  # 405 carries Allow
        return resp

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response; log here too in case the host swallows it.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(RequestError(500, "server", "internal error; see the server log"))

    app.add_exception_handler(RequestError, on_request_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
