"""Warm start (`init:` section, jobs/warmstart.py): the selected tensors come from the source
run's export, nothing else does; bad sources are one line naming the key; resume ignores it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from jobs.checkpoints import latest_export
from tests.test_train import steps_logged, train

SMILE = ["--local", "--set", "model.attributes=[smile]"]
ONE = [*SMILE, "--max-steps", "2"]


def weights(run: Path) -> dict:
    return load_file(str(latest_export(run) / "model.safetensors"))


@pytest.fixture(scope="module")
def source(tiny_attrworld: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("warm") / "source"
    assert train(tiny_attrworld, run, *ONE) == 0
    return run


def test_included_tensors_come_from_the_source_and_the_rest_does_not(tiny_attrworld: Path, source: Path,
                                                                     tmp_path: Path) -> None:
    run = tmp_path / "warm"
    # another seed, so the ranker's own init differs; the localiser's lr is 0, so it must stay the source's
    assert train(tiny_attrworld, run, *ONE, "--set", "seed=1", "--set", "model.stn_lr_mult=0",
                 "--set", f"init.from_run={source}", "--set", "init.include=[localiser.]") == 0
    src, got = weights(source), weights(run)
    # parameters only: BatchNorm's running statistics move in training mode even at lr 0
    loc = [k for k in src if k.startswith("localiser.") and "running_" not in k and "num_batches" not in k]
    assert loc and all(got[k].equal(src[k]) for k in loc)
    assert not got["ranker.trunk.features.0.weight"].equal(src["ranker.trunk.features.0.weight"])
    # the same run without the warm start has its own localiser
    cold = tmp_path / "cold"
    assert train(tiny_attrworld, cold, *ONE, "--set", "seed=1", "--set", "model.stn_lr_mult=0") == 0
    assert not all(weights(cold)[k].equal(src[k]) for k in loc)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["init"] == {"from_run": str(source), "include": ["localiser."], "exclude": []}


def test_bad_sources_are_one_line_naming_the_key(tiny_attrworld: Path, source: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other_method"
    shutil.copytree(source, other)
    state = latest_export(other).parent / "state.json"  # named directly: a run's listing would call it incomplete
    state.write_text(json.dumps({**json.loads(state.read_text()), "method": "deml"}))
    cases = [
        ([f"init.from_run={tmp_path / 'nope'}"], "no such run or export directory"),
        ([f"init.from_run={tmp_path}"], f"init.from_run {tmp_path}: no finished checkpoint"),
        ([f"init.from_run={state.parent / 'export'}"], "holds a deml model, this run trains stn_ranker"),
        ([f"init.from_run={source}", "init.include=[localizer.]"], "prefix 'localizer.' matches no parameter"),
        ([f"init.from_run={source}", "init.include=[localiser.]", "init.exclude=[localiser.]"], "selects nothing"),
        ([f"init.from_run={source}", "model.attributes=[smile,beard]"],
         "'crop_w' is [1, 256] in"),
    ]
    for i, (sets, message) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        code = train(tiny_attrworld, out, "--local", "--max-steps", "2",
                     *(a for s in sets for a in ("--set", s)))
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (out / "checkpoints").exists()  # refused before anything trained


def test_a_resumed_warm_run_loads_its_own_checkpoint_even_when_the_source_is_gone(
        tiny_attrworld: Path, source: Path, tmp_path: Path) -> None:
    copy, run = tmp_path / "source_copy", tmp_path / "warm"
    shutil.copytree(source, copy)
    warm = [*SMILE, "--set", f"init.from_run={copy}"]
    assert train(tiny_attrworld, run, *warm, "--max-steps", "2") == 0
    shutil.rmtree(copy)
    before = weights(run)
    assert train(tiny_attrworld, run, *warm, "--max-steps", "3") == 0
    assert steps_logged(run) == [1, 2, 3]
    after = weights(run)
    assert any(not after[k].equal(before[k]) for k in before)


def test_a_config_saved_before_the_init_section_still_resumes(tiny_attrworld: Path, source: Path,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "old"
    shutil.copytree(source, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["init"]  # as written by a version without the section
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert train(tiny_attrworld, run, *SMILE, "--max-steps", "3") == 0
    assert steps_logged(run) == [1, 2, 3]
