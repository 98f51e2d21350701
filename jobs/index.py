"""`attrlab index RUN_DIR`: embed a split with the run's latest export and save a k-NN index.

    attrlab index RUN_DIR [--data DIR] [--split S] [--kind flat|ivf|hnsw|torch] [--metric l2|ip]
                  [--param k=v]... [--workers N] [--address ADDR] [--out DIR]

Embeddings come from jobs/embed.py (in this process, or on N Ray Data actors with --workers N);
a model with `normalise_blocks()` (coop_embed: one block per attribute subspace, Sec. 4.3) has
each block L2-normalised before indexing, and meta.json records which. The index directory
(models/knn.py `save_index`: index file, keys.txt = sample keys by row, meta.json) defaults to
RUN_DIR/index/<split>-<kind>; it is written into a temporary directory beside it and renamed into
place at the end, so a failed run leaves nothing half-written and a re-run replaces it whole.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from shards.format import ShardError

ADD_CHUNK = 1 << 16  # vectors per add, for the progress bar


def add_parser(sub: Any) -> None:
    p = sub.add_parser("index", help="embed a split with a run's latest export and save a faiss index")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", type=Path, default=None, help="shards (default: the run's)")
    p.add_argument("--split", default=None, help="split to index (default: the model's gallery_split, "
                                                  "else data.test_split)")
    p.add_argument("--kind", default="flat", help="flat (exact), ivf, hnsw or torch; preference = latent_retrieval's "
                                                  "exact preference-weighted index")
    p.add_argument("--metric", default="l2", help="l2 (squared Euclidean) or ip (inner product)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="index parameter (ivf: nlist, nprobe; hnsw: M, efSearch, efConstruction)")
    p.add_argument("--workers", type=int, default=0, help="embed on N Ray Data actors (0 = in this process)")
    p.add_argument("--address", default=None, help="Ray cluster for --workers (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--batch-size", type=int, default=None, help="images per embedding batch (default: data.loader's)")
    p.add_argument("--out", type=Path, default=None, help="index directory (default: RUN_DIR/index/<split>-<kind>)")
    p.set_defaults(func=cmd_index)


def parse_params(items: list[str]) -> dict[str, int]:
    """['nlist=64', 'nprobe=4'] -> {'nlist': 64, 'nprobe': 4}; anything else -> one-line error."""
    out: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ShardError(f"--param {item!r}: expected KEY=VALUE, e.g. --param nlist=64")
        try:
            out[key] = int(value)
        except ValueError:
            raise ShardError(f"--param {item!r}: {key} must be an integer") from None
    return out


def check_index_args(kind: str, metric: str, params: dict[str, int]) -> None:
    """Fail before any embedding work on a kind / metric / parameter build_index would refuse."""
    from models.knn import build_index

    if kind == "preference":  # latent_retrieval's exact preference-weighted index (jobs/latent.py)
        if params:
            raise ShardError(f"--param: --kind preference takes no parameters, got {sorted(params)}")
        return

    try:
        build_index(kind, 1, metric, **params)
    except ValueError as e:
        raise ShardError(f"--kind/--metric/--param: {e}") from None


def normalise(model: Any, emb: Any) -> tuple[Any, dict[str, Any]]:
    """L2 per subspace when the model names its blocks (`normalise_blocks()`), else unchanged."""
    import numpy as np

    blocks = getattr(model, "normalise_blocks", None)
    if blocks is None:
        return emb, {"kind": "none"}
    from models.retrieval import l2_normalize_subspaces

    sl = blocks()
    dim = emb.shape[1]
    cols = [[int(s) for s in b.indices(dim)[:2]] if isinstance(b, slice) else [int(c) for c in np.asarray(b)]
            for b in sl]
    out = l2_normalize_subspaces(emb, sl).astype(np.float32)
    return out, {"kind": "l2_per_subspace", "blocks": cols, "block_format": "[start, stop) column ranges"}


def default_split(cfg: Any) -> str:
    return getattr(cfg.model, "gallery_split", None) or cfg.data.test_split


def check_out(out: Path) -> None:
    """An existing --out is replaced only when it is an index directory (never, say, a run directory)."""
    from models.knn import INDEX_FILES, KEYS_FILE, META_FILE

    if out.exists() and (not out.is_dir() or not ({p.name for p in out.iterdir()} <= {
            *INDEX_FILES.values(), KEYS_FILE, META_FILE} or _is_preference_index(out))):
        raise ShardError(f"--out {out}: exists and is not an index directory; choose a new one")


def _is_preference_index(out: Path) -> bool:
    from models.latent_index import FORMAT_VERSION

    try:
        return json.loads((out / "meta.json").read_text()).get("format") == FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing an older index there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_run_index(run_dir: Path, data: Path | None = None, split: str | None = None, kind: str = "flat",
                    metric: str = "l2", params: dict[str, int] | None = None, workers: int = 0,
                    out: Path | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Embed `split` with the run's latest export, build and save the index; returns a summary."""
    import numpy as np
    from tqdm import tqdm

    from jobs.checkpoints import latest_export, read_state
    from jobs.embed import embed_split
    from jobs.evaluate import check_run_data, load_export
    from models.knn import build_index, save_index

    t0 = time.perf_counter()
    params = dict(params or {})
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ShardError(f"{run_dir}: no such run directory; pass the --out of `attrlab train`")
    if workers < 0:
        raise ShardError(f"--workers {workers}: expected 0 (in this process) or more")
    if batch_size is not None and batch_size < 1:
        raise ShardError(f"--batch-size {batch_size}: must be >= 1 (or leave it out for data.loader's)")
    check_index_args(kind, metric, params)
    export = latest_export(run_dir)
    method, cfg, model, meta = load_export(export)
    if method.embed is None:
        raise ShardError(f"method {method.name} has no embedding; `attrlab index` needs a run of an "
                         "embedding method (e.g. coop_embed)")
    data = Path(data or cfg.data.path)
    split = split or default_split(cfg)
    manifest = check_run_data(meta, data, split)
    out = Path(out) if out is not None else run_dir / "index" / f"{split}-{kind}"
    check_out(out)

    arrays = embed_split(method, model, cfg, data, split, workers=workers, batch_size=batch_size, meta=meta)
    if kind == "preference":
        from jobs.latent import build_preference_index

        return {**build_preference_index(method, model, arrays["emb"], [str(k) for k in arrays["key"]], out),
                "split": split, "seconds": round(time.perf_counter() - t0, 2)}
    emb, norm = normalise(model, arrays["emb"])
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    index = build_index(kind, emb.shape[1], metric, **params)
    chunk = len(emb) if kind == "ivf" else ADD_CHUNK  # ivf trains on its first add: give it everything
    with tqdm(total=len(emb), unit="vec", desc=f"index {kind}", disable=not sys.stderr.isatty()) as bar:
        for s in range(0, len(emb), chunk):
            index.add(emb[s:s + chunk])
            bar.update(len(emb[s:s + chunk]))
    info = {"run_dir": str(run_dir.resolve()), "export": str(export.resolve()),
            "step": read_state(export.parent)["step"], "method": method.name, "split": split, "data": str(data.resolve()),
            "manifest_checksum": manifest["checksum"], "normalisation": norm, "count": int(index.ntotal),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # (not mkdtemp: its 0700 would stay on the renamed index)
    try:
        save_index(index, tmp, [str(k) for k in arrays["key"]], info)
        if method.query_terms is not None:  # coop_embed's attribute-value / category terms, for serving
            term_split = getattr(cfg.model, "term_split", cfg.data.train_split)
            terms = embed_split(method, model, cfg, data, term_split, workers=workers, batch_size=batch_size, meta=meta)
            np.savez(tmp / "terms.npz", **method.query_terms(model, terms))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"index": str(out), "kind": kind, "metric": metric, "params": index.params, "dim": int(emb.shape[1]),
            "count": int(index.ntotal), "split": split, "step": info["step"], "normalisation": norm["kind"],
            "seconds": round(time.perf_counter() - t0, 2)}


def cmd_index(a: argparse.Namespace) -> int:
    from jobs.embed import ensure_ray

    params = parse_params(a.param)
    if a.workers > 0:  # check the cheap things before starting or joining a Ray cluster
        check_index_args(a.kind, a.metric, params)
        if not a.run_dir.is_dir():
            raise ShardError(f"{a.run_dir}: no such run directory; pass the --out of `attrlab train`")
    ensure_ray(a.workers, a.address)
    summary = build_run_index(a.run_dir, a.data, a.split, a.kind, a.metric, params, a.workers, a.out, a.batch_size)
    print(json.dumps(summary))
    return 0
