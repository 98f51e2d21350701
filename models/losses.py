"""Loss functions shared by the methods: plain functions, tensors in, tensor out.

Ranking (Singh & Lee, "End-to-End Localization and Ranking for Relative Attributes", ECCV 2016):

* `ranknet_loss` — Eq. 2, RankNet: P = sigmoid(v1 - v2), loss = -L log P - (1 - L) log(1 - P),
  L = 1 (I1 more), 0 (I1 less), 0.5 (similar). Computed as BCE-with-logits on v1 - v2, stable
  for any |v1 - v2|.
* `st_loss` — Eq. 3 in NORMALISED coordinates: the image spans [-1, 1] on both axes with its
  centre at 0 (affine_grid's convention), so with the crop centre at (s*tx, s*ty) the term is
  (s*tx)^2 + (s*ty)^2. The paper writes it in pixel coordinates ((Cx - s*tx)^2 + ...); that is
  the same loss up to a constant factor (W/2)^2 and a change of origin.
* `outside_mask` — the boundary test of Eq. 4 / the authors' code: |s*tx| > 1 or |s*ty| > 1
  (the crop CENTRE is outside the image).
* `boundary_loss` — Eq. 4: mean_i (1-l1)(1-l2) Rank_i + l1 ST(I1_i) + l2 ST(I2_i). ST depends only
  on the localiser's (s, tx, ty), so its gradient never reaches the ranker.
* `boundary_grad` — the authors' Torch7 code instead (AffineTransformMatrixGenerator backward):
  identity forward; in backward, for outside samples the incoming gradient on (s, tx, ty) is
  REPLACED by weight * grad of 0.5*s^2*(tx^2+ty^2), i.e. (s(tx^2+ty^2), s^2 tx, s^2 ty); inside
  samples are untouched. The ranker's own gradient is never changed.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def ranknet_loss(v1: torch.Tensor, v2: torch.Tensor, label: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. 2 (RankNet cross-entropy) per pair; `reduction` 'mean' (default) or 'none'."""
    d = v1 - v2
    d = d if d.dtype == torch.float64 else d.float()  # half-precision scores are promoted
    return F.binary_cross_entropy_with_logits(d, label.to(d.dtype).expand_as(d), reduction=reduction)


def st_loss(s: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per sample in normalised coordinates (image centre 0): (s*tx)^2 + (s*ty)^2."""
    return (s * tx) ** 2 + (s * ty) ** 2


def outside_mask(s: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """True where the crop centre (s*tx, s*ty) lies outside the image [-1, 1]^2."""
    return ((s * tx).abs() > 1) | ((s * ty).abs() > 1)


def boundary_loss(rank: torch.Tensor, st1: torch.Tensor, st2: torch.Tensor,
                  out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """Eq. 4: mean over pairs of (1-l1)(1-l2) rank + l1 st1 + l2 st2 (l = outside masks, 0/1)."""
    l1, l2 = out1.to(rank.dtype), out2.to(rank.dtype)
    return ((1 - l1) * (1 - l2) * rank + l1 * st1 + l2 * st2).mean()


class _BoundaryGrad(torch.autograd.Function):
    """Identity on (s, tx, ty); backward replaces the gradient of outside samples (see module doc)."""

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, weight: float) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(s, tx, ty)
        ctx.weight = weight
        return s.clone(), tx.clone(), ty.clone()

    @staticmethod
    def backward(ctx: Any, gs: torch.Tensor | None, gtx: torch.Tensor | None,
                 gty: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        s, tx, ty = ctx.saved_tensors
        out = outside_mask(s, tx, ty)
        w = ctx.weight
        repl = (w * s * (tx * tx + ty * ty), w * s * s * tx, w * s * s * ty)
        grads = [torch.where(out, r, torch.zeros_like(r) if g is None else g) for r, g in zip(repl, (gs, gtx, gty))]
        return grads[0], grads[1], grads[2], None


def boundary_grad(s: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                  weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' boundary rule as a gradient replacement (identity in the forward pass).

    `weight` scales the replacement: the authors sum per-sample gradients and divide by the batch
    size, so a step whose loss is a mean over N pairs passes weight = 1/N.
    """
    return _BoundaryGrad.apply(s, tx, ty, weight)


# -- coop_embed (Thong, Snoek & Smeulders, ICCV-W 2019) -------------------------------------------

def proxy_softmax_loss(emb: torch.Tensor, proxies: torch.Tensor, target: torch.Tensor,
                       columns: torch.Tensor | slice | None = None) -> torch.Tensor:
    """Eq. 1 / 2 / 5: mean_b -log softmax_z(-||M(f(x_b) - p_z)||^2)[target_b] over the rows with
    target >= 0 (-1 = label missing, ignored; 0 when no row has a label).

    emb [B, N], proxies [Z, N], target [B] (proxy row per image); `columns` selects the subspace
    (M_k as a column slice / index; None = the superspace)."""
    keep = target >= 0
    if not bool(keep.any()):
        return emb.sum() * 0.0
    e, p = emb[keep], proxies
    if columns is not None:
        e, p = e[:, columns], p[:, columns]
    d = torch.cdist(e.float(), p.float()).pow(2)  # squared Euclidean, as the paper's D
    return F.cross_entropy(-d, target[keep])


def proximity_matrix(ranks: torch.Tensor, sigma: float) -> torch.Tensor:
    """Eq. 3: P_vu = exp(-(r_v - r_u)^2 / (2 sigma^2)) for the ranks r of an ordinal attribute's values."""
    r = ranks.float()
    return torch.exp(-(r[:, None] - r[None, :]) ** 2 / (2 * sigma ** 2))


def order_regulariser(proxies: torch.Tensor, ranks: torch.Tensor, sigma: float) -> torch.Tensor:
    """Eq. 4: ||S - P||_F with S the cosine-similarity matrix of one attribute's value proxies
    [V, n] (in its subspace) and P the Eq. 3 prior."""
    z = F.normalize(proxies.float(), dim=1)
    return torch.linalg.matrix_norm(z @ z.T - proximity_matrix(ranks, sigma).to(z.device), ord="fro")


def mean_rows(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group means of the rows of `values` [I, N] (group [I] in 0..n_groups-1, -1 = none) and a
    mask of the groups that have a row: the category proxies c_y = mean of their instances' p_i (Sec. 3.2)."""
    keep = group >= 0
    sums = values.new_zeros(n_groups, values.shape[1]).index_add(0, group[keep], values[keep])
    counts = torch.bincount(group[keep], minlength=n_groups).to(values.dtype)
    return sums / counts.clamp_min(1)[:, None], counts > 0


def batch_all_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean hinge max(0, d(a,p) - d(a,n) + margin) over the valid triplets of a batch with a
    positive hinge (Euclidean d; labels < 0 = unlabelled, never used): the triplet loss of the
    CSN-style concatenation baseline (coop_embed Table 3c). Written here: a few lines over a [B,B]
    distance matrix; pytorch-metric-learning would add a dependency for one function."""
    d = torch.cdist(emb.float(), emb.float())
    lab = labels.view(-1)
    ok = lab >= 0
    same = (lab[:, None] == lab[None, :]) & ok[:, None] & ok[None, :]
    pos = same & ~torch.eye(len(lab), dtype=torch.bool, device=lab.device)
    neg = ~same & ok[:, None] & ok[None, :]
    hinge = (d[:, :, None] - d[:, None, :] + margin).clamp_min(0)  # [a, p, n]
    valid = pos[:, :, None] & neg[:, None, :]
    active = valid & (hinge > 0)
    if not bool(active.any()):
        return emb.sum() * 0.0
    return hinge[active].mean()


# -- deml (Chen & Deng, CVPR 2019) ----------------------------------------------------------------

def binomial_deviance_loss(emb: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0, beta: float = 0.5,
                           neg_cost: float = 35.0) -> torch.Tensor:
    """Eq. 5 for one learner: over all pairs p < q of the batch with cosine similarity D_pq,
    sum_pq 1/w_pq log(1 + exp(-(2 s_pq - 1) alpha (D_pq - beta) gamma_pq)), gamma = 1 for
    positives and `neg_cost` (C) for negatives, w_pq = the number of positive (resp. negative)
    pairs. A pair type absent from the batch contributes 0. Not in pytorch-metric-learning."""
    z = F.normalize(emb.float(), dim=1)
    sim = z @ z.T
    lab = labels.view(-1)
    upper = torch.triu(torch.ones_like(sim, dtype=torch.bool), diagonal=1)
    same = lab[:, None] == lab[None, :]
    pos, neg = upper & same, upper & ~same
    loss = sim.new_zeros(())
    if bool(pos.any()):
        loss = loss + F.softplus(-alpha * (sim[pos] - beta)).mean()
    if bool(neg.any()):
        loss = loss + F.softplus(alpha * neg_cost * (sim[neg] - beta)).mean()
    return loss


def activation_decay(emb: torch.Tensor) -> torch.Tensor:
    """Eq. 6's first term for one learner before the weight: 1/(2N) sum_n ||f_n||^2."""
    return emb.float().pow(2).sum(1).mean() / 2


def nontrivial_term(weight: torch.Tensor) -> torch.Tensor:
    """Eq. 6's L_ntri for one learner's weight w [d_out, d_in]: tr[(w w^T - I) (.) (w w^T - I)]. The
    trace of a Hadamard square only sees the diagonal, so this is sum_r (||w_r||^2 - 1)^2: it keeps
    each output row at unit norm, which the activation decay alone would shrink to zero."""
    return (weight.float().pow(2).sum(1) - 1).pow(2).sum()


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The gradient reversal layer (Ganin et al. 2016): identity forward, gradient x -scale backward."""
    return _GradReverse.apply(x, scale)


def pairwise_discrepancy(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 4 before lambda_0: sum over ordered pairs (j, j') of ||F_j - F_j'||^2, mean over the batch."""
    if len(outputs) < 2:
        return outputs[0].sum() * 0.0
    x = torch.stack([o.float() for o in outputs], 1)  # [B, J, k]
    return torch.cdist(x, x).pow(2).sum((1, 2)).mean()


def learner_contrastive_hinge(embs: list[torch.Tensor], margin: float = 2.0) -> torch.Tensor:
    """The authors' released diversity constraint (REFERENCE_NOTES.md): a contrastive loss with
    every learner pair of a scale labelled dissimilar, on L2-normalised embeddings:
    mean over pairs j < j' and images of max(0, margin - ||z_j - z_j'||)^2 / 2."""
    if len(embs) < 2:
        return embs[0].sum() * 0.0
    z = torch.stack([F.normalize(e.float(), dim=1) for e in embs], 1)  # [B, J, k]
    d = torch.cdist(z, z)
    j = z.shape[1]
    upper = torch.triu(torch.ones(j, j, dtype=torch.bool, device=z.device), diagonal=1)
    return ((margin - d[:, upper]).clamp_min(0).pow(2) / 2).mean()


# -- trip (Translation via RIval Preferences, ICLR 2021 submission) -------------------------------
# K = 1 gives Eq. 5a / 5b; K >= 2 the multi-attribute Eq. 7a / 7b (one rank head per attribute).

def trip_ranker_loss(r_real: torch.Tensor, target: torch.Tensor, r_fake: torch.Tensor, lam: float,
                     known: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 7a: E[sum_k (R_k(x, y) - r_k)^2] over real pairs (r in {-1, 0, +1}; 0 = similar pairs,
    Remark 1) + lam E[sum_k R_k(x, G(x, v))^2] over generated pairs (the rival preference).
    `known` [B, K] (bool) drops the r_k a real pair does not label (a pair compares one attribute)."""
    err = (r_real.float() - target.float()).pow(2).view(len(r_real), -1)
    if known is not None:
        err = err * known.view(len(r_real), -1).to(err.dtype)
    return err.sum(1).mean() + lam * r_fake.float().pow(2).view(len(r_fake), -1).sum(1).mean()


def trip_generator_rank_loss(r_fake: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eq. 7b: E[sum_k (R_k(x, G(x, v)) - v_k)^2] (the ranker's output linearised to v, Eq. 4)."""
    return (r_fake.float() - v.float()).pow(2).view(len(r_fake), -1).sum(1).mean()


def lsgan_discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Eq. 6a: E[(D(x) - 1)^2] + E[D(G(x, v))^2]."""
    return (d_real.float() - 1).pow(2).mean() + d_fake.float().pow(2).mean()


def lsgan_generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Eq. 6b: E[(D(G(x, v)) - 1)^2]."""
    return (d_fake.float() - 1).pow(2).mean()


def gradient_penalty(critic: Any, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None,
                     center: float = 1.0) -> torch.Tensor:
    """WGAN-GP's E[(||grad_z critic(z)||_2 - center)^2] at z = t a + (1 - t) b, t ~ U(0, 1) per
    sample (the authors: between the input and its translation); center 0 = the zero-centred
    penalty. `critic` maps [B, ...] -> [B] or [B, 1]."""
    if t is None:
        t = torch.rand(len(a), *([1] * (a.dim() - 1)), device=a.device, dtype=a.dtype)
    z = (t * a.detach() + (1 - t) * b.detach()).requires_grad_(True)
    out = critic(z)
    (grad,) = torch.autograd.grad(out.sum(), z, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - center).pow(2).mean()


def cycle_l1(x: torch.Tensor, x_back: torch.Tensor) -> torch.Tensor:
    """L_cycle: mean |x - G(G(x, v), -v)|."""
    return (x.float() - x_back.float()).abs().mean()


def orthogonal_regulariser(weights: list[torch.Tensor]) -> torch.Tensor:
    """L_o (RelGAN follows BigGAN): sum_W ||W W^T (.) (1 - I)||_F^2 with W reshaped to
    [out, in * kh * kw]: penalises the correlation between filters, not their norms."""
    total = weights[0].new_zeros(())
    for w in weights:
        m = w.float().flatten(1)
        g = m @ m.T
        total = total + (g * (1 - torch.eye(len(g), device=g.device))).pow(2).sum()
    return total
