"""trip's evaluation (papers/trip.txt Sec. 4, App. D) on the evaluated split's first
`eval_images` images. Per target attribute k (the others at v = 0), then the mean over k:

* `ssim_std`: SSIM-std over the path v_k in {-1, -0.8, ..., 1} (Eq. 8, models/gen_metrics.py);
* `rank_v_corr`: Pearson correlation between v_k and trip's own ranker R_k(x, G(x, v)) over the
  path (Fig. 6-7's ranker-output-vs-v line; mean/std per v are in the report's figure);
* `rank_acc`: the ranker's sign accuracy on the split's real ordered pairs (each image vs the next);

with an independent attribute oracle (`model.oracle`, an attr_oracle run trained on real images):
* `spearman_v`: Spearman correlation between v_k and the oracle's change of attribute k,
  o_k(G(x, v)) - o_k(x), pooled over images and the 11 path values;
* `aas`: attribute-swapping accuracy, v_k = 1 - 2 a_k with a_k = [oracle's o_k(x) >= aas_threshold]
  (the oracle's reading of the input, so a mislabelled input does not count against G);
* `nontarget_change`: mean |o_j(G(x, v)) - o_j(x)| over the oracle's other attributes and the path;
* `fid_oracle`: Fréchet distance between oracle features of the real images and of their swaps —
  an FID-STYLE score on the oracle's features, not Inception's FID;
* `fid`: the standard FID (torchmetrics, torch-fidelity's Inception) only when
  `model.inception_weights` names a local weights file (nothing is downloaded).
Per-attribute values are reported as `<key>/<attr>` too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from models import gen_metrics
from models.attr_oracle import predict as oracle_predict
from models.registry import LoaderFactory, eval_mode
from models.trip import Trip, TripConfig, _unwrap, relative_targets
from shards.format import DatasetMeta, ShardError

PATH_V = np.round(np.linspace(-1.0, 1.0, 11), 1)  # -1, -0.8, ..., 1 (the paper's strips)
_ORACLES: dict[str, Any] = {}


def load_oracle(path: str) -> nn.Module:
    """The attr_oracle model of a run directory (its latest export) or an export directory."""
    from jobs.evaluate import load_model_dir  # lazy: models/ stays importable without the jobs layer

    if path in _ORACLES:
        return _ORACLES[path]
    p = Path(path)
    if not p.exists():
        raise ShardError(f"model.oracle {p}: not found; train one with `attrlab train attr_oracle --data ... --out {p}`")
    method, _, model, _ = load_model_dir(p)
    if method.name != "attr_oracle":
        raise ShardError(f"model.oracle {p}: is a {method.name} run, not attr_oracle")
    _ORACLES[path] = model
    return model


def eval_batch(loaders: LoaderFactory, n: int) -> dict[str, torch.Tensor]:
    """The first n images of the evaluated split (uint8) and their attribute values."""
    imgs, vals = [], []
    for batch in loaders("__eval__", kind="samples"):
        imgs.append(batch["image"])
        vals.append(batch["attributes"])
        if sum(len(i) for i in imgs) >= n:
            break
    if not imgs:
        raise ShardError("trip: the evaluated split has no images")
    return {"image": torch.cat(imgs)[:n], "attributes": torch.cat(vals)[:n]}


@torch.no_grad()
def path_frames(m: Trip, images: torch.Tensor, k: int, values: np.ndarray = PATH_V,
                base: torch.Tensor | None = None, batch_size: int = 64) -> torch.Tensor:
    """uint8 frames [T, N, 3, H, W]: G(x, v) with v_k = each value (the other dims from `base`, else 0)."""
    dev = m.cols.device
    out = []
    with eval_mode(m):
        for val in values:
            chunk_out = []
            for chunk in images.split(batch_size):
                v = torch.zeros(len(chunk), len(m.attributes), device=dev) if base is None else base.to(dev).expand(len(chunk), -1).clone()
                v[:, k] = float(val)
                chunk_out.append(m.translate(chunk, v).cpu())
            out.append(torch.cat(chunk_out))
    return torch.stack(out)


@torch.no_grad()
def ranker_on_path(m: Trip, images: torch.Tensor, frames: torch.Tensor, k: int) -> np.ndarray:
    """R_k(x, G(x, v)) [T, N] for every frame of the path."""
    dev = m.cols.device
    x = m.to_unit(images.to(dev))
    with eval_mode(m):
        return np.stack([m.ranker.rank(x, m.to_unit(f.to(dev)))[:, k].float().cpu().numpy() for f in frames])


def path_ssim_std(frames: torch.Tensor) -> float:
    """SSIM-std (Eq. 8) of uint8 path frames [T, N, 3, H, W]."""
    return gen_metrics.ssim_std(frames.permute(0, 1, 3, 4, 2).numpy().astype(np.float32) / 255.0)


def oracle_path_metrics(oracle: nn.Module, real: dict[str, torch.Tensor], frames: torch.Tensor, j: int,
                        others: list[int], swap: Callable[[np.ndarray], torch.Tensor],
                        aas_threshold: float) -> tuple[dict[str, float], torch.Tensor]:
    """The oracle's numbers for one target attribute (the oracle's column j) of a path
    `frames` [T, N, 3, H, W] (uint8, v = PATH_V) of the images the oracle read as `real`:
    spearman_v, nontarget_change (columns `others`), aas and fid_oracle. `swap(v_k)` returns the
    images translated with v_k = 1 - 2a (a = the oracle's reading of the input). Shared by
    evaluate() and the ground-truth-edit reference (bench/trip_reference.py), so a generator and
    the renderer's exact edits are scored by one code path. Returns (metrics, swapped images)."""
    t, n = frames.shape[:2]
    pv = oracle_predict(oracle, frames.flatten(0, 1))["value"].view(t, n, -1).numpy()
    base = real["value"].numpy()
    row = {"spearman_v": gen_metrics.spearman_change(np.repeat(PATH_V[:, None], n, 1), pv[:, :, j] - base[None, :, j])}
    if others:
        row["nontarget_change"] = gen_metrics.mean_abs_change(base[None][:, :, others], pv[:, :, others])
    a = base[:, j] >= aas_threshold
    swapped = swap(1.0 - 2.0 * a.astype(np.float32))
    sw = oracle_predict(oracle, swapped)
    row["aas"] = gen_metrics.swap_accuracy(base[:, j], sw["value"][:, j].numpy(), aas_threshold)
    row["fid_oracle"] = gen_metrics.frechet_distance(real["features"].numpy(), sw["features"].numpy())
    return row, swapped


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


@torch.no_grad()
def inception_fid(weights: str, real: torch.Tensor, fake: torch.Tensor) -> float:
    """The standard FID through torchmetrics with a LOCAL Inception weights file (torch-fidelity's
    FID Inception: `feature_extractor_weights_path`); a clear error when it cannot run offline."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ShardError(f"model.inception_weights is set but torchmetrics' FID is unavailable ({e}); "
                         f"pip install 'attrlab[fid]'") from None
    if not Path(weights).is_file():
        raise ShardError(f"model.inception_weights {weights}: not found (a local FID Inception weights file)")
    try:  # read it here with weights_only=True, whatever the third-party loader below defaults to
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unreadable file is the user's to fix
        raise ShardError(f"model.inception_weights {weights}: cannot be read as torch weights with weights_only=True "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use torch-fidelity's "
                         "pt_inception state_dict") from None
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


@torch.no_grad()
def evaluate(model: nn.Module, loaders: LoaderFactory, cfg: TripConfig, meta: DatasetMeta) -> dict[str, float]:
    m = _unwrap(model)
    data = eval_batch(loaders, cfg.eval_images)
    images = data["image"]
    oracle = load_oracle(cfg.oracle) if cfg.oracle else None
    o_cols: list[int] = []
    if oracle is not None:
        missing = [a for a in m.attributes if a not in oracle.attributes]
        if missing:
            raise ShardError(f"model.oracle {cfg.oracle}: does not predict {missing} (it has {list(oracle.attributes)})")
        o_cols = [oracle.attributes.index(a) for a in m.attributes]
        real = oracle_predict(oracle, images)
    per: dict[str, list[float]] = {}
    swapped_all = []
    for k, name in enumerate(m.attributes):
        frames = path_frames(m, images, k)  # [T, N, 3, H, W] uint8
        row = {"ssim_std": path_ssim_std(frames)}
        rk = ranker_on_path(m, images, frames, k)
        row["rank_v_corr"] = _pearson(np.repeat(PATH_V[:, None], rk.shape[1], 1), rk)
        if oracle is not None:
            others = [i for i in range(len(oracle.attributes)) if i not in o_cols]

            def swap(v_k: np.ndarray, k: int = k) -> torch.Tensor:
                v = torch.zeros(len(images), len(m.attributes))
                v[:, k] = torch.from_numpy(v_k.astype(np.float32))
                with eval_mode(m):
                    return torch.cat([m.translate(c, vc).cpu() for c, vc in zip(images.split(64), v.split(64))])

            o_row, swapped = oracle_path_metrics(oracle, real, frames, o_cols[k], others, swap, cfg.aas_threshold)
            row.update(o_row)
            swapped_all.append(swapped)
        for key, val in row.items():
            per.setdefault(key, []).append(val)
            if len(m.attributes) > 1:
                per.setdefault(f"{key}/{name}", []).append(val)
    out = {key: float(np.mean(vals)) for key, vals in per.items()}
    with eval_mode(m):  # the ranker on the split's real pairs (each image against the next)
        vals = data["attributes"][:, m.cols.cpu()].to(m.cols.device)
        r, known = relative_targets(vals, vals.roll(1, 0), m.binary, cfg.tau, cfg.tau_sim)
        x = m.to_unit(images.to(m.cols.device))
        pred = m.ranker.rank(x, x.roll(1, 0))
        ordered = known & (r != 0)
        if ordered.any():
            out["rank_acc"] = float(((pred.sign() == r) & ordered).sum() / ordered.sum())
    if cfg.inception_weights and swapped_all:
        out["fid"] = inception_fid(cfg.inception_weights, images, torch.cat(swapped_all))
    return out
