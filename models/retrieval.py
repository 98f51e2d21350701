"""Retrieval metrics: plain functions, arrays in (numpy or torch), floats / dicts out.

The evaluation protocol of Cooperative Embeddings (Sec. 4.2, Table 1), shared with deml and
latent_retrieval:

* Instance retrieval — `recall_at_k` / `knn_recall_at_k`: R@K, a query is a hit when one of its K
  nearest gallery images shows the same instance. The K nearest come from a `KnnIndex` backend
  (models/knn.py; faiss flat by default, `TorchIndex` in tests).
* Attribute value retrieval — `attribute_value_map`: the query term of value v of attribute k is
  the mean of the training embeddings exhibiting v, restricted to the subspace A_k (Sec. 3.1,
  masks M_k); gallery embeddings are restricted to the same subspace; mAP over the queries.
* Category retrieval — `category_map`: the query term is the mean training embedding of the
  category in the superspace U (categories are averages of instances, Sec. 3.1); mAP.
* Ordered attributes — `ordinal_mae_mrr` (Table 1c): predict the value whose query term is
  nearest; MAE of the prediction and MRR of the true value.

Retrieval uses "L2 normalization per subspace" (Sec. 4.3): the term functions normalise query
terms and gallery per subspace (`normalize=True`); for R@K normalise first with
`l2_normalize_subspaces`. Distances are Euclidean; ranking by squared L2 gives the same order.

mAP needs the rank of every relevant gallery item, i.e. a full ranking (a k = n search), so the
mAP functions compute the [queries, gallery] distance matrix directly with numpy: with few query
terms (59 values, 12 categories on In-Shop Clothes-8) this is the same brute-force work as an exact
index, without the [m, n] id matrix. Ties are broken by gallery index (stable sort), so results
are deterministic.

torchmetrics' `retrieval_average_precision` (1.9) is not used in the metric itself: it treats
items with score <= 0 as irrelevant (so negative distances as scores give AP = 0) and loops per
query. The test checks our vectorised AP against it on positive scores and against a naive loop.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from models.knn import IndexFactory, flat_index

Subspace = slice | np.ndarray | Sequence[int]  # column slice, boolean mask or column indices


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _nanmean(x: Sequence[float] | np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x[~np.isnan(x)].mean()) if (~np.isnan(x)).any() else float("nan")


def select_columns(emb: np.ndarray, subspace: Subspace | None) -> np.ndarray:
    """emb[:, subspace] for a slice, a boolean mask (length dim) or column indices; None -> emb."""
    emb = _np(emb)
    if subspace is None or isinstance(subspace, slice):
        return emb if subspace is None else emb[:, subspace]
    sub = np.asarray(subspace)
    if sub.dtype == bool and sub.shape != (emb.shape[1],):
        raise ValueError(f"boolean subspace mask has shape {sub.shape}, embedding dim is {emb.shape[1]}")
    return emb[:, sub]


def l2_normalize_subspaces(emb: np.ndarray, subspaces: Sequence[Subspace] | None = None,
                           eps: float = 1e-12) -> np.ndarray:
    """x / ||x|| per subspace block (Sec. 4.3), or over the whole vector when `subspaces` is None.

    Columns outside every block are left as they are; blocks must not overlap (the masks M_k of
    Sec. 3.1 are disjoint)."""
    out = _np(emb).astype(np.float64, copy=True)
    if subspaces is None:
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), eps)
    cols = np.arange(out.shape[1])
    seen = np.zeros(out.shape[1], bool)
    for sub in subspaces:
        idx = select_columns(cols[None, :], sub)[0]
        if seen[idx].any():
            raise ValueError("subspaces overlap: each column may belong to one subspace only")
        seen[idx] = True
        block = out[:, idx]
        out[:, idx] = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), eps)
    return out


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[m, n] squared Euclidean distances, in float64 so near-ties rank stably."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def query_terms(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct labels, their mean embeddings) — the paper's query terms (Sec. 4.2).

    Numeric labels < 0 mean "missing" (the attribute is not expressed, Sec. 3.2) and are ignored."""
    emb, labels = _np(emb).astype(np.float64), _np(labels)
    if len(emb) != len(labels):
        raise ValueError(f"{len(emb)} embeddings but {len(labels)} labels")
    if np.issubdtype(labels.dtype, np.number):
        keep = labels >= 0
        emb, labels = emb[keep], labels[keep]
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    sums = np.add.reduceat(emb[order], starts, axis=0) if len(values) else emb[:0]
    return values, sums / counts[:, None]


def recall_at_k(query_labels: np.ndarray, gallery_labels: np.ndarray, ranked_ids: np.ndarray,
                ks: Sequence[int] = (1, 5, 10),
                exclude_self: np.ndarray | None = None) -> dict[str, float]:
    """Instance Recall@K (Sec. 4.2): R@K = |{q : exists j <= K, label(g_qj) = label(q)}| / |Q+|.

    `ranked_ids` [m, w]: gallery ids of each query, nearest first (-1 = padding, as faiss
    returns). Q+ are the queries with at least one positive in the gallery; the others are
    excluded (they could never hit). Query and gallery are normally disjoint (unseen instances);
    for an evaluation over one set pass `exclude_self` [m] (or [m, j]) of gallery ids to drop per
    query (-1 = none): they are skipped when counting the K nearest and as positives. Returns
    {"recall@K": fraction in [0, 1]}; NaN when no query has a positive.
    """
    ql, gl = _np(query_labels), _np(gallery_labels)
    ranked = _np(ranked_ids).astype(np.int64)
    if ranked.ndim != 2 or len(ranked) != len(ql):
        raise ValueError(f"ranked_ids must be [{len(ql)}, w], got {list(ranked.shape)}")
    if (ranked >= len(gl)).any():
        raise ValueError(f"ranked_ids hold ids >= gallery size {len(gl)}")
    valid = ranked >= 0
    n_excl = 0
    if exclude_self is not None:
        excl = _np(exclude_self).astype(np.int64)
        excl = excl[:, None] if excl.ndim == 1 else excl
        if excl.ndim != 2 or len(excl) != len(ql):
            raise ValueError(f"exclude_self must be [{len(ql)}] or [{len(ql)}, j], got {list(excl.shape)}")
        n_excl = excl.shape[1]
        valid &= ~(ranked[:, :, None] == excl[:, None, :]).any(-1)
    hit = valid & (gl[np.maximum(ranked, 0)] == ql[:, None])
    pos = np.cumsum(valid, axis=1)  # 1-based rank among the items not excluded

    uniq, counts = np.unique(gl, return_counts=True)
    at = np.minimum(np.searchsorted(uniq, ql), len(uniq) - 1)
    n_pos = np.where(uniq[at] == ql, counts[at], 0) if len(uniq) else np.zeros(len(ql), np.int64)
    if exclude_self is not None:
        n_pos = n_pos - ((excl >= 0) & (gl[np.maximum(excl, 0)] == ql[:, None])).sum(1)
    has_pos = n_pos > 0

    out: dict[str, float] = {}
    for k in ks:
        if ranked.shape[1] < min(k + n_excl, len(gl)):
            raise ValueError(f"R@{k} needs the {k + n_excl} nearest per query, "
                             f"ranked_ids has {ranked.shape[1]}")
        hits = (hit & (pos <= k)).any(1)[has_pos]
        out[f"recall@{k}"] = float(hits.mean()) if has_pos.any() else float("nan")
    return out


def knn_recall_at_k(query_emb: np.ndarray, query_labels: np.ndarray, gallery_emb: np.ndarray,
                    gallery_labels: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                    backend: IndexFactory = flat_index, metric: str = "l2",
                    exclude_self: np.ndarray | None = None) -> dict[str, float]:
    """`recall_at_k` with the ranking from a k-NN index built by `backend(dim, metric)`."""
    g = _np(gallery_emb)
    index = backend(g.shape[1], metric)
    index.add(g)
    excl = None if exclude_self is None else _np(exclude_self)
    n_excl = 0 if excl is None else (1 if excl.ndim == 1 else excl.shape[1])
    # search deeper by the number of excluded ids so K valid neighbours remain
    _, ids = index.search(_np(query_emb), min(max(ks) + n_excl, len(g)))
    return recall_at_k(query_labels, gallery_labels, ids, ks, excl)


def average_precision(relevance: np.ndarray, scores: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """AP per query over a FULL ranking of the gallery; NaN for queries with no relevant item.

    Sort the gallery by descending score (ties: lower index first); with rel_i in {0, 1} at rank i,
    AP = (1 / R) * sum_i rel_i * P@i, P@i = (1 / i) * sum_{j <= i} rel_j, R = sum_i rel_i.
    Vectorised per block of `chunk` queries (loops over queries only)."""
    rel, sc = _np(relevance).astype(bool), _np(scores).astype(np.float64)
    if rel.shape != sc.shape or rel.ndim != 2:
        raise ValueError(f"relevance {list(rel.shape)} and scores {list(sc.shape)} must both be [m, n]")
    out = np.full(len(rel), np.nan)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    for s in range(0, len(rel), chunk):
        order = np.argsort(-sc[s:s + chunk], axis=1, kind="stable")
        r = np.take_along_axis(rel[s:s + chunk], order, axis=1)
        n_rel = r.sum(1)
        prec = np.cumsum(r, axis=1) / ranks
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + chunk] = np.where(n_rel > 0, (prec * r).sum(1) / n_rel, np.nan)
    return out


def mean_average_precision(relevance: np.ndarray, scores: np.ndarray) -> float:
    """mAP = mean over queries with >= 1 relevant item of `average_precision` (higher score =
    nearer; pass -distance). NaN when no query has a relevant item."""
    return _nanmean(average_precision(relevance, scores))


def _term_distances(train: np.ndarray, train_labels: np.ndarray, gallery: np.ndarray,
                    subspaces: Sequence[Subspace] | None,
                    normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(values, [values, gallery] squared distances) between query terms and the gallery."""
    values, q = query_terms(train, train_labels)
    g = _np(gallery).astype(np.float64)
    if normalize:
        q, g = l2_normalize_subspaces(q, subspaces), l2_normalize_subspaces(g, subspaces)
    return values, _sq_dists(q, g)


def _check_attrs(train_values: np.ndarray, gallery_values: np.ndarray,
                 subspaces: Sequence[Subspace], names: Sequence[str]) -> None:
    if not (train_values.ndim == gallery_values.ndim == 2):
        raise ValueError("attribute values must be [n, attributes] arrays (-1 = missing)")
    sizes = {len(subspaces), len(names), train_values.shape[1], gallery_values.shape[1]}
    if len(sizes) != 1:
        raise ValueError(f"{len(names)} attribute names, {len(subspaces)} subspaces, value columns "
                         f"{train_values.shape[1]} (train) / {gallery_values.shape[1]} (gallery): must agree")


def attribute_value_map(train_emb: np.ndarray, train_values: np.ndarray, gallery_emb: np.ndarray,
                        gallery_values: np.ndarray, subspace_slices: Sequence[Subspace],
                        attribute_names: Sequence[str], normalize: bool = True,
                        missing_gallery: str = "drop") -> dict[str, float]:
    """Attribute value retrieval (Sec. 4.2) -> {"attribute_map", "attribute_map/<name>", ...}.

    For attribute k with subspace A_k and each value v seen in training (values < 0 = missing,
    ignored): query q_kv = mean of M_k f(x) over training images with value v; gallery
    restricted to A_k; both L2-normalised (`normalize`); rank the gallery by ||q_kv - g||;
    relevant <=> gallery value == v; AP per (k, v) (values absent from the gallery excluded).
    "attribute_map/<name>" = mean AP over the values of k; "attribute_map" = mean over
    attributes; "attribute_map_over_queries" = mean over all (k, v) queries (the other reading).
    Gallery images missing attribute k are dropped from its ranking (`missing_gallery="drop"`,
    unknown is not wrong) or kept as irrelevant (`"irrelevant"`).
    """
    tv, gv_all = _np(train_values), _np(gallery_values)
    _check_attrs(tv, gv_all, subspace_slices, attribute_names)
    if missing_gallery not in ("drop", "irrelevant"):
        raise ValueError(f"missing_gallery must be 'drop' or 'irrelevant', got {missing_gallery!r}")
    out: dict[str, float] = {}
    per_attr, all_ap = [], []
    for a, (name, sub) in enumerate(zip(attribute_names, subspace_slices)):
        g, gv = select_columns(gallery_emb, sub), gv_all[:, a]
        if missing_gallery == "drop":
            g, gv = g[gv >= 0], gv[gv >= 0]
        values, dist = _term_distances(select_columns(train_emb, sub), tv[:, a], g, None, normalize)
        ap = average_precision(gv[None, :] == values[:, None], -dist)
        out[f"attribute_map/{name}"] = _nanmean(ap)
        per_attr.append(out[f"attribute_map/{name}"])
        all_ap.extend(ap.tolist())
    out["attribute_map"] = _nanmean(per_attr)
    out["attribute_map_over_queries"] = _nanmean(all_ap)
    return out


def category_map(train_emb: np.ndarray, train_categories: np.ndarray, gallery_emb: np.ndarray,
                 gallery_categories: np.ndarray, subspace_slices: Sequence[Subspace] | None = None,
                 normalize: bool = True) -> dict[str, float]:
    """Category retrieval (Sec. 4.2) -> {"category_map": mAP}.

    Query c_y = mean training embedding of category y in the superspace; query and gallery
    L2-normalised per subspace (whole vector if `subspace_slices` is None); rank the gallery by
    ||c_y - g||; relevant <=> same category; mAP over categories present in the gallery."""
    values, dist = _term_distances(train_emb, _np(train_categories), gallery_emb,
                                   subspace_slices, normalize)
    rel = _np(gallery_categories)[None, :] == values[:, None]
    return {"category_map": mean_average_precision(rel, -dist)}


def ordinal_mae_mrr(train_emb: np.ndarray, train_values: np.ndarray, gallery_emb: np.ndarray,
                    gallery_values: np.ndarray, subspace_slices: Sequence[Subspace],
                    attribute_names: Sequence[str],
                    value_numbers: Mapping[str, Sequence[float]] | None = None,
                    normalize: bool = True) -> dict[str, float]:
    """Ordered attributes (Table 1c): MAE and MRR of the value predicted by the nearest query term.

    For gallery image g with known value t: d_v = ||q_v - g|| in the attribute subspace (query
    terms as in `attribute_value_map`); prediction = argmin_v d_v; rank(t) = 1 + #{v: d_v < d_t}
    (+ ties before t); MAE = mean |num(pred) - num(t)|, MRR = mean 1 / rank(t), over gallery
    images whose value is known (>= 0) and seen in training. num() maps the value code to its
    number (`value_numbers[name][code]`, e.g. seats [2, 4, 5, 7]); default the code itself.
    Keys "ordinal_mae/<name>", "ordinal_mrr/<name>" and the means "ordinal_mae", "ordinal_mrr".
    """
    tv, gv_all = _np(train_values), _np(gallery_values)
    _check_attrs(tv, gv_all, subspace_slices, attribute_names)
    out: dict[str, float] = {}
    for a, (name, sub) in enumerate(zip(attribute_names, subspace_slices)):
        values, q = query_terms(select_columns(train_emb, sub), tv[:, a])
        gv = gv_all[:, a]
        keep = np.isin(gv, values) & (gv >= 0)
        g = select_columns(gallery_emb, sub)[keep].astype(np.float64)
        if normalize:
            q, g = l2_normalize_subspaces(q), l2_normalize_subspaces(g)
        d = _sq_dists(g, q)  # [gallery, values]
        t = np.searchsorted(values, gv[keep])
        d_t = d[np.arange(len(t)), t][:, None]
        before = np.arange(len(values))[None, :] < t[:, None]
        rank = 1 + (d < d_t).sum(1) + ((d == d_t) & before).sum(1)
        num = (np.asarray(value_numbers[name], np.float64)[values]
               if value_numbers and name in value_numbers else values.astype(np.float64))
        err = np.abs(num[np.argmin(d, axis=1)] - num[t]) if len(t) else np.zeros(0)
        out[f"ordinal_mae/{name}"] = float(err.mean()) if len(t) else float("nan")
        out[f"ordinal_mrr/{name}"] = float((1.0 / rank).mean()) if len(t) else float("nan")
    out["ordinal_mae"] = _nanmean([out[f"ordinal_mae/{n}"] for n in attribute_names])
    out["ordinal_mrr"] = _nanmean([out[f"ordinal_mrr/{n}"] for n in attribute_names])
    return out


__all__ = ["average_precision", "attribute_value_map", "category_map", "knn_recall_at_k",
           "l2_normalize_subspaces", "mean_average_precision", "ordinal_mae_mrr", "query_terms",
           "recall_at_k", "select_columns"]
