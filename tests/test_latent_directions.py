"""Tests for models/latent_directions.py (latent_retrieval: Algorithms 1-2, Eq. 1-4, Sec. 4 metrics)."""
from __future__ import annotations

import math
from typing import Iterator

import pytest
import torch

from models.latent_directions import (FitConfig, adjust_range, adjust_target, attribute_relevance, decompose,
                                      entries_for_energy, fit_directions, hinge_loss, identity_similarity,
                                      interfacegan_directions, ndcg_at_k, nearest_orthogonal, ortho_err,
                                      projections, select_lambda, sparsity_energy, weighted_distance)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny matmuls: on the shared 2-core box the 2-thread pool costs ~15 ms per call under load.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(n: int, G: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian latents, attribute m = [w . g_m > 0]."""
    W = torch.randn(n, G.shape[0], generator=g)
    return W, (W @ G > 0).float()


def _acc(W: torch.Tensor, Y: torch.Tensor, F: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((W @ F + b > 0) == (Y == 1)).float().mean(0)


# ---------------------------------------------------------------- Algorithm 1

def test_nearest_orthogonal_is_polar_factor_with_norms_restored() -> None:
    F = torch.randn(7, 3, generator=_gen(0), dtype=torch.float64) * torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64)
    F_hat = nearest_orthogonal(F)
    c = F.norm(dim=0)
    torch.testing.assert_close(F_hat.norm(dim=0), c)
    assert ortho_err(F_hat / c) < 1e-5
    U, _, Vh = torch.linalg.svd(F / c, full_matrices=False)
    torch.testing.assert_close(F_hat / c, U @ Vh)
    assert ortho_err(F / c) > 0.1  # the input was not orthogonal to begin with


def test_nearest_orthogonal_float32_and_fixed_points() -> None:
    F = torch.randn(16, 4, generator=_gen(1))
    F_hat = nearest_orthogonal(F)
    assert F_hat.dtype == torch.float32
    assert ortho_err(F_hat / F_hat.norm(dim=0)) < 1e-5
    Q, _ = torch.linalg.qr(F)
    scaled = Q * torch.tensor([1.0, 2.0, 0.5, 3.0])  # orthogonal already, any norms
    torch.testing.assert_close(nearest_orthogonal(scaled), scaled, atol=1e-6, rtol=0)


def test_nearest_orthogonal_errors() -> None:
    F = torch.randn(5, 3, generator=_gen(2))
    F[:, 1] = 0
    with pytest.raises(ValueError, match="zero direction.*1"):
        nearest_orthogonal(F)
    with pytest.raises(ValueError, match="M > D"):
        nearest_orthogonal(torch.randn(2, 3, generator=_gen(3)))


# ---------------------------------------------------------------- Algorithm 2

def test_hinge_loss_matches_loop_with_missing_labels() -> None:
    g = _gen(4)
    s = torch.randn(9, 3, generator=g, dtype=torch.float64) * 2
    y = (torch.rand(9, 3, generator=g) > 0.5).double()
    y[[0, 3, 4], 0] = math.nan
    y[5, 2] = math.nan
    want = []
    for m in range(3):
        terms = [max(0.0, 1 - (2 * float(y[n, m]) - 1) * float(s[n, m])) for n in range(9) if not math.isnan(y[n, m])]
        want.append(sum(terms) / len(terms))
    torch.testing.assert_close(hinge_loss(s, y), torch.tensor(want, dtype=torch.float64))


def test_fit_directions_accurate_and_orthonormal() -> None:
    g = _gen(5)
    G = torch.randn(32, 3, generator=g)
    W, Y = _data(2000, G, g)
    Wv, Yv = _data(1000, G, g)
    Y[:50, 1] = math.nan  # missing labels are ignored, not read as negatives
    r = fit_directions(W, Y, FitConfig(lr=0.1, max_iters=300, lam=1e-3), Wv, Yv)
    assert r.F.shape == (32, 3) and r.b.shape == (3,)
    assert ortho_err(r.F) < 1e-5  # orthonormal, unit columns included
    assert bool((_acc(Wv, Yv, r.F, r.b) > 0.9).all())
    again = fit_directions(W, Y, FitConfig(lr=0.1, max_iters=300, lam=1e-3), Wv, Yv)
    torch.testing.assert_close(again.F, r.F, atol=0, rtol=0)  # seeded


def test_standardize_maps_back_to_latent_space() -> None:
    g = _gen(16)
    G = torch.randn(16, 2, generator=g)
    W, Y = _data(1000, G, g)
    shifted = W * 10 + 5  # same labels, far from the origin and on another scale
    r = fit_directions(shifted, Y, FitConfig(lr=0.1, max_iters=300, lam=0.0, standardize=True))
    assert ortho_err(r.F) < 1e-5
    assert bool((_acc(shifted, Y, r.F, r.b) > 0.9).all())  # F, b apply to the raw latents


def test_orthogonality_is_what_decorrelates() -> None:
    G = torch.zeros(32, 2)
    G[0, 0], G[0, 1], G[1, 1] = 1.0, 0.6, 0.8  # true directions at cosine 0.6
    W, Y = _data(2000, G, _gen(6))
    free = fit_directions(W, Y, FitConfig(lr=0.1, max_iters=300, lam=0.0, orthogonal=False))
    orth = fit_directions(W, Y, FitConfig(lr=0.1, max_iters=300, lam=0.0, orthogonal=True))
    assert ortho_err(free.F) > 0.3
    assert ortho_err(orth.F) < 1e-5
    assert bool((_acc(W, Y, free.F, free.b) > 0.95).all())


def test_l1_gives_sparser_directions() -> None:
    g = _gen(7)
    G = torch.zeros(32, 3)
    for m in range(3):
        G[4 * m:4 * m + 4, m] = 1.0  # 4-sparse, disjoint supports
    W, Y = _data(200, G, g)  # few samples: without L1 the noise dimensions pick up weight
    Wt, Yt = _data(2000, G, g)
    dense = fit_directions(W, Y, FitConfig(lr=0.1, max_iters=300, lam=0.0))
    sparse = fit_directions(W, Y, FitConfig(lr=0.1, max_iters=300, lam=0.05))
    assert entries_for_energy(sparse.F, 0.99) < entries_for_energy(dense.F, 0.99) - 3
    assert entries_for_energy(sparse.F, 0.99) <= 6  # close to the true 4
    assert bool((_acc(Wt, Yt, sparse.F, sparse.b) > 0.9).all())


def test_early_stopping_keeps_best_iterate() -> None:
    g = _gen(8)
    G = torch.randn(16, 2, generator=g)
    W, Y = _data(300, G, g)
    Wv, Yv = _data(300, G, g)
    flip = torch.rand(Yv.shape, generator=g) < 0.3  # noisy validation labels: accuracy plateaus early
    Yv = torch.where(flip, 1 - Yv, Yv)
    cfg = FitConfig(lr=0.5, max_iters=2000, eval_every=5, patience=4, lam=0.0)
    r = fit_directions(W, Y, cfg, Wv, Yv)
    iters = [h["iter"] for h in r.history]
    assert iters[-1] < cfg.max_iters  # stopped early ...
    assert iters[-1] == r.best_iter + cfg.patience * cfg.eval_every  # ... patience evaluations after the best
    best_acc = max(h["val_acc"] for h in r.history)
    at_best = next(h for h in r.history if h["iter"] == r.best_iter)
    assert at_best["val_acc"] == best_acc
    assert float(_acc(Wv, Yv, r.F, r.b).mean()) == pytest.approx(best_acc, abs=1e-6)  # the kept iterate
    no_val = fit_directions(W, Y, FitConfig(lr=0.5, max_iters=40, eval_every=10, lam=0.0))
    assert no_val.best_iter == 40 and [h["iter"] for h in no_val.history] == [0, 10, 20, 30, 40]


def test_fit_directions_errors() -> None:
    W = torch.randn(20, 4, generator=_gen(9))
    Y = torch.ones(20, 2)
    Y[:10, 0] = 0
    with pytest.raises(ValueError, match="column 1"):
        fit_directions(W, Y, FitConfig(max_iters=1))
    with pytest.raises(ValueError, match="W \\[N, D\\]"):
        fit_directions(W, Y[:5], FitConfig(max_iters=1))


def test_select_lambda_ties_go_to_larger_lambda() -> None:
    g = _gen(10)
    G = torch.zeros(8, 1)
    G[0, 0] = 1.0
    W = torch.randn(400, 8, generator=g)
    W = W[W[:, 0].abs() > 1.0]  # wide margin: every lam reaches validation accuracy 1
    Y = (W @ G > 0).float()
    lam, res = select_lambda(W, Y, W, Y, [0.0, 1e-2, 1e-3], FitConfig(lr=0.5, max_iters=100, patience=3))
    assert set(res) == {0.0, 1e-2, 1e-3}
    assert all(max(h["val_acc"] for h in r.history) == 1.0 for r in res.values())
    assert lam == 1e-2


# ---------------------------------------------------------------- InterFaceGAN baseline

def test_interfacegan_recovers_planted_directions() -> None:
    g = _gen(11)
    G = torch.randn(16, 2, generator=g, dtype=torch.float64)
    G /= G.norm(dim=0)
    W = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    scores = W @ G + 0.3 * torch.randn(2000, 2, generator=g, dtype=torch.float64)
    scores[:100, 0] = math.nan
    N = interfacegan_directions(W, (scores > 0).double(), scores, extreme=0.1)
    torch.testing.assert_close(N.norm(dim=0), torch.ones(2, dtype=torch.float64))
    assert bool(((N * G).sum(0) > 0.9).all())


def test_interfacegan_trains_on_the_tails_only() -> None:
    g = _gen(12)
    D, n_tail, n_mid = 8, 50, 400
    e0, e1 = torch.eye(D, dtype=torch.float64)[0], torch.eye(D, dtype=torch.float64)[1]
    noise = lambda n: 0.3 * torch.randn(n, D, generator=g, dtype=torch.float64)  # noqa: E731
    # Tails: high/low scores lie far out along e0. The middle: score sign follows e1 and goes
    # against e0, so any fit that uses the middle samples is pulled away from e0.
    s_mid = torch.rand(n_mid, generator=g, dtype=torch.float64) * 2 - 1
    W = torch.cat([3 * e0 + noise(n_tail), -3 * e0 + noise(n_tail),
                   torch.sign(s_mid)[:, None] * (2 * e1 - 1.0 * e0) + noise(n_mid)])
    scores = torch.cat([2 + torch.rand(n_tail, generator=g), -2 - torch.rand(n_tail, generator=g),
                        s_mid])[:, None].double()
    Y = (scores > 0).double()
    frac = n_tail / len(W)
    tails = interfacegan_directions(W, Y, scores, extreme=frac)[:, 0]
    everything = interfacegan_directions(W, Y, scores, extreme=0.5)[:, 0]
    assert float(tails @ e0) > 0.9
    assert float(everything @ e0) < 0.5


def test_interfacegan_labels_path_and_torch_solver_agree() -> None:
    g = _gen(13)
    G = torch.randn(8, 2, generator=g, dtype=torch.float64)
    W = torch.randn(400, 8, generator=g, dtype=torch.float64)
    Y = (W @ G + 0.5 * torch.randn(400, 2, generator=g, dtype=torch.float64) > 0).double()  # not separable
    Y[:20, 1] = math.nan
    exact = interfacegan_directions(W, Y)  # libsvm
    adam = interfacegan_directions(W, Y, iters=500, svc_max_samples=0)  # batched torch solver
    assert bool(((exact * adam).sum(0) > 0.99).all())
    assert bool(((exact * G / G.norm(dim=0)).sum(0) > 0.9).all())


# ---------------------------------------------------------------- Fig. 6 sparsity

def test_sparsity_energy_hand_example() -> None:
    F = torch.tensor([[0.0, 1.0], [3.0, 1.0], [4.0, -1.0], [0.0, 1.0]])
    # column 0: energies 16, 9, 0, 0 of 25 -> 0.64, 1, 1, 1; column 1: 0.25, 0.5, 0.75, 1
    torch.testing.assert_close(sparsity_energy(F), torch.tensor([0.445, 0.75, 0.875, 1.0], dtype=torch.float64))
    assert entries_for_energy(F, 0.95) == 3.0  # (2 + 4) / 2
    assert entries_for_energy(F, 0.6) == 2.0  # (1 + 3) / 2
    assert entries_for_energy(F, 0.75) == 2.5  # (2 + 3) / 2
    assert entries_for_energy(F, 0.5) == 1.5  # (1 + 2) / 2: exactly 0.5 after 2 entries counts as reached


# ---------------------------------------------------------------- Sec. 3.2 retrieval

def test_adjust_target_hand_example() -> None:
    a_min, a_max = adjust_range(torch.tensor([[-2.0, 0.0], [2.0, 10.0], [0.0, 5.0]]))
    torch.testing.assert_close(a_min, torch.tensor([-2.0, 0.0]))
    torch.testing.assert_close(a_max, torch.tensor([2.0, 10.0]))
    c_q = torch.tensor([[5.0, 7.0], [1.0, 1.0]])
    a = torch.tensor([[0.25, math.nan], [math.nan, 1.0]])
    torch.testing.assert_close(adjust_target(c_q, a, a_min, a_max), torch.tensor([[-1.0, 7.0], [1.0, 10.0]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adjust_target(c_q, torch.tensor([[1.2, 0.0], [0.0, 0.0]]), a_min, a_max)


def _retrieval_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(14)
    F, _ = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=torch.float64))
    w_q = torch.randn(2, 6, generator=g, dtype=torch.float64)
    W = torch.randn(5, 6, generator=g, dtype=torch.float64)
    W_train = torch.randn(50, 6, generator=g, dtype=torch.float64)
    return F, w_q, W, W_train


def test_adjusting_one_attribute_changes_only_its_coordinate() -> None:
    F, w_q, W, W_train = _retrieval_case()
    a_min, a_max = adjust_range(projections(W_train, F))
    c_q = projections(w_q, F)
    a = torch.full((2, 3), math.nan, dtype=torch.float64)
    a[0, 1] = 0.9
    c_t = adjust_target(c_q, a, a_min, a_max)
    d_F0, d_I0 = decompose(w_q, W, F)
    d_F1, d_I1 = decompose(w_q, W, F, c_t)
    torch.testing.assert_close(d_I1, d_I0)
    torch.testing.assert_close(d_F1[:, :, [0, 2]], d_F0[:, :, [0, 2]])
    torch.testing.assert_close(d_F1[1], d_F0[1])
    assert float((d_F1[0, :, 1] - d_F0[0, :, 1]).abs().min()) > 1e-3
    # Eq. 4: the same as moving w_q along f_1 by alpha
    alpha = c_t[0, 1] - c_q[0, 1]
    moved = w_q.clone()
    moved[0] += alpha * F[:, 1]
    d_F2, d_I2 = decompose(moved, W, F)
    torch.testing.assert_close(d_F2, d_F1)
    torch.testing.assert_close(d_I2, d_I0)


def test_weighted_distance_matches_decomposition() -> None:
    F, w_q, W, W_train = _retrieval_case()
    c_t = projections(w_q, F) + torch.tensor([[0.5, 0.0, -1.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    for ct in (None, c_t):
        d_F, d_I = decompose(w_q, W, F, ct)
        want = (d_F.pow(2) * p[:, None, :]).sum(-1) + d_I.pow(2).sum(-1)
        torch.testing.assert_close(weighted_distance(w_q, W, F, p, ct), want)
    # p = 1: plain squared Euclidean distance in the latent space
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(weighted_distance(w_q, W, F, ones), torch.cdist(w_q, W).pow(2))
    # p_m = 0 ignores coordinate m, whatever its target
    p0 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    shifted = c_t.clone()
    shifted[:, 1] += 100.0
    torch.testing.assert_close(weighted_distance(w_q, W, F, p0, c_t), weighted_distance(w_q, W, F, p0, shifted))
    # exact for a non-orthonormal F too (the expansion does not assume F^T F = I)
    F2 = F * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) + 0.1
    d_F, d_I = decompose(w_q, W, F2)
    want = (d_F.pow(2) * p[:, None, :]).sum(-1) + d_I.pow(2).sum(-1)
    torch.testing.assert_close(weighted_distance(w_q, W, F2, p), want)


# ---------------------------------------------------------------- Sec. 4 metrics

def test_attribute_relevance_hand_example() -> None:
    desired = torch.tensor([[1.0, 0.0, math.nan], [0.0, 0.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, math.nan], [math.nan, 1.0, 0.0]])
    torch.testing.assert_close(attribute_relevance(desired, gallery), torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 1.0]]))
    with pytest.raises(ValueError, match="binary"):
        attribute_relevance(torch.tensor([[0.5, 0.0, 1.0]]), gallery)


def test_ndcg_global_ideal_hand_example() -> None:
    # query 0: gallery relevance 3, 0, 1, 2, 0; ascending distance retrieves items 2, 3 first
    rel = torch.tensor([[3.0, 0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    dist = torch.tensor([[5.0, 4.0, 0.1, 0.2, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    global_ideal = 3 / math.log2(2) + 2 / math.log2(3)  # best two of the whole gallery
    list_ideal = 2 / math.log2(2) + 1 / math.log2(3)  # best order of the retrieved two: NOT the protocol
    got = ndcg_at_k(dist, rel, 2)
    assert float(got[0]) == pytest.approx(dcg / global_ideal, abs=1e-12)
    assert float(got[0]) != pytest.approx(dcg / list_ideal, abs=1e-3)
    assert float(got[1]) == 0.0  # nothing relevant anywhere
    # k = 3: the third retrieved item (4) has relevance 0; the third ideal gain is 1 (item 2)
    assert float(ndcg_at_k(dist, rel, 3)[0]) == pytest.approx(dcg / (global_ideal + 1 / math.log2(4)), abs=1e-12)
    assert float(ndcg_at_k(-rel[:1], rel[:1], 2)[0]) == pytest.approx(1.0)  # perfect ranking


@pytest.mark.slow  # the call takes ms, but `import torchmetrics` pulls in torchvision: 5-10 s here
def test_ndcg_matches_torchmetrics_on_whole_gallery() -> None:
    from torchmetrics.functional.retrieval import retrieval_normalized_dcg

    g = _gen(15)
    dist = torch.rand(6, 40, generator=g, dtype=torch.float64)
    rel = torch.randint(0, 5, (6, 40), generator=g).float()
    for k in (1, 5, 10):
        tm = torch.stack([retrieval_normalized_dcg(-d, r.long(), top_k=k) for d, r in zip(dist, rel)])
        torch.testing.assert_close(ndcg_at_k(dist, rel, k).float(), tm, atol=1e-5, rtol=0)


def test_identity_similarity_hand_example() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    got = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]]])
    torch.testing.assert_close(identity_similarity(q, got), torch.tensor([0.5, (1 + math.sqrt(0.5)) / 2]))


def test_ortho_err_hand_example() -> None:
    assert ortho_err(torch.tensor([[1.0, 0.0], [0.0, 2.0]])) == pytest.approx(3.0)
    assert ortho_err(torch.tensor([[1.0, 1.0], [0.0, 0.0]])) == pytest.approx(1.0)  # F^T F = all ones
