"""MLflow tracking (jobs/tracking.py): names, store URIs, and `attrlab train` runs recorded in a
real SQLite-backed MLflow store — params = the resolved config, metrics = train_log.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import tracking
from jobs.cli import main
from jobs.train import FaultInjected
from tests.test_train import SMALL


def test_metric_names_are_mlflow_valid() -> None:
    assert tracking.metric_name("val/instance_r@1") == "val/instance_r_at_1"
    assert tracking.metric_name("val/lam_0.005/ndcg@5") == "val/lam_0.005/ndcg_at_5"
    assert tracking.metric_name("loss/main") == "loss/main"
    assert tracking.metric_name("a(b)") == "a_b_"


def test_store_uri_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.store_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.store_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"
    assert tracking.store_uri(str(tmp_path / "x.db"), tmp_path) == f"sqlite:///{tmp_path.resolve()}/x.db"
    assert tracking.store_uri(str(tmp_path / "store"), tmp_path) == f"sqlite:///{tmp_path.resolve()}/store/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.store_uri("", tmp_path) == "http://env:5000"
    assert tracking.store_uri("http://cfg:1", tmp_path) == "http://cfg:1"


def test_an_unusable_store_is_one_line_before_training(tiny_attrworld: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ATTRLAB_TRACKING", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run = tmp_path / "run"
    code = main(["train", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(run), "--local", *SMALL,
                 "--max-steps", "2", "--set", f"tracking.uri={blocker}/sub/mlflow.db"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "tracking.uri sqlite:///" in err and "tracking.enabled=false" in err
    assert not (run / "train_log.jsonl").exists()


def _client(run: Path):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    rec = json.loads((run / tracking.RECORD).read_text())
    client = MlflowClient(tracking_uri=rec["uri"])
    return client, client.get_run(rec["run_id"])


def test_train_runs_are_tracked_resumed_into_the_same_run_and_failures_marked(
        tiny_attrworld: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTRLAB_TRACKING", raising=False)
    run = tmp_path / "run"
    base = ["train", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(run), "--local", *SMALL,
            "--set", "optim.lr=0.003"]
    assert main([*base, "--max-steps", "4"]) == 0
    client, r = _client(run)
    assert r.info.status == "FINISHED" and r.info.run_name == "run"
    assert r.data.params["optim.lr"] == "0.003" and r.data.params["model.init_scale"] == "0.33"
    assert r.data.tags["attrlab.method"] == "stn_ranker"
    logged = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    want = [(row["step"], row["val/rank_acc"]) for row in logged if "val/rank_acc" in row]
    got = [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "val/rank_acc")]
    assert [s for s, _ in sorted(got)] == [s for s, _ in want] == [2, 4]
    assert [v for _, v in sorted(got)] == pytest.approx([v for _, v in want])
    assert len(client.get_metric_history(r.info.run_id, "loss/main")) == 4

    # resuming the run directory continues the same MLflow run
    assert main([*base, "--max-steps", "6"]) == 0
    client, r2 = _client(run)
    assert r2.info.run_id == r.info.run_id and r2.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/rank_acc")] == [2, 4, 6]

    # a run that fails is marked FAILED
    bad = tmp_path / "bad"
    with pytest.raises(FaultInjected):
        main(["train", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(bad), "--local", *SMALL,
              "--max-steps", "4", "--set", "checkpoint.fail_at_step=3"])
    assert _client(bad)[1].info.status == "FAILED"


def test_tracking_off_writes_no_record(tiny_attrworld: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTRLAB_TRACKING", raising=False)
    run = tmp_path / "run"
    assert main(["train", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(run), "--local", *SMALL,
                 "--max-steps", "2", "--set", "tracking.enabled=false"]) == 0
    assert not (run / tracking.RECORD).exists() and not (run / "mlflow.db").exists()
