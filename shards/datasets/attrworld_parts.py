"""attrworld's face parts: polygons in face coordinates (head centre at the origin, y down, head
half-height 1) as affine functions of the per-image variables; the renderer
(attrworld_render.py) caches an identity's drawing of them as a linear template.

Split out of attrworld_render.py to keep files short; the drawing is unchanged (the default
build's manifest checksum is the same).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

_S = -np.cos(np.linspace(0.0, math.pi, 25))  # head outline sample heights, dense near crown/chin

# ----------------------------------------------------------------------------------------------
# small geometry helpers (all arrays are (N, 2) face coordinates)


def _col(c: Any) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, int(round(float(v))))) for v in c)
    return r, g, b


def _mix(a: Any, b: Any, t: float) -> np.ndarray:
    return np.asarray(a, float) * (1.0 - t) + np.asarray(b, float) * t


def _band(p: np.ndarray, half: Any) -> np.ndarray:
    """Polygon of a thick polyline: p offset by +-half along its normals."""
    d = np.gradient(p, axis=0)
    n = np.stack([-d[:, 1], d[:, 0]], 1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
    h = np.asarray(half, float).reshape(-1, 1)
    return np.concatenate([p + n * h, (p - n * h)[::-1]])


@lru_cache(maxsize=None)
def _unit_circle(n: int) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    c = np.stack([np.cos(t), np.sin(t)], 1)
    c.setflags(write=False)
    return c


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 20) -> np.ndarray:
    return _unit_circle(n) * (rx, ry) + (cx, cy)


def _width(shape: int, s: np.ndarray) -> np.ndarray:
    """Head half-width profile (fraction of the half-width a) at height s in [-1, 1]."""
    s = np.clip(s, -1.0, 1.0)
    if shape == 0:  # oval
        return np.sqrt(1 - s * s)
    if shape == 1:  # square (superellipse)
        return (1 - s ** 4) ** 0.25
    if shape == 2:  # heart: broad forehead, narrow pointed chin
        return np.where(s < 0, (1 - s ** 4) ** 0.25, np.sqrt(1 - s * s) * (1 - 0.4 * np.maximum(s, 0)))
    return (1 - np.abs(s) ** 1.6) ** 0.75  # diamond: wide cheekbones, narrow crown and chin


def _outline(shape: int, a: float, s: np.ndarray = _S) -> np.ndarray:
    w = a * _width(shape, s)
    right = np.stack([w, s], 1)
    left = np.stack([-w[::-1], s[::-1]], 1)
    return np.concatenate([right, left])
# ----------------------------------------------------------------------------------------------
# geometry. Every part is an affine function of the per-image variables
#   a  (head half-width, from face_width)   es (smile)   os (mouth opening, from smile)
#   ee (eye_open)   eb (brow_thick)   en (nose_size)
# so an identity's whole drawing is cached as a linear template: points = C @ [1, a, es, ...].

VARS = ("a", "es", "os", "ee", "eb", "en")


def _vband(p: np.ndarray, half: Any) -> np.ndarray:
    """Polygon of a thick, nearly horizontal polyline: p offset vertically by +-half."""
    h = np.asarray(half, float).reshape(-1, 1) * (0.0, 1.0)
    return np.concatenate([p - h, (p + h)[::-1]])


def _eye_h(e: Any, rs: float) -> Any:
    return 0.10 * rs * (0.06 + 0.94 * e)


def _eyes(p: dict, v: Mapping[str, Any], rs: float) -> list:
    ew = 0.15 * rs
    h = _eye_h(v["ee"], rs)
    dx = np.linspace(-ew, ew, 15)
    prof = 1 - (dx / ew) ** 2
    out = []
    for side in (-1, 1):
        cx, cy = side * p["eye_x"], p["eye_y"]
        up = np.stack([cx + dx, cy - h * prof], 1)
        lo = np.stack([cx + dx, cy + 0.75 * h * prof], 1)
        out.append(("poly", np.concatenate([up, lo[::-1]]), (242, 240, 232), ""))
        out.append(("iris", np.zeros((0, 2)), None, str((side + 1) // 2)))
        out.append(("poly", _vband(up, 0.02 * rs * (0.4 + 0.6 * prof)), (45, 32, 30), ""))
    return out


def _eye_region(p: dict, rs: float) -> np.ndarray:
    ew, eh = 0.15 * rs, 0.10 * rs
    pts = []
    for side in (-1, 1):
        cx, cy = side * p["eye_x"], p["eye_y"]
        pts += [(cx - ew - 0.02 * rs, cy - eh - 0.03 * rs), (cx + ew + 0.02 * rs, cy + 0.75 * eh + 0.02 * rs)]
    return np.array(pts)


def _brows(p: dict, v: Mapping[str, Any], rs: float) -> list:
    bw = 0.15 * rs
    dx = np.linspace(-bw, bw, 13)
    arch = 1 - (dx / bw) ** 2
    half = (0.010 + 0.065 * v["eb"]) * rs * (0.55 + 0.45 * arch)
    out = []
    for side in (-1, 1):
        cx = side * p["eye_x"]
        cy = p["eye_y"] - p["brow_off"] * rs
        line = np.stack([cx + dx, cy - 0.035 * rs * arch + side * dx * 0.12], 1)
        out.append(("poly", _band(line, half), _col(p["brow"]), ""))
    return out


def _mouth(p: dict, v: Mapping[str, Any], rs: float) -> list:
    mw, my = 0.27 * rs, p["mouth_y"]
    x = np.linspace(-mw, mw, 17)
    prof = 1 - (x / mw) ** 2
    sag = mw * (-0.25 + 0.95 * v["es"])
    op = mw * 0.6 * v["os"]
    yu = my + sag * (prof - 0.5)
    yl = yu + op * prof
    up, lo = np.stack([x, yu], 1), np.stack([x, yl], 1)
    teeth = np.stack([x, yu + 0.5 * op * prof], 1)
    return [
        ("poly", np.concatenate([up, lo[::-1]]), (80, 20, 28), ""),
        ("poly", np.concatenate([up, teeth[::-1]]), (235, 230, 218), ""),
        ("poly", _vband(lo, 0.026 * rs * (0.5 + 0.5 * prof)), _col(p["lip"]), ""),
        ("poly", _vband(up, 0.020 * rs * (0.5 + 0.5 * prof)), _col(_mix(p["lip"], (50, 15, 20), 0.55)), ""),
    ]


def _nose(p: dict, v: Mapping[str, Any], rs: float) -> list:
    k, ny = (0.6 + 0.8 * v["en"]) * rs, p["nose_y"]
    tri = np.array([(0, -0.22), (0.10, 0.05), (0.06, 0.09), (-0.06, 0.09), (-0.10, 0.05)]) * k + (0, ny)
    out = [("poly", tri, _col(p["skin"] * 0.80), "")]
    for side in (-1, 1):
        out.append(("poly", _ellipse(side * 0.045, 0.055, 0.024, 0.016, 10) * k + (0, ny), _col(p["skin"] * 0.42), ""))
    return out


def _jaw(p: dict, a: Any) -> np.ndarray:
    s = np.linspace(0.15, 0.985, 12)
    w = _width(p["shape"], s) * 0.97
    right = np.stack([a * w, s], 1)
    left = np.stack([-a * w[::-1], s[::-1]], 1)
    xn = np.linspace(-1, 1, 11)
    top = np.stack([a * w[0] * xn, 0.15 + 0.22 * (1 - xn ** 2)], 1)
    return np.concatenate([right, left, top])

def _hair(p: dict, a: Any) -> tuple[list, list]:
    style, vol, part = p["hair_style"], p["hair_vol"], p["part"]
    back, front = [], []
    if style in (1, 2):  # long (to the shoulders) / bob (to the jaw), behind the head
        extra, bottom, wide, s_end = (0.14, 1.25, 0.26, 0.2) if style == 1 else (0.08, 0.42, 0.14, 0.1)
        s = np.linspace(-1, s_end, 11)
        side = np.stack([(a + vol + extra) * _width(0, np.minimum(s, 0)), s * (1 + vol)], 1)
        ends = np.array([[a + wide, bottom], [-a - wide, bottom]])
        back.append(np.concatenate([side, ends, side[::-1] * (-1, 1)]))
    s_side, hl = {0: (-0.30, -0.56), 1: (-0.10, -0.55), 2: (0.0, -0.47), 3: (-0.35, -0.60)}[style]
    s = np.linspace(-1, s_side, 10)
    outer_r = np.stack([(a + vol) * _width(p["shape"], s), s * (1 + vol)], 1)
    outer = np.concatenate([outer_r[::-1] * (-1, 1), outer_r])  # left side up, over the crown, right side down
    ws = float(_width(p["shape"], np.array([s_side]))[0])
    xn = np.linspace(1, -1, 13)
    q = np.abs(xn - part) / (1 + abs(part))
    line = np.stack([a * ws * xn, hl + (s_side - hl) * q ** 2.5], 1)
    front.append(np.concatenate([outer, line]))
    if style == 3:  # spiky tufts on the crown
        for k in range(6):
            t = 0.9 * (-0.75 + 0.3 * k)
            nx, ny = math.sin(t), -abs(math.cos(t))
            base = np.array([(a + vol) * nx * 0.95, (1 + vol) * ny])
            ln = 0.18 + 0.06 * ((k * 7919 + int(vol * 1000)) % 3)
            perp = 0.1 * np.array([-ny, nx])
            front.append(np.stack([base - perp, base + perp, base + ln * np.array([nx, ny])]))
    return back, front


def _ears(p: dict, a: Any) -> list:
    col, inner = _col(p["skin"] * 0.94), _col(p["skin"] * 0.78)
    out = []
    for side in (-1, 1):
        if p["ear"] == 0:
            out.append(("poly", _ellipse(0.03, 0.0, 0.13, 0.23, 16) * (side, 1) + (side * a, 0), col, ""))
            out.append(("poly", _ellipse(0.05, 0.0, 0.06, 0.13, 10) * (side, 1) + (side * a, 0), inner, ""))
        else:
            outer = np.array([(-0.06, -0.12), (0.32, -0.52), (0.15, 0.02), (0.07, 0.22), (-0.06, 0.2)])
            out.append(("poly", outer * (side, 1) + (side * a, 0), col, ""))
            inn = np.array([(0.02, -0.05), (0.2, -0.35), (0.07, 0.08)])
            out.append(("poly", inn * (side, 1) + (side * a, 0), inner, ""))
    return out


def _glasses(p: dict, a: Any, rs: float) -> list:
    col = _col(p["glasses_col"])
    rx, ry = 0.19 * rs, 0.14 * rs
    out = []
    for side in (-1, 1):
        cx, cy = side * p["eye_x"], p["eye_y"] + 0.01
        ring = _ellipse(cx, cy, rx, ry, 20)
        out.append(("line", np.concatenate([ring, ring[:1]]), col, "glasses"))
        out.append(("line", np.array([[cx + side * rx, cy - 0.02], [side * 0.98 * a, cy - 0.05]]), col, "glasses"))
    inner = p["eye_x"] - 0.19 * rs
    bridge = np.array([(-inner, p["eye_y"] - 0.02), (0, p["eye_y"] - 0.05), (inner, p["eye_y"] - 0.02)])
    out.append(("line", bridge, col, "glasses"))
    return out


def _hat(a: Any) -> list:
    hy = -0.70
    brim = np.stack([np.array([-1, 1, 1, -1]) * (a + np.array([0.3, 0.3, 0.34, 0.34])),
                     hy + np.array([-0.05, -0.05, 0.03, 0.03])], 1)
    t = np.linspace(0, math.pi, 9)
    xs = np.concatenate([[-0.82], -np.cos(t) * 0.68, [0.82]])
    ys = np.concatenate([[hy], -1.22 - 0.12 * np.sin(t), [hy]])
    crown = np.stack([a * xs, ys], 1)
    band = np.stack([a * np.array([-0.8, 0.8, 0.8, -0.8]), hy + np.array([-0.16, -0.16, -0.07, -0.07])], 1)
    return [("poly", crown, "hat", "hat"), ("poly", brim, "hat_brim", "hat"), ("poly", band, "hat_band", "hat")]
