"""Style evolution (models/style_graph.py): k-NN graph, Dijkstra paths, typicality."""
from __future__ import annotations

import numpy as np
import pytest

from models.knn import TorchIndex
from models.style_graph import (knn_graph, largest_step, path_to_point, rank_typical, shortest_path,
                                typicality)


def _line(n: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points at x = 0..n-1 on a line, stored in shuffled order; returns (emb, x of each id)."""
    perm = np.random.default_rng(seed).permutation(n)
    x = perm.astype(np.float64)
    return np.stack([x, np.zeros(n)], 1).astype(np.float32), x


def _edge_lengths(graph, path: list[int]) -> np.ndarray:
    return np.array([graph[a, b] for a, b in zip(path, path[1:])])


def test_knn_graph_symmetric_euclidean_and_backends_agree() -> None:
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((30, 4)).astype(np.float32)
    g = knn_graph(emb, k=3)
    assert (g != g.T).nnz == 0 and g.diagonal().sum() == 0
    assert ((g > 0).sum(1) >= 3).all()  # every node keeps at least its own k neighbours
    i, j = g.nonzero()
    np.testing.assert_allclose(np.asarray(g[i, j]).ravel(), np.linalg.norm(emb[i] - emb[j], axis=1),
                               rtol=1e-5)  # Euclidean, not squared
    gt = knn_graph(emb, k=3, backend=TorchIndex)
    assert ((gt > 0) != (g > 0)).nnz == 0  # same edges
    np.testing.assert_allclose(gt.toarray(), g.toarray(), atol=1e-5)


def test_shortest_path_on_a_line_in_order_with_cumulative_cost() -> None:
    emb, x = _line()
    g = knn_graph(emb, k=2)
    src, dst = int(np.argmin(x)), int(np.argmax(x))
    path, cost = shortest_path(g, src, dst)
    assert path[0] == src and path[-1] == dst
    assert np.all(np.diff(x[path]) > 0)  # visits the points in order along the line
    assert cost[0] == 0 and np.all(np.diff(cost) >= 0)
    np.testing.assert_allclose(np.cumsum(_edge_lengths(g, path)), cost[1:], rtol=1e-6)
    assert cost[-1] == pytest.approx(9.0, rel=1e-6)


def test_subspace_restricts_the_path() -> None:
    emb, x = _line()
    noisy = np.hstack([emb[:, :1], np.random.default_rng(2).normal(0, 50, (10, 3))]).astype(np.float32)
    src, dst = int(np.argmin(x)), int(np.argmax(x))
    mask = np.array([True, False, False, False])
    for sub in (slice(0, 1), mask):
        path, cost = shortest_path(knn_graph(noisy, k=2, subspace=sub), src, dst)
        assert np.all(np.diff(x[path]) > 0) and cost[-1] == pytest.approx(9.0, rel=1e-6)
    full_path, _ = shortest_path(knn_graph(noisy, k=2), src, dst)
    assert full_path != path  # the noise columns do change the superspace path


def test_largest_step_finds_planted_jump() -> None:
    xs = np.array([0, 1, 2, 3, 4, 20, 21, 22, 23, 24], np.float32)
    emb = np.stack([xs, np.zeros(10, np.float32)], 1)
    g = knn_graph(emb, k=5)  # 5 neighbours: each point reaches into the other cluster
    path, cost = shortest_path(g, 0, 9)
    i = largest_step(path, cost)
    assert xs[path[i]] <= 4 and xs[path[i + 1]] >= 20
    assert cost[i + 1] - cost[i] == pytest.approx(max(np.diff(cost)))
    with pytest.raises(ValueError):
        largest_step(path[:1], cost[:1])


def test_unreachable_destination_is_a_clear_error() -> None:
    emb = np.array([[0, 0], [1, 0], [100, 0], [101, 0]], np.float32)
    with pytest.raises(ValueError, match="not reachable"):
        shortest_path(knn_graph(emb, k=1), 0, 3)
    with pytest.raises(ValueError, match="dst=7"):
        shortest_path(knn_graph(emb, k=1), 0, 7)


def test_path_to_point_ends_at_virtual_centre() -> None:
    emb, x = _line()
    centre = np.array([9.5, 0.0])  # just beyond the last point
    src = int(np.argmin(x))
    path, cost = path_to_point(emb, src, centre, k=2)
    assert path[0] == src and path[-1] == len(emb)  # the virtual node
    assert x[path[-2]] in (8, 9) and np.all(np.diff(x[path[:-1]]) > 0)
    assert cost[-1] == pytest.approx(9.5, rel=1e-6)
    # the same with a subspace: a full-dimension target is restricted too
    p2, c2 = path_to_point(np.hstack([emb, emb * 0 + 7]), src, np.array([9.5, 0, 0, 0]), k=2,
                           subspace=slice(0, 2))
    assert p2 == path and c2 == pytest.approx(cost)


def test_typicality_ranks_planted_outlier_last() -> None:
    rng = np.random.default_rng(3)
    emb = np.vstack([rng.normal(0, 0.1, (8, 3)), rng.normal(5, 0.1, (6, 3))])
    emb[3] += 4.0  # the outlier of category 0
    cats = np.array([0] * 8 + [1] * 6)
    t = typicality(emb, cats)
    assert t[3] == pytest.approx(np.linalg.norm(emb[3] - emb[:8].mean(0)))
    typical, atypical = rank_typical(emb, cats, 0, 3)
    assert atypical[0] == 3 and 3 not in typical and set(typical) <= set(range(8))
    assert np.all(np.diff(t[typical]) >= 0) and np.all(np.diff(t[atypical]) <= 0)
    with pytest.raises(ValueError, match="category 7"):
        rank_typical(emb, cats, 7, 3)
