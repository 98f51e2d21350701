"""serve.schemas: request parsing through a real ASGI app (TestClient), and the value parsers."""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image
from starlette.requests import Request
from starlette.testclient import TestClient

from serve.schemas import (Limits, RequestError, decode_b64_image, decode_image, install_handlers,
                           parse_choice, parse_int, parse_named_values, parse_vector, read_request)

LIMITS = Limits(max_body_bytes=300_000, max_image_bytes=60_000, max_image_side=256, max_images=4,
                max_k=10, max_steps=8)


def encode(w: int = 8, h: int = 6, mode: str = "RGB", fmt: str = "PNG", color: Any = None,
           noise: bool = False) -> bytes:
    if noise:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    else:
        img = Image.new(mode, (w, h), color if color is not None else 0)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header(w: int, h: int) -> bytes:
    """A PNG that is only a signature and an IHDR claiming w x h (no pixel data at all)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


PNG = encode()
JPEG = encode(10, 12, fmt="JPEG", color=(200, 10, 10))
BIG_BYTES = encode(150, 150, noise=True)      # ~67 KB > max_image_bytes
NOISE = encode(40, 40, noise=True)
assert len(BIG_BYTES) > LIMITS.max_image_bytes


def shapes(arrs: list[np.ndarray]) -> list[list[int]]:
    return [list(a.shape) for a in arrs]


def make_app() -> FastAPI:
    app = FastAPI()
    install_handlers(app)

    @app.post("/parse")
    async def parse(request: Request) -> dict:
        p = await read_request(request, LIMITS)
        return {"images": shapes(p.images), "pairs": [shapes(list(pr)) for pr in p.pairs],
                "fields": p.fields}

    @app.post("/edit")
    async def edit(request: Request) -> dict:
        f = (await read_request(request, LIMITS)).fields
        return {"steps": parse_int(f.get("steps"), "steps", 1, LIMITS.max_steps, default=4),
                "direction": parse_vector(f.get("direction"), "direction", 3, -1, 1).tolist(),
                "mode": parse_choice(f.get("mode"), "mode", ["walk", "jump"], "walk"),
                "target": parse_named_values(f.get("target", {}), "target", ["smile", "age"], 0, 1)}

    @app.get("/search")
    def search(k: int) -> dict:
        return {"k": k}

    @app.get("/boom")
    def boom() -> dict:
        raise RuntimeError("secret internals")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


# ---- well-formed requests ----------------------------------------------------------------------

def test_multipart_single_image(client: TestClient) -> None:
    r = client.post("/parse", files={"image": ("a.png", PNG, "image/png")})
    assert r.status_code == 200, r.text
    assert r.json() == {"images": [[6, 8, 3]], "pairs": [], "fields": {}}


def test_multipart_images_keep_upload_order_and_fields(client: TestClient) -> None:
    files = [("images", ("a.png", encode(4, 4), "image/png")), ("image", ("b.jpg", JPEG, "image/jpeg")),
             ("images", ("c.png", encode(5, 7), "image/png"))]
    data = {"k": "3", "direction": "[0.5, 1]", "target": '{"smile": 1}', "note": "[not json"}
    r = client.post("/parse", files=files, data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["images"] == [[4, 4, 3], [12, 10, 3], [7, 5, 3]]
    assert body["fields"] == {"k": "3", "direction": [0.5, 1], "target": {"smile": 1}, "note": "[not json"}


def test_json_base64_plain_and_data_url(client: TestClient) -> None:
    r = client.post("/parse", json={"images": [b64(PNG), "data:image/jpeg;base64," + b64(JPEG)], "k": 5})
    assert r.status_code == 200, r.text
    assert r.json() == {"images": [[6, 8, 3], [12, 10, 3]], "pairs": [], "fields": {"k": 5}}
    r = client.post("/parse", json={"image": "data:image/png;base64," + b64(PNG)})
    assert r.json()["images"] == [[6, 8, 3]]


def test_pairs_json_and_multipart(client: TestClient) -> None:
    r = client.post("/parse", json={"pairs": [[b64(PNG), b64(JPEG)], [b64(JPEG), b64(PNG)]]})
    assert r.status_code == 200, r.text
    assert r.json()["pairs"] == [[[6, 8, 3], [12, 10, 3]], [[12, 10, 3], [6, 8, 3]]]
    files = [("image_a", ("a.png", PNG, "image/png")), ("image_b", ("b.jpg", JPEG, "image/jpeg")),
             ("image_a", ("c.jpg", JPEG, "image/jpeg")), ("image_b", ("d.png", PNG, "image/png"))]
    r = client.post("/parse", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["pairs"] == [[[6, 8, 3], [12, 10, 3]], [[12, 10, 3], [6, 8, 3]]]


def test_chunked_body_within_limit(client: TestClient) -> None:
    payload = json.dumps({"image": b64(PNG)}).encode()
    r = client.post("/parse", content=iter([payload[:10], payload[10:]]),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def test_edit_fields_parse(client: TestClient) -> None:
    r = client.post("/edit", json={"steps": 3, "direction": [0.5, -1, 0], "target": {"age": 0.25}})
    assert r.json() == {"steps": 3, "direction": [0.5, -1, 0], "mode": "walk", "target": {"age": 0.25}}
    r = client.post("/edit", files={"image": ("a.png", PNG, "image/png")},
                    data={"steps": "8", "direction": "[1, 0, 0]", "mode": "jump"})
    assert r.json() == {"steps": 8, "direction": [1, 0, 0], "mode": "jump", "target": {}}


# ---- malformed requests: every one a 4xx JSON error naming the field ----------------------------

def _mp(*files: tuple[str, bytes], **data: str) -> dict:
    return {"files": [(name, (f"f{i}.png", blob, "image/png")) for i, (name, blob) in enumerate(files)],
            "data": data}


BAD: list[tuple[str, str, dict, int, str]] = [
    # id, path, httpx kwargs, status, field
    ("text/plain", "/parse", {"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
    ("no content type", "/parse", {"content": b"x"}, 415, "Content-Type"),
    ("urlencoded", "/parse", {"data": {"a": "b"}}, 415, "Content-Type"),
    ("invalid json", "/parse", {"content": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, "body"),
    ("empty json", "/parse", {"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "body"),
    ("json array", "/parse", {"json": [b64(PNG)]}, 400, "body"),
    ("deep json", "/parse", {"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}},
     400, "body"),
    ("content-length over", "/parse", {"json": {"x": "a" * 300_001}}, 413, "body"),
    ("chunked over", "/parse", {"content": iter([b'{"x": "', b"a" * 300_001, b'"}']),
                                "headers": {"Content-Type": "application/json"}}, 413, "body"),
    ("bad base64", "/parse", {"json": {"image": "!!!notbase64"}}, 400, "image"),
    ("bad data url", "/parse", {"json": {"image": "data:image/png," + b64(PNG)}}, 400, "image"),
    ("image not str", "/parse", {"json": {"image": 42}}, 422, "image"),
    ("empty image", "/parse", {"json": {"image": ""}}, 400, "image"),
    ("image and images", "/parse", {"json": {"image": b64(PNG), "images": [b64(PNG)]}}, 422, "image"),
    ("images not list", "/parse", {"json": {"images": b64(PNG)}}, 422, "images"),
    ("too many images", "/parse", {"json": {"images": [b64(PNG)] * 5}}, 413, "images"),
    ("undecodable", "/parse", {"json": {"images": [b64(PNG), b64(b"hello world")]}}, 415, "images[1]"),
    ("image bytes over", "/parse", {"json": {"image": b64(BIG_BYTES)}}, 413, "image"),
    ("image side over", "/parse", {"json": {"image": b64(encode(300, 2))}}, 413, "image"),
    ("bomb header", "/parse", {"json": {"image": b64(png_header(100_000, 100_000))}}, 413, "image"),
    ("truncated png", "/parse", {"json": {"image": b64(NOISE[:len(NOISE) // 2])}}, 400, "image"),
    ("pairs not list", "/parse", {"json": {"pairs": "x"}}, 422, "pairs"),
    ("pair of one", "/parse", {"json": {"pairs": [[b64(PNG)]]}}, 422, "pairs[0]"),
    ("pair bad member", "/parse", {"json": {"pairs": [[b64(PNG), b64(PNG)], [b64(PNG), 7]]}}, 422, "pairs[1][1]"),
    ("too many pairs", "/parse", {"json": {"pairs": [[b64(PNG), b64(PNG)]] * 5}}, 413, "pairs"),
    ("mp unequal pairs", "/parse", _mp(("image_a", PNG), ("image_a", PNG), ("image_b", PNG)), 422, "image_b"),
    ("mp too many images", "/parse", _mp(*[("images", PNG)] * 5), 413, "images"),
    ("mp too many files", "/parse", _mp(*[("image_a", PNG)] * 13), 413, "images"),
    ("mp unknown file", "/parse", _mp(("photo", PNG)), 422, "photo"),
    ("mp image as text", "/parse", {"files": {"images": ("a.png", PNG)}, "data": {"image": b64(PNG)}}, 422, "image"),
    ("mp undecodable", "/parse", _mp(("image", b"GIF89a-not-really")), 415, "image"),
    ("mp second bad", "/parse", _mp(("images", PNG), ("images", b"\x00" * 10)), 415, "images[1]"),
    ("mp empty file", "/parse", _mp(("image", b"")), 400, "image"),
    ("mp file over", "/parse", _mp(("image", BIG_BYTES)), 413, "image"),
    ("mp chunked over", "/parse", {"content": iter([
        b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n', b"x" * 300_001,
        b"\r\n--zz--\r\n"]), "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}, 413, "body"),
    ("image null", "/parse", {"json": {"image": None}}, 422, "image"),
    ("mp no boundary", "/parse", {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
     400, "Content-Type"),
    ("mp garbage", "/parse", {"content": b"garbage", "headers": {"Content-Type": "multipart/form-data; boundary=zz"}},
     400, "body"),
    ("mp duplicate field", "/parse", {"files": {"image": ("a.png", PNG)}, "data": {"k": ["1", "2"]}}, 422, "k"),
    ("steps 3.5 string", "/edit", {"json": {"steps": "3.5", "direction": [0, 0, 0]}}, 422, "steps"),
    ("steps bool", "/edit", {"json": {"steps": True, "direction": [0, 0, 0]}}, 422, "steps"),
    ("steps over", "/edit", {"json": {"steps": 9, "direction": [0, 0, 0]}}, 422, "steps"),
    ("direction missing", "/edit", {"json": {}}, 422, "direction"),
    ("direction short", "/edit", {"json": {"direction": [0, 0]}}, 422, "direction"),
    ("direction NaN", "/edit", {"content": b'{"direction": [0, NaN, 0]}',
                                "headers": {"Content-Type": "application/json"}}, 422, "direction"),
    ("direction form range", "/edit", _mp(("image", PNG), direction="[0.5, 2, 0]"), 422, "direction"),
    ("mode unknown", "/edit", {"json": {"direction": [0, 0, 0], "mode": "fly"}}, 422, "mode"),
    ("target unknown", "/edit", {"json": {"direction": [0, 0, 0], "target": {"beard": 1}}}, 422, "target"),
    ("query not int", "/search?k=abc", {}, 422, "k"),
    ("query missing", "/search", {}, 422, "k"),
    ("no route", "/nowhere", {}, 404, "path"),
    ("wrong method", "/parse?get", {}, 405, "method"),
]


@pytest.mark.parametrize("path,kwargs,status,field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_request(client: TestClient, path: str, kwargs: dict, status: int, field: str) -> None:
    method = "GET" if path.startswith(("/search", "/nowhere")) or path.endswith("?get") else "POST"
    r = client.request(method, path.removesuffix("?get"), **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["status"], err["field"]) == (status, field), err
    assert err["message"]


def test_unexpected_error_is_500_json_without_traceback(client: TestClient) -> None:
    r = client.get("/boom")
    assert r.status_code == 500
    assert r.json()["error"]["field"] == "server"
    assert "secret" not in r.text and "Traceback" not in r.text


def test_405_keeps_allow_header(client: TestClient) -> None:
    assert "POST" in client.get("/parse").headers.get("allow", "")


# ---- images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,color", [("L", 77), ("RGBA", (10, 20, 30, 0)), ("P", 3), ("1", 1),
                                        ("LA", (50, 128)), ("I;16", 200)])
def test_decode_converts_to_rgb(mode: str, color: Any) -> None:
    a = decode_image(encode(5, 3, mode=mode, color=color), "image", LIMITS)
    assert a.shape == (3, 5, 3) and a.dtype == np.uint8
    if mode == "L":
        assert (a == 77).all()
    if mode == "RGBA":  # alpha dropped, colour kept (as convert("RGB") in the shard pipeline)
        assert a[0, 0].tolist() == [10, 20, 30]


def test_decode_jpeg_webp_bmp_and_first_gif_frame() -> None:
    assert decode_image(JPEG, "image", LIMITS).shape == (12, 10, 3)
    for fmt in ("WEBP", "BMP"):
        assert decode_image(encode(4, 2, fmt=fmt), "image", LIMITS).shape == (2, 4, 3)
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    a = decode_image(buf.getvalue(), "image", LIMITS)
    assert a.shape == (4, 4, 3) and a[0, 0, 0] > 200 and a[0, 0, 2] < 50


def test_decode_refuses_eps_and_names_formats() -> None:
    with pytest.raises(RequestError) as e:
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "image", LIMITS)
    assert e.value.status == 415 and "PNG" in e.value.message and "JPEG" in e.value.message


@pytest.mark.parametrize("w,h", [(100_000, 100_000), (5000, 5000), (1, 50_000)])
def test_bomb_header_is_413_before_decoding(w: int, h: int) -> None:
    with pytest.raises(RequestError) as e:
        decode_image(png_header(w, h), "img", Limits())
    assert (e.value.status, e.value.field) == (413, "img")


def test_pil_pixel_limit_also_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(RequestError) as e:
        decode_image(encode(20, 20), "image", Limits())
    assert e.value.status == 413


def test_b64_variants() -> None:
    raw = base64.b64encode(encode(3, 3)).decode()
    wrapped = "\n".join(raw[i:i + 20] for i in range(0, len(raw), 20))
    unpadded_urlsafe = base64.urlsafe_b64encode(encode(3, 3)).decode().rstrip("=")
    for v in (raw, wrapped, unpadded_urlsafe, "DATA:image/png;BASE64," + raw):
        assert decode_b64_image(v, "image", LIMITS).shape == (3, 3, 3)
    with pytest.raises(RequestError) as e:
        decode_b64_image(b"bytes", "image", LIMITS)
    assert e.value.status == 422


# ---- value parsers -----------------------------------------------------------------------------

def _err(fn, *args, **kw) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args, **kw)
    assert e.value.status == 422
    return e.value


def test_parse_vector() -> None:
    v = parse_vector([1, 0.5, -2], "d", 3)
    assert v.dtype == np.float32 and v.tolist() == [1, 0.5, -2]
    assert parse_vector("[0, 1]", "d", 2, 0, 1).tolist() == [0, 1]
    assert parse_vector((0, 1), "d", 2).tolist() == [0, 1]
    for bad, needle in [([0, float("nan")], "item 1"), ([float("inf"), 0], "item 0"), ([0, 10 ** 400], "item 1"),
                        ([0, 1e39], "item 1"), ([True, 0], "item 0"), ([0, "1"], "item 1"), ([0, None], "item 1"),
                        ([0], "got 1 items"), ([0, 0, 0], "got 3 items"), ("0,1", "got str"), (None, "required"),
                        ({"a": 1}, "got dict"), ("[0, 1", "got str"), ([0, 1.5], "item 1")]:
        e = _err(parse_vector, bad, "d", 2, -1, 1)
        assert e.field == "d" and "2 numbers in [-1, 1]" in e.message and needle in e.message, (bad, e.message)
    assert "in [0, inf]" in _err(parse_vector, [-1], "d", 1, 0, None).message


def test_parse_int() -> None:
    assert parse_int(None, "k", 1, 10, default=5) == 5
    assert parse_int("7", "k", 1, 10) == 7 and parse_int(" 7 ", "k", 1, 10) == 7
    assert parse_int(3.0, "k", 1, 10) == 3 and parse_int(10, "k", 1, 10) == 10
    assert "required" in _err(parse_int, None, "k", 1, 10).message
    for bad in ("3.5", 3.5, True, False, "1_0", "", "ten", "٣", [3], float("nan"), float("inf"), 0, 11, "11",
                "9" * 5000):
        e = _err(parse_int, bad, "k", 1, 10)
        assert e.field == "k" and "[1, 10]" in e.message


def test_parse_choice() -> None:
    assert parse_choice(None, "m", ["a", "b"], "a") == "a"
    assert parse_choice("b", "m", ["a", "b"]) == "b"
    assert "a, b" in _err(parse_choice, "c", "m", ["a", "b"]).message
    _err(parse_choice, 1, "m", ["a", "b"])
    _err(parse_choice, None, "m", ["a", "b"])


def test_parse_named_values() -> None:
    names = ["smile", "age"]
    assert parse_named_values({"age": 1, "smile": 0.5}, "t", names, 0, 1) == {"age": 1.0, "smile": 0.5}
    assert parse_named_values('{"smile": 0}', "t", names, None, None) == {"smile": 0.0}
    assert parse_named_values({}, "t", names, 0, 1) == {}
    assert "valid: smile, age" in _err(parse_named_values, {"beard": 1}, "t", names, 0, 1).message
    for bad in ({"age": 2}, {"age": float("nan")}, {"age": True}, {"age": "1"}, {"age": float("-inf")},
                [("age", 1)], "age=1", None):
        assert _err(parse_named_values, bad, "t", names, 0, 1).field == "t"


def test_limits_from_dict_and_error_body() -> None:
    assert Limits.from_dict({"max_k": 5}) == Limits(max_k=5)
    for bad, key in [({"max_kk": 5}, "max_kk"), ({"max_k": 0}, "max_k"), ({"max_k": -1}, "max_k"),
                     ({"max_k": 2.5}, "max_k"), ({"max_k": True}, "max_k"), ({"max_k": "5"}, "max_k")]:
        with pytest.raises(ValueError, match=key):
            Limits.from_dict(bad)
    assert RequestError(413, "image", "too big").body() == {
        "error": {"status": 413, "field": "image", "message": "too big"}}


def test_the_pixels_of_all_images_together_are_capped() -> None:
    from fastapi import FastAPI, Request
    from starlette.testclient import TestClient

    from serve.schemas import Limits, install_handlers, read_request

    app = FastAPI()
    install_handlers(app)
    limits = Limits(max_total_pixels=3 * 32 * 32)

    @app.post("/p")
    async def p(request: Request) -> dict:
        return {"n": len((await read_request(request, limits)).images)}

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format="PNG")
    one = base64.b64encode(buf.getvalue()).decode()
    client = TestClient(app)
    assert client.post("/p", json={"images": [one] * 3}).json() == {"n": 3}
    r = client.post("/p", json={"images": [one] * 4})
    assert r.status_code == 413 and r.json()["error"]["field"] == "images[3]"
