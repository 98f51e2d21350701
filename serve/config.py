"""serve.yaml: Ray Serve's own config file (valid for `serve deploy`), read by `attrlab serve`.

    proxy_location: HeadOnly
    http_options: {host: 127.0.0.1, port: 8000}      # loopback unless you open it on purpose
    applications:
      - name: attrlab
        route_prefix: /
        import_path: serve.app:build_app
        args:
          models:                                      # name -> run (or export) directory [+ index]
            stn_ranker: {run: data/runs/stn_ranker}
            coop_embed: {run: data/runs/coop_embed, index: data/runs/coop_embed/index/gallery-flat}
          limits: {max_image_bytes: 4000000, max_images: 32, max_k: 100}
        deployments:                                   # per deployment: model-<name>, gateway
          - name: model-stn_ranker
            autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}
            ray_actor_options: {num_cpus: 0.5}
            user_config: {max_batch_size: 16, batch_wait_timeout_s: 0.005}
          - name: model-coop_embed
            num_replicas: 2
            max_replicas_per_node: 1                   # spread: one replica per node (survives a node)

A deployment's options (`deployments:`) are Ray Serve's own and checked by Ray's schema only, so every
option Serve knows (max_replicas_per_node, health_check_period_s, graceful_shutdown_timeout_s, ...)
passes through unchanged; attrlab checks the application's `args`.

Relative model paths are taken from the directory `attrlab serve` runs in and made absolute
before deploying (replicas run elsewhere). Every problem is one error line naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from shards.format import ShardError

MODEL_KEYS = ("run", "index")
# Serve's throughput switches for the application's replicas, as serve/serve.yaml sets them (why: there)
SERVE_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}


def check_args(args: Mapping[str, Any]) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """(models with absolute paths, limits) from an application's `args`, checked."""
    from jobs.checkpoints import latest_export
    from jobs.evaluate import check_export_readable
    from serve.schemas import Limits
    from serve.services import SERVICE_OF_METHOD, method_of

    if not isinstance(args, Mapping):
        raise ShardError("args: expected a mapping with `models` (and optional `limits`)")
    unknown = sorted(set(args) - {"models", "limits"})
    if unknown:
        raise ShardError(f"args.{unknown[0]}: unknown key; expected models, limits")
    models = args.get("models")
    if not isinstance(models, Mapping) or not models:
        raise ShardError("args.models: expected {name: {run: RUN_DIR, index: INDEX_DIR}} with at least one model")
    out: dict[str, dict[str, str]] = {}
    for name, spec in models.items():
        where = f"args.models.{name}"
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise ShardError(f"{where}: a model name may hold letters, digits, '_' and '-' only (it is a URL part)")
        if not isinstance(spec, Mapping) or "run" not in spec:
            raise ShardError(f"{where}: expected {{run: RUN_DIR}} (and optionally index: INDEX_DIR)")
        bad = sorted(set(spec) - set(MODEL_KEYS))
        if bad:
            raise ShardError(f"{where}.{bad[0]}: unknown key; expected {list(MODEL_KEYS)}")
        resolved = {k: str(Path(str(v)).expanduser().resolve()) for k, v in spec.items() if v}
        if not Path(resolved["run"]).is_dir():
            raise ShardError(f"{where}.run: {resolved['run']} does not exist; train it or fix the path")
        try:
            method = method_of(resolved["run"])
            run = Path(resolved["run"])
            check_export_readable(run if (run / "model.safetensors").is_file() else latest_export(run))
        except ShardError as e:
            raise ShardError(f"{where}.run: {e}") from None
        if method not in SERVICE_OF_METHOD:
            raise ShardError(f"{where}.run: a {method} run; attrlab serves {sorted(SERVICE_OF_METHOD)}")
        if "index" in resolved and not Path(resolved["index"]).is_dir():
            raise ShardError(f"{where}.index: {resolved['index']} does not exist; build it with `attrlab index`")
        out[str(name)] = resolved
    limits = dict(args.get("limits") or {})
    try:
        Limits.from_dict(limits)
    except ValueError as e:
        raise ShardError(f"args.limits: {e}") from None
    return out, limits


def write_config(path: Path, models: Mapping[str, Mapping[str, str]], port: int, *, max_batch_size: int = 16,
                 cpus: float = 0.5) -> Path:
    """A serve.yaml for these models on 127.0.0.1:port, one replica each (demo, benchmarks)."""
    import yaml

    deps = [{"name": f"model-{n}", "num_replicas": 1, "ray_actor_options": {"num_cpus": cpus},
             "user_config": {"max_batch_size": max_batch_size,
                             "batch_wait_timeout_s": 0.005 if max_batch_size > 1 else 0.0}} for n in models]
    deps.append({"name": "gateway", "num_replicas": 1, "ray_actor_options": {"num_cpus": cpus}})
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "attrlab", "route_prefix": "/", "import_path": "serve.app:build_app",
                             "runtime_env": {"env_vars": dict(SERVE_ENV)},
                             "args": {"models": {n: dict(m) for n, m in models.items()}}, "deployments": deps}]}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
