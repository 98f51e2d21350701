"""Search-space files for `attrlab tune` (jobs/spaces/<method>.yaml), loaded strictly.

    metric: val/rank_acc          # a key the method's validation reports (default: its val_metric)
    mode: max                     # max | min
    params:                       # dotted run-config keys (as for --set) -> one distribution each
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.init_scale: {uniform: [0.2, 0.6]}
      model.scales: {choice: [1, 2, 3]}

Distributions: uniform [lo, hi], loguniform [lo, hi] (lo > 0), quniform [lo, hi, q],
randint [lo, hi] (hi exclusive), choice [v, ...], grid [v, ...] (every value, random search only).
Every parameter is checked against the method's run config before any trial starts: an unknown
key, a value of the wrong type or one the config rejects (each bound, each choice) is one error
line naming the parameter and the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from jobs.config import ConfigError, read_yaml

# distribution -> (number of arguments, or None for a list of values; numeric bounds?)
DISTRIBUTIONS: dict[str, int | None] = {
    "uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "choice": None, "grid": None,
}
SPACE_DIR = Path(__file__).parent / "spaces"


@dataclass(frozen=True)
class Dist:
    kind: str
    args: tuple[Any, ...]

    def probe_values(self) -> list[Any]:
        """Values that must all be valid config values: the bounds, or every choice."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args[:2]) if DISTRIBUTIONS[self.kind] else list(self.args)

    def to_tune(self) -> Any:
        from ray import tune

        lo, *rest = self.args
        return {"uniform": lambda: tune.uniform(lo, rest[0]), "loguniform": lambda: tune.loguniform(lo, rest[0]),
                "quniform": lambda: tune.quniform(lo, rest[0], rest[1]), "randint": lambda: tune.randint(lo, rest[0]),
                "choice": lambda: tune.choice(list(self.args)),
                "grid": lambda: tune.grid_search(list(self.args))}[self.kind]()


@dataclass(frozen=True)
class Space:
    metric: str
    mode: Literal["max", "min"]
    params: dict[str, Dist]
    path: str

    def to_tune(self) -> dict[str, Any]:
        return {k: d.to_tune() for k, d in self.params.items()}

    def grid_size(self) -> int:
        n = 1
        for d in self.params.values():
            n *= len(d.args) if d.kind == "grid" else 1
        return n


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _dist(name: str, spec: Any, where: str) -> Dist:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: params.{name}: expected one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}; "
                          f"choose from {sorted(DISTRIBUTIONS)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: params.{name}: unknown distribution {kind!r}; choose from {sorted(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: params.{name}.{kind}: expected a non-empty list")
    arity = DISTRIBUTIONS[kind]
    if arity is not None:
        if len(args) != arity or not all(_number(a) for a in args):
            raise ConfigError(f"{where}: params.{name}.{kind}: expected {arity} numbers, got {args!r}")
        if not args[0] < args[1]:
            raise ConfigError(f"{where}: params.{name}.{kind}: lower bound {args[0]} must be below {args[1]}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: params.{name}.loguniform: bounds must be > 0, got {args[0]}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: params.{name}.randint: bounds must be integers, got {args!r}")
        if kind == "quniform" and args[2] <= 0:
            raise ConfigError(f"{where}: params.{name}.quniform: step q must be > 0, got {args[2]}")
    return Dist(kind, tuple(args))


def override(key: str, value: Any) -> str:
    """A `--set` item for one sampled value (YAML flow style, so lists and strings survive)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def load_space(path: Path, method: str, default_metric: str, config: Path | None = None,
               sets: list[str] | None = None) -> Space:
    """The space file, checked against METHOD's run config (`config` YAML + `sets`, as a trial builds it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space {path}: file not found (one per method in {SPACE_DIR})")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with metric, mode and params")
    unknown = sorted(set(data) - {"metric", "mode", "params"})
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key; a space file has metric, mode and params")
    metric = data.get("metric", f"val/{default_metric}")
    if not isinstance(metric, str) or not metric.startswith("val/"):
        raise ConfigError(f"{path}: metric: expected a validation key such as 'val/{default_metric}', got {metric!r}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"{path}: mode: {mode!r} is not one of ['max', 'min']")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: params: expected a mapping of config keys to distributions")
    space = Space(metric, mode, {str(k): _dist(str(k), v, str(path)) for k, v in params.items()}, str(path))
    check_against_config(space, method, config, sets)
    return space


def check_against_config(space: Space, method: str, config: Path | None = None, sets: list[str] | None = None) -> None:
    """Build the run config with every bound / choice of every parameter: each must be accepted."""
    from jobs.cli_train import load_run_config

    for key, dist in space.params.items():
        if key.split(".")[0] in ("data", "scaling", "checkpoint", "eval", "tracking") or key == "schedule.max_steps":
            raise ConfigError(f"{space.path}: params.{key}: not tunable (it sets where and how long a trial runs; "
                              "use the command's flags or --set)")
        for value in dist.probe_values():
            try:
                load_run_config(method, config, list(sets or []) + [override(key, value)])
            except ConfigError as e:
                msg = re.sub(r"^(--set:? |command line \([^)]*\): )", "", str(e))
                if "unknown key" in msg:
                    raise ConfigError(f"{space.path}: params.{key}: not a key of the {method} run config "
                                      f"({msg})") from None
                raise ConfigError(f"{space.path}: params.{key}: {value!r} is not a valid value ({msg})") from None
