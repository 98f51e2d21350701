"""`attrlab index` and split embedding (jobs/embed.py) on a tiny coop_embed run: in process, and
on 2 Ray Data actors (same embeddings, same key order); `attrlab eval --workers 2`; clean errors."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import main

TINY = ["--set", "data.augment.resize=32", "--set", "data.augment.size=28", "--set", "data.loader.num_workers=0",
        "--set", "data.loader.batch_size=8", "--set", "data.loader.classes_per_batch=3",
        "--set", "data.loader.images_per_class=2", "--set", "data.loader.shuffle_buffer=60",
        "--set", "schedule.max_steps=3", "--set", "schedule.warmup_steps=1", "--set", "eval.every_steps=3",
        "--set", "checkpoint.every_steps=3", "--set", "model.subspace_width=4", "--set", "deepspeed.enabled=false",
        "--set", "scaling.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def coop_run(tiny_attrworld: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("coop") / "run"
    assert main(["train", "coop_embed", "--data", str(tiny_attrworld), "--out", str(run), "--local", *TINY]) == 0
    return run


def split_keys(root: Path, split: str) -> list[str]:
    from shards.reader import iter_samples

    return sorted(s["key"] for s in iter_samples(root, split))


def loaded(run: Path):  # (method, cfg, model, meta) of the run's latest export
    from jobs.checkpoints import latest_export
    from jobs.evaluate import load_export

    return load_export(latest_export(run))


def test_index_local_finds_each_vector_itself(coop_run: Path, tiny_attrworld: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    from jobs.embed import embed_split
    from jobs.index import normalise
    from models.knn import load_saved_index
    from shards.format import read_manifest

    capsys.readouterr()
    assert main(["index", str(coop_run), "--data", str(tiny_attrworld)]) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    out = coop_run / "index" / "gallery-flat"
    assert summary["index"] == str(out) and summary["split"] == "gallery"
    index, keys, meta = load_saved_index(out)
    want = split_keys(tiny_attrworld, "gallery")
    assert index.ntotal == len(want) == read_manifest(tiny_attrworld)["splits"]["gallery"]["count"]
    assert keys == want
    assert meta["method"] == "coop_embed" and meta["step"] == 3 and meta["count"] == len(want)
    assert meta["manifest_checksum"] == read_manifest(tiny_attrworld)["checksum"]
    assert meta["normalisation"]["kind"] == "l2_per_subspace" and meta["kind"] == "flat"
    assert len(meta["normalisation"]["blocks"]) == 10  # one subspace per attrworld attribute
    assert not list(out.parent.glob(".*"))  # no temporary directory left beside it

    method, cfg, model, _ = loaded(coop_run)
    emb, _ = normalise(model, embed_split(method, model, cfg, tiny_attrworld, "gallery")["emb"])
    dist, ids = index.search(emb, 3)
    assert (ids[:, 0] == np.arange(len(want))).all() and np.allclose(dist[:, 0], 0, atol=1e-5)
    # every subspace block of an indexed vector has unit norm
    b0, b1 = meta["normalisation"]["blocks"][0]
    assert np.allclose(np.linalg.norm(emb[:, b0:b1], axis=1), 1, atol=1e-5)

    other = coop_run / "hnsw_out"
    assert main(["index", str(coop_run), "--split", "query", "--kind", "hnsw", "--param", "M=8",
                 "--out", str(other)]) == 0
    index, keys, meta = load_saved_index(other)
    assert keys == split_keys(tiny_attrworld, "query") and meta["params"]["M"] == 8 and meta["kind"] == "hnsw"


def test_index_errors_are_one_line_and_write_nothing(coop_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [
        (["index", str(coop_run), "--kind", "annoy"], "unknown index kind 'annoy'"),
        (["index", str(coop_run), "--kind", "ivf", "--param", "nlists=4"], "unknown parameter 'nlists'"),
        (["index", str(coop_run), "--param", "nlist"], "expected KEY=VALUE"),
        (["index", str(coop_run), "--kind", "ivf", "--param", "nlist=x"], "nlist must be an integer"),
        (["index", str(tmp_path / "missing")], "no such run directory"),
        (["index", str(tmp_path)], "no finished checkpoint"),
        (["index", str(coop_run), "--split", "nope", "--out", str(tmp_path / "idx")], "no split 'nope'"),
        (["index", str(coop_run), "--out", str(coop_run)], "is not an index directory"),
    ]
    before = sorted(p.name for p in coop_run.iterdir())
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in coop_run.iterdir()) == before  # no index/ directory appeared
    assert not (coop_run / "index" / "gallery-annoy").exists() and not (tmp_path / "idx").exists()

    import ray

    from jobs.embed import embed_split
    from models import coop_embed

    method, cfg, model, meta = loaded(coop_run)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(Exception, match="needs a Ray cluster: start one with ray.init"):
        embed_split(method, model, cfg, cfg.data.path, "gallery", workers=2, meta=meta)
    monkeypatch.undo()
    monkeypatch.setattr(coop_embed, "METHOD", dataclasses.replace(coop_embed.METHOD, embed=None))
    capsys.readouterr()
    assert main(["index", str(coop_run)]) == 2
    assert "method coop_embed has no embedding" in capsys.readouterr().err


def test_ray_embedding_matches_local(ray_session: object, coop_run: Path, tiny_attrworld: Path) -> None:
    from jobs.embed import embed_split
    from jobs.train import EvalData

    method, cfg, model, meta = loaded(coop_run)
    local = embed_split(method, model, cfg, tiny_attrworld, "train")  # 4 shards: 4 Ray Data read tasks
    data = EvalData(cfg, str(tiny_attrworld), "train", workers=2, method="coop_embed", meta=meta)
    dist = data.embed("__eval__", model)
    assert set(dist) == {"emb", "key", "instance", "category", "attributes"}
    assert list(dist["key"]) == list(local["key"]) == split_keys(tiny_attrworld, "train")
    assert dist["emb"].dtype == np.float32 and dist["emb"].shape == local["emb"].shape
    assert np.allclose(dist["emb"], local["emb"], atol=1e-5)
    assert (dist["instance"] == local["instance"]).all() and (dist["category"] == local["category"]).all()
    assert np.array_equal(dist["attributes"], local["attributes"], equal_nan=True)


def test_eval_with_ray_workers_matches_local(ray_session: object, coop_run: Path) -> None:
    assert main(["eval", str(coop_run)]) == 0
    local = json.loads((coop_run / "metrics.json").read_text())
    assert main(["eval", str(coop_run), "--workers", "2"]) == 0
    dist = json.loads((coop_run / "metrics.json").read_text())
    assert set(dist) == set(local) and "instance_r@1" in dist
    for k, v in local.items():
        if isinstance(v, float):
            assert (math.isnan(v) and math.isnan(dist[k])) or abs(v - dist[k]) <= 1e-5, k
        else:
            assert v == dist[k], k


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_eval_and_index_refuse_damaged_or_foreign_data_and_keep_what_was_written(
        coop_run: Path, tiny_attrworld: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from shards.format import read_manifest
    from shards.writer import write_dataset
    from tests import toy

    run = tmp_path / "run"
    shutil.copytree(coop_run, run)
    assert main(["eval", str(run)]) == 0

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    good = files()
    data = tmp_path / "data"
    shutil.copytree(tiny_attrworld, data)
    shard = data / read_manifest(data)["splits"]["gallery"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated: eval would skip half of it
    _one_line_error(capsys, ["eval", str(run), "--data", str(data), "--split", "gallery"],
                    f"{shard}: sha256 differs from manifest.json")
    _one_line_error(capsys, ["index", str(run), "--data", str(data)], "sha256 differs")
    other = tmp_path / "toy"
    write_dataset(toy.plan(), other, shard_size=5, progress=False)
    _one_line_error(capsys, ["eval", str(run), "--data", str(other)], "but the run was trained on 'attrworld'")
    assert files() == good  # metrics.json and any index of the run untouched


def test_a_damaged_checkpoint_is_one_line_and_an_older_damaged_one_is_skipped(
        coop_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(coop_run, run)
    latest = sorted((run / "checkpoints").iterdir())[-1]
    older = run / "checkpoints" / "step_0000001"
    shutil.copytree(latest, older)
    (older / "state.json").write_text("{x")  # one damaged old checkpoint must not make the run unreadable
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["checkpoint"] == str(latest)
    weights = latest / "export" / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size: passes the completeness check
    _one_line_error(capsys, ["eval", str(run)], "model.safetensors: not a readable safetensors file")
    _one_line_error(capsys, ["report", str(tmp_path / "missing")], "no such run directory")
    assert not (tmp_path / "missing").exists()


def test_train_out_checks_resume_step_files_and_runs_that_never_checkpointed(
        coop_run: Path, tiny_attrworld: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(coop_run, run)
    before = (run / "config.yaml").read_bytes()
    train = ["train", "coop_embed", "--data", str(tiny_attrworld), "--local", *TINY]
    _one_line_error(capsys, [*train, "--out", str(run), "--max-steps", "2"],
                    "schedule.max_steps 2 is below the step of its latest checkpoint (3)")
    assert (run / "config.yaml").read_bytes() == before
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _one_line_error(capsys, [*train, "--out", str(afile)], "is a file, not a directory")
    assert afile.read_text() == "mine"
    shutil.rmtree(run / "checkpoints")  # a run that crashed before its first checkpoint ...
    assert main([*train, "--out", str(run), "--set", "optim.lr=0.002", "--max-steps", "1"]) == 0  # ... starts again
    assert "lr: 0.002" in (run / "config.yaml").read_text()


def test_serve_preflight_names_a_damaged_export_before_starting_replicas(coop_run: Path, tmp_path: Path) -> None:
    import shutil

    from serve.config import check_args
    from shards.format import ShardError

    models, _ = check_args({"models": {"shop": {"run": str(coop_run)}}})
    assert models["shop"]["run"] == str(coop_run.resolve())
    run = tmp_path / "run"
    shutil.copytree(coop_run, run)
    weights = sorted((run / "checkpoints").iterdir())[-1] / "export" / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)
    with pytest.raises(ShardError, match=r"args.models.shop.run: .*model.safetensors: not a readable safetensors"):
        check_args({"models": {"shop": {"run": str(run)}}})
    with pytest.raises(ShardError, match=r"args.models.shop.run: .* does not exist"):
        check_args({"models": {"shop": {"run": str(tmp_path / "nope")}}})
