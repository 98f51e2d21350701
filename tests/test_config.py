"""Strict config loading: unknown keys, wrong types and missing files are one line naming them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from jobs import config
from jobs.config import ConfigError
from jobs.schema import run_config_class


@dataclass(frozen=True)
class Inner:
    depth: int = 2
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ToyModel:
    width: float = 1.0
    kind: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    scale: float | None = None


RunCfg = run_config_class("toy_method", ToyModel)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_build_typed_frozen_config(tmp_path: Path) -> None:
    p = write(tmp_path, "optim:\n  lr: 0.01\n  lr_mult: {stn: 0.1}\nmodel:\n  width: 2\n  inner: {names: [x, y]}\n")
    cfg = config.load(RunCfg, p, ["model.inner.depth=5", "data.loader.batch_size=7", "model.scale=0.5", "seed=3"])
    assert cfg.optim.lr == 0.01 and cfg.optim.lr_mult == {"stn": 0.1}
    assert cfg.model.width == 2.0 and isinstance(cfg.model.width, float)
    assert cfg.model.inner == Inner(depth=5, names=("x", "y"))
    assert cfg.data.loader.batch_size == 7 and cfg.model.scale == 0.5 and cfg.seed == 3
    assert cfg.optim.momentum == 0.9  # defaults kept
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0  # frozen
    # round trip through the saved form
    config.dump(cfg, tmp_path / "saved.yaml")
    assert config.load(RunCfg, tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("text, overrides, message", [
    ("optim:\n  lrr: 1\n", [], r"c.yaml: optim.lrr: unknown key; OptimSection has \['betas'"),
    ("model:\n  inner:\n    depht: 1\n", [], r"c.yaml: model.inner.depht: unknown key"),
    ("optim:\n  lr: fast\n", [], r"c.yaml: optim.lr: expected a number, got 'fast'"),
    ("model:\n  kind: c\n", [], r"c.yaml: model.kind: 'c' is not one of \['a', 'b'\]"),
    ("model:\n  inner: {depth: 1.5}\n", [], r"model.inner.depth: expected an integer, got 1.5"),
    ("deepspeed:\n  enabled: yes please\n", [], r"deepspeed.enabled: expected true or false"),
    ("optim: [1, 2]\n", [], r"optim: expected a mapping"),
    ("- a\n- b\n", [], r"the top level must be a mapping"),
    ("optim:\n  lr: [1\n", [], r"c.yaml:3: not valid YAML"),
    ("", ["optim.nope=1"], r"--set optim.nope: unknown key"),
    ("", ["schedule.max_steps=ten"], r"command line \(schedule.max_steps=ten\): schedule.max_steps: expected an integer"),
    ("", ["schedule.max_steps=0"], r"max_steps and schedule.grad_accum must be >= 1"),
    ("", ["optim"], r"--set 'optim': expected dotted.key=value"),
    ("", ["data.augment.size=99"], r"augment.size \(99\) must be in 1..augment.resize"),
    ("eval:\n  max_batches: 2\n", [], r"eval: max_batches: 2 is not supported: validation runs over the whole split"),
    # a section's own check blames the command line when the bad value came from it, else the file
    ("", ["schedule.max_steps=0"], r"^command line \(schedule.max_steps=0\): schedule: schedule.max_steps"),
    ("schedule:\n  max_steps: 0\n", [], r"c.yaml: schedule: schedule.max_steps"),
    ("", ["optim.lr=-1"], r"^command line \(optim.lr=-1\): optim: optim.lr must be >= 0, got -1"),
    ("", ["checkpoint.every_steps=0"], r"^command line .*checkpoint.every_steps must be >= 1 \(got 0\)"),
    ("", ["eval.every_steps=0"], r"eval.every_steps must be >= 1, got 0"),
    ("", ["data.loader.batch_size=0"], r"^command line \(data.loader.batch_size=0\): data.loader: loader.batch_size"),
    ("", ["scaling.workers=0"], r"scaling.workers must be >= 1 \(got 0\)"),
    ("", ["scaling.gpus_per_worker=-1"], r"scaling.gpus_per_worker >= 0 \(got -1.0\)"),
])
def test_bad_config_is_one_line_naming_key_and_file(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        config.load(RunCfg, write(tmp_path, text), overrides)
    assert "\n" not in str(e.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        config.load(RunCfg, tmp_path / "nope.yaml")


def test_yaml_is_safe_loaded(tmp_path: Path) -> None:
    p = write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(RunCfg, p)


@pytest.mark.parametrize("path", sorted(Path("jobs/configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_strictly(path: Path) -> None:
    from jobs.cli_train import load_run_config
    from models import registry

    method = next(m for m in registry.names() if path.stem == m or path.stem.startswith(m + "_"))
    cfg = load_run_config(method, path, [])
    assert cfg.schedule.max_steps >= 1 and cfg.data.train_split


def test_a_config_file_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"bin.yaml: not UTF-8 text"):
        config.load(RunCfg, p)
    with pytest.raises(ConfigError, match="is a directory"):
        config.read_yaml(tmp_path)


def test_read_json_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    from shards.format import ShardError, read_json_file

    p = tmp_path / "state.json"
    for text, message in (("{x", "unreadable or not valid JSON"), ("[1, 2]", "expected a JSON object, found list"),
                          ("\udcff", "unreadable or not valid JSON")):
        p.write_text(text, errors="surrogateescape")
        with pytest.raises(ShardError, match=rf"state.json: {message}.*; do this") as e:
            read_json_file(p, "do this")
        assert "\n" not in str(e.value)
    with pytest.raises(ShardError, match="missing; do this"):
        read_json_file(tmp_path / "nope.json", "do this")
    p.write_text('{"step": 3}')
    assert read_json_file(p, "x") == {"step": 3}
