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
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jobs.config import dump
from shards.format import ShardError, read_json_file

log = logging.getLogger(__name__)

STATE = "state.json"
FILES = "files-rank"  # files-rank<r>.json: the files rank r wrote into a checkpoint, with their sizes
EXPORT = "export"
FAULT_MARKER = ".fault_injected"


STAGING = "attrlab-ckpt-"  # <tmp>/attrlab-ckpt-<pid>-<step>-*: a Ray worker's checkpoint before Ray copies it


def sweep_orphan_staging(tmp_root: Path | None = None) -> list[Path]:
    """Remove staging directories whose writer process is gone. A worker SIGKILLed (OOM, fault
    injection, a lost peer) inside `checkpoint` never runs its TemporaryDirectory cleanup, and
    each orphan is a full checkpoint (optimiser state included) left in /tmp. Assumes the pids
    of one /tmp are one pid namespace (a Ray node's, or a pod's own /tmp under KubeRay)."""
    removed = []
    for d in Path(tmp_root or tempfile.gettempdir()).glob(f"{STAGING}*-*-*"):
        pid = d.name[len(STAGING):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: existence check only
            continue
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, another user's
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def read_state(directory: Path) -> dict[str, Any]:
    state = read_json_file(Path(directory) / STATE, f"the checkpoint {directory} is corrupt: delete that directory "
                           "to fall back to the one before it")
    if not isinstance(state.get("step"), int):
        raise ShardError(f"{Path(directory) / STATE}: no integer 'step'; the checkpoint {directory} is corrupt: "
                         "delete that directory to fall back to the one before it")
    return state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def sum_over_ranks(n: int) -> int:
    """n summed over every rank (a collective: every rank must call it at the same point)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return n
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([n], dtype=torch.int64, device=on)  # nccl reduces CUDA tensors only
    dist.all_reduce(t)
    return int(t.item())


class CheckpointError(ShardError):
    """A checkpoint that cannot be written (full or unwritable storage): user-fixable, one line."""


def dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def ensure_room(dest: Path, need: int, reserve_mb: float, step: int) -> None:
    """Refuse a checkpoint that cannot fit before a byte of it is written: a half-copied
    checkpoint on shared storage is worse than none. Probes writability (os.access says yes to
    root on a read-only mount) and compares free space with the checkpoint's measured size."""
    def fix() -> str:  # scans the run's checkpoints: only when refusing, not on every save
        return f"free space there or set scaling.storage_path to other storage; {previous_note(dest)}"

    try:
        probe = dest / f".attrlab-write-probe-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
        free = shutil.disk_usage(dest).free
    except OSError as e:
        raise CheckpointError(f"{dest}: cannot write the step {step} checkpoint ({e.strerror}); {fix()}") from None
    reserve = int(reserve_mb * 2**20)
    if free < need + reserve:
        raise CheckpointError(f"{dest}: {free / 2**20:.1f} MiB free, the step {step} checkpoint needs "
                              f"{need / 2**20:.1f} MiB (+ checkpoint.min_free_mb={reserve_mb:g}); {fix()}")


def previous_note(run_dir: Path) -> str:
    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        return "no earlier checkpoint exists"
    return f"the previous checkpoint (step {read_state(ckpts[-1])['step']}, {ckpts[-1]}) is intact"


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
    found = [p for p in _checkpoint_dirs(run_dir) if (p / EXPORT / "model.safetensors").is_file() and _usable(p)]
    return sorted(found, key=lambda p: read_state(p)["step"])


def _usable(directory: Path) -> bool:
    """Complete and readable; a corrupt checkpoint is skipped with a warning naming it, so that one
    damaged old checkpoint does not make the whole run unreadable."""
    try:
        if is_complete(directory):
            return True
        # normal while another rank is still copying its files in: latest_export warns users instead
        log.debug("skipping checkpoint %s: incomplete", directory)
    except ShardError as e:
        log.warning("skipping checkpoint %s: %s", directory, e)
    return False


def is_complete(directory: Path) -> bool:
    """Every rank's files are there at their full size (files-rank*.json, written with them): a
    worker killed while its files were still being copied leaves an incomplete checkpoint."""
    lists = sorted(directory.glob(FILES + "*.json"))
    if len(lists) < read_state(directory).get("world", len(lists)):
        return False
    for listing in lists:
        for rel, size in read_json_file(listing, f"the checkpoint {directory} is corrupt").items():
            f = directory / rel
            if not f.is_file() or f.stat().st_size != size:
                return False
    return True


def storage_dir(run_dir: Path, storage_path: str) -> Path | None:
    """Where Ray Train stores this run's checkpoints, when that is a filesystem path (else None)."""
    if "://" in storage_path:
        return None
    return (Path(storage_path) if storage_path else Path(run_dir).parent) / Path(run_dir).name


def latest_export(run_dir: Path) -> Path:
    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ShardError(f"{run_dir}: no such run directory; give the --out of an `attrlab train` run")
        present = _checkpoint_dirs(run_dir)
        if present:
            raise ShardError(f"{run_dir}: its {len(present)} checkpoint(s) are incomplete or corrupt (files missing or "
                             "of the wrong size, or no export); resume training with the same --out to write a new one")
        raise ShardError(f"{run_dir}: no finished checkpoint with an export; train first (attrlab train ... --out {run_dir})")
    latest = ckpts[-1]
    newer = sorted(p.name for p in _checkpoint_dirs(Path(run_dir)) if p.parent == latest.parent and p.name > latest.name)
    if newer:  # say so: evaluating an older step without a word would mislead
        log.warning("%s: using %s; newer and incomplete or damaged: %s (a file listed in files-rank*.json is "
                    "missing or of another size, or no export)", run_dir, latest.name, ", ".join(newer))
    return latest / EXPORT


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    return [p.parent for p in run_dir.glob("checkpoints/*/" + STATE)] + [p.parent for p in run_dir.glob("checkpoint_*/" + STATE)]


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

    def fail(self, message: str) -> None:
        """The injected fault (checkpoint.fail_at_step): in-process, an exception the caller sees."""
        from jobs.train import FaultInjected

        raise FaultInjected(message)

    def inject_fault_once(self) -> bool:
        marker = self.run_dir / FAULT_MARKER
        if marker.exists():
            return False
        marker.write_text("1")
        return True

    def _fill(self, directory: Path, engines: Any, step: int, metrics: dict[str, Any], cfg: Any, method: Any) -> None:
        engines.save(str(directory))  # collective under DeepSpeed
        rank = _rank()
        if rank == 0:
            write_export(directory, engines.module, cfg, self.meta_json)
            world = dist.get_world_size() if dist.is_initialized() else 1
            (directory / STATE).write_text(json.dumps({"step": step, "method": method.name, "metrics": metrics,
                                                       "world": world}))
        _barrier()
        # this rank's files (a Ray rank's directory holds only its own), listed last
        mine = {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*"))
                if f.is_file() and not f.name.startswith(FILES)}
        (directory / f"{FILES}{rank}.json").write_text(json.dumps(mine))
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
            raise CheckpointError(f"{final}: cannot write checkpoint ({e.strerror}); {previous_note(self.run_dir)}") from None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in find_checkpoints(self.run_dir)[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


class RayReporter(Reporter):
    def __init__(self, run_dir: Path, meta_json: dict[str, Any], keep: int, storage_path: str = "") -> None:
        super().__init__(run_dir, meta_json, keep)
        self.storage_path = storage_path  # scaling.storage_path ("" = RUN_DIR's parent)

    def restore_dir(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        newest = self._unregistered(ckpt)
        if newest is not None:
            return newest
        if ckpt is None:
            return None
        # one directory per rank: to_directory() without a path reuses one shared temp dir, and
        # two ranks copying into it at once read each other's half-written files
        return Path(ckpt.to_directory(tempfile.mkdtemp(prefix=f"attrlab-restore-r{_rank()}-")))

    def _unregistered(self, ckpt: Any) -> Path | None:
        """A complete checkpoint on the run's storage newer than the one Ray registered, if any.
        Ray registers a reported checkpoint only when its controller next polls the workers, so a
        worker killed right after writing one (SIGKILL, OOM, a lost node) would otherwise cost a
        whole extra interval; its files are checked complete (files-rank*.json) before use."""
        where = storage_dir(self.run_dir, self.storage_path)
        if where is None:
            return None
        on_disk = find_checkpoints(where)
        if not on_disk:
            return None
        known = -1
        if ckpt is not None and (Path(ckpt.path) / STATE).is_file():
            known = read_state(Path(ckpt.path))["step"]
        if read_state(on_disk[-1])["step"] <= known:
            return None
        log.warning("rank %d resumes from %s, written but not yet registered with Ray when its writer died",
                    _rank(), on_disk[-1])
        return on_disk[-1]

    def fail(self, message: str) -> None:
        """The injected fault in a Ray worker is a real crash: SIGKILL, as the OOM killer would."""
        import signal

        log.error("%s: killing this worker (pid %d)", message, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)

    def checkpoint(self, engines: Any, step: int, metrics: dict[str, Any], cfg: Any, method: Any) -> None:
        import ray.train

        sweep_orphan_staging()
        with tempfile.TemporaryDirectory(prefix=f"{STAGING}{os.getpid()}-{step}-") as tmp:
            self._fill(Path(tmp), engines, step, metrics, cfg, method)
            need = sum_over_ranks(dir_bytes(Path(tmp)))  # every rank's files land in one directory
            where = storage_dir(self.run_dir, cfg.scaling.storage_path)
            if where is not None:  # object stores: Ray's upload reports its own errors
                ensure_room(where, need, cfg.checkpoint.min_free_mb, step)
            # every rank reports its own files; Ray merges them into one checkpoint directory
            ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
