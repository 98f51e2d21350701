"""trip on attrworld's 32 px translation build (issue 6 quality benchmark): an attribute oracle
trained on real images only, then TRIP and the rows of the paper's Table 2 with the same step
budget, each through the one training loop (`attrlab train --local`, then `attrlab eval` on the
test split, judged by the same oracle):

  TRIP (hair_dark) | L_rank = 0 | lambda = 0 | CLS, Eq. 3 | L_gan = 0 | TRIP (hair_dark + beard, K = 2)

    python bench/trip_ablation.py --out runs/trip_ablation --steps 2000 [--oracle-steps 2000] \
        [--data DIR] [--rows trip,no_rank,lam0,cls,no_gan,two] [--set KEY=VALUE ...]

Without --data the shards are built under OUT/shards with jobs.quickstart.TRANSLATION_BUILD.
On that build a first row scores the renderer's exact edits with the same oracle
(bench/trip_reference.py): the ceiling an exact translator reaches under this oracle.
Rows with a metrics.json are not re-run. Prints a markdown table and writes OUT/ablation.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rows import run_row  # noqa: E402

ROWS: dict[str, tuple[str, list[str]]] = {
    "trip": ("TRIP (hair_dark)", []),
    "no_rank": ("L_rank = 0", ["model.lambda_rank=0.0"]),
    "lam0": ("lambda = 0", ["model.lam=0.0"]),
    "cls": ("CLS (Eq. 3)", ["model.target=classification"]),
    "no_gan": ("L_gan = 0", ["model.lambda_g=0.0"]),
    "two": ("TRIP (hair_dark + beard)", ["model.attributes=[hair_dark,beard]"]),
}
KEYS = ("spearman_v", "aas", "nontarget_change", "ssim_std", "fid_oracle", "rank_v_corr")


def reference_row(data: Path, oracle: Path) -> dict | None:
    """The renderer's exact hair_dark edits scored by the same oracle (bench/trip_reference.py):
    what an exact translator reaches. Only for the translation build it re-renders."""
    import time

    from bench.trip_reference import reference
    from jobs.quickstart import TRANSLATION_BUILD
    from shards.datasets import BuildOptions, plan_embedded

    manifest = json.loads((data / "manifest.json").read_text())
    if manifest.get("fingerprint") != plan_embedded("attrworld", BuildOptions(**TRANSLATION_BUILD)).fingerprint:
        print(f"{data} is not jobs.quickstart.TRANSLATION_BUILD: no renderer reference row", flush=True)
        return None
    t0 = time.perf_counter()
    m = reference(str(oracle.resolve()), ["hair_dark"], 64)
    return {"label": "reference: the renderer's exact edits (hair_dark)", "metrics": m,
            "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--oracle-steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="extra override for every trip row")
    a = ap.parse_args(argv)
    data = a.data
    if data is None:
        from jobs.quickstart import TRANSLATION_BUILD
        from shards.datasets import BuildOptions, plan_embedded
        from shards.writer import write_dataset

        data = a.out / "shards"
        write_dataset(plan_embedded("attrworld", BuildOptions(**TRANSLATION_BUILD)), data, shard_size=500, workers=2,
                      overwrite=True)
    oracle = run_row("attr_oracle", data, a.out / "oracle", a.oracle_steps, [], a.threads)
    print(f"oracle: score {oracle['metrics']['oracle_score']:.3f}, spearman/hair_dark "
          f"{oracle['metrics']['spearman/hair_dark']:.3f} ({oracle['wall_s']:.0f} s)", flush=True)
    results: dict[str, dict] = {"oracle": {"label": "attr_oracle (test split)", **oracle}}
    ref = reference_row(data, a.out / "oracle")
    if ref:
        results["reference"] = ref
    for key in a.rows.split(","):
        label, sets = ROWS[key]
        r = run_row("trip", data, a.out / key, a.steps, [f"model.oracle={(a.out / 'oracle').resolve()}", *sets, *a.set],
                    a.threads)
        results[key] = {"label": label, **r}
        m = r["metrics"]
        print(f"{label}: spearman_v {m['spearman_v']:.3f} aas {m['aas']:.3f} ({r['wall_s']:.0f} s)", flush=True)
    (a.out / "ablation.json").write_text(json.dumps(results, indent=1))
    print(f"\n| row | {' | '.join(KEYS)} | train+eval s |")
    print("|---|" + "---|" * (len(KEYS) + 1))
    for key, r in results.items():
        if key == "oracle":
            continue
        m = r["metrics"]
        print(f"| {r['label']} | {' | '.join(f'{m[k]:.4f}' if k in m else '-' for k in KEYS)} | {r['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
