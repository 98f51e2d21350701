"""latent_retrieval's fitting and evaluation protocol (papers/latent_retrieval.txt Sec. 4).

`collect` encodes the training split (up to fit_samples latents), the validation split and the
evaluated split, fits Algorithm 2 for every lambda of `lams` (early stopping on validation) and
picks lambda by validation accuracy, fits the InterFaceGAN baseline, and stores the chosen
directions in the model. `protocol` then runs the paper's query protocol on the evaluated split,
which is both the query set and the gallery (the paper: the CelebA test set, 1000 queries; each
query is left out of its own gallery):

* each query flips ONE attribute m (drawn per query, seeded): desired = its labels with m
  flipped; the adjustment a_m = desired_m (T(a), Eq. 4), every other coordinate unchanged;
* preference p = 1 on every attribute but m, p_m from `preferences` (Fig. 5's sweep);
* nDCG@5/10/20: relevance = number of attributes of a gallery image matching `desired`, global
  ideal DCG over the gallery (REFERENCE_NOTES.md);
* identity similarity: mean cosine between the query's and the retrieved images' identity
  features from `identity_run` (a project model, e.g. coop_embed's instance embedding; the paper
  used a FaceNet); `same_identity@k`: the share of retrieved images of the query's identity
  (attrworld labels identities), reported always.

Table 1's settings: `none` (p_m = 1), `best` (per query, the p_m with the best nDCG@k),
`constrained` (per query, the best nDCG@k among p_m whose identity similarity is at least the
InterFaceGAN baseline's with no preference for that query; the paper's floor was the best
compositional method, which attrlab does not train), `fixed_<p>` (Fig. 5). The unprefixed keys
(`ndcg@5`, `identity_sim`, ...) are this method's `constrained` setting; `ifg/...` the baseline's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import latent_directions as ld
from models.registry import eval_mode
from shards.format import DatasetMeta, ShardError

log = logging.getLogger(__name__)
KS = (5, 10, 20)
RECON_IMAGES = 256
_IDENTITY: dict[str, Any] = {}


@dataclass
class Split:
    W: torch.Tensor  # latents [N, d+]
    Y: torch.Tensor  # binary labels [N, M] (NaN missing)
    values: torch.Tensor  # raw attribute values [N, M] (InterFaceGAN's extreme-sample scores)
    instance: list[str]
    images: torch.Tensor | None = None  # uint8 [N, 3, S, S] (evaluated split only)
    ident: torch.Tensor | None = None  # identity features [N, E]


@dataclass
class Collected:
    train: Split
    val: Split
    test: Split
    fits: dict[float, ld.FitResult]
    lam: float
    baseline: torch.Tensor  # InterFaceGAN unit normals [d+, M]
    extra: dict[str, float] = field(default_factory=dict)


def identity_model(path: str) -> tuple[Any, Any, Any]:
    """(method, config, model) of the run (or export) named by model.identity_run."""
    from jobs.evaluate import load_model_dir

    if path not in _IDENTITY:
        p = Path(path)
        if not p.exists():
            raise ShardError(f"model.identity_run {p}: not found; train an embedding run first "
                             f"(e.g. `attrlab train coop_embed --data ... --out {p}`)")
        method, cfg, model, _ = load_model_dir(p)
        if method.embed is None:
            raise ShardError(f"model.identity_run {p}: {method.name} has no embedding; use e.g. a coop_embed run")
        _IDENTITY[path] = (method, cfg, model)
    return _IDENTITY[path]


def identity_features(path: str, images: torch.Tensor) -> torch.Tensor:
    method, cfg, model = identity_model(path)
    size = cfg.data.augment.size
    out = []
    for chunk in images.split(128):
        x = chunk
        if x.shape[-1] != size:  # the identity model's input size
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)
        out.append(method.embed(model, x).float().cpu())
    return torch.cat(out)


def encode_split(m: Any, loaders: Any, split: str, limit: int, keep_images: int = 0) -> Split:
    """Latents, labels and instances of the first `limit` images of `split` (0 = all), and its
    first `keep_images` images (-1 = all)."""
    ws, ys, vs, inst, imgs = [], [], [], [], []
    n = 0
    with eval_mode(m), torch.no_grad():
        for batch in loaders(split, kind="samples"):
            images = batch["image"]
            ws.append(m.encode_images(images).cpu())
            attrs = batch["attributes"].float()
            ys.append(m.labels(attrs).cpu())
            vs.append(attrs[:, m.cols.cpu()])
            inst += list(batch["instance"])
            if keep_images < 0 or sum(len(i) for i in imgs) < keep_images:
                imgs.append(images.cpu())
            n += len(images)
            if limit and n >= limit:
                break
    if not ws:
        raise ShardError(f"latent_retrieval: split {split!r} has no images")
    cut = limit or n
    kept = (cut if keep_images < 0 else min(cut, keep_images)) if imgs else 0
    return Split(torch.cat(ws)[:cut], torch.cat(ys)[:cut], torch.cat(vs)[:cut], inst[:cut],
                 torch.cat(imgs)[:kept] if imgs else None)


def fit_config(cfg: Any, lam: float) -> ld.FitConfig:
    return ld.FitConfig(lam=lam, lr=cfg.fit_lr, max_iters=cfg.fit_iters, eval_every=cfg.fit_eval_every,
                        patience=cfg.fit_patience, seed=cfg.seed)


def fit_all(train: Split, val: Split, cfg: Any) -> tuple[float, dict[float, ld.FitResult], torch.Tensor]:
    """Algorithm 2 for every lambda (chosen on validation) and the InterFaceGAN baseline."""
    lams = tuple(cfg.lams) or (cfg.lam,)
    with torch.enable_grad():
        if len(lams) == 1:
            fits = {lams[0]: ld.fit_directions(train.W, train.Y, fit_config(cfg, lams[0]), val.W, val.Y)}
            lam = lams[0]
        else:
            lam, fits = ld.select_lambda(train.W, train.Y, val.W, val.Y, lams, fit_config(cfg, cfg.lam))
        baseline = ld.interfacegan_directions(train.W, train.Y, scores=train.values, extreme=cfg.ifg_extreme)
    return lam, fits, baseline


def collect(m: Any, loaders: Any, cfg: Any, keep_images: bool = False) -> Collected:
    data = loaders.cfg.data
    train = encode_split(m, loaders, data.train_split, cfg.fit_samples)
    val = encode_split(m, loaders, data.val_split, 0)
    # all images when they are needed (identity features, figures), else a few for the recon error
    test = encode_split(m, loaders, "__eval__", 0, keep_images=-1 if keep_images or cfg.identity_run else RECON_IMAGES)
    if cfg.identity_run:
        test.ident = identity_features(cfg.identity_run, test.images)
    lam, fits, baseline = fit_all(train, val, cfg)
    best = fits[lam]
    C = ld.projections(train.W, best.F)
    a_min, a_max = ld.adjust_range(C)
    dev = m.directions.device
    m.directions.copy_(best.F.to(dev)), m.bias.copy_(best.b.to(dev))
    m.a_min.copy_(a_min.to(dev)), m.a_max.copy_(a_max.to(dev))
    m.baseline.copy_(baseline.to(dev)), m.lam.fill_(lam), m.fitted.fill_(True)
    n = min(RECON_IMAGES, len(test.images))  # reconstruction L1 in [-1, 1] units
    extra = {"recon_l1": float((m.to_unit(m.decode_latents(test.W[:n])) - m.to_unit(test.images[:n])).abs().mean())}
    return Collected(train, val, test, fits, lam, baseline, extra)


def conditioned(F_: torch.Tensor) -> torch.Tensor:
    """InterFaceGAN's conditional manipulation: each direction projected onto the null space of
    the previous ones (Gram-Schmidt, in attribute order), so Eq. 1-3 apply to the baseline."""
    q, r = torch.linalg.qr(F_.double())
    return (q * torch.sign(torch.diagonal(r))).to(F_.dtype)


def query_plan(Y: torch.Tensor, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(query rows, flipped attribute per query, desired labels [Q, M])."""
    rng = np.random.default_rng(seed)
    y = Y.numpy()
    rows = np.flatnonzero(~np.isnan(y).all(1))
    rows = np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False))
    target = np.array([rng.choice(np.flatnonzero(~np.isnan(y[r]))) for r in rows])
    desired = Y[rows].clone()
    desired[np.arange(len(rows)), target] = 1 - desired[np.arange(len(rows)), target]
    return rows, target, desired


def _identity(split: Split, rows: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(same-identity share [Q], identity cosine [Q] or None) of the top-k retrieved."""
    inst = np.asarray(split.instance)
    same = (inst[ids[:, :k]] == inst[rows][:, None]).mean(1)
    if split.ident is None:
        return same, None
    sim = ld.identity_similarity(split.ident[rows], split.ident[torch.from_numpy(ids[:, :k])])
    return same, sim.numpy()


def sweep(split: Split, F_: torch.Tensor, a_min: torch.Tensor, a_max: torch.Tensor, cfg: Any) -> dict[str, Any]:
    """Per preference value p_m: per-query nDCG@k, identity similarity and same-identity share."""
    rows, target, desired = query_plan(split.Y, cfg.queries, cfg.seed)
    q = len(rows)
    W = split.W.double()
    Fd = F_.double()
    c_q = ld.projections(W[rows], Fd)
    a = torch.full_like(c_q, float("nan"))
    a[np.arange(q), target] = desired[np.arange(q), target].double()
    c_t = ld.adjust_target(c_q, a, a_min.double(), a_max.double())
    rel = ld.attribute_relevance(desired, split.Y).double()
    rel[np.arange(q), rows] = 0.0  # the query itself is not in its gallery (nor in the ideal DCG)
    out: dict[str, Any] = {"rows": rows, "target": target, "p": list(cfg.preferences), "ndcg": {}, "same": {}, "sim": {}, "ids": {}}
    # the query as is: plain latent L2, no adjustment (what the adjustment has to beat)
    d = torch.cdist(W[rows], W).pow(2)
    d[np.arange(q), rows] = torch.inf
    out["l2"] = {k: float(ld.ndcg_at_k(d.nan_to_num(posinf=1e300), rel, k).mean()) for k in KS}
    for v in cfg.preferences:
        p = torch.ones(q, F_.shape[1], dtype=torch.float64)
        p[np.arange(q), target] = v
        d = ld.weighted_distance(W[rows], W, Fd, p, c_t)
        d[np.arange(q), rows] = torch.inf
        ids = torch.topk(d, max(KS), largest=False).indices.numpy()
        out["ids"][v] = ids
        for k in KS:
            out["ndcg"][(v, k)] = ld.ndcg_at_k(d.nan_to_num(posinf=1e300), rel, k).numpy()
            out["same"][(v, k)], out["sim"][(v, k)] = _identity(split, rows, ids, k)
    return out


def _identity_measure(s: dict[str, Any]) -> dict[tuple[float, int], np.ndarray]:
    """The sweep's identity cosines when there is an identity model, else its same-identity shares."""
    return s["sim"] if s["sim"][(s["p"][0], KS[0])] is not None else s["same"]


def summarise(s: dict[str, Any], floor: dict[int, np.ndarray] | None) -> dict[str, float]:
    """Table 1's settings from one sweep; `floor[k]` = per-query identity floor (constrained)."""
    ps = s["p"]
    ident = _identity_measure(s)
    out: dict[str, float] = {}
    for k in KS:
        nd = np.stack([s["ndcg"][(v, k)] for v in ps])  # [P, Q]
        idm = np.stack([ident[(v, k)] for v in ps])
        sm = np.stack([s["same"][(v, k)] for v in ps])
        none = ps.index(1.0)
        best = nd.argmax(0)
        ok = idm >= (floor[k][None] - 1e-9 if floor is not None else idm[none][None])
        cons = np.where(ok, nd, -np.inf).argmax(0)
        cons = np.where(ok.any(0), cons, none)
        cols = np.arange(nd.shape[1])
        for name, pick in (("none", np.full_like(best, none)), ("best", best), ("constrained", cons)):
            out[f"{name}/ndcg@{k}"] = float(nd[pick, cols].mean())
            out[f"{name}/identity_sim@{k}"] = float(idm[pick, cols].mean())
            out[f"{name}/same_identity@{k}"] = float(sm[pick, cols].mean())
        if k == 5:
            for i, v in enumerate(ps):
                out[f"fixed_{v:g}/ndcg@5"] = float(nd[i].mean())
                out[f"fixed_{v:g}/identity_sim@5"] = float(idm[i].mean())
    return out


def identity_floor(s: dict[str, Any]) -> dict[int, np.ndarray]:
    ident = _identity_measure(s)
    return {k: ident[(1.0, k)] for k in KS}


def headline(prefix: str, summary: dict[str, float], has_ident: bool) -> dict[str, float]:
    out = {f"{prefix}{k}": v for k, v in summary.items()}
    for k in KS:
        out[f"{prefix}ndcg@{k}"] = summary[f"constrained/ndcg@{k}"]
        out[f"{prefix}same_identity@{k}"] = summary[f"constrained/same_identity@{k}"]
        if has_ident:
            out[f"{prefix}identity_sim@{k}"] = summary[f"constrained/identity_sim@{k}"]
    if has_ident:
        out[f"{prefix}identity_sim"] = summary["constrained/identity_sim@5"]
    return out


def retrieval_metrics(col: Collected, cfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """All metrics and the sweeps behind them ({'ours': ..., 'ifg': ..., 'lam_<x>': ...})."""
    has_ident = col.test.ident is not None
    base = conditioned(col.baseline)
    b_min, b_max = ld.adjust_range(ld.projections(col.train.W, base))
    sweeps = {"ifg": sweep(col.test, base, b_min, b_max, cfg)}
    floor = identity_floor(sweeps["ifg"])
    out: dict[str, float] = headline("ifg/", summarise(sweeps["ifg"], floor), has_ident)
    out.update({f"l2/ndcg@{k}": v for k, v in sweeps["ifg"]["l2"].items()})
    for lam, fit in col.fits.items():
        a_min, a_max = ld.adjust_range(ld.projections(col.train.W, fit.F))
        s = sweep(col.test, fit.F, a_min, a_max, cfg)
        sweeps[f"lam_{lam:g}"] = s
        summ = summarise(s, floor)
        out[f"lam_{lam:g}/ndcg@5"] = summ["constrained/ndcg@5"]
        out[f"lam_{lam:g}/identity_sim@5"] = summ["constrained/identity_sim@5"]
        out[f"lam_{lam:g}/same_identity@5"] = summ["constrained/same_identity@5"]
        out[f"lam_{lam:g}/entries95"] = ld.entries_for_energy(fit.F, 0.95)
        out[f"lam_{lam:g}/val_acc"] = max((h.get("val_acc", 0.0) for h in fit.history), default=0.0)
        if lam == col.lam:
            sweeps["ours"] = s
            out.update(headline("", summ, has_ident))
    chosen = col.fits[col.lam]
    out.update({"ortho_err": ld.ortho_err(chosen.F), "lambda": col.lam, "entries95": ld.entries_for_energy(chosen.F, 0.95),
                "ifg/entries95": ld.entries_for_energy(col.baseline, 0.95), "ifg/ortho_err": ld.ortho_err(col.baseline),
                "val_acc": out[f"lam_{col.lam:g}/val_acc"], "queries": float(len(sweeps["ours"]["rows"])),
                "gallery": float(len(col.test.W)), **col.extra})
    return out, sweeps


def evaluate(m: Any, loaders: Any, cfg: Any, meta: DatasetMeta) -> dict[str, float]:
    col = collect(m, loaders, cfg)
    return retrieval_metrics(col, cfg)[0]
