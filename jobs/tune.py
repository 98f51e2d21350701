"""`attrlab tune`: Ray Tune sweeps over any registered method, and `attrlab tune best`.

    attrlab tune METHOD --data DIR --out SWEEP_DIR [--space YAML] [--trials N] [--scheduler asha|fifo]
                 [--search random|optuna] [--max-concurrent K] [--workers-per-trial W]
                 [--config YAML] [--set KEY=VALUE]... [--max-steps N] [--seed S]
    attrlab tune best SWEEP_DIR [--export RUN_DIR]

The Train V2 pattern: Tune calls `_trial` once per sampled configuration; it builds the same
TorchTrainer as `attrlab train` (jobs.cli_train.make_trainer: DeepSpeed inside each worker) with
Ray's TuneReportCallback, so every validation reaches Tune, where ASHA stops the weak trials on
the space file's metric. A trial checkpoints at every validation and keeps its best checkpoints.

SWEEP_DIR holds
    sweep.json               what was asked (method, data, space, options); a re-run must match it
    tune/                    Ray Tune's experiment state: re-running the command resumes it, and
                             finished trials are not run again (an unfinished one resumes from
                             its latest checkpoint: it is an `attrlab train` run directory)
    trials/<trial_id>/       one training run per trial (config.yaml, params.json, train_log.jsonl,
                             checkpoint_*/ with weights-only exports)
    mlflow.db                the MLflow store: every trial's params and metrics (tracking.uri to change)
    results.csv, results.html   the table and the parameter-vs-metric plots (jobs/tune_report.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from jobs import config as configlib
from jobs.config import ConfigError
from jobs.schema import TrackingSection
from jobs.tune_space import SPACE_DIR, Space, load_space, override
from shards.format import ShardError, read_json_file, read_manifest

TRIAL_CPU = 0.01  # the trial function only waits on its trainer; its workers hold the real CPUs
TUNE_DIR, TRIALS_DIR, SWEEP_FILE, PARAMS_FILE = "tune", "trials", "sweep.json", "params.json"
# options that define a sweep: re-running SWEEP_DIR with another value would mix two sweeps
IDENTITY = ("method", "data_checksum", "space", "config", "sets", "trials", "scheduler", "search", "seed")


def add_parser(sub: Any) -> None:
    t = sub.add_parser("tune", help="a Ray Tune sweep over a method (ASHA, random or Optuna search); "
                                    "`attrlab tune best SWEEP_DIR` prints / exports the best trial",
                       description="attrlab tune METHOD --data DIR --out SWEEP_DIR ... | attrlab tune best SWEEP_DIR [--export RUN_DIR]")
    t.add_argument("target", help="a method of models/registry.py, or 'best'")
    t.add_argument("sweep_dir", nargs="?", type=Path, help="(best) the sweep directory")
    t.add_argument("--data", type=Path, help="shard directory")
    t.add_argument("--out", type=Path, help="sweep directory (re-use it to resume)")
    t.add_argument("--space", type=Path, default=None, help="search space YAML (default: jobs/spaces/METHOD.yaml)")
    t.add_argument("--trials", type=int, default=8, help="configurations to sample (grid: per grid point)")
    t.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    t.add_argument("--search", choices=("random", "optuna"), default="random")
    t.add_argument("--max-concurrent", type=int, default=1, help="trials at once (capped by the cluster's resources)")
    t.add_argument("--workers-per-trial", type=int, default=None, help="Ray Train workers per trial (scaling.workers)")
    t.add_argument("--config", type=Path, default=None, help="base run config (default: jobs/configs/METHOD.yaml)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base config key")
    t.add_argument("--max-steps", type=int, default=None, help="steps per trial (ASHA's max_t)")
    t.add_argument("--reduction-factor", type=int, default=3, help="ASHA's reduction factor")
    t.add_argument("--seed", type=int, default=0, help="the search's random seed")
    t.add_argument("--export", type=Path, default=None, help="(best) write the best trial as a run directory")
    t.set_defaults(func=cmd_tune)


def cmd_tune(a: argparse.Namespace) -> int:
    if a.target == "best":
        if a.sweep_dir is None:
            raise ShardError("attrlab tune best SWEEP_DIR: give the sweep directory")
        return cmd_best(a.sweep_dir, a.export)
    if a.sweep_dir is not None:
        raise ShardError(f"attrlab tune {a.target}: unexpected argument {a.sweep_dir}; the sweep directory is --out")
    for flag in ("data", "out"):
        if getattr(a, flag) is None:
            raise ShardError(f"attrlab tune {a.target}: --{flag} is required")
    if a.export is not None:
        raise ShardError("--export belongs to `attrlab tune best SWEEP_DIR --export RUN_DIR`")
    for flag in ("trials", "max_concurrent", "reduction_factor"):
        if getattr(a, flag) < (2 if flag == "reduction_factor" else 1):
            raise ShardError(f"--{flag.replace('_', '-')} {getattr(a, flag)}: must be at least "
                             f"{2 if flag == 'reduction_factor' else 1}")
    sweep, space = plan_sweep(a)
    statuses = run_sweep(sweep, space, a)
    return report_sweep(Path(sweep["sweep_dir"]), statuses, expected=a.trials * space.grid_size())


def plan_sweep(a: argparse.Namespace) -> tuple[dict[str, Any], Space]:
    """Everything a trial needs, as plain data, checked before Ray starts anything."""
    from jobs import tracking
    from jobs.cli_train import absolute_paths, check_build, flag_overrides, load_run_config
    from models import registry

    method = registry.get(a.target)
    sets = flag_overrides(a.set, a.data, workers=a.workers_per_trial, max_steps=a.max_steps)
    cfg = load_run_config(method.name, a.config, sets)
    # every validation becomes a checkpointed report: ASHA judges it, and the best is kept
    sets.append(f"checkpoint.every_steps={cfg.eval.every_steps}")
    cfg = absolute_paths(load_run_config(method.name, a.config, sets), method.path_fields)
    check_build(method, cfg, a.data)
    space_path = a.space or SPACE_DIR / f"{method.name}.yaml"
    space = load_space(space_path, method.name, method.val_metric, a.config, sets)
    if a.search == "optuna":
        if any(d.kind == "grid" for d in space.params.values()):
            raise ConfigError(f"{space.path}: grid: Optuna samples, it does not enumerate; use choice, or --search random")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ShardError("--search optuna needs Optuna: pip install 'attrlab[tune]' (or use --search random)") from None
    out = a.out.resolve()
    sweep = {
        "method": method.name, "data": str(a.data.resolve()), "data_checksum": read_manifest(a.data)["checksum"],
        "space": _digest(space_path), "space_path": str(Path(space_path).resolve()),
        "config": str(a.config.resolve()) if a.config else None, "sets": sets, "trials": a.trials,
        "scheduler": a.scheduler, "search": a.search, "seed": a.seed, "metric": space.metric, "mode": space.mode,
        "max_steps": cfg.schedule.max_steps, "eval_every": cfg.eval.every_steps, "sweep_dir": str(out),
        # the sweep's driver decides (ATTRLAB_TRACKING, tracking.*) for every trial
        "tracking": tracking.store_uri(cfg.tracking.uri, out) if cfg.tracking.enabled and not tracking.env_disabled() else "",
        "experiment": cfg.tracking.experiment or out.name,
        "scaling": {"workers": cfg.scaling.workers, "cpus": cfg.scaling.cpus_per_worker, "gpus": cfg.scaling.gpus_per_worker},
    }
    check_sweep_dir(out, sweep)
    return sweep, space


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_sweep(sweep_dir: Path) -> dict[str, Any]:
    """sweep.json, checked for the keys the tables need (one line naming the file otherwise)."""
    path = sweep_dir / SWEEP_FILE
    sweep = read_json_file(path, "restore it, or re-run the sweep into a new --out")
    missing = [k for k in ("metric", "mode", "method") if k not in sweep]
    if missing:
        raise ShardError(f"{path}: no {', '.join(missing)}; restore it, or re-run the sweep into a new --out")
    return sweep


def check_sweep_dir(out: Path, sweep: dict[str, Any], *, write: bool = False) -> None:
    """A new sweep directory, or one holding this same sweep; `write` records the sweep in it."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out}: is a file, not a directory; choose a new --out")
    saved = out / SWEEP_FILE
    if saved.is_file():
        old = read_json_file(saved, "restore it, or sweep into a new --out")
        for k in IDENTITY:
            if old.get(k) != sweep.get(k):
                raise ShardError(f"--out {out}: resuming a sweep with a different {k} ({old.get(k)!r} -> {sweep.get(k)!r});"
                                 " use a new --out, or the same command as before")
    elif out.exists() and any(out.iterdir()):
        raise ShardError(f"--out {out}: exists and is not an attrlab sweep directory; choose a new one")
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(sweep, indent=1))
    os.replace(tmp, saved)


def check_resources(sweep: dict[str, Any], wanted: int) -> int:
    """Trials that fit at once; one error line when not even one trial fits (never a silent hang)."""
    import ray

    total = ray.cluster_resources()
    s = sweep["scaling"]
    need = {"CPU": s["workers"] * s["cpus"] + TRIAL_CPU, "GPU": s["workers"] * s["gpus"]}
    fits = wanted
    for res, amount in need.items():
        if amount <= 0:
            continue
        have = float(total.get(res, 0.0))
        if have + 1e-9 < amount:
            raise ShardError(
                f"a trial needs {s['workers']} workers x {s['cpus'] if res == 'CPU' else s['gpus']} {res}"
                f"{f' + {TRIAL_CPU} for its driver' if res == 'CPU' else ''} = {amount:g} {res}, the cluster has "
                f"{have:g}: lower --workers-per-trial or --set scaling.{'cpus' if res == 'CPU' else 'gpus'}_per_worker=..."
                f"{', or start Ray with more logical CPUs (ray start --num-cpus N)' if res == 'CPU' else ''}")
        fits = min(fits, int(math.floor(have / amount + 1e-9)))
    if fits < wanted:
        print(f"attrlab: --max-concurrent {wanted}: only {fits} trial(s) of {need['CPU']:g} CPU fit this cluster "
              f"({total.get('CPU', 0):g} CPU); running {fits} at a time", file=sys.stderr)
    return fits


def _trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial: an `attrlab train` run in SWEEP_DIR/trials/<trial_id> with the sampled values."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.cli_train import absolute_paths, load_run_config, prepare_run_dir, start_tracking, make_trainer
    from jobs.train import TrainJob
    from models import registry

    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(sweep["sweep_dir"]) / TRIALS_DIR / trial_id
    method = registry.get(sweep["method"])
    config = Path(sweep["config"]) if sweep["config"] else None
    cfg = load_run_config(method.name, config, sweep["sets"] + [override(k, v) for k, v in params.items()])
    cfg = absolute_paths(cfg, method.path_fields)
    cfg = dataclasses.replace(cfg, tracking=TrackingSection(enabled=bool(sweep["tracking"]), uri=sweep["tracking"],
                                                            experiment=sweep["experiment"]))
    prepare_run_dir(run_dir, method.name, cfg, Path(sweep["data"]))
    (run_dir / PARAMS_FILE).write_text(json.dumps({"trial_id": trial_id, "params": params}, indent=1))
    start_tracking(run_dir, method.name, cfg, respect_env=False, run_name=trial_id, tags={
        "attrlab.sweep": sweep["sweep_dir"], "attrlab.trial": trial_id, "attrlab.tuned": ",".join(sorted(params))})
    job = TrainJob(method.name, configlib.to_dict(cfg), sweep["data"], str(run_dir))
    make_trainer(job, cfg, callbacks=(TuneReportCallback(),), score=(sweep["metric"], sweep["mode"])).fit()


def _callbacks(sweep: dict[str, Any]) -> list[Any]:
    from ray import tune

    from jobs import tracking

    trials_dir = Path(sweep["sweep_dir"]) / TRIALS_DIR

    class EndTracking(tune.Callback):
        """Ends each trial's MLflow run from the driver: an early-stopped trial's actor is killed."""

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            early = int((trial.last_result or {}).get("step", 0)) < sweep["max_steps"]
            tracking.close_run(trials_dir / trial.trial_id, "KILLED" if early else "FINISHED",
                               tags={"attrlab.early_stopped": str(early).lower()})

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            tracking.close_run(trials_dir / trial.trial_id, "FAILED")

    return [EndTracking()] if sweep["tracking"] else []


def run_sweep(sweep: dict[str, Any], space: Space, a: argparse.Namespace) -> dict[str, str]:
    """Run (or resume) the sweep; returns trial id -> Tune status."""
    from ray import tune

    from jobs import tracking

    from cluster.connect import connect

    connect()
    concurrent = check_resources(sweep, a.max_concurrent)
    check_sweep_dir(Path(sweep["sweep_dir"]), sweep, write=True)  # only once it can run
    if sweep["tracking"]:  # create the store once here, not racing from concurrent trials
        tracking.ensure_experiment(sweep["tracking"], sweep["experiment"])
    trainable = tune.with_resources(tune.with_parameters(_trial_entry, sweep=sweep), {"CPU": TRIAL_CPU})
    exp_dir = Path(sweep["sweep_dir"]) / TUNE_DIR
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # checked with a clear message after
    if tune.Tuner.can_restore(str(exp_dir)):
        print(f"attrlab: resuming the sweep in {exp_dir}; finished trials are kept", file=sys.stderr)
        # an errored trial (a diverged config, say) stays errored: resuming it would fail again
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(trainable, param_space={"params": space.to_tune()},
                           tune_config=_tune_config(sweep, a, concurrent),
                           run_config=tune.RunConfig(name=TUNE_DIR, storage_path=sweep["sweep_dir"],
                                                     callbacks=_callbacks(sweep)))
    grid = tuner.fit()
    # Tune's own view of each trial (an interrupted sweep leaves some RUNNING / PENDING)
    return {t.trial_id: t.status for t in getattr(grid._experiment_analysis, "trials", [])}


def _trial_entry(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    _trial(config["params"], sweep)


def _tune_config(sweep: dict[str, Any], a: argparse.Namespace, concurrent: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler = (ASHAScheduler(time_attr="step", max_t=sweep["max_steps"], reduction_factor=a.reduction_factor,
                               grace_period=min(sweep["eval_every"], sweep["max_steps"]))
                 if a.scheduler == "asha" else FIFOScheduler())
    if a.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=a.seed)
    else:
        # its own concurrency limit: Tune ignores max_concurrent_trials for a generator instance
        search = tune.search.BasicVariantGenerator(random_state=a.seed, max_concurrent=concurrent)
    return tune.TuneConfig(metric=sweep["metric"], mode=sweep["mode"], scheduler=scheduler, search_alg=search,
                           num_samples=a.trials, max_concurrent_trials=concurrent if a.search == "optuna" else None,
                           trial_dirname_creator=_trial_name, trial_name_creator=_trial_name)


def _trial_name(trial: Any) -> str:
    return str(trial.trial_id)


def report_sweep(sweep_dir: Path, statuses: dict[str, str], expected: int) -> int:
    """Table, CSV, HTML; exit 130 (re-run to resume) unless all `expected` trials have ended."""
    from jobs.tune_report import collect, print_table, write_results

    sweep = read_sweep(sweep_dir)
    rows = collect(sweep_dir, sweep, statuses)
    write_results(sweep_dir, sweep, rows)
    print_table(sweep, rows)
    scored = [r for r in rows if r["best"] is not None]
    if rows and not scored:
        raise ShardError(f"metric {sweep['metric']}: no trial reported it; {sweep['method']} validation reports "
                         f"{sorted(rows[0]['reported'])[:12]}; fix `metric:` in {sweep['space_path']}")
    ended = sum(st in ("TERMINATED", "ERROR") for st in statuses.values())
    if sweep["tracking"]:
        print(f"attrlab: every trial in MLflow: mlflow ui --backend-store-uri {sweep['tracking']}", file=sys.stderr)
    print(f"attrlab: table {sweep_dir / 'results.csv'}, plots {sweep_dir / 'results.html'}", file=sys.stderr)
    if ended < expected:
        print(f"attrlab: {expected - ended} of {expected} trials unfinished; re-run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def cmd_best(sweep_dir: Path, export: Path | None) -> int:
    from jobs.tune_report import best_row, collect

    if not (sweep_dir / SWEEP_FILE).is_file():
        raise ShardError(f"{sweep_dir}: not a sweep directory (no {SWEEP_FILE}); run attrlab tune METHOD --out {sweep_dir}")
    sweep = read_sweep(sweep_dir)
    row = best_row(sweep, collect(sweep_dir, sweep, {}))
    trial_dir = sweep_dir / TRIALS_DIR / row["trial_id"]
    print(json.dumps({"trial_id": row["trial_id"], sweep["metric"]: row["best"], "step": row["best_step"],
                      "params": row["params"], "checkpoint": row["checkpoint"]}, indent=1))
    print((trial_dir / "config.yaml").read_text())
    if export is not None:
        export_run(trial_dir, Path(row["checkpoint"]), export, sweep, row)
        print(f"attrlab: exported to {export}: attrlab eval {export} | attrlab index {export} ...", file=sys.stderr)
    return 0


def export_run(trial_dir: Path, checkpoint: Path, out: Path, sweep: dict[str, Any], row: dict[str, Any]) -> None:
    """A run directory with the best checkpoint's weights-only export (what eval / index / serve read),
    written next to OUT and renamed into place, so a failure leaves nothing half-written."""
    from jobs.checkpoints import EXPORT, STATE

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShardError(f"--export {out}: exists; choose a new directory")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dest = tmp / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint / EXPORT, dest / EXPORT)
    state = json.loads((checkpoint / STATE).read_text())
    state.pop("world", None)  # the export only: no rank's training-state files travel with it
    (dest / STATE).write_text(json.dumps(state))
    for name in ("config.yaml", "run.json", PARAMS_FILE):
        shutil.copy2(trial_dir / name, tmp / name)
    (tmp / "tune_best.json").write_text(json.dumps({"sweep_dir": sweep["sweep_dir"], "metric": sweep["metric"],
                                                    "value": row["best"], **{k: row[k] for k in ("trial_id", "params", "best_step")}},
                                                   indent=1))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
