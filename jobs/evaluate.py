"""`attrlab eval RUN_DIR`: the method's paper metrics on the test split -> RUN_DIR/metrics.json.

Loads only the serving export (safetensors weights + resolved config), never pickled state.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from jobs import config as configlib
from jobs.checkpoints import latest_export, read_state
from models import registry
from shards.format import DatasetMeta, ShardError, read_json_file, read_meta
from shards.reader import verify_split


def load_export(export: Path) -> tuple[registry.Method, Any, torch.nn.Module, DatasetMeta]:
    """(method, config, model with weights, dataset meta) from an export directory."""
    from safetensors.torch import load_file

    from jobs.cli_train import resolve_config_class

    state = read_state(export.parent)
    method = registry.get(state["method"])
    cfg = configlib.load(resolve_config_class(method.name), export / "config.yaml")
    meta = DatasetMeta.from_json(read_json_file(export / "meta.json", _damaged(export)), where=str(export / "meta.json"))
    model = method.build(cfg.model, meta)
    try:
        weights = load_file(str(export / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 — safetensors raises its own error types for a damaged file
        raise _unreadable_weights(export, e) from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ShardError(f"{export}/model.safetensors: does not match {method.name} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return method, cfg, model.eval(), meta


def check_export_readable(export: Path) -> None:
    """Open the export's safetensors header and meta.json without building the model: a cheap
    pre-flight (e.g. before `attrlab serve` starts replicas) that names a damaged file in one line."""
    from safetensors import safe_open

    read_json_file(export / "meta.json", _damaged(export))
    try:
        with safe_open(str(export / "model.safetensors"), "pt") as f:
            if not list(f.keys()):
                raise ValueError("no tensors")
    except Exception as e:  # noqa: BLE001 — safetensors raises its own error types for a damaged file
        raise _unreadable_weights(export, e) from None


def _damaged(export: Path) -> str:
    return f"the export {export} is corrupt: delete its checkpoint directory to fall back to the one before it"


def _unreadable_weights(export: Path, e: BaseException) -> ShardError:
    return ShardError(f"{export}/model.safetensors: not a readable safetensors file ({e}); {_damaged(export)}")


def load_model_dir(path: Path) -> tuple[registry.Method, Any, torch.nn.Module, DatasetMeta]:
    """load_export of a run directory's latest export, or of an export directory itself."""
    return load_export(path if (path / "model.safetensors").is_file() else latest_export(path))


def evaluate_run(run_dir: Path, data: Path | None = None, split: str | None = None,
                 workers: int = 0) -> dict[str, Any]:
    """workers > 0: methods that embed through `loaders.embed` do it on that many Ray Data actors
    (Ray must be initialised: `attrlab eval --workers N` connects or starts it)."""
    from jobs.train import EvalData

    run_dir = Path(run_dir)
    export = latest_export(run_dir)
    method, cfg, model, meta = load_export(export)
    data = Path(data or cfg.data.path)
    split = split or cfg.data.test_split
    manifest = check_run_data(meta, data, split)
    with torch.no_grad():
        loaders = EvalData(cfg, str(data), split, workers=workers, method=method.name, meta=meta)
        metrics = method.evaluate(model, loaders, cfg.model, meta)
    out = {**metrics, "method": method.name, "split": split, "step": read_state(export.parent)["step"],
           "checkpoint": str(export.parent), "data": str(data), "manifest_checksum": manifest["checksum"]}
    write_text_atomic(run_dir / "metrics.json", json.dumps(out, indent=1, sort_keys=True))
    return out


def check_run_data(meta: DatasetMeta, data: Path, split: str) -> dict[str, Any]:
    """The manifest of `data`, after checking that it is the dataset the run was trained on (by
    name: a rebuilt or re-imported copy is fine) and that `split`'s shards are intact."""
    other = read_meta(data)
    if other.name != meta.name:
        raise ShardError(f"{data}: shard set {other.name!r}, but the run was trained on {meta.name!r}; pass --data "
                         f"of a {meta.name!r} shard set (or leave --data out to use the run's own)")
    return verify_split(data, split)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
