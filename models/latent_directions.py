"""latent_directions — "Face Image Retrieval with Attribute Manipulation", A. Zaeemzadeh et al.,
ICCV 2021 (papers/latent_retrieval.txt; no official code, see REFERENCE_NOTES.md).

Sparse orthogonal attribute directions in a StyleGAN latent space (Sec. 3.1) and the retrieval
built on them (Sec. 3.2). Plain functions, tensors in and out; W is [N, D] latents, F is [D, M]
with one direction per column, labels are {0, 1} with NaN = missing (ignored everywhere).

* `nearest_orthogonal` — Algorithm 1: F_hat = F (F^T F)^(-1/2) on the unit columns, norms restored
  (the polar factor U V^T of the SVD, i.e. the Procrustes solution).
* `fit_directions` — Algorithm 2: per-attribute hinge loss + lam * ||f_m||_1, one plain gradient
  step of size lr on every f_m, b_m, then the Algorithm 1 retraction; columns normalised at the end.
  The paper's loss SUMS over the N samples; we take the MEAN so that lr and lam mean the same thing
  for any N. Steps with (lr, lam) on the sum equal steps with (lr * N, lam / N) on the mean, so the
  paper's numbers taken literally on the sum would be a far larger step and a far weaker L1 than the
  same numbers here. Xavier-uniform init and early stopping on validation accuracy follow the
  unofficial reproduction (REFERENCE_NOTES.md), which found lr 1e-2 oscillating and used 1e-4.
* `select_lambda` — lam from {0, 1e-3, 5e-3, 1e-2} by validation accuracy (Sec. 4, Table 2).
* `interfacegan_directions` — the InterFaceGAN baseline [25]: one linear SVM per attribute on the
  extreme 2% of each tail of the attribute scores, unit normal as the direction.
* Retrieval — Eq. 1-2 `decompose` (d_F, d_I), Eq. 3 `weighted_distance` (d_F^T P d_F + ||d_I||^2,
  computed from projections, never [Q, N, D]), Eq. 4 / T(a) `adjust_target` with the per-attribute
  range of the training projections (`adjust_range`).
* Metrics (Sec. 4) — `ndcg_at_k` with the GLOBAL ideal DCG and relevance = `attribute_relevance`
  (number of attributes equal to the desired, adjusted attribute vector); `identity_similarity`
  (mean cosine of face embeddings); Fig. 6 `sparsity_energy` / `entries_for_energy`; `ortho_err`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as Fn


# ---------------------------------------------------------------- Algorithm 1

def nearest_orthogonal(F: torch.Tensor) -> torch.Tensor:
    """Algorithm 1: the nearest set with orthogonal columns and the same column norms. F [D, M]."""
    if F.ndim != 2:
        raise ValueError(f"F must be [D, M], got shape {tuple(F.shape)}")
    D, M = F.shape
    if M > D:
        raise ValueError(f"cannot orthogonalise M={M} directions in D={D} dimensions (M > D)")
    c = torch.linalg.vector_norm(F.double(), dim=0)
    if bool((c == 0).any()):
        raise ValueError(f"zero direction in column(s) {torch.nonzero(c == 0).flatten().tolist()}")
    Fu = F.double() / c
    # (F^T F)^(-1/2) by eigh in float64: the Gram matrix squares the condition number
    e, V = torch.linalg.eigh(Fu.T @ Fu)
    if float(e.min()) <= 1e-12 * float(e.max()):
        raise ValueError("directions are linearly dependent: the nearest orthogonal set is not unique")
    F_hat = Fu @ (V * e.rsqrt()) @ V.T
    return (F_hat * c).to(F.dtype)


def ortho_err(F: torch.Tensor) -> float:
    """max |F^T F - I|."""
    eye = torch.eye(F.shape[1], dtype=F.dtype, device=F.device)
    return float((F.T @ F - eye).abs().max())


# ---------------------------------------------------------------- Algorithm 2

def hinge_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[M]: per attribute, mean over present samples of max(0, 1 - y s), y = 2 label - 1.

    An attribute without any present label gives NaN (0 / 0)."""
    present = ~torch.isnan(labels)
    y = torch.where(present, 2 * labels - 1, torch.zeros_like(labels))
    h = torch.clamp(1 - y * scores, min=0) * present
    return h.sum(0) / present.sum(0)


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[M]: fraction of present labels predicted by sign(score) (> 0 -> 1)."""
    present = ~torch.isnan(labels)
    hit = ((scores > 0) == (labels == 1)) & present
    return hit.sum(0) / present.sum(0)


@dataclass(frozen=True)
class FitConfig:
    lam: float = 5e-3          # L1 sparsity weight (paper default; Table 2 sweeps {0, 1e-3, 5e-3, 1e-2})
    lr: float = 1e-2           # beta (paper); plain gradient descent
    max_iters: int = 2000
    eval_every: int = 10       # validation every n iterations (early stopping)
    patience: int = 20         # evaluations without improvement before stopping
    orthogonal: bool = True    # False = no Algorithm 1 retraction (used by tests / ablation)
    seed: int = 0
    standardize: bool = False  # optional: not in the paper


@dataclass
class FitResult:
    F: torch.Tensor   # [D, M] unit-norm columns (Algorithm 2 step 11)
    b: torch.Tensor   # [M] biases, rescaled with the normalisation so sign(F^T w + b) is unchanged
    best_iter: int
    history: list[dict[str, float]]   # iter, train_loss, val_acc (mean over attributes), val_loss


def _check_labels(W: torch.Tensor, Y: torch.Tensor, name: str) -> None:
    if W.ndim != 2 or Y.ndim != 2 or W.shape[0] != Y.shape[0]:
        raise ValueError(f"{name}: need W [N, D] and Y [N, M], got {tuple(W.shape)} and {tuple(Y.shape)}")


def fit_directions(W: torch.Tensor, Y: torch.Tensor, cfg: FitConfig, W_val: torch.Tensor | None = None,
                   Y_val: torch.Tensor | None = None, progress: bool = False) -> FitResult:
    """Algorithm 2, full batch. Returns unit directions F [D, M] and biases b [M].

    Early stopping: the validation mean accuracy is evaluated at iteration 0 and every
    `eval_every` steps; an evaluation improves when its accuracy is higher, or equal with a lower
    validation hinge loss (accuracy is discrete and plateaus). The best iterate is kept; training
    stops after `patience` evaluations without improvement. Without validation data it runs
    `max_iters` steps and returns the last iterate (history then has NaN val_acc / val_loss).
    """
    _check_labels(W, Y, "train")
    N, D = W.shape
    M = Y.shape[1]
    if M > D and cfg.orthogonal:
        raise ValueError(f"M={M} orthogonal directions do not fit in D={D} dimensions")
    if (W_val is None) != (Y_val is None):
        raise ValueError("give both W_val and Y_val or neither")
    if cfg.max_iters < 0 or cfg.eval_every < 1 or cfg.patience < 1:
        raise ValueError(f"need max_iters >= 0, eval_every >= 1, patience >= 1, got {cfg}")
    dtype = W.dtype if W.is_floating_point() else torch.float32
    W, Y = W.detach().to(dtype), Y.detach().to(dtype=dtype, device=W.device)  # plain GD, no autograd
    for m in range(M):
        col = Y[:, m]
        if not bool((col == 1).any()) or not bool((col == 0).any()):
            raise ValueError(f"attribute column {m} needs at least one positive and one negative label")
    if W_val is not None:
        _check_labels(W_val, Y_val, "validation")
        if W_val.shape[1] != D or Y_val.shape[1] != M:
            raise ValueError(f"validation shapes {tuple(W_val.shape)}, {tuple(Y_val.shape)} do not match D={D}, M={M}")
        W_val, Y_val = (t.detach().to(dtype=dtype, device=W.device) for t in (W_val, Y_val))

    # Optional: centre and divide by ONE global scale. A per-dimension scale would make the
    # directions non-orthogonal once mapped back to W space; a scalar keeps them orthogonal.
    mu = torch.zeros(D, dtype=dtype, device=W.device)
    s = torch.ones((), dtype=dtype, device=W.device)
    if cfg.standardize:
        mu = W.mean(0)
        s = (W - mu).pow(2).mean().sqrt().clamp_min(1e-12)
    X = (W - mu) / s
    X_val = None if W_val is None else (W_val - mu) / s

    g = torch.Generator().manual_seed(cfg.seed)
    bound = math.sqrt(6.0 / (D + M))  # Xavier-uniform for the [D, M] matrix
    F = ((torch.rand(D, M, generator=g, dtype=dtype) * 2 - 1) * bound).to(W.device)
    b = ((torch.rand(M, generator=g, dtype=dtype) * 2 - 1) / math.sqrt(D)).to(W.device)  # nn.Linear bias init
    if cfg.orthogonal:
        F = nearest_orthogonal(F)

    def objective(F: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [M]: L_m of step 5 (mean over n)
        return hinge_loss(torch.addmm(b, X, F), Y) + cfg.lam * F.abs().sum(0)

    # Hinge subgradient written out instead of autograd: one matmul each way and three [N, M]
    # passes per step (autograd makes ~3x as many; each costs a thread-pool round trip).
    present = ~torch.isnan(Y)
    y_pm = torch.where(present, 2 * Y - 1, torch.zeros_like(Y))  # 0 for missing: never contributes
    coef = y_pm / present.sum(0)  # d(mean hinge)/d(score) = -coef where the margin y s < 1

    history: list[dict[str, float]] = []
    best_acc, best_loss = -math.inf, math.inf
    best_F, best_b, best_iter, bad = F, b, 0, 0
    for it in range(cfg.max_iters + 1):
        if it % cfg.eval_every == 0 or it == cfg.max_iters:
            rec = {"iter": float(it), "train_loss": float(objective(F, b).mean()),
                   "val_acc": math.nan, "val_loss": math.nan}
            if X_val is not None:
                sc = torch.addmm(b, X_val, F)
                rec["val_acc"] = float(_accuracy(sc, Y_val).nanmean())
                rec["val_loss"] = float(hinge_loss(sc, Y_val).nanmean())
            history.append(rec)
            if progress:
                print(f"latent_directions it {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "iter"),
                      flush=True)
            if X_val is not None:
                acc, loss = rec["val_acc"], rec["val_loss"]
                if acc > best_acc or (acc == best_acc and loss < best_loss):
                    best_acc, best_loss, best_iter, bad = acc, loss, it, 0
                    best_F, best_b = F, b  # the loop rebinds F, b: no copy needed
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        break
        if it == cfg.max_iters:
            break
        # Steps 3-8 for all m at once (L_m depends on f_m, b_m only); L1 subgradient sign(f), 0 at 0.
        g_s = torch.where(y_pm * torch.addmm(b, X, F) < 1, coef, 0.0)
        # (g_s^T X)^T, not X^T g_s: the BLAS-friendly layout, 2-5x faster at N=20000, D=512 here
        F = F - cfg.lr * (cfg.lam * torch.sign(F) - (g_s.T @ X).T)
        b = b + cfg.lr * g_s.sum(0)
        if cfg.orthogonal:  # step 9: retraction onto the (scaled) Stiefel manifold
            F = nearest_orthogonal(F)
    if X_val is None:
        best_F, best_b, best_iter = F, b, it

    # Back to W space: f^T (w - mu) / s + b = (f / s)^T w + (b - f^T mu / s); then step 11.
    F_w, b_w = best_F / s, best_b - (mu @ best_F) / s
    c = torch.linalg.vector_norm(F_w, dim=0).clamp_min(torch.finfo(dtype).tiny)
    return FitResult(F=F_w / c, b=b_w / c, best_iter=best_iter, history=history)


def select_lambda(W: torch.Tensor, Y: torch.Tensor, W_val: torch.Tensor, Y_val: torch.Tensor,
                  lams: Sequence[float], cfg: FitConfig) -> tuple[float, dict[float, FitResult]]:
    """Sec. 4: pick lam by the validation mean accuracy of the kept (best) iterate.

    Ties go to the LARGER lam: at equal accuracy the sparser directions are preferred (Sec. 3.1)."""
    if not lams:
        raise ValueError("lams is empty")
    results: dict[float, FitResult] = {}
    best_lam, best_acc = None, -math.inf
    for lam in sorted(lams):
        res = fit_directions(W, Y, replace(cfg, lam=float(lam)), W_val, Y_val)
        results[lam] = res
        acc = next(h["val_acc"] for h in res.history if h["iter"] == res.best_iter)
        if acc >= best_acc:  # ascending lam, so >= hands ties to the larger one
            best_lam, best_acc = lam, acc
    return best_lam, results


# ---------------------------------------------------------------- InterFaceGAN baseline

def _svm_torch(X: torch.Tensor, Yp: torch.Tensor, sel: torch.Tensor, C: float, iters: int) -> torch.Tensor:
    """Batched soft-margin SVMs: per column m, min mean_sel hinge + ||w_m||^2 / (2 C n_m).

    Yp [n, M] in {-1, 1}, sel [n, M] bool. Full-batch Adam (lr 0.05 decaying linearly to 0, betas
    0.9 / 0.999, torch.optim's defaults) from zero, so deterministic; Adam is elementwise, so the
    columns stay independent problems. Written out: torch.optim's first use imports torch._dynamo
    (2-4 s here)."""
    n_m = sel.sum(0).to(X.dtype)
    coef = Yp * sel / n_m
    params = [torch.zeros(X.shape[1], Yp.shape[1], dtype=X.dtype), torch.zeros(Yp.shape[1], dtype=X.dtype)]
    mom = [torch.zeros_like(p) for p in params]
    var = [torch.zeros_like(p) for p in params]
    for t in range(1, iters + 1):
        w, b = params
        g_s = torch.where(Yp * torch.addmm(b, X, w) < 1, -coef, 0.0)  # hinge subgradient wrt scores
        grads = [(g_s.T @ X).T + w / (C * n_m), g_s.sum(0)]
        lr = 0.05 * (1 - (t - 1) / iters)
        for p, g, m1, m2 in zip(params, grads, mom, var):
            m1.mul_(0.9).add_(g, alpha=0.1)
            m2.mul_(0.999).addcmul_(g, g, value=0.001)
            p.sub_(lr * (m1 / (1 - 0.9 ** t)) / ((m2 / (1 - 0.999 ** t)).sqrt() + 1e-8))
    return params[0]


def interfacegan_directions(W: torch.Tensor, Y: torch.Tensor, scores: torch.Tensor | None = None,
                            extreme: float = 0.02, C: float = 1.0, iters: int = 500, *,
                            svc_max_samples: int = 2000) -> torch.Tensor:
    """InterFaceGAN [25] (genforce/interfacegan train_boundary): unit SVM normals [D, M].

    With `scores` [N, M] (continuous attribute values, NaN = missing) attribute m trains on the
    int(extreme * n) highest-scoring samples as positives and as many lowest as negatives, as
    InterFaceGAN does (Y is then only shape-checked); without, on all labelled samples of Y.
    Objective: the standard soft-margin SVM min 1/2 ||w||^2 + C sum_i max(0, 1 - y_i (w.x_i + b)),
    unregularised bias (InterFaceGAN's sklearn SVC(kernel='linear')); no validation split, no
    orthogonalisation. Solver: sklearn SVC (libsvm, exact) up to `svc_max_samples` samples, which
    covers the default (N=20000, 2% tails: 800 samples, 0.15 s at D=512). Beyond it, the same
    objective divided by C n by full-batch Adam for `iters` steps: measured at D=512, libsvm took
    36 s at n=3000 and LinearSVC (hinge, dual) 22 s per attribute at n=20000 without converging.
    """
    _check_labels(W, Y, "train")
    N, D = W.shape
    M = Y.shape[1]
    if scores is not None and tuple(scores.shape) != (N, M):
        raise ValueError(f"scores must be [N, M] = {(N, M)}, got {tuple(scores.shape)}")
    if not 0 < extreme <= 0.5:
        raise ValueError(f"extreme must be in (0, 0.5], got {extreme}")
    Wd = W.detach().double().cpu()
    Yp = torch.zeros(N, M, dtype=torch.float64)
    sel = torch.zeros(N, M, dtype=torch.bool)
    for m in range(M):
        if scores is not None:
            sm = scores[:, m].detach().double().cpu()
            valid = torch.nonzero(~torch.isnan(sm)).flatten()
            k = int(extreme * len(valid))
            if k < 1:
                raise ValueError(f"attribute column {m}: extreme={extreme} of {len(valid)} scores selects no sample")
            order = valid[torch.argsort(sm[valid], descending=True, stable=True)]
            Yp[order[:k], m], Yp[order[-k:], m] = 1.0, -1.0
            sel[order[:k], m] = sel[order[-k:], m] = True
        else:
            ym = Y[:, m].detach().double().cpu()
            sel[:, m] = ~torch.isnan(ym)
            Yp[:, m] = torch.where(ym == 1, 1.0, -1.0)
            if not bool((ym == 1).any()) or not bool((ym == 0).any()):
                raise ValueError(f"attribute column {m} needs at least one positive and one negative label")
    normals = torch.zeros(D, M, dtype=torch.float64)
    small = [m for m in range(M) if int(sel[:, m].sum()) <= svc_max_samples]
    large = [m for m in range(M) if m not in small]
    if small:
        from sklearn.svm import SVC  # imported here: `import sklearn.svm` costs seconds

        for m in small:
            idx = torch.nonzero(sel[:, m]).flatten()
            svc = SVC(kernel="linear", C=C).fit(Wd[idx].numpy(), Yp[idx, m].numpy())
            normals[:, m] = torch.tensor(svc.coef_[0])
    if large:
        rows = torch.nonzero(sel[:, large].any(1)).flatten()  # only rows some attribute trains on
        normals[:, large] = _svm_torch(Wd[rows], Yp[rows][:, large], sel[rows][:, large], C, iters)
    return (normals / torch.linalg.vector_norm(normals, dim=0).clamp_min(1e-300)).to(W.dtype).to(W.device)


# ---------------------------------------------------------------- Fig. 6 sparsity

def sparsity_energy(F: torch.Tensor) -> torch.Tensor:
    """[D]: value at k-1 = mean over columns of the energy fraction in the top-k entries by |f|^2."""
    e = F.double().pow(2).sort(dim=0, descending=True).values
    return (e.cumsum(0) / e.sum(0)).mean(1)


def entries_for_energy(F: torch.Tensor, fraction: float = 0.95) -> float:
    """Mean over columns of the smallest number of entries that hold `fraction` of the energy."""
    e = F.double().pow(2).sort(dim=0, descending=True).values
    frac = e.cumsum(0) / e.sum(0)
    # tolerance: a fraction hit exactly (e.g. 0.75 of a uniform column) must count as reached
    counts = (frac < fraction - 1e-12).sum(0) + 1
    return float(counts.double().mean())


# ---------------------------------------------------------------- Sec. 3.2 retrieval

def projections(W: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """C = W F [N, M]: coordinates along the attribute directions."""
    return W @ F


def adjust_range(C_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_min, a_max) [M]: per-attribute min and max of the training projections (defines T)."""
    return C_train.min(0).values, C_train.max(0).values


def adjust_target(c_q: torch.Tensor, a: torch.Tensor, a_min: torch.Tensor, a_max: torch.Tensor) -> torch.Tensor:
    """T(a): c_q [Q, M] with entry m set to a_m (a_max - a_min) + a_min; NaN in a = leave as is."""
    a = torch.as_tensor(a, dtype=c_q.dtype, device=c_q.device).expand_as(c_q)
    known = ~torch.isnan(a)
    if bool(((a[known] < 0) | (a[known] > 1)).any()):
        raise ValueError("attribute intensities a must lie in [0, 1] (NaN = unchanged)")
    return torch.where(known, a * (a_max - a_min) + a_min, c_q)


def decompose(w_q: torch.Tensor, W: torch.Tensor, F: torch.Tensor,
              c_target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-2, 4: d_F [Q, N, M] = c_t - F^T w, d_I [Q, N, D] = (I - F F^T)(w_q - w).

    c_t = F^T w_q unless an adjusted target is given; an adjustment moves w_q inside span(F), so
    d_I keeps the unadjusted w_q. Materialises [Q, N, D]: small N only."""
    c_t = w_q @ F if c_target is None else c_target
    d_F = c_t[:, None, :] - (W @ F)[None]
    diff = w_q[:, None, :] - W[None]
    d_I = diff - (diff @ F) @ F.T
    return d_F, d_I


def weighted_distance(w_q: torch.Tensor, W: torch.Tensor, F: torch.Tensor, p: torch.Tensor,
                      c_target: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: [Q, N] = d_F^T diag(p) d_F + ||d_I||^2, p [M] or [Q, M].

    Expanded into [Q, N] matrix products (no [Q, N, D] or [Q, N, M] tensor): with r = (I - F F^T) w,
    ||d_I||^2 = ||r_q||^2 + ||r||^2 - 2 r_q.r. Exact for any F, equal to ||w_q - w||^2 at p = 1
    when F is orthonormal."""
    C = W @ F
    c_t = w_q @ F if c_target is None else c_target
    p = torch.as_tensor(p, dtype=C.dtype, device=C.device).expand_as(c_t)
    attr = (p * c_t.pow(2)).sum(1, keepdim=True) - 2 * (p * c_t) @ C.T + p @ C.pow(2).T
    r_q, r = w_q - (w_q @ F) @ F.T, W - C @ F.T
    resid = r_q.pow(2).sum(1, keepdim=True) + r.pow(2).sum(1) - 2 * r_q @ r.T
    return attr.clamp_min(0) + resid.clamp_min(0)  # clamp: rounding of the expansion only


# ---------------------------------------------------------------- Sec. 4 metrics

def attribute_relevance(desired: torch.Tensor, gallery_attrs: torch.Tensor) -> torch.Tensor:
    """[Q, N] float: number of attributes where the gallery's {0, 1} value equals the desired one.

    NaN (either side) never matches. Two matrix products instead of a [Q, N, M] comparison."""
    for name, t in (("desired", desired), ("gallery_attrs", gallery_attrs)):
        v = t[~torch.isnan(t)]
        if bool(((v != 0) & (v != 1)).any()):
            raise ValueError(f"{name} must hold binary attributes {{0, 1}} or NaN")
    d1, d0 = (desired == 1).float(), (desired == 0).float()
    g1, g0 = (gallery_attrs == 1).float(), (gallery_attrs == 0).float()
    return d1 @ g1.T + d0 @ g0.T


def ndcg_at_k(distances: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """[Q] nDCG@k of the ranking by ascending distance, ideal DCG over the WHOLE gallery.

    Linear gain: DCG@k = sum_{i=1..k} rel_i / log2(i + 1), as torchmetrics'
    retrieval_normalized_dcg (which also takes the ideal from the list it is given, so it matches
    when given the whole gallery). Not called here: it scores one query per call (it flattens 2-D
    input into a single list) and sorts the full gallery; this is batched. Ties in distance go
    to the lower gallery index (stable sort) where torchmetrics averages the tied gains; equal
    without ties (the test checks). An all-irrelevant gallery gives 0, as in torchmetrics.
    k > N is clipped to N."""
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if distances.shape != relevance.shape or distances.ndim != 2:
        raise ValueError(f"distances and relevance must both be [Q, N], got {tuple(distances.shape)}, "
                         f"{tuple(relevance.shape)}")
    k = min(k, distances.shape[1])
    rel = relevance.double()
    order = torch.sort(distances, dim=1, stable=True).indices[:, :k]
    disc = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=rel.device))
    dcg = (rel.gather(1, order) * disc).sum(1)
    ideal = (rel.topk(k, dim=1).values * disc).sum(1)
    return torch.where(ideal > 0, dcg / ideal.clamp_min(1e-300), torch.zeros_like(dcg))


def identity_similarity(q_feat: torch.Tensor, retrieved_feat: torch.Tensor) -> torch.Tensor:
    """[Q]: mean cosine similarity between each query embedding [Q, E] and its retrieved [Q, k, E]."""
    return Fn.cosine_similarity(q_feat[:, None, :], retrieved_feat, dim=-1).mean(1)
