"""latent_retrieval's paper figures for `attrlab report` (papers/latent_retrieval.txt).

* Fig. 3: direction edits decoded to images: an image's latent moved along attribute m to the
  other end of the training range, with this method's sparse orthogonal direction and with the
  InterFaceGAN baseline's (input reconstruction | ours | InterFaceGAN).
* Fig. 4: queries with their top-5 retrieved images: as is, with one attribute adjusted, and
  adjusted + emphasised (p_m = 8).
* Fig. 5: nDCG@5 and identity similarity against the fixed preference of the adjusted attribute.
* Fig. 6: the energy held by the top entries of the attribute directions, per lambda and for
  the baseline (sparsity).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import latent_directions as ld
from models.latent_eval import Collected, collect, retrieval_metrics
from models.plots import save_figure
from models.registry import eval_mode


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).cpu().numpy()


def _flip(w: torch.Tensor, F_: torch.Tensor, m: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """w moved along unit direction f_m so its projection goes to the other end of [lo, hi]."""
    f = F_[:, m] / F_[:, m].norm()
    c = w @ f
    target = torch.where(c > (lo[m] + hi[m]) / 2, lo[m], hi[m])
    return w + (target - c)[:, None] * f[None]


def edits(m: Any, col: Collected, out: Path, n_img: int) -> str:
    import matplotlib.pyplot as plt

    ours = m.directions.cpu()
    o_lo, o_hi = ld.adjust_range(ld.projections(col.train.W, ours))
    base = col.baseline
    b_lo, b_hi = ld.adjust_range(ld.projections(col.train.W, base))
    attrs = list(range(min(len(m.attributes), 4)))
    w = col.test.W[:n_img]
    fig, axes = plt.subplots(len(attrs), 3 * n_img, figsize=(3 * n_img * 0.8, len(attrs) * 0.95), squeeze=False)
    recon = m.decode_latents(w).cpu()
    for r, a in enumerate(attrs):
        mine = m.decode_latents(_flip(w, ours, a, o_lo, o_hi)).cpu()
        theirs = m.decode_latents(_flip(w, base, a, b_lo, b_hi)).cpu()
        for i in range(n_img):
            for j, img in enumerate((recon[i], mine[i], theirs[i])):
                axes[r, 3 * i + j].imshow(_hwc(img))
        axes[r, 0].set_ylabel(m.attributes[a], fontsize=7)
    for i in range(n_img):
        for j, t in enumerate(("input", "ours", "IFG")):
            axes[0, 3 * i + j].set_title(t, fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    return save_figure(fig, "attribute edits: reconstruction | sparse orthogonal direction (ours) | InterFaceGAN",
                       out, "latent_edits.png")


def retrievals(m: Any, col: Collected, sweeps: dict[str, Any], out: Path, n_query: int = 3) -> str:
    import matplotlib.pyplot as plt

    s = sweeps["ours"]
    images = col.test.images
    F_ = m.directions.cpu().double()
    W = col.test.W.double()
    rows = s["rows"][:n_query]
    fig, axes = plt.subplots(3 * len(rows), 6, figsize=(6 * 0.9, 3 * len(rows) * 0.95), squeeze=False)
    for qi, (row, tgt) in enumerate(zip(rows, s["target"][:n_query])):
        c_q = ld.projections(W[row:row + 1], F_)
        a = torch.full_like(c_q, float("nan"))
        a[0, tgt] = 1 - col.test.Y[row, tgt].double()
        c_t = ld.adjust_target(c_q, a, m.a_min.cpu().double(), m.a_max.cpu().double())
        name = m.attributes[tgt]
        want = "add" if a[0, tgt] > 0.5 else "remove"
        for li, (label, ct, pm) in enumerate((("as is", None, 1.0), (f"{want} {name}", c_t, 1.0),
                                              (f"{want} {name}, p=8", c_t, 8.0))):
            p = torch.ones(1, F_.shape[1], dtype=torch.float64)
            p[0, tgt] = pm
            d = ld.weighted_distance(W[row:row + 1], W, F_, p, ct)[0]
            d[row] = torch.inf
            ids = torch.topk(d, 5, largest=False).indices
            ax = axes[3 * qi + li]
            ax[0].imshow(_hwc(images[row]))
            ax[0].set_ylabel(label, fontsize=6)
            for j, g in enumerate(ids.tolist()):
                ax[j + 1].imshow(_hwc(images[g]))
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_title("query", fontsize=7)
    for j in range(5):
        axes[0, j + 1].set_title(f"top {j + 1}", fontsize=7)
    return save_figure(fig, "queries adjusted and emphasised, with their top-5 retrieved images", out,
                       "latent_retrieval.png")


def preference_curve(metrics: dict[str, float], prefs: tuple[float, ...], has_ident: bool, out: Path) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    ylab = "identity similarity" if has_ident else "same identity share"
    for prefix, label in (("", "ours"), ("ifg/", "InterFaceGAN")):
        nd = [metrics[f"{prefix}fixed_{v:g}/ndcg@5"] for v in prefs]
        idm = [metrics[f"{prefix}fixed_{v:g}/identity_sim@5"] for v in prefs]
        axes[0].plot(prefs, nd, marker="o", label=label)
        axes[1].plot(prefs, idm, marker="o", label=label)
    axes[0].set_ylabel("nDCG@5")
    axes[1].set_ylabel(ylab + "@5")
    for ax in axes:
        ax.set_xlabel("preference of the adjusted attribute")
        ax.set_xscale("symlog", linthresh=1)
        ax.legend(fontsize=7)
    return save_figure(fig, "fixed attribute preference: nDCG@5 and identity (Fig. 5)", out, "latent_preference.png")


def energy(col: Collected, out: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for lam, fit in sorted(col.fits.items()):
        e = ld.sparsity_energy(fit.F).numpy()
        ax.plot(np.arange(1, len(e) + 1), e, label=f"lambda = {lam:g}" + (" (chosen)" if lam == col.lam else ""))
    e = ld.sparsity_energy(col.baseline).numpy()
    ax.plot(np.arange(1, len(e) + 1), e, "k--", label="InterFaceGAN")
    ax.set_xscale("log")
    ax.set_xlabel("top entries of the direction")
    ax.set_ylabel("fraction of energy")
    ax.legend(fontsize=7)
    return save_figure(fig, "energy in the top entries of the attribute directions (Fig. 6)", out, "latent_energy.png")


def figures(model: Any, loaders: Any, cfg: Any, meta: Any, run_dir: Path, out: Path) -> list[tuple[str, str]]:
    from models.latent_retrieval import _unwrap

    m = _unwrap(model)
    with eval_mode(m), torch.no_grad():
        col = collect(m, loaders, cfg, keep_images=True)
        metrics, sweeps = retrieval_metrics(col, cfg)
        return [("Fig. 3 analog: attribute edits decoded", edits(m, col, out, min(cfg.figure_images, 3))),
                ("Fig. 4 analog: adjusted / emphasised queries and their retrievals", retrievals(m, col, sweeps, out)),
                ("Fig. 5 analog: the preference sweep", preference_curve(metrics, tuple(cfg.preferences),
                                                                         col.test.ident is not None, out)),
                ("Fig. 6 analog: sparsity of the directions", energy(col, out))]


