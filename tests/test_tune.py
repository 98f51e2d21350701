"""`attrlab tune`: space files, resource checks, and a real ASHA sweep (Ray Tune driving Ray
Train + DeepSpeed trials) that is interrupted, resumed, exported and evaluated, with every trial
tracked in MLflow."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.config import parse_override
from jobs.tune_space import SPACE_DIR, load_space, override
from models import registry
from tests.test_train import SMALL

METHODS = ["stn_ranker", "coop_embed", "deml", "latent_retrieval", "trip"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_a_valid_space_file(method: str) -> None:
    m = registry.get(method)
    space = load_space(SPACE_DIR / f"{method}.yaml", method, m.val_metric)
    assert space.metric.startswith("val/") and len(space.params) >= 2
    assert all(k.split(".")[0] in ("model", "optim", "schedule") for k in space.params)


@pytest.mark.parametrize("value", [0.0003, 1e-05, 3, "adamw", [0.0, 0.001], True])
def test_sampled_values_survive_the_override_round_trip(value: object) -> None:
    path, parsed = parse_override(override("model.x", value))
    assert path == ["model", "x"] and parsed == value and type(parsed) is type(value)


BAD_SPACES = [
    ({"params": {"optim.lr": {"logunifrom": [1e-4, 1e-2]}}}, "params.optim.lr: unknown distribution 'logunifrom'"),
    ({"params": {"model.nope": {"uniform": [0, 1]}}}, "params.model.nope: not a key of the stn_ranker run config (model.nope: unknown key"),
    ({"params": {"model.init_scale": {"uniform": [-1.0, 0.5]}}}, "params.model.init_scale: -1.0 is not a valid value"),
    ({"params": {"optim.lr": {"loguniform": [0, 0.1]}}}, "params.optim.lr.loguniform: bounds must be > 0"),
    ({"params": {"optim.lr": {"uniform": [0.1]}}}, "params.optim.lr.uniform: expected 2 numbers"),
    ({"params": {"optim.lr": {"uniform": [0.2, 0.1]}}}, "lower bound 0.2 must be below 0.1"),
    ({"params": {"optim.name": {"choice": ["adam", "rmsprop"]}}}, "params.optim.name: 'rmsprop' is not a valid value"),
    ({"params": {"scaling.workers": {"choice": [1, 2]}}}, "params.scaling.workers: not tunable"),
    ({"metric": "rank_acc", "params": {"optim.lr": {"uniform": [0.1, 0.2]}}}, "metric: expected a validation key"),
    ({"mode": "maximise", "params": {"optim.lr": {"uniform": [0.1, 0.2]}}}, "mode: 'maximise' is not one of"),
    ({"parameters": {}}, "parameters: unknown key"),
    ({"metric": "val/rank_acc"}, "params: expected a mapping"),
]


@pytest.mark.parametrize("space,message", BAD_SPACES, ids=[m[:40] for _, m in BAD_SPACES])
def test_a_bad_space_file_is_one_line_and_writes_nothing(space: dict, message: str, tiny_attrworld: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = tmp_path / "sweep"
    assert main(["tune", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(out), "--space", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err
    assert not out.exists()


def test_a_trial_the_cluster_cannot_hold_is_refused_not_left_waiting(
        ray_session: object, tiny_attrworld: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    # 9 workers x 0.5 CPU + the trial driver > the 4 logical CPUs of the test cluster
    code = main(["tune", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(out), "--workers-per-trial", "9",
                 *SMALL, "--max-steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "a trial needs 9 workers x 0.5 CPU" in err and "the cluster has 4" in err
    assert not (out / "sweep.json").exists()


def _sweep_args(data: Path, out: Path) -> list[str]:
    return ["tune", "stn_ranker", "--data", str(data), "--out", str(out), "--trials", "3", "--scheduler", "asha",
            "--workers-per-trial", "1", "--max-concurrent", "1", "--max-steps", "4", *SMALL]


def _log_rows(trial: Path) -> list[str]:
    return (trial / "train_log.jsonl").read_text().splitlines()


@pytest.mark.slow
def test_asha_sweep_interrupted_resumed_exported_and_tracked(ray_session: object, tiny_attrworld: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from jobs.tune_report import collect

    out = tmp_path / "sweep"
    args = _sweep_args(tiny_attrworld, out)
    env = {k: v for k, v in os.environ.items() if k != "ATTRLAB_TRACKING"}
    env.update(RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=os.getcwd())
    # 1. a sweep in its own driver process, interrupted (Ctrl-C) once the second trial has started
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(list((out / "trials").glob("*/params.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log[-3000:]
    assert "re-run the same command to resume" in log
    first = sorted((out / "trials").glob("*/params.json"))[0].parent
    assert json.loads(first.joinpath("params.json").read_text())["trial_id"].endswith("_00000")
    before = _log_rows(first)
    assert any('"val/rank_acc"' in r and '"step": 4' in r for r in before)

    # 2. the same command resumes: the finished trial is not run again, the rest complete
    monkeypatch.delenv("ATTRLAB_TRACKING", raising=False)
    assert main(args) == 0
    assert _log_rows(first) == before
    sweep = json.loads((out / "sweep.json").read_text())
    rows = collect(out, sweep, {})
    assert len(rows) == 3 and all(r["best"] is not None for r in rows)
    assert all(r["status"] in ("finished", "stopped") for r in rows)
    lrs = {r["trial_id"]: r["params"]["optim.lr"] for r in rows}
    assert len(set(lrs.values())) == 3  # three sampled configurations
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and "optim.lr" in csv_lines[0]
    assert (out / "results.html").read_text().count("data:image/png;base64,") == 2

    # 3. tune best: the best trial's config and checkpoint, exported as a run directory eval accepts
    best = max(rows, key=lambda r: r["best"])
    export = tmp_path / "best_run"
    assert main(["tune", "best", str(out), "--export", str(export)]) == 0
    assert json.loads((export / "tune_best.json").read_text())["trial_id"] == best["trial_id"]
    assert main(["eval", str(export), "--split", "val"]) == 0
    metrics = json.loads((export / "metrics.json").read_text())
    # the exported checkpoint is the trial's best: eval on val reproduces its best validation score
    assert metrics["rank_acc"] == pytest.approx(best["best"], abs=1e-6)
    assert main(["tune", "best", str(out), "--export", str(export)]) == 2  # never over an existing directory

    # 4. MLflow: one run per trial, with the sampled params and the validation curve
    client = MlflowClient(tracking_uri=sweep["tracking"])
    exp = client.get_experiment_by_name(sweep["experiment"])
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == set(lrs)
    for tid, run in runs.items():
        assert float(run.data.params["optim.lr"]) == pytest.approx(lrs[tid])
        assert run.data.params["scaling.workers"] == "1"
        assert run.info.status in ("FINISHED", "KILLED")
        history = client.get_metric_history(run.info.run_id, "val/rank_acc")
        assert history and history[-1].step <= 4
    best_hist = client.get_metric_history(runs[best["trial_id"]].info.run_id, "val/rank_acc")
    assert max(h.value for h in best_hist) == pytest.approx(best["best"])


def test_optuna_search_is_built_and_its_absence_is_one_line(tiny_attrworld: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from ray.tune.search.optuna import OptunaSearch

    from jobs.tune import _tune_config

    sweep = {"max_steps": 4, "eval_every": 2, "metric": "val/rank_acc", "mode": "max"}
    a = argparse.Namespace(search="optuna", scheduler="asha", reduction_factor=3, seed=0, trials=3)
    cfg = _tune_config(sweep, a, 1)
    assert isinstance(cfg.search_alg, OptunaSearch) and cfg.max_concurrent_trials == 1
    assert cfg.scheduler._max_t == 4 and cfg.scheduler._time_attr == "step"
    # grid points cannot be sampled by Optuna
    space = tmp_path / "grid.yaml"
    space.write_text("params:\n  optim.lr: {grid: [0.001, 0.002]}\n")
    base = ["tune", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(tmp_path / "s"), "--search", "optuna"]
    assert main([*base, "--space", str(space)]) == 2
    assert "grid: Optuna samples" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    assert main(base) == 2
    assert "--search optuna needs Optuna: pip install 'attrlab[tune]'" in capsys.readouterr().err


def test_a_sweep_is_submittable_to_a_cluster() -> None:
    from cluster.submit import entrypoint, job_command

    args = job_command(["--", "tune", "deml", "--data", "/shared/digits", "--out", "/shared/sweeps/d1",
                        "--trials", "16", "--max-concurrent", "4", "--search", "optuna"])
    assert entrypoint("python", args).startswith("python -m jobs.cli tune deml --data /shared/digits")


def test_a_sweep_directory_holds_one_sweep(tiny_attrworld: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.tune import check_sweep_dir

    out = tmp_path / "s"
    check_sweep_dir(out, {"method": "stn_ranker", "trials": 3}, write=True)
    with pytest.raises(Exception, match="resuming a sweep with a different trials"):
        check_sweep_dir(out, {"method": "stn_ranker", "trials": 5})
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("keep")
    assert main(["tune", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(other)]) == 2
    assert "is not an attrlab sweep directory" in capsys.readouterr().err
    assert (other / "x").read_text() == "keep"
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["tune", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(afile)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err and afile.read_text() == "keep"
    for text, message in (("{x", "not valid JSON"), ("{}", "no metric, mode, method"), ("[]", "expected a JSON object")):
        (out / "sweep.json").write_text(text)
        assert main(["tune", "best", str(out)]) == 2
        err = capsys.readouterr().err
        assert "sweep.json" in err and message in err and len(err.strip().splitlines()) == 1, err
