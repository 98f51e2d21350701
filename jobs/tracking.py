"""Experiment tracking through MLflow: every `attrlab train` run and every `attrlab tune` trial is
an MLflow run holding its resolved config (params), its training curve and its validation metrics.

Who does what:
- the driver (`attrlab train`, or a sweep's trial function) calls `open_run`: it creates the
  experiment and the run, or re-opens the run recorded in RUN_DIR/tracking.json when a run is
  resumed, logs the flattened config as params and writes RUN_DIR/tracking.json {uri, run_id};
- rank 0 logs every row of train_log.jsonl through `RunLogger` (jobs/checkpoints.Reporter.log),
  only when tracking.json exists: the driver decides, so workers need no settings of their own;
- the driver ends it with `close_run(run_dir, status)` (a sweep's early-stopped trials: KILLED).

Logging never stops training: a store that fails mid-run is warned about once, then skipped.
Opening an unusable store is one error line before training starts. The local default store is
SQLite (MLflow 3 deprecates its file store): `mlflow ui --backend-store-uri sqlite:///PATH.db`.
MLflow's client is used directly rather than `mlflow.start_run`'s process-global active run, so a
Tune trial actor or a Ray worker never logs into another run's context.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from shards.format import ShardError

log = logging.getLogger(__name__)

RECORD = "tracking.json"
ENV_SWITCH = "ATTRLAB_TRACKING"  # 0/false/off: no tracking for any run started from this shell
_BAD = re.compile(r"[^/\w.\- :]")  # MLflow's allowed characters for metric and param names


def env_disabled() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "off", "no")


def store_uri(configured: str, default_dir: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite store in `default_dir`.
    A plain path is a SQLite file (`.db`) or a directory that gets `mlflow.db`."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{(Path(default_dir) / 'mlflow.db').resolve()}"
    if "://" in uri or uri.startswith("databricks"):
        return uri
    path = Path(uri).expanduser().resolve()
    return f"sqlite:///{path if path.suffix == '.db' else path / 'mlflow.db'}"


def metric_name(key: str) -> str:
    """An MLflow-valid name for one of our keys ('val/instance_r@1' -> 'val/instance_r_at_1')."""
    return _BAD.sub("_", key.replace("@", "_at_"))


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _local_dir(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else None


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it (artifacts next to a local store, never in the cwd)."""
    from mlflow.exceptions import MlflowException

    local = _local_dir(uri)
    try:
        if local is not None:
            local.mkdir(parents=True, exist_ok=True)
        client = _client(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifacts = (local / "mlartifacts").as_uri() if local is not None else None
        try:
            return client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # created meanwhile by a concurrent trial
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id
    except Exception as e:  # noqa: BLE001 - any store failure is the same user-fixable problem
        raise ShardError(f"tracking.uri {uri}: cannot open the MLflow store ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); fix it or set tracking.enabled=false") from None


def open_run(run_dir: Path, cfg_dict: Mapping[str, Any], *, uri: str, experiment: str, run_name: str,
             tags: Mapping[str, str] | None = None) -> str:
    """Create (or re-open, on resume) the run for RUN_DIR; returns its run id."""
    from mlflow.entities import Param

    run_dir = Path(run_dir)
    record = run_dir / RECORD
    exp_id = ensure_experiment(uri, experiment)
    client = _client(uri)
    if record.is_file():
        prev = json.loads(record.read_text())
        if prev.get("uri") == uri:
            try:
                client.update_run(prev["run_id"], status="RUNNING")
                return prev["run_id"]
            except Exception:  # noqa: BLE001 - the run was deleted from the store: start a new one
                log.warning("tracking: run %s not found in %s; starting a new one", prev.get("run_id"), uri)
    all_tags = {"attrlab.run_dir": str(run_dir.resolve()), **(tags or {})}
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    from jobs.config import flatten

    params = [Param(metric_name(k), str(v)[:6000]) for k, v in sorted(flatten(cfg_dict).items())]
    for i in range(0, len(params), 100):  # MLflow's limit of params per batch
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"uri": uri, "run_id": run.info.run_id, "experiment": experiment}))
    os.replace(tmp, record)
    return run.info.run_id


def close_run(run_dir: Path, status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
    """End the run recorded in RUN_DIR (FINISHED, FAILED or KILLED); no record, nothing to do."""
    record = Path(run_dir) / RECORD
    if not record.is_file():
        return
    rec = json.loads(record.read_text())
    try:
        client = _client(rec["uri"])
        for k, v in (tags or {}).items():
            client.set_tag(rec["run_id"], k, v)
        client.set_terminated(rec["run_id"], status=status)
    except Exception as e:  # noqa: BLE001 - never turn a finished training run into a failure
        log.warning("tracking: could not end run %s in %s: %s", rec.get("run_id"), rec.get("uri"), e)


class RunLogger:
    """Rank 0's side: train_log rows -> metrics of the run in RUN_DIR/tracking.json, if any."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._client: Any = None
        self._run_id: str | None = None
        self._off = False

    def _open(self) -> bool:
        if self._off:
            return False
        if self._client is None:
            record = self.run_dir / RECORD
            if not record.is_file():
                self._off = True
                return False
            rec = json.loads(record.read_text())
            self._client, self._run_id = _client(rec["uri"]), rec["run_id"]
        return True

    def log(self, row: Mapping[str, Any]) -> None:
        if not self._open():
            return
        from mlflow.entities import Metric

        step = int(row.get("step", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(k), float(v), now, step) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        try:
            for i in range(0, len(metrics), 1000):  # MLflow's limit of metrics per batch
                self._client.log_batch(self._run_id, metrics=metrics[i:i + 1000])
        except Exception as e:  # noqa: BLE001 - tracking must not stop training
            log.warning("tracking: logging to run %s failed (%s); training goes on without tracking", self._run_id, e)
            self._off = True
