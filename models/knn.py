"""k-nearest-neighbour search behind one small interface, plus index persistence.

Shared by the retrieval evaluation of Cooperative Embeddings (Sec. 4.2: R@K needs the K nearest
gallery images of each query; Sec. 5.3: the k-NN graph with k = 5) and by deml, latent_retrieval
and the serving layer.

Backends (both satisfy `KnnIndex`):

* `FaissIndex` — kind "flat" (exact), "ivf" (IndexIVFFlat: `nlist`, `nprobe`; trained on the first
  `add`), "hnsw" (IndexHNSWFlat: `M`, `efSearch`, `efConstruction`). Build with `build_index`.
* `TorchIndex` — brute force with `torch.cdist`, the reference backend for tests (kind "torch").

Distance convention (faiss's): metric "l2" returns SQUARED Euclidean distances, ascending;
metric "ip" returns inner products, descending (use it on L2-normalised vectors for cosine).
`TorchIndex` returns the same, so the two backends compare equal. When k > ntotal the missing
columns hold id -1 and distance +FLT_MAX ("l2") or -FLT_MAX ("ip"), as faiss does.

Threads: on machines with <= 4 cores faiss runs on 1 OpenMP thread (2 threads were measured
10-150x slower on the 2-core dev box); `configure_faiss_threads` is called once, lazily, when the
first `FaissIndex` is built, unless the caller already called it.

Persistence (`save_index` / `load_saved_index`): a directory with the index (`index.faiss` via
faiss.write_index, or `index.npy` for the torch backend), `keys.txt` (row id -> sample key, one
per line) and `meta.json` (kind, metric, dim, ntotal, params + caller meta). Nothing is ever
unpickled: faiss reads its own binary format, numpy loads with allow_pickle=False.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import faiss
import numpy as np
import torch

METRICS = ("l2", "ip")
# kind -> allowed construction parameters and their defaults
PARAMS: dict[str, dict[str, int]] = {
    "flat": {},
    "ivf": {"nlist": 100, "nprobe": 8},
    "hnsw": {"M": 32, "efSearch": 64, "efConstruction": 40},
    "torch": {},
}
KINDS = tuple(PARAMS)
FAISS_KINDS = ("flat", "ivf", "hnsw")
INDEX_FILES = {"faiss": "index.faiss", "torch": "index.npy"}
KEYS_FILE, META_FILE = "keys.txt", "meta.json"
_RESERVED_META = ("kind", "metric", "dim", "ntotal", "params")
_FLT_MAX = float(np.finfo(np.float32).max)
_threads_configured = False


@runtime_checkable
class KnnIndex(Protocol):
    """What the metrics, the style graph and the serving layer need from a k-NN backend."""

    kind: str
    metric: str
    dim: int

    @property
    def ntotal(self) -> int: ...

    @property
    def params(self) -> dict[str, int]: ...

    def add(self, x: np.ndarray) -> None: ...

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, path: str | Path) -> None: ...


IndexFactory = Callable[[int, str], KnnIndex]  # (dim, metric) -> empty index


def _available_cpus() -> int:
    # the affinity mask is what a container / Ray worker may really use; cpu_count() can overstate it
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def configure_faiss_threads(n: int | None = None) -> int:
    """Set faiss's OpenMP threads: `n`, or 1 on <= 4 cores, else min(cores, 8). Returns the count."""
    global _threads_configured
    if n is None:
        cpus = _available_cpus()
        n = 1 if cpus <= 4 else min(cpus, 8)
    if n < 1:
        raise ValueError(f"faiss threads must be >= 1, got {n}")
    faiss.omp_set_num_threads(n)
    _threads_configured = True
    return n


def _as_f32(x: np.ndarray | torch.Tensor, dim: int, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)  # faiss needs C-contiguous float32
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape [n, {dim}], got {list(x.shape)}")
    return x


def _check_params(kind: str, metric: str, params: dict[str, Any]) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    for key, val in params.items():
        if key not in PARAMS[kind]:
            allowed = ", ".join(PARAMS[kind]) or "none"
            raise ValueError(f"unknown parameter {key!r} for index kind {kind!r}; allowed: {allowed}")
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"index parameter {key!r} must be a positive integer, got {val!r}")


def _check_k(k: int) -> None:
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")


class FaissIndex:
    """A faiss index ("flat", "ivf" or "hnsw") behind the `KnnIndex` interface."""

    def __init__(self, kind: str, dim: int, metric: str = "l2", raw: Any = None, **params: int) -> None:
        if kind not in FAISS_KINDS:
            raise ValueError(f"unknown faiss index kind {kind!r}; allowed: {', '.join(FAISS_KINDS)}")
        _check_params(kind, metric, params)
        if not _threads_configured:
            configure_faiss_threads()
        self.kind, self.dim, self.metric = kind, int(dim), metric
        self._cfg = {**PARAMS[kind], **params}
        self.index = raw if raw is not None else self._make(self._cfg.get("nlist", 0))
        if raw is not None:
            self._cfg = {**self._cfg, **self.params}  # a loaded index keeps its saved settings

    def _make(self, nlist: int) -> Any:
        mt = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            return faiss.IndexFlat(self.dim, mt)
        if self.kind == "ivf":
            # python faiss keeps a reference to the quantizer, so it outlives this frame
            ix = faiss.IndexIVFFlat(faiss.IndexFlat(self.dim, mt), self.dim, nlist, mt)
            ix.nprobe = min(self._cfg["nprobe"], nlist)
            return ix
        ix = faiss.IndexHNSWFlat(self.dim, self._cfg["M"], mt)
        ix.hnsw.efConstruction = self._cfg["efConstruction"]
        ix.hnsw.efSearch = self._cfg["efSearch"]
        return ix

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def params(self) -> dict[str, int]:
        """The parameters in effect, read from the faiss index (so also right after loading)."""
        if self.kind == "ivf":
            return {"nlist": int(self.index.nlist), "nprobe": int(self.index.nprobe)}
        if self.kind == "hnsw":
            h = self.index.hnsw
            return {"M": int(h.nb_neighbors(1)), "efSearch": int(h.efSearch),
                    "efConstruction": int(h.efConstruction)}
        return {}

    def add(self, x: np.ndarray) -> None:
        x = _as_f32(x, self.dim, "vectors to add")
        if self.kind == "ivf" and not self.index.is_trained:
            if len(x) == 0:
                raise ValueError("the first add to an ivf index trains it: it needs at least one vector")
            # k-means cannot make more centroids than points: clamp nlist to n (faiss would
            # abort); the first batch should be the whole gallery or a representative sample
            if len(x) < self.index.nlist:
                self.index = self._make(len(x))
            self.index.train(x)
        self.index.add(x)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _check_k(k)
        d, i = self.index.search(_as_f32(q, self.dim, "queries"), int(k))
        return d, i.astype(np.int64, copy=False)

    def save(self, path: str | Path) -> None:
        faiss.write_index(self.index, str(path))


class TorchIndex:
    """Exact brute-force k-NN with torch.cdist; returns faiss's conventions (squared L2)."""

    kind = "torch"

    def __init__(self, dim: int, metric: str = "l2", max_chunk_elems: int = 1 << 25) -> None:
        _check_params("torch", metric, {})
        self.dim, self.metric = int(dim), metric
        self.max_chunk_elems = max_chunk_elems  # bounds the [chunk, ntotal] distance block
        self._x = np.zeros((0, self.dim), np.float32)

    @property
    def ntotal(self) -> int:
        return len(self._x)

    @property
    def params(self) -> dict[str, int]:
        return {}

    def add(self, x: np.ndarray) -> None:
        self._x = np.concatenate([self._x, _as_f32(x, self.dim, "vectors to add")])

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _check_k(k)
        q = _as_f32(q, self.dim, "queries")
        m, n, k = len(q), self.ntotal, int(k)
        pad = _FLT_MAX if self.metric == "l2" else -_FLT_MAX
        dist = np.full((m, k), pad, np.float32)
        ids = np.full((m, k), -1, np.int64)
        if n == 0 or m == 0:
            return dist, ids
        kk, x = min(k, n), torch.from_numpy(self._x)
        step = max(1, self.max_chunk_elems // n)
        for s in range(0, m, step):
            qs = torch.from_numpy(q[s:s + step])
            if self.metric == "l2":
                d = torch.cdist(qs, x).square_()  # squared, as faiss reports L2
                v, j = torch.topk(d, kk, dim=1, largest=False, sorted=True)
            else:
                v, j = torch.topk(qs @ x.T, kk, dim=1, largest=True, sorted=True)
            dist[s:s + step, :kk], ids[s:s + step, :kk] = v.numpy(), j.numpy()
        return dist, ids

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:  # a file object keeps np.save from appending ".npy"
            np.save(f, self._x, allow_pickle=False)


def build_index(kind: str, dim: int, metric: str = "l2", **params: int) -> KnnIndex:
    """An empty index of `kind` (flat, ivf, hnsw, torch); unknown kind/metric/param -> ValueError."""
    if kind not in PARAMS:
        raise ValueError(f"unknown index kind {kind!r}; allowed: {', '.join(KINDS)}")
    _check_params(kind, metric, params)
    if dim < 1:
        raise ValueError(f"index dim must be >= 1, got {dim}")
    if kind == "torch":
        return TorchIndex(dim, metric)
    return FaissIndex(kind, dim, metric, **{k: int(v) for k, v in params.items()})


def flat_index(dim: int, metric: str = "l2") -> KnnIndex:
    """The default `IndexFactory`: exact faiss search."""
    return build_index("flat", dim, metric)


def load_index(path: str | Path, metric: str = "l2") -> KnnIndex:
    """Read an index written by `save`: `*.npy` -> TorchIndex (with `metric`), else faiss."""
    path = Path(path)
    if path.suffix == ".npy":
        x = np.load(path, allow_pickle=False)  # object arrays raise instead of unpickling
        if x.ndim != 2:
            raise ValueError(f"{path}: expected a 2-d float array, got shape {list(x.shape)}")
        ix = TorchIndex(x.shape[1], metric)
        ix.add(x)
        return ix
    try:
        raw = faiss.read_index(str(path))
    except RuntimeError as e:
        raise ValueError(f"{path}: not a readable faiss index ({e})") from None
    metric_read = {faiss.METRIC_L2: "l2", faiss.METRIC_INNER_PRODUCT: "ip"}.get(raw.metric_type)
    if metric_read is None:
        raise ValueError(f"{path}: unsupported faiss metric type {raw.metric_type}")
    if isinstance(raw, faiss.IndexIVFFlat):
        kind = "ivf"
    elif isinstance(raw, faiss.IndexHNSWFlat):
        kind = "hnsw"
    elif isinstance(raw, faiss.IndexFlat):
        kind = "flat"
    else:
        raise ValueError(f"{path}: unsupported faiss index type {type(raw).__name__}")
    return FaissIndex(kind, raw.d, metric_read, raw=raw)


def _index_file(kind: str) -> str:
    return INDEX_FILES["torch" if kind == "torch" else "faiss"]


def save_index(index: KnnIndex, directory: str | Path, keys: list[str], meta: dict[str, Any]) -> Path:
    """Write `index.faiss|index.npy`, `keys.txt` and `meta.json` into `directory`; returns it."""
    d = Path(directory)
    if len(keys) != index.ntotal:
        raise ValueError(f"{len(keys)} keys for an index of {index.ntotal} vectors: one key per row")
    bad = next((k for k in keys if "\n" in k or "\r" in k), None)
    if bad is not None:
        raise ValueError(f"sample key {bad!r} contains a line break; keys.txt holds one key per line")
    clash = sorted(set(meta) & set(_RESERVED_META))
    if clash:
        raise ValueError(f"meta keys {clash} are reserved (written by save_index); rename them")
    full = {"kind": index.kind, "metric": index.metric, "dim": index.dim, "ntotal": index.ntotal,
            "params": index.params, **meta}
    text = json.dumps(full, indent=2, sort_keys=True)  # fails early on non-JSON meta
    d.mkdir(parents=True, exist_ok=True)
    index.save(d / _index_file(index.kind))
    (d / KEYS_FILE).write_text("".join(k + "\n" for k in keys), encoding="utf-8")
    (d / META_FILE).write_text(text + "\n", encoding="utf-8")  # last: its presence marks a full save
    return d


def load_saved_index(directory: str | Path) -> tuple[KnnIndex, list[str], dict[str, Any]]:
    """Read a `save_index` directory -> (index, keys, meta); a missing file is named in the error."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"index directory {d} does not exist")
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d} is incomplete: missing {META_FILE} (written last by save_index)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    missing = [k for k in _RESERVED_META if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing fields {missing}")
    index_path, keys_path = d / _index_file(meta["kind"]), d / KEYS_FILE
    for p in (index_path, keys_path):
        if not p.is_file():
            raise FileNotFoundError(f"{d} is incomplete: missing {p.name}")
    index = load_index(index_path, metric=meta["metric"])
    # split on "\n" only: splitlines() would also break keys at \x1c, \u2028 and friends
    keys = keys_path.read_text(encoding="utf-8").split("\n")[:-1]
    if not (len(keys) == index.ntotal == meta["ntotal"]) or index.dim != meta["dim"]:
        raise ValueError(f"{d}: inconsistent files: {len(keys)} keys, index of {index.ntotal} x "
                         f"{index.dim}, meta says {meta['ntotal']} x {meta['dim']}")
    return index, keys, meta
