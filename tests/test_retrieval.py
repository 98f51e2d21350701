"""k-NN backends, index persistence and the retrieval metrics (models/knn.py, models/retrieval.py)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from models import knn
from models.knn import FaissIndex, TorchIndex, build_index, load_saved_index, save_index
from models.retrieval import (attribute_value_map, average_precision, category_map, knn_recall_at_k,
                              l2_normalize_subspaces, mean_average_precision, ordinal_mae_mrr,
                              recall_at_k)


def _data(n: int = 60, m: int = 7, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((m, d)).astype(np.float32)


# ---------------------------------------------------------------- k-NN backends

@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_flat_matches_torch(metric: str) -> None:
    x, q = _data()
    f, t = build_index("flat", 8, metric), TorchIndex(8, metric)
    f.add(x)
    t.add(x)
    (df, i_f), (dt, i_t) = f.search(q, 5), t.search(q, 5)
    assert i_f.dtype == i_t.dtype == np.int64
    np.testing.assert_array_equal(i_f, i_t)
    np.testing.assert_allclose(df, dt, atol=1e-4)
    if metric == "l2":  # squared L2, faiss's convention, on both
        np.testing.assert_allclose(dt[:, 0], ((q - x[i_t[:, 0]]) ** 2).sum(1), rtol=1e-5)


def test_torch_pads_like_faiss_when_k_exceeds_ntotal() -> None:
    x, q = _data(n=3)
    f, t = build_index("flat", 8), TorchIndex(8)
    f.add(x)
    t.add(x)
    (df, i_f), (dt, i_t) = f.search(q, 5), t.search(q, 5)
    np.testing.assert_array_equal(i_f, i_t)
    assert (i_t[:, 3:] == -1).all()
    np.testing.assert_array_equal(df[:, 3:], dt[:, 3:])


def test_ivf_and_hnsw_recover_exact_top1() -> None:
    x, q = _data(n=200, m=20)
    exact = TorchIndex(8)
    exact.add(x)
    top1 = exact.search(q, 1)[1]
    ivf = build_index("ivf", 8, nlist=8, nprobe=8)  # nprobe = nlist: every list is scanned
    hnsw = build_index("hnsw", 8, M=16, efSearch=256, efConstruction=64)
    for ix in (ivf, hnsw):
        ix.add(x)
        np.testing.assert_array_equal(ix.search(q, 1)[1], top1)
    assert ivf.params == {"nlist": 8, "nprobe": 8} and hnsw.params["efSearch"] == 256


def test_ivf_clamps_nlist_to_training_size() -> None:
    x, q = _data(n=5)
    ivf = build_index("ivf", 8, nlist=16, nprobe=16)
    ivf.add(x)
    assert ivf.params == {"nlist": 5, "nprobe": 5} and ivf.ntotal == 5
    ivf.add(x)  # a second add must not retrain
    assert ivf.ntotal == 10


@pytest.mark.parametrize("kind, params, bad", [
    ("bogus", {}, "bogus"), ("ivf", {"nprob": 4}, "nprob"), ("ivf", {"M": 8}, "'M'"),
    ("flat", {"nlist": 4}, "nlist"), ("hnsw", {"M": 0}, "'M'")])
def test_build_index_rejects_unknown_kind_or_param(kind: str, params: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad) as err:
        build_index(kind, 8, **params)
    if kind == "bogus":
        assert "flat, ivf, hnsw" in str(err.value)
    with pytest.raises(ValueError, match="cosine"):
        build_index("flat", 8, "cosine")


def test_configure_faiss_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(knn.faiss, "omp_set_num_threads", calls.append)
    monkeypatch.setattr(knn, "_available_cpus", lambda: 2)
    assert knn.configure_faiss_threads() == 1
    monkeypatch.setattr(knn, "_available_cpus", lambda: 32)
    assert knn.configure_faiss_threads() == 8
    assert knn.configure_faiss_threads(3) == 3
    assert calls == [1, 8, 3]
    monkeypatch.setattr(knn, "_threads_configured", False)
    FaissIndex("flat", 4)  # first build configures lazily
    assert calls[-1] == 8 and knn._threads_configured


# ---------------------------------------------------------------- persistence

@pytest.mark.parametrize("kind, params", [("flat", {}), ("ivf", {"nlist": 4, "nprobe": 2}),
                                          ("hnsw", {"M": 8, "efSearch": 32}), ("torch", {})])
def test_index_round_trip(tmp_path: Path, kind: str, params: dict) -> None:
    x, q = _data(n=40)
    ix = build_index(kind, 8, "ip" if kind == "hnsw" else "l2", **params)
    ix.add(x)
    keys = [f"shard-{i:03d}/img\u2028{i}" for i in range(40)]  # a unicode line separator survives
    save_index(ix, tmp_path / "ix", keys, {"model": "coop_embed", "split": "gallery"})
    loaded, keys2, meta = load_saved_index(tmp_path / "ix")
    assert keys2 == keys and loaded.kind == kind and loaded.metric == ix.metric
    assert meta == json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["model"] == "coop_embed" and meta["ntotal"] == 40 and meta["params"] == ix.params
    assert loaded.params == ix.params
    for a, b in zip(ix.search(q, 4), loaded.search(q, 4)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind, victim", [("flat", "keys.txt"), ("flat", "index.faiss"),
                                          ("torch", "index.npy"), ("flat", "meta.json")])
def test_incomplete_directory_names_missing_file(tmp_path: Path, kind: str, victim: str) -> None:
    ix = build_index(kind, 8)
    ix.add(_data(n=3)[0])
    save_index(ix, tmp_path, ["a", "b", "c"], {})
    (tmp_path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        load_saved_index(tmp_path)


def test_save_index_validates_keys_and_meta(tmp_path: Path) -> None:
    ix = TorchIndex(8)
    ix.add(_data(n=2)[0])
    with pytest.raises(ValueError, match="one key per row"):
        save_index(ix, tmp_path, ["a"], {})
    with pytest.raises(ValueError, match="line break"):
        save_index(ix, tmp_path, ["a", "b\nc"], {})
    with pytest.raises(ValueError, match="reserved"):
        save_index(ix, tmp_path, ["a", "b"], {"kind": "x"})


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for kind in ("flat", "torch"):
        ix = build_index(kind, 8)
        ix.add(_data(n=3)[0])
        save_index(ix, tmp_path / kind, ["a", "b", "c"], {})

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("pickle used while loading an index")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    for kind in ("flat", "torch"):
        assert load_saved_index(tmp_path / kind)[0].ntotal == 3
    monkeypatch.undo()
    # a pickled object array in place of index.npy is refused, not executed
    np.save(tmp_path / "torch" / "index.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_saved_index(tmp_path / "torch")


# ---------------------------------------------------------------- Recall@K

def test_recall_at_k_hand_built() -> None:
    gallery = np.array([0, 0, 1, 2, 2, 5])
    queries = np.array([0, 1, 2, 3])
    ranked = np.array([[2, 0, 3],   # labels 1,0,2: first hit at rank 2
                       [2, 4, 5],   # labels 1,2,5: hit at rank 1
                       [0, 1, 5],   # labels 0,0,5: no hit in 3
                       [0, 1, 2]])  # label 3 absent from gallery: excluded
    r = recall_at_k(queries, gallery, ranked, ks=(1, 2, 3))
    # 3 counted queries: R@1 = 1/3 (q1), R@2 = R@3 = 2/3 (q0, q1)
    assert r == pytest.approx({"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 2 / 3})
    # drop gallery id 2 for q0 and q1: q0's list becomes 0,3 -> hit at rank 1; q1 loses its only
    # positive (id 2 is the sole label-1 item) -> excluded; q2 still misses: R@1 = R@2 = 1/2
    r = recall_at_k(queries, gallery, ranked, ks=(1, 2), exclude_self=np.array([2, 2, -1, -1]))
    assert r == pytest.approx({"recall@1": 1 / 2, "recall@2": 1 / 2})
    with pytest.raises(ValueError, match="R@5"):
        recall_at_k(queries, gallery, ranked, ks=(5,))


def test_knn_recall_backends_agree_and_exclude_self() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 30)
    emb = (np.eye(4)[labels] * 3 + rng.standard_normal((30, 4)) * 0.8).astype(np.float32)
    a = knn_recall_at_k(emb[:10], labels[:10], emb[10:], labels[10:], ks=(1, 5))
    b = knn_recall_at_k(emb[:10], labels[:10], emb[10:], labels[10:], ks=(1, 5), backend=TorchIndex)
    assert a == b and 0 < a["recall@1"] <= a["recall@5"] <= 1
    # one set as query and gallery: without exclusion every query finds itself at rank 1
    assert knn_recall_at_k(emb, labels, emb, labels, ks=(1,))["recall@1"] == 1.0
    self_ex = knn_recall_at_k(emb, labels, emb, labels, ks=(1,), exclude_self=np.arange(30))
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1) + np.diag(np.full(30, np.inf))
    assert self_ex["recall@1"] == pytest.approx((labels[d.argmin(1)] == labels).mean())


# ---------------------------------------------------------------- mAP

def test_map_hand_built() -> None:
    rel = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.9, 0.8], [0.4, 0.3, 0.2, 0.1]])
    # q0 order 0,1,2,3 -> rel 1,0,1,0: AP = (1/1 + 2/3) / 2 = 5/6
    # q1 order 2,3,1,0 -> rel 0,0,1,0: AP = (1/3) / 1 = 1/3;  q2 has no relevant item: excluded
    ap = average_precision(rel, scores)
    np.testing.assert_allclose(ap[:2], [5 / 6, 1 / 3])
    assert np.isnan(ap[2])
    assert mean_average_precision(rel, scores) == pytest.approx((5 / 6 + 1 / 3) / 2)  # 7/12
    assert mean_average_precision(torch.tensor(rel), torch.tensor(scores)) == pytest.approx(7 / 12)


def _random_relevance(seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rel = rng.random((9, 25)) < 0.3
    rel[0] = False  # one query without relevant items
    return rel, rng.random((9, 25)) + 0.01  # positive: torchmetrics counts score <= 0 as irrelevant


def test_map_matches_naive_loop() -> None:
    rel, scores = _random_relevance()
    aps = []
    for r, s in zip(rel, scores):  # naive oracle: walk the ranking, average precision at each hit
        if not r.any():
            continue
        hits, precs = 0, []
        for rank, j in enumerate(sorted(range(len(s)), key=lambda j: -s[j]), start=1):
            if r[j]:
                hits += 1
                precs.append(hits / rank)
        aps.append(sum(precs) / len(precs))
    assert mean_average_precision(rel, scores) == pytest.approx(np.mean(aps), abs=1e-12)
    # -distance scores are negative: the ranking, hence the AP, only depends on the order
    assert mean_average_precision(rel, scores - 5.0) == pytest.approx(np.mean(aps), abs=1e-12)


@pytest.mark.slow  # the call takes ms, but `import torchmetrics` pulls in torchvision: 5-9 s here
def test_map_matches_torchmetrics() -> None:
    from torchmetrics.functional.retrieval import retrieval_average_precision

    rel, scores = _random_relevance()
    tm = [float(retrieval_average_precision(torch.tensor(s), torch.tensor(r)))
          for r, s in zip(rel, scores) if r.any()]
    np.testing.assert_allclose(average_precision(rel, scores)[1:], tm, atol=1e-6)
    # the reason the metric does not call it: torchmetrics 1.9 zeroes relevance where score <= 0
    r, s = torch.tensor(rel[1]), torch.tensor(scores[1] - 5.0)
    assert float(retrieval_average_precision(s, r)) == 0.0


# ---------------------------------------------------------------- attribute / category mAP

def _unit(deg: float) -> np.ndarray:
    return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])


def _attr_case() -> tuple[np.ndarray, ...]:
    """4-d embedding, attribute 'a' in columns 0:2 (values 0, 1), 'b' in 2:4 (values 0, 1, 2)."""
    rng = np.random.default_rng(3)
    dirs_a, dirs_b = [_unit(0), _unit(90)], [_unit(0), _unit(120), _unit(240)]

    def make(vals: np.ndarray) -> np.ndarray:
        e = rng.standard_normal((len(vals), 4))
        for i, (va, vb) in enumerate(vals):
            if va >= 0:
                e[i, :2] = dirs_a[va] * rng.uniform(0.5, 3)
            if vb >= 0:
                e[i, 2:] = dirs_b[vb] * rng.uniform(0.5, 3)
        return e

    tv = np.array([[0, 0], [0, 1], [1, 2], [1, 0], [0, 2], [1, 1], [-1, -1], [-1, -1]])
    gv = np.array([[1, 0], [0, 2], [1, 1], [0, 0], [0, 1], [1, 2], [-1, 0]])
    train, gallery = make(tv), make(gv)
    # missing values carry large, misleading embeddings: if they entered a value's mean (e.g. -1
    # wrapping to the last value), that query would point away from its images
    train[6:, :2], train[6:, 2:] = -50 * dirs_a[1], -50 * dirs_b[2]
    return train, tv, gallery, gv


def test_attribute_value_map_perfect_and_missing_ignored() -> None:
    train, tv, gallery, gv = _attr_case()
    subs = [slice(0, 2), slice(2, 4)]
    out = attribute_value_map(train, tv, gallery, gv, subs, ["a", "b"])
    assert out == pytest.approx({"attribute_map": 1.0, "attribute_map/a": 1.0, "attribute_map/b": 1.0,
                                 "attribute_map_over_queries": 1.0})
    masks = [np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1], bool)]
    assert attribute_value_map(train, tv, gallery, gv, masks, ["a", "b"])["attribute_map"] == 1.0
    # 'a' in the gallery: ids 0, 2 (v=1) at 90 deg, ids 1, 3, 4 (v=0) at 0 deg; move id 5 (v=1)
    # to 30 deg and put id 6 (value missing) at 60 deg. Query v=1 (90 deg) ranks 0, 2, then 6, 5,
    # then the v=0 items. Dropped (default), id 6 is ignored: AP 1. Kept as irrelevant: rel
    # 1,1,0,1 -> AP = (1/1 + 2/2 + 3/4) / 3 = 11/12. Query v=0 ranks 1,3,4 first either way: AP 1
    gallery[5, :2], gallery[6, :2] = _unit(30), _unit(60)
    out = attribute_value_map(train, tv, gallery, gv, subs, ["a", "b"], missing_gallery="irrelevant")
    assert out["attribute_map/a"] == pytest.approx((1 + 11 / 12) / 2)
    assert attribute_value_map(train, tv, gallery, gv, subs, ["a", "b"])["attribute_map/a"] == 1.0


def test_attribute_value_map_permuted_case() -> None:
    # attribute 'a' (cols 0:2): query terms at 0 deg (v=0) and 90 deg (v=1); gallery at
    # 0 (v0), 30 (v1), 60 (v0), 90 (v1) degrees
    train = np.stack([_unit(0), _unit(0) * 2, _unit(90), _unit(90) * 3])
    tv = np.array([[0], [0], [1], [1]])
    gallery = np.stack([_unit(0), _unit(30), _unit(60), _unit(90)])
    gv = np.array([[0], [1], [0], [1]])
    # v=0 ranks 0,30,60,90 -> rel 1,0,1,0: AP = (1 + 2/3)/2 = 5/6; v=1 ranks 90,60,30,0 -> 5/6
    out = attribute_value_map(train, tv, gallery, gv, [slice(0, 2)], ["a"])
    assert out["attribute_map"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="must agree"):
        attribute_value_map(train, tv, gallery, gv, [slice(0, 1), slice(1, 2)], ["a"])


def test_category_map_hand_built() -> None:
    # categories 'x' (centre 0 deg) and 'y' (centre 90 deg) in a 2-d superspace
    train = np.stack([_unit(-10), _unit(10), _unit(80), _unit(100)]) * 2
    tc = np.array(["x", "x", "y", "y"])
    gallery = np.stack([_unit(5), _unit(50), _unit(40), _unit(85)])
    gc = np.array(["x", "y", "x", "y"])
    # x ranks 5,40,50,85 -> rel 1,1,0,0: AP 1; y ranks 85,50,40,5 -> rel 1,1,0,0: AP 1
    assert category_map(train, tc, gallery, gc)["category_map"] == pytest.approx(1.0)
    gc = np.array(["x", "x", "y", "y"])
    # x: rel 1,0,1,0 (5,40,50,85 -> x,y,x,y) AP = (1 + 2/3)/2 = 5/6; y: 85,50,40,5 -> y,x,y,x: 5/6
    assert category_map(train, tc, gallery, gc)["category_map"] == pytest.approx(5 / 6)
    # per-subspace normalisation: a huge second block must not swamp the first
    big = np.hstack([gallery, np.ones((4, 2)) * 100])
    tbig = np.hstack([train, np.ones((4, 2)) * 100])
    subs = [slice(0, 2), slice(2, 4)]
    assert category_map(tbig, tc, big, gc, subs)["category_map"] == pytest.approx(5 / 6)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize_subspaces(big, subs)[:, 2:], axis=1), 1)


# ---------------------------------------------------------------- ordinal MAE / MRR

def test_ordinal_mae_mrr_hand_built() -> None:
    # query terms at 0, 45, 90 degrees for values 0, 1, 2 (means of +-5 degree pairs)
    train = np.stack([_unit(a) for v in (0, 45, 90) for a in (v - 5, v + 5)] + [_unit(200) * 9])
    tv = np.array([0, 0, 1, 1, 2, 2, -1])[:, None].repeat(2, 1)
    gallery = np.stack([_unit(10), _unit(50), _unit(85), _unit(88), _unit(0)])
    gv = np.array([0, 2, 1, 0, -1])[:, None].repeat(2, 1)
    # 10 deg, true 0: order 0,1,2 -> pred 0, rank 1
    # 50 deg, true 2: order 1 (5), 2 (40), 0 (50) -> pred 1, |1-2| = 1, rank 2
    # 85 deg, true 1: order 2 (5), 1 (40), 0 -> pred 2, |2-1| = 1, rank 2
    # 88 deg, true 0: order 2, 1, 0 -> pred 2, |2-0| = 2, rank 3;  item 4 (missing) ignored
    # MAE = (0+1+1+2)/4 = 1; MRR = (1 + 1/2 + 1/2 + 1/3)/4 = 7/12
    # with doors numbers [2, 3, 5]: errors 0, |3-5|, |5-3|, |5-2| -> MAE = 7/4
    train4 = np.hstack([train, train])
    out = ordinal_mae_mrr(train4, tv, np.hstack([gallery, gallery]), gv, [slice(0, 2), slice(2, 4)],
                          ["seats", "doors"], value_numbers={"doors": [2, 3, 5]})
    assert out["ordinal_mae/seats"] == pytest.approx(1.0)
    assert out["ordinal_mrr/seats"] == pytest.approx(7 / 12)
    assert out["ordinal_mae/doors"] == pytest.approx(7 / 4)
    assert out["ordinal_mrr/doors"] == pytest.approx(7 / 12)
    assert out["ordinal_mae"] == pytest.approx((1 + 7 / 4) / 2)
    assert out["ordinal_mrr"] == pytest.approx(7 / 12)
