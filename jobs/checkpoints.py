"""Checkpoints, serving exports, training logs and resume — locally or through Ray Train.

A checkpoint directory holds the DeepSpeed (or plain torch) training state written by every
rank, `state.json` (step, metrics) and `export/`: weights only (`model.safetensors`), the
resolved `config.yaml` and the dataset `meta.json` — what eval, index and serve load, without
unpickling anything.

LocalReporter keeps checkpoints under RUN_DIR/checkpoints/step_NNNNNNN; RayReporter hands each
one to `ray.train.report`, which stores it under the run's storage path, and resumes from
`ray.train.get_checkpoint()` after a worker failure or a re-run with the same run directory.
"""
from __future__ import annotations

import abc
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jobs.config import dump
from shards.format import ShardError

STATE = "state.json"
EXPORT = "export"
FAULT_MARKER = ".fault_injected"


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE).read_text())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_export(directory: Path, model: torch.nn.Module, cfg: Any, meta_json: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out = Path(directory) / EXPORT
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    dump(cfg, out / "config.yaml")
    (out / "meta.json").write_text(json.dumps(meta_json, indent=1, sort_keys=True))


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints under a run directory (local or Ray layout), oldest first."""
    run_dir = Path(run_dir)
    found = [p.parent for p in run_dir.glob("checkpoints/*/" + STATE)] + [p.parent for p in run_dir.glob("checkpoint_*/" + STATE)]
    found = [p for p in found if (p / EXPORT / "model.safetensors").is_file()]
    return sorted(found, key=lambda p: read_state(p)["step"])


def latest_export(run_dir: Path) -> Path:
    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        raise ShardError(f"{run_dir}: no finished checkpoint with an export; train first (attrlab train ... --out {run_dir})")
    return ckpts[-1] / EXPORT


class Reporter(abc.ABC):
    """Where logs and checkpoints go; subclasses differ only in storage."""

    def __init__(self, run_dir: Path, meta_json: dict[str, Any], keep: int) -> None:
        from jobs.tracking import RunLogger

        self.run_dir, self.meta_json, self.keep = Path(run_dir), meta_json, keep
        self.tracker = RunLogger(self.run_dir)  # MLflow, when the driver opened a run (tracking.json)

    def log(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.log(row)

    def inject_fault_once(self) -> bool:
        marker = self.run_dir / FAULT_MARKER
        if marker.exists():
            return False
        marker.write_text("1")
        return True

    def _fill(self, directory: Path, engines: Any, step: int, metrics: dict[str, Any], cfg: Any, method: Any) -> None:
        engines.save(str(directory))  # collective under DeepSpeed
        if _rank() == 0:
            write_export(directory, engines.module, cfg, self.meta_json)
            (directory / STATE).write_text(json.dumps({"step": step, "method": method.name, "metrics": metrics}))
        _barrier()

    @abc.abstractmethod
    def restore_dir(self) -> Path | None:
        """The checkpoint directory to resume from, or None for a fresh start."""

    @abc.abstractmethod
    def checkpoint(self, engines: Any, step: int, metrics: dict[str, Any], cfg: Any, method: Any) -> None:
        """Save a checkpoint (called on every rank)."""


class LocalReporter(Reporter):
    def restore_dir(self) -> Path | None:
        ckpts = find_checkpoints(self.run_dir)
        return ckpts[-1] if ckpts else None

    def checkpoint(self, engines: Any, step: int, metrics: dict[str, Any], cfg: Any, method: Any) -> None:
        final = self.run_dir / "checkpoints" / f"step_{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self._fill(tmp, engines, step, metrics, cfg, method)
        except OSError as e:  # full or unwritable disk: keep the previous checkpoint intact
            shutil.rmtree(tmp, ignore_errors=True)
            raise ShardError(f"{final}: cannot write checkpoint ({e.strerror}); the previous one is intact") from None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in find_checkpoints(self.run_dir)[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


class RayReporter(Reporter):
    def restore_dir(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        # one directory per rank: to_directory() without a path reuses one shared temp dir, and
        # two ranks copying into it at once read each other's half-written files
        return Path(ckpt.to_directory(tempfile.mkdtemp(prefix=f"attrlab-restore-r{_rank()}-")))

    def checkpoint(self, engines: Any, step: int, metrics: dict[str, Any], cfg: Any, method: Any) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix=f"attrlab-ckpt-{step}-") as tmp:
            self._fill(Path(tmp), engines, step, metrics, cfg, method)
            # every rank reports its own files; Ray merges them into one checkpoint directory
            ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
