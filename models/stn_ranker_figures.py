"""stn_ranker's paper figures for `attrlab report`.

* Fig. 5: per attribute, test images uniformly sampled along the predicted ranking (weakest ->
  strongest), each with its STN crop box (red) and, where the data has one, the ground-truth
  region (green, dashed).
* Fig. 4: the distribution of STN crop boxes over the validation images at each validation step
  of training (RUN_DIR/snapshots), as a heat map over the split's mean image: the localiser
  starts spread out and converges on the attribute's region.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.plots import save_figure

MAX_IMAGES = 400  # images scored for the ranked strips
COLUMNS = 8


def _collect(model: Any, loaders: Any, cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from models.stn_ranker import predict

    imgs, scores, boxes, gts = [], [], [], []
    n = 0
    for batch in loaders("__eval__", kind="samples", full_image=True):
        out = predict(model, batch["image"], cfg.tta_crops)
        imgs.append(batch["image"].permute(0, 2, 3, 1).numpy())
        scores.append(out["score"].float().cpu().numpy())
        boxes.append(out["box"].float().cpu().numpy())
        gts.append(batch["boxes"].numpy())
        n += len(batch["image"])
        if n >= MAX_IMAGES:
            break
    return np.concatenate(imgs), np.concatenate(scores), np.concatenate(boxes), np.concatenate(gts)




def _rect(ax: Any, box: np.ndarray, size: int, **kw: Any) -> None:
    import matplotlib.patches as patches

    x0, y0, x1, y1 = (np.clip(box, 0, 1) * size).tolist()
    ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, **kw))


def ranked_strips(model: Any, loaders: Any, cfg: Any, meta: Any, out: Path) -> str:
    import matplotlib.pyplot as plt

    imgs, scores, boxes, gts = _collect(model, loaders, cfg)
    attrs = list(model.attributes)
    cols = min(COLUMNS, len(imgs))
    fig, axes = plt.subplots(len(attrs), cols, figsize=(1.3 * cols, 1.45 * len(attrs)), squeeze=False)
    size = imgs.shape[1]
    for r, name in enumerate(attrs):
        order = np.argsort(scores[:, r])
        picks = order[np.linspace(0, len(order) - 1, cols).round().astype(int)]
        gi = meta.attribute_names.index(name)
        for c, i in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(imgs[i])
            _rect(ax, boxes[i, r], size, edgecolor="red", linewidth=1.5)
            if not np.isnan(gts[i, gi]).any():
                _rect(ax, gts[i, gi], size, edgecolor="lime", linewidth=1, linestyle="--")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    return save_figure(fig, "test images by predicted strength (left: weakest); red: STN crop, green: true region",
                 out, "stn_ranked_strips.png")


def box_distribution(run_dir: Path, loaders: Any, out: Path) -> str | None:
    import matplotlib.pyplot as plt

    snaps = sorted((Path(run_dir) / "snapshots").glob("step_*.npz"))
    if not snaps:
        return None
    if len(snaps) > 6:  # first, last and evenly spaced between
        snaps = [snaps[i] for i in np.linspace(0, len(snaps) - 1, 6).round().astype(int)]
    batch = next(iter(loaders("__eval__", kind="samples", full_image=True)))
    background = batch["image"].float().mean(0).permute(1, 2, 0).numpy() / 255
    size = background.shape[0]
    data = [np.load(p) for p in snaps]
    attrs = [str(a) for a in data[0]["attributes"]]
    fig, axes = plt.subplots(len(attrs), len(snaps), figsize=(1.5 * len(snaps), 1.5 * len(attrs)), squeeze=False)
    for c, (path, d) in enumerate(zip(snaps, data)):
        for r, name in enumerate(attrs):
            heat = np.zeros((size, size))
            for box in d["box"][:, r]:
                x0, y0, x1, y1 = (np.clip(box, 0, 1) * size).round().astype(int)
                heat[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] += 1
            ax = axes[r][c]
            ax.imshow(background)
            ax.imshow(heat / max(heat.max(), 1), cmap="jet", alpha=0.45)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {int(path.stem.split('_')[1])}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    return save_figure(fig, "STN crop distribution over validation images during training", out, "stn_box_distribution.png")


@torch.no_grad()
def figures(model: Any, loaders: Any, cfg: Any, meta: Any, run_dir: Path, out: Path) -> list[tuple[str, str]]:
    made = [("Fig. 5 analog: test images sorted by predicted attribute strength with the STN crop",
             ranked_strips(model, loaders, cfg, meta, out))]
    dist = box_distribution(run_dir, loaders, out)
    if dist:
        made.append(("Fig. 4 analog: STN crop distribution over training (validation images)", dist))
    return made
