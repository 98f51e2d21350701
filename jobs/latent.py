"""`attrlab latent fit`: latent_retrieval on precomputed external latents (no training, no network);
`attrlab latent search`: one adjusted, preference-weighted query against a preference index.

    attrlab latent search RUN_OR_FIT_DIR --key KEY [--adjust Smiling=0] [--prefer Eyeglasses=4] [-k 10]
    attrlab latent fit --latents W.npy|W.pt --attributes list_attr_celeba.txt
                       [--partition list_eval_partition.txt] [--keys keys.txt]
                       [--identities identity_CelebA.txt] [--identity-features F.npy]
                       [--use Smiling,Eyeglasses,...] [--lams 0,0.001,0.005,0.01]
                       [--queries 1000] [--fit-samples 20000] [--index] --out DIR

Algorithm 2 on the training split's latents (lambda chosen on the validation split), the
InterFaceGAN baseline, and the retrieval protocol on the test split (models/latent_eval.py) ->
DIR/metrics.json (the same keys as a trained run), DIR/directions.safetensors (F, b, a_min,
a_max, the baseline), the Fig. 5 / Fig. 6 plots, and with --index the exact preference index of
the test split (models/latent_index.py) in DIR/index. Everything is written into a temporary
directory beside DIR and renamed into place at the end: a failed run leaves nothing behind.

`build_preference_index` is also what `attrlab index RUN_DIR --kind preference` runs for a
trained latent_retrieval run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.format import ShardError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("latent", help="latent_retrieval on external latents (e.g. e4e W+ codes of CelebA)")
    lsub = p.add_subparsers(dest="latent_cmd", required=True)
    f = lsub.add_parser("fit", help="fit the directions, evaluate retrieval, optionally index the test split")
    f.add_argument("--latents", type=Path, required=True)
    f.add_argument("--attributes", type=Path, required=True, help="CelebA-style attribute list")
    f.add_argument("--partition", type=Path, default=None, help="CelebA list_eval_partition.txt")
    f.add_argument("--keys", type=Path, default=None, help="image name of every latent row (for .npy)")
    f.add_argument("--identities", type=Path, default=None, help="CelebA identity_CelebA.txt")
    f.add_argument("--identity-features", type=Path, default=None,
                   help=".npy [N, E] identity features in the latents' row order (adds identity_sim)")
    f.add_argument("--use", default="", help="comma-separated attribute names (default: all)")
    f.add_argument("--lams", default="0,0.001,0.005,0.01", help="lambdas to choose from on validation")
    f.add_argument("--queries", type=int, default=1000)
    f.add_argument("--fit-samples", type=int, default=20000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--index", action="store_true", help="also build the exact preference index of the test split")
    f.add_argument("--out", type=Path, required=True)
    f.set_defaults(func=cmd_fit)
    q = lsub.add_parser("search", help="query a preference index by gallery key, with adjustments and preferences")
    q.add_argument("source", type=Path, help="a latent_retrieval run directory or an `attrlab latent fit` --out")
    q.add_argument("--index", type=Path, default=None,
                   help="index directory (default: RUN/index/<test split>-preference, or FIT/index)")
    q.add_argument("--key", required=True, help="the query: a gallery image's key")
    q.add_argument("--adjust", action="append", default=[], metavar="ATTR=A",
                   help="desired intensity a in [0, 1] of an attribute (Eq. 4); repeatable")
    q.add_argument("--prefer", action="append", default=[], metavar="ATTR=P",
                   help="preference p >= 0 of an attribute (default 1; 0 = don't care); repeatable")
    q.add_argument("-k", type=int, default=10)
    q.set_defaults(func=cmd_search)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ShardError(f"{flag} {text!r}: expected comma-separated numbers") from None


def cmd_fit(a: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from models import latent_directions as ld
    from models.latent_eval import Collected, fit_all, retrieval_metrics
    from models.latent_external import load_external
    from models.latent_figures import energy, preference_curve
    from models.latent_retrieval import LatentRetrievalConfig

    t0 = time.perf_counter()
    if a.out.exists():
        raise ShardError(f"--out {a.out}: exists; choose a new directory (nothing is overwritten)")
    cfg = LatentRetrievalConfig(lams=_floats(a.lams, "--lams"), queries=a.queries, fit_samples=a.fit_samples, seed=a.seed)
    use = tuple(x.strip() for x in a.use.split(",") if x.strip())
    table = load_external(a.latents, a.attributes, a.partition, a.keys, a.identities, use, a.seed)
    train, val, test = (table.subset(s) for s in ("train", "val", "test"))
    train.W, train.Y, train.values = train.W[:cfg.fit_samples], train.Y[:cfg.fit_samples], train.values[:cfg.fit_samples]
    if a.identity_features is not None:
        feats = np.load(a.identity_features, allow_pickle=False)
        if len(feats) != len(table.keys):
            raise ShardError(f"--identity-features {a.identity_features}: {len(feats)} rows, the latents have {len(table.keys)}")
        test.ident = torch.from_numpy(np.asarray(feats, np.float32)[table.split == "test"])
    print(f"latents: {len(table.keys)} x {table.W.shape[1]}, {len(table.names)} attributes; "
          f"train {len(train.W)} / val {len(val.W)} / test {len(test.W)}")
    lam, fits, baseline = fit_all(train, val, cfg)
    col = Collected(train, val, test, fits, lam, baseline)
    metrics, _ = retrieval_metrics(col, cfg)
    a_min, a_max = ld.adjust_range(ld.projections(train.W, fits[lam].F))

    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.parent / f".{a.out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({"directions": fits[lam].F.contiguous(), "bias": fits[lam].b.contiguous(), "a_min": a_min, "a_max": a_max,
                   "baseline": baseline.contiguous()}, str(tmp / "directions.safetensors"),
                  metadata={"attributes": json.dumps(list(table.names)), "lambda": str(lam)})
        preference_curve(metrics, tuple(cfg.preferences), test.ident is not None, tmp)
        energy(col, tmp)
        if a.index:
            from models.latent_index import PreferenceIndex

            idx = PreferenceIndex.build(test.W.numpy(), fits[lam].F.double().numpy(),
                                        keys=[table.keys[i] for i in np.flatnonzero(table.split == "test")])
            idx.save(tmp / "index")
        info = {"latents": str(a.latents.resolve()), "attributes": list(table.names), "config": dataclasses.asdict(cfg),
                "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "info": info}, indent=1, sort_keys=True))
        tmp.rename(a.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = ("ndcg@5", "ndcg@10", "ndcg@20", "identity_sim", "same_identity@5", "ortho_err", "lambda",
            "ifg/ndcg@5", "ifg/identity_sim", "ifg/same_identity@5")
    print(json.dumps({k: round(metrics[k], 4) for k in keys if k in metrics}))
    print(f"wrote {a.out}")
    return 0


def _assignments(items: list[str], names: tuple[str, ...], flag: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in names:
            raise ShardError(f"{flag} {item!r}: expected ATTR=VALUE with ATTR one of {list(names)}")
        try:
            out[names.index(name.strip())] = float(value)
        except ValueError:
            raise ShardError(f"{flag} {item!r}: {value!r} is not a number") from None
    return out


def query_context(source: Path, index: Path | None) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor, Path]:
    """(attribute names, a_min, a_max, index dir) of a latent_retrieval run or a `latent fit` output."""
    if (source / "directions.safetensors").is_file():  # attrlab latent fit
        from safetensors import safe_open

        with safe_open(str(source / "directions.safetensors"), "pt") as f:
            names = tuple(json.loads(f.metadata()["attributes"]))
            a_min, a_max = f.get_tensor("a_min"), f.get_tensor("a_max")
        return names, a_min, a_max, index or source / "index"
    from jobs.evaluate import load_model_dir
    from models.latent_retrieval import _unwrap

    if not source.is_dir():
        raise ShardError(f"{source}: not a run directory or an `attrlab latent fit` output")
    method, cfg, model, _ = load_model_dir(source)
    if method.name != "latent_retrieval":
        raise ShardError(f"{source}: a {method.name} run, not latent_retrieval")
    m = _unwrap(model)
    return tuple(m.attributes), m.a_min, m.a_max, index or source / "index" / f"{cfg.data.test_split}-preference"


def cmd_search(a: argparse.Namespace) -> int:
    from models import latent_directions as ld
    from models.latent_index import PreferenceIndex

    names, a_min, a_max, index_dir = query_context(a.source, a.index)
    if not (index_dir / "meta.json").is_file():
        raise ShardError(f"{index_dir}: no preference index; build it with `attrlab index {a.source} --kind preference`"
                         " or `attrlab latent fit ... --index`")
    adjust, prefer = _assignments(a.adjust, names, "--adjust"), _assignments(a.prefer, names, "--prefer")
    if any(not 0.0 <= v <= 1.0 for v in adjust.values()):
        raise ShardError("--adjust: intensities must lie in [0, 1]")
    if any(v < 0 for v in prefer.values()):
        raise ShardError("--prefer: preferences must be >= 0")
    idx = PreferenceIndex.load(index_dir)
    if idx.keys is None or a.key not in idx.keys:
        raise ShardError(f"--key {a.key!r}: not in the index {index_dir}")
    w_q = torch.from_numpy(idx.latent(idx.keys.index(a.key)).astype(np.float64))[None]
    F_ = torch.from_numpy(np.asarray(idx.directions, np.float64))
    av = torch.full((1, len(names)), float("nan"), dtype=torch.float64)
    for j, v in adjust.items():
        av[0, j] = v
    c_t = ld.adjust_target(ld.projections(w_q, F_), av, a_min.double(), a_max.double())
    p = np.ones(len(names))
    for j, v in prefer.items():
        p[j] = v
    row = idx.keys.index(a.key)
    dist, ids = idx.search(w_q.numpy(), p, min(a.k + 1, idx.ntotal), c_target=c_t.numpy())
    hits = [(float(d), int(i)) for d, i in zip(dist[0], ids[0]) if i != row][:a.k]  # the query is not its own result
    print(json.dumps({"query": a.key, "adjust": {names[j]: v for j, v in adjust.items()},
                      "prefer": {names[j]: v for j, v in prefer.items()},
                      "results": [{"key": idx.keys[i], "distance": d} for d, i in hits]}))
    return 0


def build_preference_index(method: Any, model: Any, emb: np.ndarray, keys: list[str], out: Path) -> dict[str, Any]:
    """The exact preference-weighted index (models/latent_index.py) of a latent_retrieval run's
    gallery latents, with the run's fitted directions."""
    from models.latent_index import PreferenceIndex
    from models.latent_retrieval import _unwrap

    if method.name != "latent_retrieval":
        raise ShardError(f"--kind preference: needs a latent_retrieval run, this is {method.name}")
    m = _unwrap(model)
    if not bool(m.fitted):
        raise ShardError("--kind preference: the run's directions were never fitted (no validation ran); "
                         "train it to its first eval.every_steps")
    index = PreferenceIndex.build(np.ascontiguousarray(emb, np.float32), m.directions.double().numpy(), keys=keys)
    index.save(out)
    return {"index": str(out), "kind": "preference", "count": int(index.ntotal), "dim": int(index.dim),
            "attributes": list(m.attributes)}
