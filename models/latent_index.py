"""Exact preference-weighted latent retrieval through faiss ("Face Image Retrieval with Attribute
Manipulation", latent_retrieval; models/latent_retrieval.py).

Gallery latents w in R^D, M orthonormal attribute directions F in R^{D x M}. Eq. 1-2 split a
latent into attribute coordinates c = F^T w and the rest r = (I - F F^T) w; Eq. 3 weights the
attribute part by a per-query preference p >= 0 (0 = "don't care"); Eq. 4 moves the query's
attribute coordinates to an adjusted target c_t (default F^T w_q):

    d(w) = sum_m p_m (c_t,m - c_m)^2 + ||r_q - r||^2

Expanding the squares makes d an inner product in an augmented space, so one faiss inner-product
search ranks the gallery for any p without rebuilding anything:

    g = [r ; c ; ||r||^2 ; c*c]            (per gallery latent, L0 = D + 2M + 1 values)
    h = [2 r_q ; 2 p*c_t ; -1 ; -p]        (per query)
    d(w) = const(q) - h.g,   const(q) = ||r_q||^2 + sum_m p_m c_t,m^2

(no orthonormality is used by the identity, so it is exact for the F given).

Exactness. faiss scores h.g approximately: `method="flat"` (IndexFlatIP over float32 g) by float32
rounding, `method="certified"` (IndexScalarQuantizer over our own per-column affine 8-bit codes,
16-bit as two 8-bit digits for the 2M + 1 attribute / norm columns; QT_8bit_direct, whose decode
is the bare code, or QT_8bit_uniform where this faiss would round a direct query to bytes) by
quantisation plus rounding. Each query gets a rigorous bound B on |approx - h.g|: float rounding
(gamma_n bounds) and, for codes, the largest quantisation error measured at build time against
faiss's own decode (Cauchy-Schwarz on the r block, per-column maxima elsewhere). k' candidates are
re-ranked exactly in float64 from the stored float32 latents; the result is accepted only if every
non-retrieved latent provably lies beyond the k-th exact distance (const - (lowest retrieved score
+ B) > d_k). Otherwise k' is widened (x4); past `max_candidates` the query falls back to an exact
float64 scan. `stats` counts both. Ties are broken by the lower id, as in `brute_force`.

The database is split into `shards` faiss sub-indexes under a threaded IndexShards, so a single
query scans on all cores (OpenMP in faiss only splits across queries). Measured at 1M x 512, M = 8,
k = 10 (bench/latent_search.py, 2-core EPYC with one core taken by another job): certified ~100 ms
per query, all of it CPU (552 B of codes per latent; faiss's SQ8 kernel is decode-bound at ~5.5 GB/s
per core), flat ~200 ms, numpy ~300 ms; exact on every query, no widening. Memory: the float32
latents (kept for the exact re-rank) plus 0.55 GB (certified) or 2.1 GB (flat).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
ORTHO_TOL = 1e-4
CHUNK = 16384  # rows per float64 block when building: 16384 x 512 x 8 B = 64 MB, never a float64 gallery
SCAN_CHUNK = 2048  # rows per block of the exact scan: cache-sized, ~3x faster than 16384 here
_U32 = 2.0 ** -24  # float32 unit roundoff
METHODS = ("certified", "flat")


# ---------------------------------------------------------------- validation and exact distance
def _check_F(F: np.ndarray, dim: int | None = None) -> np.ndarray:
    F = np.asarray(F)
    if F.ndim != 2 or F.shape[1] < 1 or F.shape[1] > F.shape[0]:
        raise ValueError(f"F: expected [D, M] with 1 <= M <= D, got shape {F.shape}")
    if dim is not None and F.shape[0] != dim:
        raise ValueError(f"F: has D={F.shape[0]} rows but the latents have D={dim}")
    F = F.astype(np.float64)
    if not np.isfinite(F).all():
        raise ValueError("F: contains NaN or inf")
    err = np.abs(F.T @ F - np.eye(F.shape[1])).max()
    if err > ORTHO_TOL:
        raise ValueError(f"F: columns are not orthonormal (max |F^T F - I| = {err:.2e} > {ORTHO_TOL}); "
                         "run Algorithm 1 (F <- F (F^T F)^-1/2) / orthonormalise F first")
    return F


def _check_W(W: np.ndarray) -> np.ndarray:
    if np.ndim(W) != 2 or len(W) < 1:
        raise ValueError(f"W: expected a non-empty [N, D] gallery, got shape {np.shape(W)}")
    return np.asarray(W)


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k: must be an integer in [1, N={n}], got {k!r}")
    return int(k)


def _rows(x, width: int, name: str, q: int | None = None) -> np.ndarray:
    """x as float64 [rows, width]; [width] is one row, broadcast to q rows when q is given."""
    a = np.asarray(x, dtype=np.float64)
    a = a[None] if a.ndim == 1 else a
    if a.ndim != 2 or a.shape[1] != width or len(a) < 1 or (q is not None and len(a) not in (1, q)):
        want = "[D] or [Q, D] with D" if q is None else f"[M] or [Q, M] with Q={q}, M"
        raise ValueError(f"{name}: expected {want}={width}, got shape {np.shape(x)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return a if q is None else np.ascontiguousarray(np.broadcast_to(a, (q, width)))


def _queries(w_q, p, c_target, F: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> r_q [Q, D], c_t [Q, M], p [Q, M], all float64."""
    D, M = F.shape
    wq = _rows(w_q, D, "w_q")
    pp = _rows(p, M, "p", len(wq))
    if (pp < 0).any():
        raise ValueError(f"p: preferences must be >= 0, got min {pp.min():g}")
    cq = wq @ F
    ct = cq if c_target is None else _rows(c_target, M, "c_target", len(wq))
    return wq - cq @ F.T, ct, pp


def _rows_cr(X: np.ndarray, F: np.ndarray, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 1-2 for gallery rows, in float64 (the exact path) or float32: c = F^T w, r = (I - F F^T) w."""
    X, F = np.asarray(X, dtype=dtype), F.astype(dtype, copy=False)
    c = X @ F
    return c, X - c @ F.T


def _dist(c: np.ndarray, r: np.ndarray, ct: np.ndarray, rq: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Eq. 3 for one query against rows (c, r); row-wise sums so a row's value ignores its batch."""
    return ((c - ct) ** 2 * p).sum(1) + ((r - rq) ** 2).sum(1)


def _merge(bd: np.ndarray, bi: np.ndarray, d: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the union by (distance, id), keeping every tie at the cut so lower ids can win."""
    if len(d) > k:
        keep = d <= np.partition(d, k - 1)[k - 1]
        d, ids = d[keep], ids[keep]
    d, ids = np.concatenate([bd, d]), np.concatenate([bi, ids])
    o = np.lexsort((ids, d))[:k]
    return d[o], ids[o]


def _scan(W: np.ndarray, F: np.ndarray, rq: np.ndarray, ct: np.ndarray, p: np.ndarray,
          k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 top-k over the whole gallery in cache-sized blocks (the oracle and the fallback)."""
    Q = len(rq)
    best = [(np.empty(0), np.empty(0, np.int64))] * Q
    for s in range(0, len(W), SCAN_CHUNK):
        c, r = _rows_cr(W[s:s + SCAN_CHUNK], F)
        ids = np.arange(s, s + len(c), dtype=np.int64)
        for q in range(Q):
            best[q] = _merge(*best[q], _dist(c, r, ct[q], rq[q], p[q]), ids, k)
    return np.stack([b[0] for b in best]), np.stack([b[1] for b in best])


def brute_force(W: np.ndarray, F: np.ndarray, w_q: np.ndarray, p: np.ndarray, k: int,
                c_target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """numpy float64 oracle: (distances [Q, k] ascending, ids [Q, k] int64). w_q [Q, D] or [D] (then
    Q=1), p [Q, M] or [M] (broadcast), c_target [Q, M] or None. Ties broken by lower id."""
    W = _check_W(W)
    F = _check_F(F, W.shape[1])
    rq, ct, pp = _queries(w_q, p, c_target, F)
    return _scan(W, F, rq, ct, pp, _check_k(k, len(W)))


def _features(X: np.ndarray, F: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Augmented gallery vectors g = [r ; c ; ||r||^2 ; c*c] (one chunk)."""
    c, r = _rows_cr(X, F, dtype)
    return np.hstack([r, c, (r * r).sum(1, keepdims=True), c * c])


# ---------------------------------------------------------------- the index
class PreferenceIndex:
    """faiss first pass + certified float64 re-ranking; see the module docstring."""

    init_candidates = (4, 64)  # first k' = 4k + 64: certifies at once on 1M random latents (no widening seen)
    max_candidates = 16384  # beyond this a query is cheaper as an exact scan

    def __init__(self, W: np.ndarray, F: np.ndarray, method: str, subs: list, q: dict,
                 keys: list[str] | None) -> None:
        import faiss

        self._W, self._F, self.method, self._subs, self._q, self.keys = W, F, method, subs, q, keys
        self._index = faiss.IndexShards(subs[0].d, True, True)  # threaded, ids offset per shard
        for s in subs:
            self._index.add_shard(s)
        self._index.syncWithSubIndexes()
        self.stats = {"queries": 0, "widened": 0, "fallback": 0}

    directions = property(lambda self: self._F, doc="F [D, M] the index was built with")

    def latent(self, row: int) -> np.ndarray:
        """The stored (float32) latent of gallery row `row` (e.g. to query by a gallery image)."""
        return np.asarray(self._W[row])

    ntotal = property(lambda self: int(self._W.shape[0]))
    dim = property(lambda self: int(self._W.shape[1]))
    n_attributes = property(lambda self: int(self._F.shape[1]))
    shards = property(lambda self: len(self._subs))

    # ------------------------------------------------------------ build
    @classmethod
    def build(cls, W: np.ndarray, F: np.ndarray, *, method: str = "certified", shards: int = 0,
              keys: list[str] | None = None, progress: bool = True) -> "PreferenceIndex":
        """W [N, D] gallery (kept as float32; no copy if it already is C-contiguous float32, so do not
        modify it afterwards), F [D, M] orthonormal. shards=0: one per CPU core."""
        import faiss
        from tqdm import tqdm

        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        W = np.ascontiguousarray(_check_W(W), dtype=np.float32)
        N, D = W.shape
        F = _check_F(F, D)
        M = F.shape[1]
        if keys is not None:
            keys = [str(x) for x in keys]
            if len(keys) != N or any("\n" in x for x in keys):
                raise ValueError(f"keys: expected {N} strings without newlines, got {len(keys)}")
        n_sh = max(1, min(N, shards or len(os.sched_getaffinity(0))))
        bounds = np.linspace(0, N, n_sh + 1).astype(np.int64)
        L0 = D + 2 * M + 1
        lo, hi = np.full(L0, np.inf), np.full(L0, -np.inf)

        def chunks(desc: str, dtype: type = np.float64):
            with tqdm(total=N, desc=desc, unit="row", unit_scale=True, disable=not progress or N <= CHUNK) as pb:
                for s in range(0, N, CHUNK):
                    X = W[s:s + CHUNK]
                    if not np.isfinite(X).all():
                        raise ValueError(f"W: contains NaN or inf (rows {s}..{s + len(X) - 1})")
                    yield s, _features(X, F, dtype)
                    pb.update(len(X))

        if method == "flat":
            subs = [faiss.IndexFlatIP(L0) for _ in range(n_sh)]
            for s, g in chunks("latent index: flat"):
                _add_split(subs, bounds, s, np.ascontiguousarray(g, dtype=np.float32), add_codes=False)
                lo, hi = np.minimum(lo, g.min(0)), np.maximum(hi, g.max(0))
            gmax = np.maximum(np.abs(lo), np.abs(hi))  # per column max |g|, for the rounding bound
            return cls(W, F, method, subs, {"gmax": gmax}, keys)

        # certified: our own per-column affine 8-bit grid; the 2M + 1 attribute / norm columns (scaled
        # by p, or large) get two digits (16 bit). Code column j stands for g column col[j] and is worth
        # base[j] + unit[j] * code: faiss decodes the bare code, the affine map moves into the query.
        # the grid only has to cover the data (errors are measured exactly below): float32 is enough
        for _, g in chunks("latent index: ranges", np.float32):
            lo, hi = np.minimum(lo, g.min(0)), np.maximum(hi, g.max(0))
        pad = 1e-5 * np.maximum(np.maximum(np.abs(lo), np.abs(hi)), 1.0)  # float32 vs float64 values
        lo, hi = lo - pad, hi + pad
        two = np.arange(L0) >= D
        levels = np.where(two, 65535.0, 255.0)
        step = (hi - lo) / levels
        step[~(step > 0)] = 1.0  # constant column: code 0, no error
        Lc = D + 2 * int(two.sum())
        # faiss's SIMD kernels need d % 8 == 0 (else ~8x slower). QT_8bit_direct (code -> float code,
        # the cheapest decode: ~20% faster here than QT_8bit_uniform) keeps a float query only when
        # d % 16 != 0 -- else faiss rounds the query to bytes -- so d is an odd multiple of 8.
        Lp = -(-Lc // 8) * 8
        Lp += 8 if Lp % 16 == 0 else 0
        col, base, unit = np.full(Lp, -1), np.zeros(Lp), np.zeros(Lp)
        col[:D], base[:D], unit[:D] = np.arange(D), lo[:D], step[:D]
        col[D:Lc:2], base[D:Lc:2], unit[D:Lc:2] = np.arange(D, L0), lo[D:], 256.0 * step[D:]  # high digit
        col[D + 1:Lc:2], unit[D + 1:Lc:2] = np.arange(D, L0), step[D:]  # low digit
        subs = [_code_index(Lp) for _ in range(n_sh)]
        colerr, decmax, rerr = np.zeros(L0), np.zeros(Lp), 0.0
        for s, g in chunks("latent index: encode"):
            qv = np.clip(np.rint((g - lo) / step), 0, levels)
            codes = np.zeros((len(g), Lp), np.uint8)
            codes[:, :D] = qv[:, :D]
            codes[:, D:Lc:2] = qv[:, D:] // 256
            codes[:, D + 1:Lc:2] = qv[:, D:] % 256
            # errors against faiss's own float32 decode, so its rounding is measured, not assumed
            dec = subs[0].sa_decode(codes).astype(np.float64)
            decmax = np.maximum(decmax, np.abs(dec).max(0))
            v = base + unit * dec
            err = g - np.hstack([v[:, :D], v[:, D:Lc:2] + v[:, D + 1:Lc:2]])
            colerr = np.maximum(colerr, np.abs(err).max(0))
            rerr = max(rerr, float(np.sqrt((err[:, :D] ** 2).sum(1)).max()))
            _add_split(subs, bounds, s, codes, add_codes=True)
        q = {"col": col, "off": base, "scale": unit, "colerr": colerr, "decmax": decmax, "rerr": rerr}
        return cls(W, F, method, subs, q, keys)

    # ------------------------------------------------------------ search
    def _query_vectors(self, rq: np.ndarray, ct: np.ndarray, p: np.ndarray):
        """-> faiss queries x [Q, d] float32, offset [Q] (so approx h.g = score + offset), bound [Q]
        (|h.g - approx| <= bound for every gallery row), const [Q] (d = const - h.g)."""
        D, M = self.dim, self.n_attributes
        H = np.hstack([2 * rq, 2 * p * ct, -np.ones((len(rq), 1)), -p])
        const = (rq * rq).sum(1) + (p * ct * ct).sum(1)
        q = self._q
        if self.method == "flat":
            L0 = H.shape[1]
            # gamma_{L0} plus the float32 rounding of h and g, on sum_j |h_j g_j|
            bound = 1.01 * (L0 + 3) * _U32 * (np.abs(H) @ q["gmax"])
            return H.astype(np.float32), np.zeros(len(H)), bound, const
        Hx = np.where(q["col"] >= 0, H[:, q["col"]], 0.0)  # h per code column (0 on padding)
        x = (Hx * q["scale"]).astype(np.float32)
        Hr, Ha = H[:, :D], H[:, D:]
        # quantisation: Cauchy-Schwarz or per-column maxima on r, per-column maxima elsewhere
        quant = (np.minimum(np.linalg.norm(Hr, axis=1) * q["rerr"], np.abs(Hr) @ q["colerr"][:D])
                 + np.abs(Ha) @ q["colerr"][D:])
        # faiss's float32 dot (gamma_d), rounding h to float32, SIMD vs scalar decode (a few ulps)
        fp = 1.01 * (x.shape[1] + 6) * _U32 * (np.abs(x).astype(np.float64) @ q["decmax"])
        return x, Hx @ q["off"], quant + fp, const

    def _faiss(self, x: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss
        prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # the shards already use every core; nested OpenMP only costs
        try:
            return self._index.search(x, kk)
        finally:
            faiss.omp_set_num_threads(prev)

    def search(self, w_q, p, k: int, c_target=None) -> tuple[np.ndarray, np.ndarray]:
        """Same contract as brute_force; distances are float64 and exact for the returned ids."""
        rq, ct, pp = _queries(w_q, p, c_target, self._F)
        N = self.ntotal
        k = _check_k(k, N)
        x, offset, bound, const = self._query_vectors(rq, ct, pp)
        kk = min(N, self.init_candidates[0] * k + self.init_candidates[1])
        S, I = self._faiss(x, kk)
        out_d, out_i = np.empty((len(x), k)), np.empty((len(x), k), np.int64)
        for q in range(len(x)):
            self.stats["queries"] += 1
            s, ids, kq = S[q], I[q], kk
            while (res := self._certify(q, s, ids, k, rq, ct, pp, offset, bound, const)) is None:
                kq = min(N, kq * 4)
                if self.max_candidates < kq < N:  # cheaper (and certain) as an exact scan
                    self.stats["fallback"] += 1
                    res = tuple(a[0] for a in _scan(self._W, self._F, rq[q:q + 1], ct[q:q + 1], pp[q:q + 1], k))
                    break
                self.stats["widened"] += 1
                s, ids = (a[0] for a in self._faiss(x[q:q + 1], kq))
            out_d[q], out_i[q] = res
        return out_d, out_i

    def _certify(self, q, s, ids, k, rq, ct, pp, offset, bound, const):
        """Exact top-k from the candidates, or None when a non-retrieved row might still beat it."""
        ok = ids >= 0
        s, ids = s[ok], ids[ok].astype(np.int64)
        order = np.argsort(ids)  # ascending rows: a friendlier gather from a memmap
        c, r = _rows_cr(self._W[ids[order]], self._F)
        d = np.empty(len(ids))
        d[order] = _dist(c, r, ct[q], rq[q], pp[q])
        top = np.lexsort((ids, d))[:k]
        if len(ids) < self.ntotal:
            # every row outside the candidates scored <= the lowest retrieved score
            lower = const[q] - (float(s[-1]) + offset[q] + bound[q])
            tol = 1e-9 * (1.0 + abs(const[q]) + abs(offset[q]) + abs(d[top[-1]]))  # float64 rounding
            if not lower > d[top[-1]] + tol:
                return None
        return d[top], ids[top]

    # ------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """Write atomically: a temp dir beside the target, renamed into place at the end."""
        import faiss

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would stay on the renamed index (serving may run as another user)
        try:
            np.save(tmp / "W.npy", np.asarray(self._W), allow_pickle=False)
            np.save(tmp / "F.npy", self._F, allow_pickle=False)
            arrays = {k: v for k, v in self._q.items() if isinstance(v, np.ndarray)}
            for name, a in arrays.items():
                np.save(tmp / f"q_{name}.npy", a, allow_pickle=False)
            for i, sub in enumerate(self._subs):
                faiss.write_index(sub, str(tmp / f"shard_{i:03d}.faiss"))
            if self.keys is not None:
                (tmp / "keys.txt").write_text("".join(k + "\n" for k in self.keys))
            meta = {"format": FORMAT_VERSION, "n": self.ntotal, "dim": self.dim, "n_attributes": self.n_attributes,
                    "method": self.method, "shards": self.shards, "quant_arrays": sorted(arrays),
                    "scalars": {k: v for k, v in self._q.items() if not isinstance(v, np.ndarray)},
                    "keys": self.keys is not None}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if directory.exists():
                directory.rename(old)  # two renames: the old index stays whole until the new one is in place
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "PreferenceIndex":
        import faiss

        directory = Path(directory)

        def need(name: str) -> Path:
            path = directory / name
            if not path.is_file():
                raise FileNotFoundError(f"PreferenceIndex.load: {name} missing in {directory}")
            return path

        meta = json.loads(need("meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{directory / 'meta.json'}: format {meta.get('format')}, expected {FORMAT_VERSION}")
        files = ["W.npy", "F.npy"] + [f"shard_{i:03d}.faiss" for i in range(meta["shards"])]
        paths = [need(f) for f in files + (["keys.txt"] if meta["keys"] else [])]
        q = {n: np.load(need(f"q_{n}.npy"), allow_pickle=False) for n in meta["quant_arrays"]}
        W = np.load(paths[0], mmap_mode="r" if mmap else None, allow_pickle=False)
        F = np.load(paths[1], allow_pickle=False)
        if W.shape != (meta["n"], meta["dim"]) or F.shape != (meta["dim"], meta["n_attributes"]):
            raise ValueError(f"{directory}: W.npy {W.shape} / F.npy {F.shape} disagree with meta.json")
        q.update(meta["scalars"])
        subs = [faiss.read_index(str(p)) for p in paths[2:2 + meta["shards"]]]
        direct = faiss.ScalarQuantizer.QT_8bit_direct
        if any(hasattr(s, "sq") and s.sq.qtype == direct and not _direct_float_query(s.d) for s in subs):
            raise ValueError(f"{directory}: this faiss rounds QT_8bit_direct queries to bytes; rebuild the index")
        keys = paths[-1].read_text().splitlines() if meta["keys"] else None
        return cls(W, F, meta["method"], subs, q, keys)


def _add_split(subs: list, bounds: np.ndarray, start: int, rows: np.ndarray, add_codes: bool) -> None:
    """Add a chunk of rows [start, start + n) to the shards whose id ranges it overlaps."""
    for i, sub in enumerate(subs):
        a, b = max(start, bounds[i]), min(start + len(rows), bounds[i + 1])
        if a < b:
            part = np.ascontiguousarray(rows[a - start:b - start])
            sub.add_sa_codes(part) if add_codes else sub.add(part)


def _code_index(d: int):
    """An empty faiss index over 8-bit codes that decode to (about) the code itself, float query."""
    import faiss

    if _direct_float_query(d):
        return faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit_direct, faiss.METRIC_INNER_PRODUCT)
    sub = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit_uniform, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(np.array([-0.5, 255.0], np.float32), sub.sq.trained)  # (c + .5)/255*255 - .5
    sub.is_trained = True
    return sub


@functools.cache
def _direct_float_query(d: int) -> bool:
    """Does this faiss score QT_8bit_direct codes against the float query (not a byte-rounded one)?"""
    import faiss

    rng = np.random.default_rng(0)
    probe = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit_direct, faiss.METRIC_INNER_PRODUCT)
    codes = rng.integers(0, 256, (64, d), dtype=np.uint8)
    probe.add_sa_codes(codes)
    x = (rng.standard_normal((1, d)) * 1e-2).astype(np.float32)
    S, I = probe.search(x, 64)
    want = codes[I[0]].astype(np.float64) @ x[0].astype(np.float64)
    return bool(np.abs(S[0] - want).max() <= 1e-3 * np.abs(x).sum() * 255.0)
