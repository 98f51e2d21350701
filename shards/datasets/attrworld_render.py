"""The attrworld renderer: one face-like RGB image from (seed, identity, image index, attributes, cfg).

Everything is drawn as polygons in *face coordinates* (head centre at the origin, y down, head
half-height 1), mapped to a 4x supersampled canvas by one similarity transform (pose rotation,
scale, position), then box-downsampled, blurred, lit, noised and encoded. Because the geometry of
every attribute is a continuous function of its strength and the canvas is supersampled, a small
change of an attribute value changes the pixels a little, and only inside that attribute's region.

Randomness: identity traits come from default_rng([seed, 11, identity]), ground-truth attribute
values (used by the plan, stored in the spec) from default_rng([seed, 12, identity, image]), and
pose, lighting, colours, clutter and noise from one default_rng([seed, 13, identity, image])
stream drawn in a fixed order that never looks at attribute values, so re-rendering a spec with
one attribute changed is an exact "edit" of the same image.

Speed: every part is affine in the per-image variables, so an identity's drawing is cached as a
linear template (_template) and one matrix product gives all polygon points of an image.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from shards.datasets.attrworld_parts import (
    VARS, _brows, _col, _ears, _eye_h, _eye_region, _eyes, _glasses, _hair, _hat, _jaw, _mix, _mouth, _nose, _outline,
    _unit_circle, _width,
)

GENERATOR_VERSION = "attrworld/1"
SUPERSAMPLE = 4

SHAPES = ("oval", "square", "heart", "diamond")
EARS = ("round", "pointed")
HAIR_STYLES = ("short", "long", "bob", "spiky")
CATEGORIES = tuple(f"{s}-{e}" for s in SHAPES for e in EARS)
CONTINUOUS = ("smile", "eye_open", "brow_thick", "hair_dark", "beard", "nose_size", "face_width")
EXPRESSIONS = ("smile", "eye_open")  # broad per-image variation; the others are identity traits
BINARY = ("glasses", "hat")
# attribute -> named region whose box is stored per sample (face_width is global: no box)
REGION_OF = {
    "smile": "mouth", "eye_open": "eyes", "brow_thick": "brows", "hair_dark": "hair",
    "beard": "jaw", "nose_size": "nose", "glasses": "glasses", "hat": "hat", "hair_style": "hair",
}

_SKIN = np.array([(255, 226, 200), (240, 200, 160), (226, 176, 120), (200, 140, 90),
                  (150, 98, 62), (100, 66, 46)], float)
_HAIR = np.array([(238, 206, 140), (214, 120, 66), (180, 130, 88), (205, 200, 195),
                  (176, 150, 110), (150, 100, 70)], float)  # light versions; hair_dark darkens
_IRIS = np.array([(95, 60, 35), (70, 110, 170), (80, 130, 80), (120, 125, 130), (45, 35, 30)], float)



# the visual strength that subtlety shrinks towards: 0 for presence-like attributes, else the middle
ANCHOR = {"beard": 0.0}


def effective(attr: str, value: float, subtlety: float) -> float:
    """Visual strength in [0, 1] of an attribute value: subtlety shrinks the range towards ANCHOR."""
    c = ANCHOR.get(attr, 0.5)
    return c + (float(value) - c) * (1.0 - subtlety)


# ----------------------------------------------------------------------------------------------
# identity traits

@lru_cache(maxsize=4096)
def identity_params(seed: int, ident: int) -> dict[str, Any]:
    """Fixed nuisance parameters and base attribute levels of one identity (cached, read-only)."""
    r = np.random.default_rng([int(seed), 11, int(ident)])
    u = r.random(40)
    g = r.random((150, 3))  # beard stipple candidates: x, y, threshold
    t = u[2] * (len(_SKIN) - 1)
    i = min(int(t), len(_SKIN) - 2)
    skin = _mix(_SKIN[i], _SKIN[i + 1], t - i) + (u[3:6] - 0.5) * 16
    hair = _HAIR[int(u[6] * len(_HAIR)) % len(_HAIR)] + (u[7:10] - 0.5) * 24
    return {
        "shape": int(u[0] * 4) % 4,
        "ear": int(u[1] * 2) % 2,
        "skin": skin,
        "hair": hair,
        "brow": hair * 0.35 + 10,
        "beard": hair * 0.45,
        "lip": _mix(skin, (160, 45, 60), 0.6),
        "iris": _IRIS[int(u[10] * len(_IRIS)) % len(_IRIS)],
        "hair_style": int(u[11] * 4) % 4,
        "hair_vol": 0.06 + 0.10 * u[12],
        "part": (u[13] - 0.5) * 0.3,
        "eye_x": 0.33 + 0.05 * (u[14] - 0.5),
        "eye_y": -0.10 + 0.05 * (u[15] - 0.5),
        "brow_off": 0.17 + 0.03 * (u[16] - 0.5),
        "mouth_y": 0.52 + 0.05 * (u[17] - 0.5),
        "nose_y": 0.20 + 0.03 * (u[18] - 0.5),
        "glasses_col": _mix((20, 20, 25), (140, 90, 40), u[19]),
        "glasses": bool(u[20] < 0.3),
        "base": {a: float(u[21 + k]) for k, a in enumerate(CONTINUOUS)},
        "stipple": g,
    }


def image_attributes(seed: int, ident: int, img: int) -> dict[str, Any]:
    """Ground-truth attribute values of one image (identity base + per-image variation)."""
    p = identity_params(seed, ident)
    r = np.random.default_rng([int(seed), 12, int(ident), int(img)])
    u = r.random(len(CONTINUOUS) + 4)
    z = r.standard_normal(len(CONTINUOUS))
    out: dict[str, Any] = {}
    for k, a in enumerate(CONTINUOUS):
        base = p["base"][a]
        if a in EXPRESSIONS:
            v = 0.3 * base + 0.7 * u[k]
        else:
            v = base + 0.04 * z[k]
        out[a] = round(float(min(1.0, max(0.0, v))), 4)
    out["glasses"] = int(p["glasses"] != bool(u[-1] < 0.08))
    out["hat"] = int(u[-2] < 0.2)
    out["hair_style"] = p["hair_style"]
    return out



@lru_cache(maxsize=4096)
def _stipple(seed: int, ident: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Beard stipple dots of an identity: x / head half-width, y, appearance threshold."""
    p = identity_params(seed, ident)
    g, shape = p["stipple"], p["shape"]
    w15 = float(_width(shape, np.array([0.15]))[0]) * 0.97
    xn, ys = g[:, 0] * 2 - 1, 0.15 + g[:, 1] * 0.83
    inside = (ys > 0.16 + 0.22 * (1 - xn ** 2)) & (np.abs(xn) * w15 < _width(shape, ys) * 0.92)
    keep = np.flatnonzero(inside)[:40]
    return xn[keep] * w15, ys[keep], g[keep, 2]




def _geometry(p: dict, v: Mapping[str, Any], rs: float) -> list:
    """The drawing of one identity, back to front: [(kind, points, colour, tag)].

    kind: poly | line | dots | iris (iris/pupil, computed per image); colour: an RGB tuple or a
    per-image key (shirt, hair, beard, hat, hat_brim, hat_band); tag: '' or an optional
    accessory (glasses, hat) or the eye index of an iris.
    """
    a = v["a"]
    skin = _col(p["skin"])
    xs, ys, _ = _stipple(p["seed"], p["ident"])
    back, front = _hair(p, a)
    torso = np.stack([a * np.array([-1.7, -0.5, 0.5, 1.7, 1.9, -1.9]), np.array([1.3, 1.1, 1.1, 1.3, 3.2, 3.2])], 1)
    neck = np.array([(-0.3, 0.5), (0.3, 0.5), (0.33, 1.25), (-0.33, 1.25)])
    out = [("poly", torso, "shirt", ""), ("poly", neck, _col(p["skin"] * 0.88), "")]
    out += [("poly", b, "hair", "") for b in back]
    out += _ears(p, a)
    out.append(("poly", _outline(p["shape"], a), skin, ""))
    out.append(("poly", _jaw(p, a), "beard", ""))
    out.append(("dots", np.stack([a * xs, ys], 1), None, ""))
    out += _nose(p, v, rs)
    out += _mouth(p, v, rs)
    out += _eyes(p, v, rs)
    out += _brows(p, v, rs)
    out += [("poly", f, "hair", "") for f in front]
    out += _glasses(p, a, rs)
    out += _hat(a)
    return out


@lru_cache(maxsize=512)
def _template(seed: int, ident: int, rs: float):
    """(items [(kind, start, stop, colour, tag)], coefficients C (n, 2, 1 + len(VARS)))."""
    p = dict(identity_params(seed, ident), seed=seed, ident=ident)
    zero = {k: 0.0 for k in VARS}
    base = _geometry(p, zero, rs)
    cols = [np.concatenate([q for _, q, _, _ in base])]
    for k in VARS:
        g = _geometry(p, dict(zero, **{k: 1.0}), rs)
        cols.append(np.concatenate([q for _, q, _, _ in g]) - cols[0])
    C = np.stack(cols, -1)
    items, n = [], 0
    for kind, q, colour, tag in base:
        items.append((kind, n, n + len(q), colour, tag))
        n += len(q)
    C.setflags(write=False)
    return tuple(items), C


def _mouth_open(e: float) -> float:
    """Mouth opening (teeth showing) of a smile strength: 0 up to 0.4, then linear to 1."""
    return max(0.0, e - 0.4) / 0.6


def _variables(eff: Mapping[str, float]) -> np.ndarray:
    e = eff["smile"]
    return np.array([1.0, 0.70 + 0.26 * eff["face_width"], e, _mouth_open(e),
                     eff["eye_open"], eff["brow_thick"], eff["nose_size"]])


@lru_cache(maxsize=4096)
def _feature_regions(seed: int, ident: int, rs: float, sub: float) -> dict[str, np.ndarray]:
    """Face-coordinate extents of the regions that do not depend on the head width: the
    geometry at both ends of the visual range and at the mouth opening's kink (every point is
    piecewise affine in the attribute, so its extremes lie among these)."""
    p = identity_params(seed, ident)
    out = {"eyes": _eye_region(p, rs)}
    ends = []
    lo_s, hi_s = effective("smile", 0.0, sub), effective("smile", 1.0, sub)
    for val, es in ((0.0, lo_s), (1.0, hi_s), (0.5, min(max(0.4, lo_s), hi_s))):  # + the opening's kink
        e = {a: effective(a, val, sub) for a in CONTINUOUS}
        ends.append({"es": es, "os": _mouth_open(es), "ee": e["eye_open"],
                     "eb": e["brow_thick"], "en": e["nose_size"], "a": 0.0})
    for reg, fn in (("mouth", _mouth), ("brows", _brows), ("nose", _nose)):
        pts = np.concatenate([q for v in ends for _, q, _, _ in fn(p, v, rs)])
        lo, hi = pts.min(0), pts.max(0)
        out[reg] = np.array([lo, hi, (lo[0], hi[1]), (hi[0], lo[1])])
    return out


def _irises(p: dict, ee: float, rs: float, gaze: tuple[float, float]) -> np.ndarray:
    """(4, 16, 2): iris and pupil of each eye, clipped to the eye opening."""
    ew, h = 0.15 * rs, _eye_h(ee, rs)
    circ = _unit_circle(16)
    out = []
    for side in (-1, 1):
        cx, cy = side * p["eye_x"], p["eye_y"]
        for rad in (0.065 * rs, 0.028 * rs):
            c = circ * rad + (cx + gaze[0] * rs, cy + gaze[1] * rs)
            q = np.clip((c[:, 0] - cx) / ew, -1, 1)
            pr = 1 - q * q
            c[:, 1] = np.clip(c[:, 1], cy - h * pr, cy + 0.75 * h * pr)
            out.append(c)
    return np.stack(out)


# ----------------------------------------------------------------------------------------------
# clutter

def _clutter(draw: ImageDraw.ImageDraw, r: np.random.Generator, S: int, n: int) -> None:
    if n <= 0:
        return
    U = r.random((n, 16)).tolist()
    C = r.integers(0, 256, (n, 6)).tolist()
    for u, c in zip(U, C):
        kind = u[0]
        cx, cy = u[1] * S, u[2] * S
        w, h = (0.05 + 0.35 * u[3]) * S, (0.05 + 0.35 * u[4]) * S
        col = (c[0], c[1], c[2])
        if kind < 0.15:  # face-coloured blob, sometimes with two dark "eyes"
            t = u[5] * (len(_SKIN) - 1)
            i = min(int(t), len(_SKIN) - 2)
            sk = _col(_mix(_SKIN[i], _SKIN[i + 1], t - i) + (np.array(u[6:9]) - 0.5) * 30)
            draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=sk)
            if u[9] < 0.5:
                for sd in (-1, 1):
                    ex, ey, er = cx + sd * w * 0.2, cy - h * 0.1, max(1.0, w * 0.05)
                    draw.ellipse([ex - er, ey - er * 0.6, ex + er, ey + er * 0.6], fill=(40, 30, 30))
        elif kind < 0.4:
            draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=col)
        elif kind < 0.6:
            th = u[5] * math.pi
            co, si = math.cos(th), math.sin(th)
            pts = [(cx + co * x - si * y, cy + si * x + co * y) for x, y in
                   ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))]
            draw.polygon(pts, fill=col)
        elif kind < 0.75:
            pts = [(cx + (u[5 + 2 * k] - 0.5) * w * 1.5, cy + (u[6 + 2 * k] - 0.5) * h * 1.5) for k in range(3)]
            draw.polygon(pts, fill=col)
        elif kind < 0.92:  # stripe texture patch
            th = u[5] * math.pi
            co, si = math.cos(th), math.sin(th)
            gap = max(3.0, (0.015 + 0.03 * u[6]) * S)
            lw = max(1, int(gap * (0.3 + 0.4 * u[7])))
            col2 = (c[3], c[4], c[5])
            for k in range(int(min(w, 0.3 * S) / gap) + 1):
                off = -w / 2 + k * gap
                draw.line([(cx + co * off - si * h / 2, cy + si * off + co * h / 2),
                           (cx + co * off + si * h / 2, cy + si * off - co * h / 2)], fill=col2, width=lw)
        else:
            draw.line([(cx - w, cy - h), (cx + w, cy + h)], fill=col, width=max(1, int(0.01 * S * (1 + 3 * u[5]))))


# ----------------------------------------------------------------------------------------------
# the renderer

@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size) - np.float32(0.5)
    return xx, yy


def render(seed: int, ident: int, img: int, attrs: Mapping[str, Any], cfg: Mapping[str, Any]):
    """-> (uint8 HxWx3 array, boxes {attribute: (x0, y0, x1, y1)} normalised, extra dict)."""
    seed, ident, img = int(seed), int(ident), int(img)
    size = int(cfg["size"])
    S = size * SUPERSAMPLE
    sub = float(cfg["subtlety"])
    rs = float(cfg["region_scale"])
    p = identity_params(seed, ident)
    eff = {a: effective(a, attrs[a], sub) for a in CONTINUOUS}

    # one stream per image, drawn in a fixed order that never depends on attribute values:
    # pose/lighting/colours (24 uniforms), then clutter, then pixel noise
    r = np.random.default_rng([seed, 13, ident, img])
    u = r.random(24).tolist()
    fmin, fmax = cfg["face_scale"]
    f = fmin + (fmax - fmin) * u[0]
    unit = f * S / 2.0  # head half-height in supersampled px
    rot = math.radians(float(cfg["rotation"]) * (2 * u[1] - 1))
    cx = S * (0.55 * f + (1 - 1.1 * f) * u[2])
    cy = S * (0.70 * f + (1 - 1.25 * f) * u[3])
    c, s_ = math.cos(rot) * unit, math.sin(rot) * unit
    MT = np.array([[c, s_], [-s_, c]])  # transposed rotation-scale: row points @ MT
    off = np.array([cx, cy])
    gaze = ((u[4] - 0.5) * 0.06, (u[5] - 0.5) * 0.03)
    hat_col = np.array([v * 220 + 20 for v in u[9:12]])
    beard_fill = _mix(p["skin"], p["beard"], 0.7 * eff["beard"])
    colours = {
        "shirt": _col([v * 255 for v in u[6:9]]),
        "hair": _col(p["hair"] * (1 - 0.85 * eff["hair_dark"])),
        "beard": _col(beard_fill),
        "hat": _col(hat_col), "hat_brim": _col(hat_col * 0.7), "hat_band": _col(_mix(hat_col, (255, 255, 255), 0.35)),
    }
    bg = _col([v * 255 for v in u[12:15]])
    L = float(cfg["lighting"])
    gain0 = 1 + L * 0.25 * (2 * u[15] - 1)
    grad = L * 0.5 * u[16]
    gdir = 2 * math.pi * u[17]
    tint = np.array([1 + L * 0.08 * (2 * v - 1) for v in u[18:21]], np.float32)
    blur_sigma = float(cfg["blur"]) * u[21]
    noise_std = float(cfg["noise"]) * 255 * (0.5 + u[22])
    n_clutter = int(round(float(cfg["clutter"]) * (0.5 + u[23])))

    im = Image.new("RGB", (S, S), bg)
    draw = ImageDraw.Draw(im)
    _clutter(draw, r, S, n_clutter)

    items, C = _template(seed, ident, rs)
    pts = C @ _variables(eff)  # (n, 2) face coordinates
    q = pts @ MT + off
    flat = q.ravel().tolist()
    irises = None
    show = {"": True, "glasses": bool(attrs.get("glasses")), "hat": bool(attrs.get("hat")), "0": True, "1": True}
    gw = max(1, int(round(0.03 * unit)))
    for kind, i0, i1, colour, tag in items:
        if not show[tag]:
            continue
        if kind == "poly":
            draw.polygon(flat[2 * i0:2 * i1], fill=colours[colour] if isinstance(colour, str) else colour)
        elif kind == "line":
            draw.line(flat[2 * i0:2 * i1], fill=colour, width=gw, joint="curve")
        elif kind == "dots":
            xs, ys, th = _stipple(seed, ident)
            al = np.clip((eff["beard"] - 0.9 * th) * 5.0, 0.0, 1.0)
            rad = 0.022 * unit
            dcols = (beard_fill[None, :] * (1 - al[:, None]) + (p["beard"] * 0.6)[None, :] * al[:, None]).round()
            for k, (on, dc) in enumerate(zip((al > 0).tolist(), dcols.astype(int).tolist())):
                if on:
                    x, y = flat[2 * (i0 + k)], flat[2 * (i0 + k) + 1]
                    draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=tuple(dc))
        else:  # iris + pupil of eye `tag`
            if irises is None:
                irises = (_irises(p, eff["eye_open"], rs, gaze) @ MT + off).tolist()
            e = int(tag)
            draw.polygon([tuple(xy) for xy in irises[2 * e]], fill=_col(p["iris"]))
            draw.polygon([tuple(xy) for xy in irises[2 * e + 1]], fill=(15, 12, 12))

    # region boxes (value-independent extents), normalised to the output image
    regions = dict(_feature_regions(seed, ident, rs, sub))
    spans = {"jaw": [], "hair": [], "glasses": [], "hat": []}
    for kind, i0, i1, colour, tag in items:
        if tag in spans:
            spans[tag].append(q[i0:i1])
        elif colour == "beard":
            spans["jaw"].append(q[i0:i1])
        elif colour == "hair":
            spans["hair"].append(q[i0:i1])
    pad = {"glasses": gw / 2 + 1, "jaw": 0.03 * unit + 1}
    boxes = {}
    for attr, reg in REGION_OF.items():
        rq = np.concatenate(spans[reg]) if reg in spans else regions[reg] @ MT + off
        m = pad.get(reg, 1.0)
        lo, hi = (rq.min(0) - m).tolist(), (rq.max(0) + m).tolist()
        boxes[attr] = tuple(round(min(1.0, max(0.0, v / S)), 5) for v in (lo[0], lo[1], hi[0], hi[1]))

    im = im.reduce(SUPERSAMPLE)
    if blur_sigma > 0.05:
        im = im.filter(ImageFilter.GaussianBlur(blur_sigma))
    arr = np.asarray(im, dtype=np.float32)
    xx, yy = _grid(size)
    light = np.float32(gain0) * (1 + np.float32(grad) * (np.float32(math.cos(gdir)) * xx + np.float32(math.sin(gdir)) * yy))
    arr = arr * light[..., None] * tint
    if noise_std > 0:
        arr += r.standard_normal(arr.shape, dtype=np.float32) * np.float32(noise_std)
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    extra = {"rotation_deg": round(math.degrees(rot), 3), "face_scale": round(f, 4),
             "centre": [round(cx / S, 4), round(cy / S, 4)], "blur_sigma": round(blur_sigma, 4),
             "noise_std": round(noise_std, 3), "clutter_shapes": n_clutter}
    return out, boxes, extra
