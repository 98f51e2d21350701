"""Style evolution through the embedding (Cooperative Embeddings, Sec. 5.3, Figs. 4-5).

* Visual transitions between two images: a k-nearest-neighbour graph over the test gallery
  (k = 5 in the paper), edge weight = Euclidean (L2, not squared) distance, and Dijkstra's
  shortest path from a source to a target image (`knn_graph`, `shortest_path`). The largest
  single step of a path tends to mark a crossing of a category boundary (`largest_step`).
* Transition to an empirical category centre: the centre joins the graph as a virtual node linked
  to its k nearest images (`path_to_point`).
* Visual transitions within a category: images ranked by the distance to their empirical
  category centre, the mean embedding of the category (`typicality`, `rank_typical`).

Every function takes `subspace` (a column slice, boolean mask or column indices) to work in one
attribute subspace A_k instead of the superspace. Normalise beforehand if wanted
(`models.retrieval.l2_normalize_subspaces`); the functions use the embeddings as given.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import dijkstra

from models.knn import IndexFactory, flat_index
from models.retrieval import Subspace, query_terms, select_columns

# sparse matrices drop explicit zeros, which would delete the edge between duplicate embeddings
_MIN_EDGE = 1e-12


def _neighbours(x: np.ndarray, q: np.ndarray, k: int, backend: IndexFactory | None,
                drop_self: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, Euclidean distances) of the k nearest of each row of q among x."""
    index = (backend or flat_index)(x.shape[1], "l2")
    index.add(x)
    extra = 1 if drop_self else 0
    d2, ids = index.search(q, min(k + extra, len(x)))
    keep = ids >= 0
    if drop_self:
        keep &= ids != np.arange(len(q))[:, None]
        # with duplicates a row may not find itself: keep only its k first others
        keep &= np.cumsum(keep, axis=1) <= k
    rows = np.broadcast_to(np.arange(len(q))[:, None], ids.shape)[keep]
    return rows, ids[keep], np.sqrt(np.maximum(d2[keep].astype(np.float64), 0.0))


def knn_graph(emb: np.ndarray, k: int = 5, backend: IndexFactory | None = None,
              subspace: Subspace | None = None) -> sp.csr_matrix:
    """Symmetric k-NN graph: i-j is an edge when j is among the k nearest of i or vice versa;
    weight = ||e_i - e_j||_2 (the backend's squared L2, square-rooted)."""
    x = np.ascontiguousarray(select_columns(emb, subspace), dtype=np.float32)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows, cols, w = _neighbours(x, x, k, backend, drop_self=True)
    a = sp.csr_matrix((np.maximum(w, _MIN_EDGE), (rows, cols)), shape=(len(x), len(x)))
    return a.maximum(a.T).tocsr()  # distances are symmetric, so max just fills the missing half


def shortest_path(graph: sp.spmatrix, src: int, dst: int) -> tuple[list[int], list[float]]:
    """Dijkstra from src to dst -> (node ids src..dst, cumulative cost at each node, 0 at src)."""
    n = graph.shape[0]
    for name, v in (("src", src), ("dst", dst)):
        if not 0 <= v < n:
            raise ValueError(f"{name}={v} is not a node of the graph (0..{n - 1})")
    dist, pred = dijkstra(graph, directed=False, indices=src, return_predecessors=True)
    if not np.isfinite(dist[dst]):
        raise ValueError(f"dst={dst} is not reachable from src={src}: the k-NN graph is "
                         "disconnected; build it with a larger k")
    path = [int(dst)]
    while path[-1] != src:
        path.append(int(pred[path[-1]]))
    path.reverse()
    return path, [float(dist[v]) for v in path]


def largest_step(path: list[int], cum_cost: list[float]) -> int:
    """Index i of the longest single edge path[i] -> path[i+1] (Sec. 5.3: boundary crossings)."""
    if len(path) != len(cum_cost) or len(path) < 2:
        raise ValueError("largest_step needs a path of at least 2 nodes with one cost per node")
    return int(np.argmax(np.diff(np.asarray(cum_cost))))


def path_to_point(emb: np.ndarray, src: int, target_vec: np.ndarray, k: int = 5,
                  backend: IndexFactory | None = None, subspace: Subspace | None = None,
                  graph: sp.spmatrix | None = None) -> tuple[list[int], list[float]]:
    """Shortest path from image `src` to a point (e.g. a category centre).

    The point becomes a virtual node with id len(emb), linked to its k nearest images, so the
    returned path ENDS at id len(emb) (not an image). `target_vec` has the full or the
    subspace dimension; pass a prebuilt `graph` (from `knn_graph`, same k and subspace) to reuse it."""
    x = np.ascontiguousarray(select_columns(emb, subspace), dtype=np.float32)
    t = np.asarray(target_vec, dtype=np.float32).reshape(1, -1)
    if t.shape[1] != x.shape[1]:
        t = np.ascontiguousarray(select_columns(t, subspace), dtype=np.float32)
    if t.shape[1] != x.shape[1]:
        raise ValueError(f"target_vec has dim {t.shape[1]}, embeddings (in the subspace) {x.shape[1]}")
    g = graph if graph is not None else knn_graph(x, k, backend)
    n = len(x)
    _, cols, w = _neighbours(x, t, k, backend, drop_self=False)
    w = np.maximum(w, _MIN_EDGE)
    link = sp.csr_matrix((np.concatenate([w, w]), (np.concatenate([np.full(len(cols), n), cols]),
                                                   np.concatenate([cols, np.full(len(cols), n)]))),
                         shape=(n + 1, n + 1))
    return shortest_path(sp.block_diag([g, sp.csr_matrix((1, 1))]).tocsr() + link, src, n)


def typicality(emb: np.ndarray, categories: np.ndarray, subspace: Subspace | None = None) -> np.ndarray:
    """Per item: Euclidean distance to the empirical centre (mean embedding) of its own category."""
    x = select_columns(emb, subspace).astype(np.float64)
    cats = np.asarray(categories)
    values, centres = query_terms(x, cats)
    if len(values) == 0 or (np.issubdtype(cats.dtype, np.number) and (cats < 0).any()):
        raise ValueError("every item needs a category (numeric categories must be >= 0)")
    return np.linalg.norm(x - centres[np.searchsorted(values, cats)], axis=1)


def rank_typical(emb: np.ndarray, categories: np.ndarray, category: object, n: int,
                 subspace: Subspace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n most typical ids, nearest the centre first; n least typical ids, farthest first)."""
    cats = np.asarray(categories)
    members = np.flatnonzero(cats == category)
    if len(members) == 0:
        raise ValueError(f"category {category!r} has no items")
    dist = typicality(emb, cats, subspace)[members]
    order = members[np.argsort(dist, kind="stable")]
    return order[:n], order[::-1][:n]
