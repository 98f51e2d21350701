"""stn_ranker Table 5 ablation on attrworld: global image only / STN crop only / combined, one
model per attribute, the same step budget for every row (issue 3 quality benchmark).

    python bench/stn_ablation.py --data data/shards/attrworld --out runs/stn_ablation \
        [--attrs eye_open,smile,brow_thick,nose_size,beard,hair_dark] --steps 1500 [--set KEY=VALUE ...]

Every row is `attrlab train stn_ranker --local` (the one training loop, in-process: Ray Train
would add only start-up time on one machine) followed by `attrlab eval` (10-crop test-time
averaging, ordered test pairs). Rows that already have metrics.json are not re-run, so an
interrupted sweep continues. Prints a markdown table and writes OUT/ablation.json.

`--warm smile=beard[,brow_thick=eye_open ...]`: an attribute's STN rows start from the localiser
of the named source attribute's STN-only row, trained first at the same budget (`init.from_run`,
`init.include=[localiser.]`). That is the paper's "STN initialised from a pretrained network"
with a network trained here on a neighbouring region that the localiser does find. The source's
steps are extra budget; the table counts them in the wall time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rows import run_row  # noqa: E402

MODES = ("global_only", "stn_only", "combined")


def run_stn_row(data: Path, run: Path, attr: str, mode: str, steps: int, extra: list[str], threads: int) -> dict:
    sets = [f"model.attributes=[{attr}]", f"model.mode={mode}", f"eval.every_steps={steps}",
            f"checkpoint.every_steps={steps}", f"model.stage1_steps={steps // 2}", *extra]
    r = run_row("stn_ranker", data, run, steps, sets, threads)
    m = r["metrics"]
    return {"attribute": attr, "mode": mode, "steps": steps, "rank_acc": m["rank_acc"],
            "stn_hit": m.get("stn_hit"), "stn_cover": m.get("stn_cover"), "wall_s": r["wall_s"]}


def parse_warm(text: str) -> dict[str, str]:
    """'smile=beard,brow_thick=eye_open' -> {'smile': 'beard', 'brow_thick': 'eye_open'}."""
    pairs = [p.partition("=") for p in text.split(",") if p]
    bad = [a + s + b for a, s, b in pairs if not (a and s and b) or a == b]
    if bad:
        raise argparse.ArgumentTypeError(f"expected ATTR=SOURCE_ATTR[,...] with two different names, got {bad[0]!r}")
    return {a: b for a, _, b in pairs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--attrs", default="eye_open,smile,brow_thick,nose_size,beard,hair_dark",
                    help="attributes, one model each (default: attrworld's six localised ones)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra config override for every row")
    ap.add_argument("--warm", type=parse_warm, default={}, metavar="ATTR=SOURCE[,...]",
                    help="start ATTR's STN rows from SOURCE's STN-only localiser (trained first)")
    a = ap.parse_args(argv)
    rows = []
    for attr in a.attrs.split(","):
        for mode in a.modes.split(","):
            extra, run, source = list(a.set), a.out / f"{attr}-{mode}", None
            if attr in a.warm and mode != "global_only":  # the source row is shared with --modes stn_only
                src_run = a.out / f"{a.warm[attr]}-stn_only"
                source = run_stn_row(a.data, src_run, a.warm[attr], "stn_only", a.steps, a.set, a.threads)
                extra += [f"init.from_run={src_run}", "init.include=[localiser.]"]
                run = run.with_name(f"{run.name}-from-{a.warm[attr]}")
            r = run_stn_row(a.data, run, attr, mode, a.steps, extra, a.threads)
            if source is not None:
                r.update(warm_from=a.warm[attr], wall_s=r["wall_s"] + source["wall_s"])
            rows.append(r)
            print(json.dumps(r), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ablation.json").write_text(json.dumps(rows, indent=1))
    print(f"\n| attribute | {' | '.join(a.modes.split(','))} | stn_hit / stn_cover (combined) |")
    print("|---|" + "---|" * (len(a.modes.split(",")) + 1))
    for attr in a.attrs.split(","):
        by = {r["mode"]: r for r in rows if r["attribute"] == attr}
        c = by.get("combined", {})
        hit = None if c.get("stn_hit") is None else f"{c['stn_hit']:.2f} / {c.get('stn_cover') or float('nan'):.2f}"
        cells = [f"{by[m]['rank_acc']:.3f} ({by[m]['wall_s']:.0f} s)" for m in a.modes.split(",") if m in by]
        print(f"| {attr} | {' | '.join(cells)} | {hit or '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
