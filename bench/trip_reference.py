"""Ground-truth reference for trip's oracle metrics (issue 6): attrworld's renderer edits the
test images exactly (same identity, pose, clutter and noise; only the target attribute's value
changes, DATASETS.md "Ground-truth edits"), and the same oracle scores those edits through the
same code as a trained generator (models.trip_eval.oracle_path_metrics). It shows what an exact
translator reaches under this oracle: how much of a goal (Spearman >= 0.9, non-target change
< 0.1) is reachable at all, and how much is the oracle's own error.

    python -m bench.trip_reference --oracle runs/trip_ablation/oracle [--attributes hair_dark,beard] [--images 64] [--path fraction|additive]

The path: v in {-1, -0.8, ..., 1} moves the value a a fraction |v| of the way to 1 (v > 0) or to
0 (v < 0), so v = +-1 is the extreme and the AAS swap (v = 1 - 2a) lands on the far end
(`--path fraction`); or to a + v clipped to [0, 1] (`--path additive`). Neither is the one
right answer (the paper's v is a relative change), so both are reported.
The images: the first N test images (by key) of jobs.quickstart.TRANSLATION_BUILD, the build
bench/trip_ablation.py trains and evaluates on.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def edit_value(a: float, v: float, path: str = "fraction") -> float:
    """`fraction`: the attribute value a fraction |v| of the way from a to 1 (v > 0) or to 0 (v < 0);
    `additive`: a + v clipped to [0, 1]."""
    if path == "additive":
        return round(min(1.0, max(0.0, a + v)), 4)
    return round(a + v * (1.0 - a) if v >= 0 else a * (1.0 + v), 4)


def render(specs: list[dict], attr: str | None = None, values: list[float] | None = None) -> torch.Tensor:
    """uint8 [N, 3, H, W]: the specs rendered and decoded as the shard reader decodes them,
    with `attr` set to values[i] in spec i when given."""
    from shards.augment import decode_rgb
    from shards.datasets.attrworld import load

    out = []
    for i, spec in enumerate(specs):
        if attr is not None:
            spec = dict(spec, attributes={**spec["attributes"], attr: values[i]})
        out.append(decode_rgb(load(spec).image))
    return torch.stack(out)


def reference(oracle_dir: str, attributes: list[str], n: int, path: str = "fraction") -> dict[str, float]:
    """trip_eval's oracle metrics (+ ssim_std) of the renderer's exact edits, mean over attributes
    and per attribute as `<key>/<attr>`."""
    from jobs.quickstart import TRANSLATION_BUILD
    from models.attr_oracle import predict
    from models.trip import TripConfig
    from models.trip_eval import PATH_V, load_oracle, oracle_path_metrics, path_ssim_std
    from shards.datasets import BuildOptions, plan_embedded

    specs = plan_embedded("attrworld", BuildOptions(**TRANSLATION_BUILD)).splits["test"][:n]
    oracle = load_oracle(oracle_dir)
    missing = [a for a in attributes if a not in oracle.attributes]
    if missing:
        raise SystemExit(f"--attributes: the oracle {oracle_dir} does not predict {missing} (it has {list(oracle.attributes)})")
    images = render(specs)
    real = predict(oracle, images)
    cols = [oracle.attributes.index(a) for a in attributes]
    others = [i for i in range(len(oracle.attributes)) if i not in cols]
    per: dict[str, list[float]] = {}
    for attr, j in zip(attributes, cols):
        base = [float(s["attributes"][attr]) for s in specs]
        frames = torch.stack([render(specs, attr, [edit_value(a, float(v), path) for a in base]) for v in PATH_V])
        row = {"ssim_std": path_ssim_std(frames)}

        def swap(v_k: np.ndarray, attr: str = attr, base: list[float] = base) -> torch.Tensor:
            return render(specs, attr, [edit_value(a, float(v), path) for a, v in zip(base, v_k)])

        o_row, _ = oracle_path_metrics(oracle, real, frames, j, others, swap, TripConfig.aas_threshold)
        row.update(o_row)
        for key, val in row.items():
            per.setdefault(key, []).append(val)
            per.setdefault(f"{key}/{attr}", []).append(val)
    return {key: float(np.mean(vals)) for key, vals in per.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle", required=True, help="an attr_oracle run directory (bench/trip_ablation.py's OUT/oracle)")
    ap.add_argument("--attributes", default="hair_dark", help="comma-separated target attributes")
    ap.add_argument("--images", type=int, default=64, help="test images (trip's model.eval_images)")
    ap.add_argument("--path", choices=("fraction", "additive"), default="fraction",
                    help="how v moves the value a: a fraction |v| of the way to 0 or 1, or a + v clipped")
    ap.add_argument("--out", type=Path, default=None, help="write the metrics here as JSON")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from shards.format import ShardError

    try:
        m = reference(a.oracle, [s for s in a.attributes.split(",") if s], a.images, a.path)
    except ShardError as e:  # a missing or wrong --oracle run: one line, not a traceback
        print(f"trip_reference: {e}", file=sys.stderr)
        return 2
    if a.out:
        a.out.write_text(json.dumps(m, indent=1, sort_keys=True))
    from bench.trip_ablation import KEYS

    print(f"| row | {' | '.join(KEYS)} |\n|---|" + "---|" * len(KEYS))
    print(f"| renderer's exact edits ({a.attributes}, {a.path}) | {' | '.join(f'{m[k]:.4f}' if k in m else '-' for k in KEYS)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
