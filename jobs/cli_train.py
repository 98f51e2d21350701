"""`attrlab train` and `attrlab eval`.

    attrlab train METHOD --data DIR --out RUN_DIR [--config YAML] [--set k=v]... [--workers N]
                  [--gpus-per-worker G] [--max-steps N] [--local]
    attrlab eval RUN_DIR [--data DIR] [--split test] [--workers N] [--address ADDR]

Training runs `ray.train.torch.TorchTrainer` over the shards (DeepSpeed inside each worker);
`--local` runs the same loop in this process without Ray. Re-running with the same RUN_DIR
resumes from its latest checkpoint; a different config in an existing RUN_DIR is refused, so
nothing already written is overwritten by an unrelated run.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from jobs import config as configlib
from shards.format import ShardError, read_json_file, read_manifest, read_meta

log = logging.getLogger(__name__)


CONFIG_DIR = Path(__file__).parent / "configs"
# keys that may change between a run and its resumption (more steps, other hardware)
RESUMABLE_CHANGES = ("schedule.max_steps", "scaling.", "eval.", "checkpoint.fail_at_step", "checkpoint.min_free_mb",
                     "checkpoint.max_failures",
                     "data.path", "tracking.")


@functools.lru_cache(maxsize=None)
def resolve_config_class(method: str) -> type:
    from jobs.schema import run_config_class
    from models import registry

    return run_config_class(method, registry.get(method).config_cls)


def load_run_config(method: str, path: Path | None, overrides: list[str]) -> Any:
    if path is not None and not path.is_file():
        raise ShardError(f"--config {path}: no such file")
    path = path if path is not None else CONFIG_DIR / f"{method}.yaml"
    cfg = configlib.load(resolve_config_class(method), path if path.is_file() else None, overrides)
    return with_deepspeed_file(cfg, path)


REPO_ROOT = Path(__file__).resolve().parents[1]


def with_deepspeed_file(cfg: Any, source: Path) -> Any:
    """cfg with deepspeed.config_file absolute: as given (relative to this directory) or, for the
    configs shipped with attrlab (`cluster/deepspeed/zero2_bf16.json`), relative to attrlab itself,
    so Ray workers, whatever their working directory, open the same file."""
    import dataclasses

    name = cfg.deepspeed.config_file
    if not name or "://" in name or Path(name).is_absolute():
        return cfg
    for base in (Path.cwd(), REPO_ROOT):
        if (base / name).is_file():
            return dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, config_file=str(base / name)))
    raise ShardError(f"{source}: deepspeed.config_file {name}: not found here or in {REPO_ROOT}")


def prepare_run_dir(run_dir: Path, method: str, cfg: Any, data: Path) -> None:
    """Save config + data provenance, or check them against the run being resumed."""
    from jobs.checkpoints import find_checkpoints, read_state, storage_dir

    manifest = read_manifest(data)
    cfg_dict = configlib.to_dict(cfg)
    saved = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise ShardError(f"--out {run_dir}: is a file, not a directory; choose a new --out")
    ckpts, elsewhere = [], False
    if saved.is_file():
        where = storage_dir(run_dir, cfg.scaling.storage_path)
        elsewhere = where is None  # an object store: its checkpoints cannot be listed from here
        ckpts = sorted({*find_checkpoints(run_dir), *(find_checkpoints(where) if where else [])},
                       key=lambda c: read_state(c)["step"])
    if saved.is_file() and (ckpts or elsewhere):
        old = configlib.read_yaml(saved)
        prev = read_json_file(run_dir / "run.json", "restore it, or train into a new --out") \
            if (run_dir / "run.json").is_file() else {}
        if not isinstance(old, dict):
            raise ShardError(f"{saved}: not a mapping of config sections; restore it, or train into a new --out")
        if prev.get("method") not in (None, method):
            raise ShardError(f"--out {run_dir}: holds a {prev['method']} run; choose another directory")
        done = read_state(ckpts[-1])["step"] if ckpts else 0
        if cfg.schedule.max_steps < done:
            raise ShardError(f"--out {run_dir}: schedule.max_steps {cfg.schedule.max_steps} is below the step of its "
                             f"latest checkpoint ({done}); give --max-steps >= {done}, or a new --out")
        a, b = configlib.flatten(old), configlib.flatten(cfg_dict)
        # a key the saved config predates counts as its default, so runs of older versions still resume
        a = {**{k: v for k, v in configlib.flatten(configlib.to_dict(type(cfg)())).items() if k not in a}, **a}
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]
        if diff:
            k = diff[0]
            raise ShardError(f"--out {run_dir}: resuming a run with a different config ({k}: {a.get(k)!r} -> "
                             f"{b.get(k)!r}); use a new --out or the saved config")
        if prev.get("manifest_checksum") not in (None, manifest["checksum"]):
            raise ShardError(f"--out {run_dir}: was trained on shards {prev['manifest_checksum']}, --data {data} is "
                             f"{manifest['checksum']}; use a new --out")
    elif saved.is_file():  # a run that never reached a checkpoint (e.g. a bad value crashed it): start afresh
        prev = read_json_file(run_dir / "run.json", "restore it, or train into a new --out")
        if prev.get("method") != method:
            raise ShardError(f"--out {run_dir}: holds a {prev.get('method')} run; choose another directory")
        log.warning("--out %s has no checkpoint yet: starting it again with this config", run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ShardError(f"--out {run_dir}: exists and is not an attrlab run directory; choose a new one")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=run_dir, suffix=".tmp", delete=False) as tmp:
            configlib.dump(cfg, Path(tmp.name))  # to a temp file first: a failed write keeps the old one
        os.replace(tmp.name, saved)
        (run_dir / "run.json").write_text(json.dumps({"method": method, "data": str(data.resolve()),
                                                      "manifest_checksum": manifest["checksum"]}, indent=1))
    except OSError as e:
        from jobs.checkpoints import previous_note

        raise ShardError(f"--out {run_dir}: cannot write there ({e.strerror}); fix its permissions or free space, "
                         f"or choose another --out; {previous_note(run_dir)}") from None


def add_parsers(sub: Any) -> None:
    t = sub.add_parser("train", help="train a method on shards (Ray Train + DeepSpeed, or --local)")
    t.add_argument("method", help="a method of models/registry.py (e.g. stn_ranker)")
    t.add_argument("--data", required=True, type=Path, help="shard directory")
    t.add_argument("--out", required=True, type=Path, help="run directory (re-use it to resume)")
    t.add_argument("--config", type=Path, default=None, help="YAML (default: jobs/configs/METHOD.yaml)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--workers", type=int, default=None)
    t.add_argument("--gpus-per-worker", type=float, default=None)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--local", action="store_true", help="run the loop in this process, without Ray")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a run's latest checkpoint; writes RUN_DIR/metrics.json")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--data", type=Path, default=None, help="shards (default: the run's)")
    e.add_argument("--split", default=None, help="split (default: data.test_split)")
    e.add_argument("--workers", type=int, default=0,
                   help="embed splits on N Ray Data actors (0 = in this process)")
    e.add_argument("--address", default=None, help="Ray cluster for --workers (default: RAY_ADDRESS, else a local Ray)")
    e.set_defaults(func=cmd_eval)


def cmd_train(a: argparse.Namespace) -> int:
    from models import registry

    registry.get(a.method)  # unknown method -> one clear line
    sets = flag_overrides(a.set, a.data, workers=a.workers, gpus_per_worker=a.gpus_per_worker, max_steps=a.max_steps)
    cfg = load_run_config(a.method, a.config, sets)
    cfg = absolute_paths(cfg, registry.get(a.method).path_fields)
    from jobs.checkpoints import find_checkpoints

    # a resumed run loads its own checkpoint: init.from_run is not read again (it may be gone)
    check_build(registry.get(a.method), cfg, a.data, warm_start=not find_checkpoints(a.out))
    prepare_run_dir(a.out, a.method, cfg, a.data)
    from jobs.train import TrainJob

    job = TrainJob(a.method, configlib.to_dict(cfg), str(a.data.resolve()), str(a.out.resolve()))
    tracked = start_tracking(a.out, a.method, cfg)
    from jobs.progress import follow

    with tracking_status(a.out), follow(a.out, cfg.schedule.max_steps, f"train {a.out.name}"):
        metrics = run_local(job) if a.local else run_ray(job, cfg)
    print(json.dumps({"run_dir": str(a.out), **{k: round(v, 4) for k, v in metrics.items()}}))
    if tracked:
        print(f"attrlab: tracked in MLflow: mlflow ui --backend-store-uri {tracked}", file=sys.stderr)
    return 0


def start_tracking(run_dir: Path, method: str, cfg: Any, *, respect_env: bool = True, run_name: str = "",
                   tags: dict[str, str] | None = None) -> str:
    """Open the run's MLflow run (jobs/tracking.py); returns the store URI, "" when tracking is off.
    respect_env=False: a sweep's trial, whose driver already folded ATTRLAB_TRACKING into cfg."""
    from jobs import tracking

    if not cfg.tracking.enabled or (respect_env and tracking.env_disabled()):
        (run_dir / tracking.RECORD).unlink(missing_ok=True)  # workers log only where this exists
        return ""
    uri = tracking.store_uri(cfg.tracking.uri, run_dir)
    tracking.open_run(run_dir, configlib.to_dict(cfg), uri=uri, experiment=cfg.tracking.experiment or method,
                      run_name=run_name or run_dir.name, tags={"attrlab.method": method, **(tags or {})})
    return uri


@contextlib.contextmanager
def tracking_status(run_dir: Path) -> Iterator[None]:
    """End the run's MLflow run FINISHED, or FAILED / KILLED when training raises."""
    from jobs import tracking

    try:
        yield
    except KeyboardInterrupt:
        tracking.close_run(run_dir, "KILLED")
        raise
    except BaseException:
        tracking.close_run(run_dir, "FAILED")
        raise
    tracking.close_run(run_dir, "FINISHED")


def flag_overrides(sets: list[str], data: Path, **flags: Any) -> list[str]:
    """--set items plus the shortcut flags that were given (--workers, --max-steps, ...) and --data."""
    keys = {"workers": "scaling.workers", "gpus_per_worker": "scaling.gpus_per_worker", "max_steps": "schedule.max_steps"}
    return [*sets, *(f"{keys[k]}={v}" for k, v in flags.items() if v is not None), f"data.path={data.resolve()}"]


def check_build(method: Any, cfg: Any, data: Path, warm_start: bool = True) -> None:
    """Build the model on the meta device (no memory, no weights copied) before any worker
    starts, so a config the method rejects (an unknown attribute, a size it cannot take) is one
    line here instead of a traceback from every Ray worker after start-up."""
    import torch

    meta = read_meta(data)
    if method.prepare_meta is not None:
        meta = method.prepare_meta(meta, data, cfg.data.train_split)
    with torch.device("meta"):
        model = method.build(cfg.model, meta)
    if warm_start and cfg.init.from_run:  # a missing source or a mismatched tensor: one line before any worker starts
        from jobs.warmstart import plan

        plan(model, cfg.init, method.name)


def absolute_paths(cfg: Any, fields: tuple[str, ...]) -> Any:
    """cfg with the named `model:` path fields and `init.from_run` made absolute (relative to this
    process's cwd), so Ray workers in another directory find them."""
    import dataclasses

    def fix(section: Any, names: tuple[str, ...]) -> Any:
        fixed = {f: str(Path(getattr(section, f)).resolve()) for f in names
                 if getattr(section, f) and not Path(getattr(section, f)).is_absolute() and "://" not in getattr(section, f)}
        return dataclasses.replace(section, **fixed) if fixed else section

    return dataclasses.replace(cfg, model=fix(cfg.model, fields), init=fix(cfg.init, ("from_run",)))


def world_of_one(backend: str | None = None) -> None:
    """A process group of one in this process (DeepSpeed needs one even for a single rank): nccl on
    a GPU, gloo otherwise. Kept for the life of the process: DeepSpeed caches the world group, so a
    second run in the same process (a notebook, the tests, a benchmark) would meet a destroyed group."""
    import torch
    import torch.distributed as dist

    from cluster.connect import free_port

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), rank=0, world_size=1)


def run_local(job: Any) -> dict[str, float]:
    """The same loop in this process: a world of one (DeepSpeed still needs a process group)."""
    from jobs.checkpoints import LocalReporter
    from jobs.train import run_loop

    world_of_one()
    cfg = configlib.build(resolve_config_class(job.method), job.cfg_dict)
    meta = json.loads((Path(job.data) / "meta.json").read_text())
    return run_loop(job, LocalReporter(Path(job.run_dir), meta, cfg.checkpoint.keep))


def ray_worker_entry(config: dict[str, Any]) -> None:
    from jobs.checkpoints import RayReporter
    from jobs.train import TrainJob, run_loop

    job = TrainJob(**config["job"])
    meta = json.loads((Path(job.data) / "meta.json").read_text())
    record_workers(Path(job.run_dir))
    storage = job.cfg_dict.get("scaling", {}).get("storage_path", "")
    run_loop(job, RayReporter(Path(job.run_dir), meta, config["keep"], storage))


def record_workers(run_dir: Path) -> None:
    """Append where each rank of this attempt runs (Ray node id, IP, pid) to RUN_DIR/workers.jsonl:
    which nodes took part, and how often the group was restarted after a failure."""
    import time

    import ray
    import torch.distributed as dist

    ctx = ray.get_runtime_context()
    me = {"rank": dist.get_rank(), "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
          "pid": os.getpid()}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    if me["rank"] == 0:
        with open(run_dir / "workers.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "ranks": everyone}) + "\n")


def make_trainer(job: Any, cfg: Any, *, callbacks: tuple[Any, ...] = (), score: tuple[str, str] | None = None) -> Any:
    """The TorchTrainer over `ray_worker_entry` that `attrlab train` and each `attrlab tune` trial
    run; its Ray storage is RUN_DIR itself (storage_path = the parent, name = the directory), so a
    re-run with the same RUN_DIR resumes. score: (metric, max|min) keeps the best checkpoints
    (Ray always keeps the latest too, for resuming)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    gpu = s.gpus_per_worker > 0
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if gpu else {})}
    run_dir = Path(job.run_dir)
    storage = s.storage_path or str(run_dir.parent)
    keep = CheckpointConfig(num_to_keep=cfg.checkpoint.keep, **(
        {"checkpoint_score_attribute": score[0], "checkpoint_score_order": score[1]} if score else {}))
    return TorchTrainer(
        ray_worker_entry,
        train_loop_config={"job": job.__dict__, "keep": cfg.checkpoint.keep},
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=gpu, resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=run_dir.name, storage_path=storage, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
                             checkpoint_config=keep),
    )


def run_ray(job: Any, cfg: Any) -> dict[str, float]:
    from ray.train import TrainingFailedError

    from cluster.connect import connect
    from jobs.checkpoints import sweep_orphan_staging

    connect(log_to_driver=True)
    try:
        result = make_trainer(job, cfg).fit()
    except TrainingFailedError as e:
        raise user_error(e) or e from None
    finally:  # workers of a failed attempt that died after the last in-run sweep (this node's /tmp)
        sweep_orphan_staging()
    return {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}


def user_error(e: BaseException) -> ShardError | None:
    """The user-fixable error (a full checkpoint disk, a bad shard) behind Ray's TrainingFailedError,
    so the CLI prints its one line instead of Ray's traceback; None when there is none."""
    from ray.exceptions import RayError

    seen: set[int] = set()
    todo: list[Any] = [e, *getattr(e, "worker_failures", {}).values(), getattr(e, "controller_failure", None)]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ShardError) and not isinstance(x, RayError):  # RayTaskError(ShardError): its .cause
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def cmd_eval(a: argparse.Namespace) -> int:
    from jobs.embed import ensure_ray
    from jobs.evaluate import evaluate_run

    if a.workers < 0:
        raise ShardError(f"--workers {a.workers}: expected 0 (in this process) or more")
    ensure_ray(a.workers, a.address)
    metrics = evaluate_run(a.run_dir, a.data, a.split, workers=a.workers)
    print(json.dumps(metrics, indent=1, sort_keys=True))
    return 0
