"""deml's paper figures for `attrlab report` (Chen & Deng 2019, papers/deml.txt).

* Fig. 4a: object-attention regions at every scale: each scale's input with its OAM proposal
  (random-walk mass, Eq. 2-3) as a heat map and the square crop box that becomes the next
  scale's input (red; dashed at the last scale, where no further scale uses it).
* Fig. 4b: channel-attention proposals: for one image, the J CAMs of scale 1 side by side on the
  channels where their weights differ most (cap_(1,j) = U x w_j; one colour scale per channel),
  and the J x C channel weights.
* Fig. 5: training (seen classes) and testing (unseen classes) R@1 over the training steps, from
  the snapshots recorded at each validation (RUN_DIR/snapshots).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.plots import save_figure

N_IMAGES, N_CHANNELS = 6, 4




def _display(m: Any, x: torch.Tensor) -> np.ndarray:
    """Normalised model inputs [B, 3, H, W] -> displayable [B, H, W, 3] in [0, 1]."""
    img = (x.float() * m.norm.std + m.norm.mean) / 255.0
    return img.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def _first_images(loaders: Any, n: int) -> torch.Tensor:
    batch = next(iter(loaders("__eval__", kind="samples")))
    return batch["image"][:n]


def attention_regions(m: Any, images: torch.Tensor, out: Path) -> str:
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    outs = m.run(images.to(m.norm.mean.device))
    fig, axes = plt.subplots(len(images), len(outs), figsize=(1.6 * len(outs) + 0.4, 1.6 * len(images)), squeeze=False)
    for i, o in enumerate(outs):
        att, boxes, _ = m.next_input(o)
        shown = _display(m, o.inputs)
        for r in range(len(images)):
            ax = axes[r][i]
            ax.imshow(shown[r])
            ax.imshow(att[r].cpu().numpy(), cmap="jet", alpha=0.4, vmin=0, vmax=1)
            x0, y0, x1, y1 = boxes[r].tolist()
            ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red",
                                           linewidth=1.5, linestyle="-" if i + 1 < len(outs) else "--"))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"scale {i + 1}", fontsize=8)
    return save_figure(fig, "OAM proposals and crops per scale (red: the next scale's input)", out, "deml_oam.png")


def channel_proposals(m: Any, image: torch.Tensor, out: Path) -> str | None:
    import matplotlib.pyplot as plt

    scale = m.scales[0]
    if len(scale.cams) < 1:
        return None
    x = m.norm(image[None].to(m.norm.mean.device))
    u = scale.fnet(x)
    caps, weights = zip(*[cam(u) for cam in scale.cams])
    w = torch.cat(weights).cpu().numpy()  # [J, C]
    chans = np.argsort(-w.std(0))[:N_CHANNELS]
    j = len(caps)
    fig, axes = plt.subplots(j + 1, len(chans) + 1, figsize=(1.5 * (len(chans) + 1), 1.4 * (j + 1)), squeeze=False)
    axes[0][0].imshow(_display(m, x)[0])
    axes[0][0].set_title("input", fontsize=7)
    for c, ch in enumerate(chans, 1):
        axes[0][c].imshow(u[0, ch].cpu().numpy(), cmap="viridis")
        axes[0][c].set_title(f"U ch {ch}", fontsize=7)
        top = max(float(cap[0, ch].abs().max()) for cap in caps) or 1.0
        for r, cap in enumerate(caps, 1):
            axes[r][c].imshow(cap[0, ch].cpu().numpy(), cmap="viridis", vmin=-top, vmax=top)
            axes[r][c].set_title(f"w={w[r - 1, ch]:.2f}", fontsize=7)
    for r in range(1, j + 1):
        axes[r][0].imshow(w[r - 1:r], aspect="auto", cmap="magma", vmin=0, vmax=1)
        axes[r][0].set_ylabel(f"CAM {r}", fontsize=7)
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, "channel-attention proposals of scale 1 (left: each CAM's channel weights)", out, "deml_cam.png")


def recall_curves(run_dir: Path, out: Path) -> str | None:
    import matplotlib.pyplot as plt

    snaps = sorted((Path(run_dir) / "snapshots").glob("step_*.npz"))
    if not snaps:
        return None
    steps = [int(p.stem.split("_")[1]) for p in snaps]
    data = [dict(np.load(p)) for p in snaps]
    fig, ax = plt.subplots(figsize=(4.2, 3))
    for key, label in (("train_r@1", "training (seen classes)"), ("test_r@1", "testing (unseen classes)")):
        if key in data[0]:
            ax.plot(steps, [float(d[key]) for d in data], marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("R@1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, "R@1 during training", out, "deml_curves.png")


@torch.no_grad()
def figures(model: Any, loaders: Any, cfg: Any, meta: Any, run_dir: Path, out: Path) -> list[tuple[str, str]]:
    from models.deml import _unwrap

    from models.registry import eval_mode

    with eval_mode(_unwrap(model)) as m:
        images = _first_images(loaders, N_IMAGES)
        made = [("Fig. 4a analog: object-attention regions at each scale", attention_regions(m, images, out))]
        cam = channel_proposals(m, images[0], out)
        if cam:
            made.append(("Fig. 4b analog: channel-attention proposals of the CAMs", cam))
    curves = recall_curves(run_dir, out)
    if curves:
        made.append(("Fig. 5 analog: training vs testing R@1 over training", curves))
    return made
