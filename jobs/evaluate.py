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
from shards.format import DatasetMeta, ShardError, read_manifest


def load_export(export: Path) -> tuple[registry.Method, Any, torch.nn.Module, DatasetMeta]:
    """(method, config, model with weights, dataset meta) from an export directory."""
    from safetensors.torch import load_file

    from jobs.cli_train import resolve_config_class

    state = read_state(export.parent)
    method = registry.get(state["method"])
    cfg = configlib.load(resolve_config_class(method.name), export / "config.yaml")
    meta = DatasetMeta.from_json(json.loads((export / "meta.json").read_text()), where=str(export / "meta.json"))
    model = method.build(cfg.model, meta)
    missing, unexpected = model.load_state_dict(load_file(str(export / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise ShardError(f"{export}/model.safetensors: does not match {method.name} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return method, cfg, model.eval(), meta


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
    manifest = read_manifest(data)
    split = split or cfg.data.test_split
    with torch.no_grad():
        loaders = EvalData(cfg, str(data), split, workers=workers, method=method.name, meta=meta)
        metrics = method.evaluate(model, loaders, cfg.model, meta)
    out = {**metrics, "method": method.name, "split": split, "step": read_state(export.parent)["step"],
           "checkpoint": str(export.parent), "data": str(data), "manifest_checksum": manifest["checksum"]}
    (run_dir / "metrics.json").write_text(json.dumps(out, indent=1, sort_keys=True))
    return out
