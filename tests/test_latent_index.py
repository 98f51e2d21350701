"""models/latent_index.py: the float64 oracle against a naive loop, both faiss methods exact against
it (preferences with zeros and large weights, adjusted targets), forced widening / fallback,
save/load, clean errors."""
from __future__ import annotations

import numpy as np
import pytest

from models.latent_index import PreferenceIndex, brute_force

N, D, M = 2000, 32, 4


def orthonormal(rng: np.random.Generator, d: int, m: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, m)))[0]


def prefs(rng: np.random.Generator, q: int, m: int) -> np.ndarray:
    p = rng.uniform(0, 2, (q, m))
    p[:, 0] = 0.0  # "don't care"
    p[::2, 1] = 10.0  # strongly preferred
    p[1::3] = rng.choice([0.0, 1.0, 10.0], size=(len(p[1::3]), m))
    return p


@pytest.fixture(scope="module")
def data() -> dict:
    rng = np.random.default_rng(0)
    W = rng.standard_normal((N, D)).astype(np.float32)
    F = orthonormal(rng, D, M)
    wq = rng.standard_normal((9, D))
    wq[:3] = W[[5, 77, 1500]] + 0.3 * rng.standard_normal((3, D))  # queries near gallery members too
    return {"W": W, "F": F, "wq": wq, "p": prefs(rng, 9, M), "ct": (wq @ F) + rng.normal(0, 2, (9, M))}


@pytest.fixture(scope="module", params=["certified", "flat"])
def index(request: pytest.FixtureRequest, data: dict) -> PreferenceIndex:
    return PreferenceIndex.build(data["W"], data["F"], method=request.param, shards=2, progress=False,
                                 keys=[f"img{i:05d}" for i in range(N)])


def test_brute_force_matches_naive_loop() -> None:
    rng = np.random.default_rng(1)
    W = rng.standard_normal((50, 8)).astype(np.float32)
    F = orthonormal(rng, 8, 3)
    wq, p, ct = rng.standard_normal((2, 8)), np.array([[0.0, 1.0, 10.0], [2.0, 0.0, 0.5]]), rng.normal(0, 2, (2, 3))
    for c_target in (None, ct):
        d, ids = brute_force(W, F, wq, p, 7, c_target)
        for q in range(2):
            cq = F.T @ wq[q]
            rq = wq[q] - F @ cq
            t = cq if c_target is None else c_target[q]
            naive = []
            for i, w in enumerate(W.astype(np.float64)):
                c = F.T @ w
                r = w - F @ c
                naive.append((sum(p[q, m] * (t[m] - c[m]) ** 2 for m in range(3)) + sum((rq - r) ** 2), i))
            naive.sort()
            assert ids[q].tolist() == [i for _, i in naive[:7]]
            np.testing.assert_allclose(d[q], [x for x, _ in naive[:7]], rtol=1e-10)
    d1, i1 = brute_force(W, F, wq[0], p[0], 7)  # [D] query, [M] preference -> Q = 1
    assert d1.shape == i1.shape == (1, 7) and i1.dtype == np.int64


@pytest.mark.parametrize("adjusted", [False, True])
def test_index_exact(index: PreferenceIndex, data: dict, adjusted: bool) -> None:
    ct = data["ct"] if adjusted else None
    d, ids = index.search(data["wq"], data["p"], 10, ct)
    bd, bi = brute_force(data["W"], data["F"], data["wq"], data["p"], 10, ct)
    np.testing.assert_array_equal(ids, bi)
    np.testing.assert_allclose(d, bd, rtol=1e-10, atol=1e-10)
    assert np.all(np.diff(d, axis=1) >= 0)
    # the certificate is tight enough to matter: 4k + 64 of the 2000 candidates suffice, no widening
    assert index.stats["widened"] == 0 and index.stats["fallback"] == 0
    # one query at a time, [M] preference broadcast over queries: same answers
    d0, i0 = index.search(data["wq"][4], data["p"][4], 10, None if ct is None else ct[4])
    np.testing.assert_array_equal(i0[0], bi[4])
    dq, iq = index.search(data["wq"][:3], data["p"][2], 5)
    np.testing.assert_array_equal(iq, brute_force(data["W"], data["F"], data["wq"][:3], data["p"][2], 5)[1])


def test_uniform_codec_when_direct_queries_are_rounded(data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.latent_index as li

    # a faiss that rounds QT_8bit_direct queries to bytes: the QT_8bit_uniform codes must stay exact
    monkeypatch.setattr(li, "_direct_float_query", lambda d: False)
    index = PreferenceIndex.build(data["W"], data["F"], shards=1, progress=False)
    import faiss

    assert index._subs[0].sq.qtype == faiss.ScalarQuantizer.QT_8bit_uniform
    d, ids = index.search(data["wq"], data["p"], 10, data["ct"])
    bd, bi = brute_force(data["W"], data["F"], data["wq"], data["p"], 10, data["ct"])
    np.testing.assert_array_equal(ids, bi)
    np.testing.assert_allclose(d, bd, rtol=1e-10)


def test_uniform_preference_is_plain_l2(index: PreferenceIndex, data: dict) -> None:
    d, ids = index.search(data["wq"], np.ones(M), 8)
    full = ((data["wq"][:, None, :] - data["W"].astype(np.float64)[None]) ** 2).sum(-1)
    for q in range(len(full)):
        order = np.lexsort((np.arange(N), full[q]))[:8]
        np.testing.assert_array_equal(ids[q], order)
        np.testing.assert_allclose(d[q], full[q, order], rtol=1e-9)
    assert index.ntotal == N and index.dim == D and index.n_attributes == M


@pytest.mark.parametrize("method", ["certified", "flat"])
def test_near_duplicates_widen_then_fall_back(method: str) -> None:
    rng = np.random.default_rng(2)
    W = rng.standard_normal((N, D)).astype(np.float32)
    # 300 near-duplicates: their distances differ far below the first pass's quantisation / rounding
    W[1000:1300] = W[1000] + 1e-6 * rng.standard_normal((300, D))
    F = orthonormal(rng, D, M)
    wq, p = W[1000] + 0.1 * rng.standard_normal((3, D)), prefs(rng, 3, M)
    bd, bi = brute_force(W, F, wq, p, 10)
    index = PreferenceIndex.build(W, F, method=method, shards=3, progress=False)
    d, ids = index.search(wq, p, 10)
    np.testing.assert_array_equal(ids, bi)
    np.testing.assert_allclose(d, bd, rtol=1e-10)
    assert index.stats["widened"] > 0 and index.stats["fallback"] == 0
    index.max_candidates = 100  # no widening allowed past 100: the exact scan answers
    d, ids = index.search(wq, p, 10)
    np.testing.assert_array_equal(ids, bi)
    assert index.stats["fallback"] == 3


def test_save_load_round_trip(index: PreferenceIndex, data: dict, tmp_path) -> None:
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # overwriting an existing index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp dirs left behind
    for mmap in (True, False):
        loaded = PreferenceIndex.load(tmp_path / "idx", mmap=mmap)
        assert loaded.method == index.method and loaded.keys == index.keys and loaded.shards == 2
        a = index.search(data["wq"], data["p"], 10, data["ct"])
        b = loaded.search(data["wq"], data["p"], 10, data["ct"])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    (tmp_path / "idx" / "W.npy").unlink()
    with pytest.raises(FileNotFoundError, match="W.npy"):
        PreferenceIndex.load(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        PreferenceIndex.load(tmp_path / "nothing")


def test_bad_inputs(data: dict, index: PreferenceIndex) -> None:
    W, F, wq, p = data["W"], data["F"], data["wq"], data["p"]
    skew = F.copy()
    skew[:, 1] += 0.1 * F[:, 0]
    with pytest.raises(ValueError, match="F: columns are not orthonormal.*Algorithm 1"):
        PreferenceIndex.build(W, skew, progress=False)
    with pytest.raises(ValueError, match="F: has D=31"):
        brute_force(W, F[:-1], wq, p, 3)
    bad_w = W[:100].copy()
    bad_w[7, 3] = np.nan
    with pytest.raises(ValueError, match="W: contains NaN"):
        PreferenceIndex.build(bad_w, F, progress=False)
    with pytest.raises(ValueError, match="method"):
        PreferenceIndex.build(W, F, method="ivf", progress=False)
    with pytest.raises(ValueError, match="keys"):
        PreferenceIndex.build(W, F, keys=["a"], progress=False)
    for search in (index.search, lambda *a: brute_force(W, F, *a)):
        with pytest.raises(ValueError, match="p: preferences must be >= 0"):
            search(wq, -p, 3)
        with pytest.raises(ValueError, match="p: expected"):
            search(wq, p[:2], 3)
        with pytest.raises(ValueError, match="w_q: expected"):
            search(wq[:, :-1], p, 3)
        with pytest.raises(ValueError, match="w_q: contains NaN"):
            search(np.full(D, np.nan), p[0], 3)
        with pytest.raises(ValueError, match="c_target: expected"):
            search(wq, p, 3, np.zeros((len(wq), M + 1)))
        with pytest.raises(ValueError, match="k: must be"):
            search(wq, p, 0)
        with pytest.raises(ValueError, match="k: must be"):
            search(wq, p, N + 1)
