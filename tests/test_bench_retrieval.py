"""bench/retrieval_bench.py on smoke sizes: well-formed rows, recall in [0, 1], and the numpy brute
force every speed-up is measured against returns faiss flat's exact top-10 (the oracle check)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from bench.cli import Context
from bench.retrieval_bench import K, make_gallery, numpy_search, numpy_search_batch, recall_at_k, run


def test_numpy_baseline_returns_faiss_flat_top10() -> None:
    from models.knn import build_index

    X, Q = make_gallery(2000, 32, seed=0), make_gallery(10, 32, seed=1)
    assert np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    flat = build_index("flat", 32, "l2")
    flat.add(X)
    _, want = flat.search(Q, K)
    got = np.stack([numpy_search(X, q, K) for q in Q])
    assert (got == want).all()  # same ids in the same (ascending distance) order
    assert (numpy_search_batch(X, Q, K, chunk=3) == want).all()
    # and the naive definition: sort all squared distances
    naive = np.argsort(((X[None] - Q[:, None]) ** 2).sum(-1), axis=1, kind="stable")[:, :K]
    assert recall_at_k(got, naive) == 1.0


def test_recall_at_k_counts_the_overlap() -> None:
    truth = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert recall_at_k(np.array([[3, 2, 9, -1], [4, 5, 6, 7]]), truth) == pytest.approx((2 / 4 + 1) / 2)


def test_retrieval_group_smoke_rows(tmp_path: Path) -> None:
    rows = run(Context(smoke=True, work=tmp_path, runs=tmp_path))
    by_id = {r.id: r for r in rows}
    assert set(by_id) == {"retrieval/flat_2k", "retrieval/ivf_2k", "retrieval/hnsw_2k",
                          "retrieval/latent_preference_1m"}
    for r in rows:
        r.check()
        assert r.group == "retrieval" and r.ours > 0 and r.baseline and r.baseline > 0 and r.what and r.machine
    assert by_id["retrieval/flat_2k"].goal == "" and by_id["retrieval/flat_2k"].met is None
    assert "top-10 equal to numpy's on 10/10 queries" in by_id["retrieval/flat_2k"].note
    for kind in ("ivf", "hnsw"):
        r = by_id[f"retrieval/{kind}_2k"]
        rec = [float(x) for x in re.findall(r"(?<![\d.])([01]\.\d+)(?![\d.])", r.note.split("p50")[0])]
        assert rec and all(0.0 <= x <= 1.0 for x in rec), r.note
        chosen = float(re.search(r"recall@10 ([\d.]+) at", r.note).group(1))
        assert r.met == (r.ratio >= 5.0 and chosen >= 0.95)
    pref = by_id["retrieval/latent_preference_1m"]
    assert pref.unit == "ms/query" and pref.ratio == pytest.approx(pref.baseline / pref.ours)
    assert re.search(r"exact \(vs float64 oracle\) 10/10", pref.note), pref.note  # certified: exact on every query
    assert (tmp_path / "retrieval.json").is_file()


def test_a_missed_preference_goal_says_what_limits_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.retrieval_bench as rb

    monkeypatch.setattr(rb, "LATENT_GOAL_MS", 1e-6)  # unreachable: the row must say why it is missed
    r, raw = rb.bench_preference(3000, 32, 4, 1)
    r.check()
    assert r.met is False and r.goal == "< 1e-06 ms/query"
    assert "limit: each query scans" in r.note and f"({raw['code_bytes']} B/latent)" in r.note
