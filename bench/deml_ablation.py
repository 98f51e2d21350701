"""deml on cluttered_digits zero-shot (issue 5 quality benchmark): train on digits 0-4, Recall@K
on the unseen digits 5-9 (test split, leave-one-out, cosine). Same embedding size d and step
budget for every trained row, each through the one training loop (`attrlab train --local`, then
`attrlab eval` on the test split):

  raw pixels (mean-centred, cosine; no training) | U-baseline | U + activation decay (Table 1)
  | DeML(1,4) | DeML(2,1) | DeML(2,2) | DeML(3,1) | DeML(1,4) without the adversary (Table 4)

    python bench/deml_ablation.py --data data/shards/cluttered_digits --out runs/deml_ablation --steps 1500 \
        [--rows u,u_act,d14,d21,d22,d31,d14_noadv] [--set KEY=VALUE ...]

Rows with a metrics.json are not re-run. Prints a markdown table and writes OUT/ablation.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rows import run_row  # noqa: E402

U = ["model.scales=1", "model.learners=1", "model.cam=none"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "u": ("U-baseline", [*U, "model.lambda_act=0.0", "model.lambda_ntri=0.0"]),
    "u_act": ("U + L_act", U),
    "d14": ("DeML(1,4)", ["model.scales=1", "model.learners=4"]),
    "d21": ("DeML(2,1)", ["model.scales=2", "model.learners=1"]),
    "d22": ("DeML(2,2)", ["model.scales=2", "model.learners=2"]),
    "d31": ("DeML(3,1)", ["model.scales=3", "model.learners=1"]),  # the authors' code runs 3 scales
    "d14_noadv": ("DeML(1,4) without adversary", ["model.scales=1", "model.learners=4", "model.diversity=none"]),
}
KEYS = ("r@1", "r@2", "r@4", "r@8")


def split_tensors(data: Path, split: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(uint8 images [N, 3, S, S] at `size` (default: the shards' own), category ids [N], the first
    attribute's box per image [N, 4] in image fractions, or None unless every sample has one)."""
    from shards.augment import AugmentConfig
    from shards.format import read_meta
    from shards.reader import LoaderConfig, make_loader

    size = size or int(read_meta(data).extra.get("size", 64))
    xs, cats, boxes = [], [], []
    for b in make_loader(data, split, mode="eval", cfg=LoaderConfig(batch_size=256, num_workers=0),
                         augment=AugmentConfig(resize=size, size=size, hflip=False), kind="samples", rank=0, world_size=1):
        xs.append(b["image"].numpy())
        cats.append(b["category"].numpy())
        if b["boxes"].shape[1]:  # [B, attributes, 4], NaN where a sample has no box
            boxes.append(b["boxes"][:, 0].numpy())
    first = np.concatenate(boxes) if boxes else None
    return np.concatenate(xs), np.concatenate(cats), (first if first is not None and np.isfinite(first).all() else None)


def raw_pixels(data: Path, split: str = "test") -> dict[str, float]:
    from models.retrieval import knn_recall_at_k

    x, lab, _ = split_tensors(data, split)
    e = x.reshape(len(x), -1).astype(np.float32)
    e = e - e.mean(1, keepdims=True)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    r = knn_recall_at_k(e, lab, e, lab, ks=(1, 2, 4, 8), exclude_self=np.arange(len(lab)))
    return {f"r@{k.split('@')[1]}": v for k, v in r.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra override for every row")
    a = ap.parse_args(argv)
    results: dict[str, dict] = {"raw": {"label": "raw pixels", "metrics": raw_pixels(a.data), "wall_s": 0.0}}
    for key in a.rows.split(","):
        label, sets = ROWS[key]
        r = run_row("deml", a.data, a.out / key, a.steps, [*sets, *a.set], a.threads)
        results[key] = {"label": label, **r}
        print(f"{label}: R@1 {r['metrics']['r@1']:.3f} ({r['wall_s']:.0f} s)", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ablation.json").write_text(json.dumps(results, indent=1))
    print(f"\n| row | {' | '.join(k.upper() for k in KEYS)} | O (per-scale R@1) | sim | train s |")
    print("|---|" + "---|" * (len(KEYS) + 3))
    for r in results.values():
        m = r["metrics"]
        oa = " / ".join(f"{m[k]:.3f}" for k in sorted(m) if k.startswith("oa")) or "-"
        sim = f"{m['sim']:.2f} ± {m['sim_std']:.2f}" if "sim" in m else "-"
        print(f"| {r['label']} | {' | '.join(f'{m[k]:.3f}' for k in KEYS)} | {oa} | {sim} | {r['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
