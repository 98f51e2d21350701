"""`attrlab report RUN_DIR`: RUN_DIR/report/index.html with training curves, the metrics table
and the method's paper figures (e.g. stn_ranker: Fig. 5 ranked strips with STN boxes, Fig. 4
STN box distribution over training).
"""
from __future__ import annotations

import argparse
import html
import json
import logging
from pathlib import Path
from typing import Any

from shards.format import ShardError, read_json_file

log = logging.getLogger(__name__)



def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None  # a line cut short by a killed worker: the curves skip it
            log.warning("%s:%d: not a JSON row; skipped in the curves", path, n)
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_curves(rows: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    """One PNG per group of series: losses, validation metrics, learning rate, throughput."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on cluster nodes
    import matplotlib.pyplot as plt
    groups = {"losses": lambda k: k.startswith("loss/"), "validation": lambda k: k.startswith("val/"),
              "learning rate": lambda k: k == "lr", "throughput (samples/s)": lambda k: k == "samples_per_s"}
    made = []
    for title, want in groups.items():
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            for k, v in r.items():
                if k != "step" and want(k) and isinstance(v, (int, float)):
                    series.setdefault(k, []).append((r["step"], v))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for k, pts in sorted(series.items())[:12]:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=k, marker="." if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = f"curve_{title.split()[0]}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        made.append((title, name))
    return made


def metrics_table(metrics: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float)
                   else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in sorted(metrics.items()))
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def build_report(run_dir: Path, data: Path | None = None) -> Path:
    from jobs.evaluate import evaluate_run, load_export
    from jobs.checkpoints import latest_export
    from jobs.train import eval_loaders

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ShardError(f"{run_dir}: no such run directory; give the --out of an `attrlab train` run")
    export = latest_export(run_dir)  # fails early, in one line, on a run without a usable checkpoint
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    metrics_path = run_dir / "metrics.json"
    metrics = (read_json_file(metrics_path, f"re-create it with `attrlab eval {run_dir}`") if metrics_path.is_file()
               else evaluate_run(run_dir, data))
    curves = plot_curves(read_log(run_dir), out)
    method, cfg, model, meta = load_export(export)
    figures: list[tuple[str, str]] = []
    if method.figures is not None:
        split = metrics.get("split", cfg.data.test_split)
        figures = method.figures(model, eval_loaders(cfg, str(data or cfg.data.path), split), cfg.model, meta,
                                 run_dir, out)
    parts = [f"<h1>{html.escape(method.name)} — {html.escape(run_dir.name)}</h1>",
             "<h2>Metrics</h2>", metrics_table(metrics), "<h2>Training</h2>"]
    parts += [f"<figure><img src='{n}'><figcaption>{html.escape(t)}</figcaption></figure>" for t, n in curves]
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [f"<figure><img src='{n}'><figcaption>{html.escape(t)}</figcaption></figure>" for t, n in figures]
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 10px}img{max-width:100%}"
    page = f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    (out / "index.html").write_text(page)
    return out / "index.html"


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="write RUN_DIR/report/index.html (curves, metrics, figures)")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--data", type=Path, default=None)
    r.set_defaults(func=cmd_report)


def cmd_report(a: argparse.Namespace) -> int:
    print(build_report(a.run_dir, a.data))
    return 0
