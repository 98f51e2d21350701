"""A sweep's results from its own files (SWEEP_DIR/trials/*): the table (printed and
results.csv), the best trial, and results.html with a parallel-coordinates plot and one
parameter-vs-metric scatter per tuned parameter (PNG embedded, so the page is one file).

Read from each trial's train_log.jsonl and checkpoints, not from Tune's internal state, so
`attrlab tune best` works on a finished, interrupted or copied sweep directory.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from shards.format import ShardError, read_json_file

UNFINISHED = ("RUNNING", "PENDING", "PAUSED")


def _better(a: float, b: float | None, mode: str) -> bool:
    return b is None or (a > b if mode == "max" else a < b)


def collect(sweep_dir: Path, sweep: dict[str, Any], statuses: dict[str, str]) -> list[dict[str, Any]]:
    """One row per trial that started: params, best / last metric, steps, status, best checkpoint."""
    from jobs.checkpoints import find_checkpoints, read_state

    metric, mode = sweep["metric"], sweep["mode"]
    rows = []
    for params_file in sorted((sweep_dir / "trials").glob("*/params.json")):
        trial_dir = params_file.parent
        info = read_json_file(params_file, "delete that trial's directory and re-run the sweep to redo it")
        best = best_step = last = None
        steps, reported = 0, set()
        for row in timeline(trial_dir / "train_log.jsonl"):
            steps = max(steps, int(row.get("step", 0)))
            reported.update(k for k in row if k.startswith("val/"))
            value = row.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                last = float(value)
                if _better(last, best, mode):
                    best, best_step = last, int(row["step"])
        ckpts = find_checkpoints(trial_dir)
        scored = [(read_state(c)["metrics"].get(metric), c) for c in ckpts]
        scored = [(v, c) for v, c in scored if isinstance(v, (int, float))]
        chosen = None
        for v, c in scored:
            if chosen is None or _better(v, chosen[0], mode):
                chosen = (v, c)
        tune_status = statuses.get(info["trial_id"], "")
        status = ("error" if tune_status == "ERROR" else "unfinished" if tune_status in UNFINISHED
                  else "finished" if steps >= sweep["max_steps"] else "stopped early" if tune_status else "stopped")
        rows.append({"trial_id": info["trial_id"], "params": info["params"], "status": status, "steps": steps,
                     "best": best, "best_step": best_step, "last": last, "reported": sorted(reported),
                     "checkpoint": str(chosen[1] if chosen else (ckpts[-1] if ckpts else ""))})
    return rows


def timeline(log: Path) -> list[dict[str, Any]]:
    """The rows of a train_log.jsonl as the run's final history: a run resumed from an earlier
    checkpoint logs some steps again, and the rows it replaced are dropped."""
    rows: list[dict[str, Any]] = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        row = json.loads(line)
        step = int(row.get("step", 0))
        if rows and step < int(rows[-1].get("step", 0)):
            rows = [r for r in rows if int(r.get("step", 0)) < step]
        rows.append(row)
    return rows


def best_row(sweep: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    chosen = None
    for r in rows:
        if r["best"] is not None and r["checkpoint"] and (chosen is None or _better(r["best"], chosen["best"], sweep["mode"])):
            chosen = r
    if chosen is None:
        raise ShardError(f"{sweep['sweep_dir']}: no trial has a checkpoint with {sweep['metric']} yet; "
                         "run or resume the sweep (the same attrlab tune command)")
    return chosen


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(sweep: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial_id", "status", "steps", *keys, f"best {sweep['metric']}", "at step", "last"]
    order = sorted(rows, key=lambda r: (r["best"] is None, -(r["best"] or 0) if sweep["mode"] == "max" else (r["best"] or 0)))
    body = [[r["trial_id"], r["status"], str(r["steps"]), *[_fmt(r["params"].get(k, "")) for k in keys],
             _fmt(r["best"]) if r["best"] is not None else "-", str(r["best_step"] or "-"),
             _fmt(r["last"]) if r["last"] is not None else "-"] for r in order]
    return head, body


def print_table(sweep: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    head, body = table(sweep, rows)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for line in [head, *body]:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)))


def write_results(sweep_dir: Path, sweep: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    head, body = table(sweep, rows)
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows(body)
    figs = _figures(sweep, rows)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    imgs = "".join(f'<figure><img src="data:image/png;base64,{b}"/><figcaption>{html.escape(c)}</figcaption></figure>'
                   for c, b in figs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>attrlab sweep {html.escape(sweep_dir.name)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:3px 8px;font-size:13px}img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(sweep['method'])} sweep: {html.escape(sweep_dir.name)}</h1>"
            f"<p>{len(rows)} trials, {html.escape(sweep['scheduler'])} scheduler, {html.escape(sweep['search'])} search, "
            f"metric {html.escape(sweep['metric'])} ({sweep['mode']}), {sweep['max_steps']} steps max.</p>"
            f"<table><tr>{cells}</tr>{trs}</table>{imgs}</body></html>")
    (sweep_dir / "results.html").write_text(page)


def _numeric(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Values on an axis: numbers as they are (log10 when they span decades), categories as indices."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        nums = [float(v) for v in values]
        if min(nums) > 0 and max(nums) / min(nums) >= 100:
            return [math.log10(v) for v in nums], ["log10"]
        return nums, None
    labels = sorted({json.dumps(v) for v in values})
    return [float(labels.index(json.dumps(v))) for v in values], labels


def _figures(sweep: dict[str, Any], rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["best"] is not None]
    keys = sorted({k for r in scored for k in r["params"]})
    if not scored or not keys:
        return []
    metric = [r["best"] for r in scored]
    out = []
    cmap = plt.get_cmap("viridis")
    lo, hi = min(metric), max(metric)
    colour = [cmap((m - lo) / (hi - lo) if hi > lo else 1.0) for m in metric]
    axes = [_numeric([r["params"].get(k) for r in scored]) for k in keys]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * (len(keys) + 1)), 4))
    cols = [vals for vals, _ in axes] + [metric]
    norm = []
    for vals in cols:
        a, b = min(vals), max(vals)
        norm.append([(v - a) / (b - a) if b > a else 0.5 for v in vals])
    for i in range(len(scored)):
        ax.plot(range(len(cols)), [n[i] for n in norm], color=colour[i], alpha=0.85)
    for x, vals in enumerate(cols):  # each axis's range at its ends
        ax.axvline(x, color="#bbb", lw=0.8, zorder=0)
        for y, v in ((0.0, min(vals)), (1.0, max(vals))):
            ax.annotate(f"{v:.3g}", (x, y), xytext=(3, -10 if y == 0 else 4), textcoords="offset points", fontsize=7)
    labels = [f"{k}{' (log10)' if ax_[1] == ['log10'] else ''}" for k, ax_ in zip(keys, axes)] + [sweep["metric"]]
    ax.set_xticks(range(len(cols)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(cols) - 0.5)
    ax.set_title("parallel coordinates (each axis min-max scaled; colour = metric)")
    out.append(("Parallel coordinates: one line per trial", _png(fig)))
    n = len(keys)
    fig, axs = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
    for ax, k, (vals, cats) in zip(axs[0], keys, axes):
        ax.scatter(vals, metric, c=colour)
        ax.set_xlabel(f"{k} (log10)" if cats == ["log10"] else k, fontsize=8)
        if cats and cats != ["log10"]:
            ax.set_xticks(range(len(cats)), cats, fontsize=7, rotation=20)
        ax.set_ylabel(sweep["metric"], fontsize=8)
    fig.tight_layout()
    out.append(("Each tuned parameter against the trial's best metric", _png(fig)))
    return out


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()
