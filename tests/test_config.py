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
    ("", ["schedule.max_steps=ten"], r"--set: schedule.max_steps: expected an integer"),
    ("", ["schedule.max_steps=0"], r"max_steps and schedule.grad_accum must be >= 1"),
    ("", ["optim"], r"--set 'optim': expected dotted.key=value"),
    ("", ["data.augment.size=99"], r"augment.size \(99\) must be in 1..augment.resize"),
    ("eval:\n  max_batches: 2\n", [], r"eval: max_batches: 2 is not supported: validation runs over the whole split"),
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
