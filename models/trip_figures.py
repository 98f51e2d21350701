"""trip's paper figures for `attrlab report` (papers/trip.txt).

* Fig. 1 / 5: translation strips: each row an input image and G(x, v) for v from -1 to 1 in
  steps of 0.2 (one strip block per target attribute, the others at 0).
* Fig. 8 (K >= 2): the two-attribute grid: one image translated over v_1 x v_2.
* Fig. 6-7: the ranker's output R_k(x, G(x, v)) against v (mean and std over the evaluated
  images), with the identity line the generator is trained towards; and, when an oracle is
  configured, the oracle's measured change of the attribute on the same path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.plots import save_figure
from models.registry import eval_mode

GRID_V = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).cpu().numpy()


def strips(m: Any, images: torch.Tensor, out: Path) -> str:
    import matplotlib.pyplot as plt

    from models.trip_eval import PATH_V, path_frames

    n, k = len(images), len(m.attributes)
    fig, axes = plt.subplots(n * k, 12, figsize=(12 * 0.8, n * k * 0.85), squeeze=False)
    for a, name in enumerate(m.attributes):
        frames = path_frames(m, images, a)
        for i in range(n):
            row = axes[a * n + i]
            row[0].imshow(_hwc(images[i]))
            for t in range(len(PATH_V)):
                row[t + 1].imshow(_hwc(frames[t, i]))
            row[0].set_ylabel(name if i == 0 else "", fontsize=7)
    for t, v in enumerate(["input", *[f"{v:+.1f}" for v in PATH_V]]):
        axes[0, t].set_title(v, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, "translation strips, v from -1 to 1 (the other attributes at v = 0)", out, "trip_strips.png")


def grid(m: Any, image: torch.Tensor, out: Path) -> str:
    import matplotlib.pyplot as plt

    n = len(GRID_V)
    fig, axes = plt.subplots(n, n, figsize=(n * 1.0, n * 1.0), squeeze=False)
    with eval_mode(m):
        for i, v0 in enumerate(GRID_V[::-1]):
            for j, v1 in enumerate(GRID_V):
                v = torch.zeros(1, len(m.attributes))
                v[0, 0], v[0, 1] = float(v0), float(v1)
                axes[i, j].imshow(_hwc(m.translate(image[None], v)[0].cpu()))
                axes[i, j].set_xticks([])
                axes[i, j].set_yticks([])
                if j == 0:
                    axes[i, j].set_ylabel(f"{v0:+.1f}", fontsize=7)
                if i == n - 1:
                    axes[i, j].set_xlabel(f"{v1:+.1f}", fontsize=7)
    a0, a1 = m.attributes[:2]
    return save_figure(fig, f"two-attribute grid: {a0} (rows) x {a1} (columns)", out, "trip_grid.png")


def ranker_curve(m: Any, images: torch.Tensor, cfg: Any, out: Path) -> str:
    import matplotlib.pyplot as plt

    from models.trip_eval import PATH_V, load_oracle, path_frames, ranker_on_path

    oracle = load_oracle(cfg.oracle) if cfg.oracle else None
    k = len(m.attributes)
    fig, axes = plt.subplots(1, k, figsize=(max(4.5, 3.4 * k), 3.2), squeeze=False)
    for a, name in enumerate(m.attributes):
        ax = axes[0, a]
        frames = path_frames(m, images, a)
        r = ranker_on_path(m, images, frames, a)
        ax.errorbar(PATH_V, r.mean(1), yerr=r.std(1), marker="o", ms=3, capsize=2, label="ranker R(x, G(x, v))")
        ax.plot([-1, 1], [-1, 1], "k:", lw=0.8, label="target: v")
        if oracle is not None and name in oracle.attributes:
            from models.attr_oracle import predict

            j = oracle.attributes.index(name)
            t, n = frames.shape[:2]
            pv = predict(oracle, frames.flatten(0, 1))["value"].view(t, n, -1)[:, :, j].numpy()
            change = pv - predict(oracle, images)["value"][:, j].numpy()[None]
            ax.errorbar(PATH_V, change.mean(1), yerr=change.std(1), marker="s", ms=3, capsize=2,
                        label="oracle change of the attribute")
        ax.set_xlabel("v")
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=6)
    return save_figure(fig, "ranker output (and oracle change) vs v: mean +- std over images", out, "trip_ranker_v.png")


def figures(model: Any, loaders: Any, cfg: Any, meta: Any, run_dir: Path, out: Path) -> list[tuple[str, str]]:
    from models.trip import _unwrap
    from models.trip_eval import eval_batch

    m = _unwrap(model)
    data = eval_batch(loaders, max(cfg.figure_images, 32))
    with eval_mode(m):
        made = [("Fig. 1 / 5 analog: fine-grained translation strips", strips(m, data["image"][:cfg.figure_images], out))]
        if len(m.attributes) >= 2:
            made.append(("Fig. 8 analog: two attributes translated together", grid(m, data["image"][0], out)))
        made.append(("Fig. 6-7 analog: the ranker's output against v", ranker_curve(m, data["image"], cfg, out)))
    return made
