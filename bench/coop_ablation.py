"""coop_embed ablations on attrworld (issue 4 quality benchmark): the paper's Tables 1a, 1b, 2a,
2b, 3 (MTL, CSN) and an untrained-backbone baseline, each row through the one training loop
with the same step budget, evaluated on unseen identities (query -> gallery).

    python bench/coop_ablation.py --data data/shards/attrworld --out runs/coop --tables untrained,1a \
        --steps 5000 [--seeds 0,1] [--set KEY=VALUE ...]

Rows with a metrics.json are not re-run (an interrupted sweep continues). Prints one markdown
table per paper table and writes OUT/ablation.json. `--seeds 0,1,2` repeats every row with those
seeds (`seed=` of the run config: initialisation and sampling) and reports mean [min, max]: at
this budget two seeds of one configuration differ by several R@1 points.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rows import run_row  # noqa: E402


def _lambdas(ins: int, attr: int, cat: int) -> list[str]:
    return [f"model.lambda_ins={ins}.0", f"model.lambda_attr={attr}.0", f"model.lambda_cat={cat}.0"]


# paper table -> [(row label, overrides)]
TABLES: dict[str, list[tuple[str, list[str]]]] = {
    # random weights, BatchNorm statistics calibrated on the data (lr 0), no learning
    "untrained": [("untrained backbone", ["optim.lr=0.0"])],
    "1a": [(f"ins={i} attr={a} cat={c}", _lambdas(i, a, c))
           for i, a, c in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 0), (1, 1, 1))],
    "1b": [(f"n={n}", [f"model.subspace_width={n}"]) for n in (1, 4, 16, 32)],
    "2a": [(f"instance {'learned' if i else 'fixed'}, attribute {'learned' if a else 'fixed'}",
            [f"model.learn_instance_proxies={str(bool(i)).lower()}", f"model.learn_attribute_proxies={str(bool(a)).lower()}"])
           for i, a in ((0, 0), (1, 0), (0, 1), (1, 1))],
    "2b": [(f"{mode} {level:.0%}", [f"model.corrupt_mode={mode}", f"model.corrupt_level={level}"])
           for level in (0.4, 0.2) for mode in ("absence", "swap", "both")],
    "2c": [(f"lambda_reg={r}", [f"model.lambda_reg={r}"]) for r in (0.0, 0.005, 0.05, 0.5)],
    "3": [("a. multitask (MTL)", ["model.head=mtl"]), ("c. concatenation + triplet (CSN)", ["model.head=csn"]),
          ("cooperative", [])],
}
KEYS = ("instance_r@1", "attribute_map", "category_map")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tables", default="untrained,1a", help=f"comma-separated, of {list(TABLES)}")
    ap.add_argument("--steps", type=int, default=5000, help="per row (1500 leaves every row under-trained: RESULTS.md)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra config override for every row")
    ap.add_argument("--rows", default="", help="only these row labels, ';'-separated (e.g. 'ins=1 attr=0 cat=0;ins=1 attr=1 cat=1')")
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds; every row runs once per seed")
    a = ap.parse_args(argv)
    try:
        seeds = [int(x) for x in a.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {a.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    wanted = [x for x in a.rows.split(";") if x]
    known = {label for t in a.tables.split(",") for label, _ in TABLES.get(t, [])}
    if set(wanted) - known:
        ap.error(f"--rows: {sorted(set(wanted) - known)} not in tables {a.tables}; rows are {sorted(known)}")
    rows = []
    for table in a.tables.split(","):
        if table not in TABLES:
            ap.error(f"--tables: unknown table {table!r}; choose from {list(TABLES)}")
        for label, sets in TABLES[table]:
            if wanted and label not in wanted:
                continue
            name = f"{table}-" + "".join(c if c.isalnum() else "_" for c in label)
            steps = 100 if table == "untrained" else a.steps
            common = [f"eval.every_steps={steps}", f"checkpoint.every_steps={steps}"]
            for seed in seeds:  # seed 0 keeps the unsuffixed run name of a single-seed sweep
                run = a.out / (name if seed == 0 else f"{name}-s{seed}")
                r = run_row("coop_embed", a.data, run, steps, [*common, *a.set, *sets, f"seed={seed}"], a.threads)
                row = {"table": table, "row": label, "seed": seed, "steps": steps, "wall_s": r["wall_s"],
                       **{k: r["metrics"].get(k) for k in KEYS}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ablation.json").write_text(json.dumps(rows, indent=1))
    print_tables(rows, a.tables.split(","), len(seeds))
    return 0


def cell(values: list[float | None]) -> str:
    """Percent; with several seeds: mean [min, max]."""
    v = [100 * x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{sum(v) / len(v):.1f} [{min(v):.1f}, {max(v):.1f}]"


def print_tables(rows: list[dict], tables: list[str], n_seeds: int) -> None:
    for table in tables:
        print(f"\nTable {table}" + (f" (mean [min, max] over {n_seeds} seeds)" if n_seeds > 1 else "")
              + "\n\n| row | instance R@1 | attribute mAP | category mAP | train+eval s |\n|---|---|---|---|---|")
        labels = list(dict.fromkeys(r["row"] for r in rows if r["table"] == table))
        for label in labels:
            same = [r for r in rows if r["table"] == table and r["row"] == label]
            cells = " | ".join(cell([r[k] for r in same]) for k in KEYS)
            print(f"| {label} | {cells} | {sum(r['wall_s'] for r in same) / len(same):.0f} |")


if __name__ == "__main__":
    raise SystemExit(main())
