"""`attrlab latent fit`: latent_retrieval on precomputed external latents (no training, no network).

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
