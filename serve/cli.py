"""`attrlab serve`: deploy serve.yaml (Ray Serve's config format) on a cluster or a local Ray.

    attrlab serve [--config serve/serve.yaml] [--address ADDR] [--timeout 300] [--detach]
    attrlab serve status [--address ADDR]
    attrlab serve shutdown [--address ADDR]

With --address (or RAY_ADDRESS) the applications are deployed on that running cluster and the
command returns once they are RUNNING; re-running it with a changed serve.yaml (a new model run,
other replicas or batching) is a rolling update that drops no request. Without an address it
starts a local Ray, deploys, prints the URL and serves until Ctrl-C. The config is checked first
(Ray's schema, then attrlab's `args`): a problem is one error line naming the key.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from jobs.config import read_yaml
from shards.format import ShardError

DEFAULT_CONFIG = Path(__file__).with_name("serve.yaml")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="deploy serve.yaml: ranking, retrieval, face search and translation over HTTP")
    p.add_argument("action", nargs="?", default="deploy", choices=("deploy", "status", "shutdown"))
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="serve.yaml (Ray Serve config format)")
    p.add_argument("--address", default=None, help="a running Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the applications to run")
    p.add_argument("--detach", action="store_true", help="local Ray: return once running (tests, scripts)")
    p.set_defaults(func=cmd_serve)


def load_config(path: Path) -> Any:
    """The Serve deploy schema of serve.yaml, every application's args checked and made absolute."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from serve.config import check_args

    if not path.is_file():
        raise ShardError(f"--config {path}: file not found")
    raw = read_yaml(path)
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ShardError(f"{path}: {loc}: {err['msg']}") from None
    for app in schema.applications:
        if app.import_path == "serve.app:build_app":
            try:
                models, limits = check_args(app.args or {})
            except ShardError as e:
                raise ShardError(f"{path}: applications[{app.name}].{e}") from None
            app.args = {"models": models, "limits": limits}
    return schema


def _connect(address: str | None) -> bool:
    """Connect to the cluster; returns True when this process started a local Ray."""
    from cluster.connect import connect

    return connect(address, namespace="serve", dashboard=True)  # on loopback: Serve's own status pages


def deploy(schema: Any, timeout: float) -> dict[str, str]:
    """Submit the config and wait until every application is RUNNING; returns app -> status."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    client = serve_api.serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                                   grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
    client.deploy_apps(schema, _blocking=False)
    return wait_running([a.name for a in schema.applications], timeout)


def wait_running(names: list[str], timeout: float) -> dict[str, str]:
    from ray import serve

    deadline = time.time() + timeout
    while True:
        apps = serve.status().applications
        states = {n: str(apps[n].status) if n in apps else "NOT_STARTED" for n in names}
        failed = {n: apps[n].message for n in names if n in apps and "DEPLOY_FAILED" in str(apps[n].status)}
        if failed:
            name, msg = next(iter(failed.items()))
            raise ShardError(f"application {name}: deploy failed: {msg.strip().splitlines()[-1][:400] if msg else '?'}")
        if all("RUNNING" in s for s in states.values()):
            return states
        if time.time() > deadline:
            raise ShardError(f"applications not running after {timeout:g} s: {states}; see `attrlab serve status`")
        time.sleep(1.0)


def cmd_serve(a: argparse.Namespace) -> int:
    from ray import serve

    if a.action == "deploy":
        schema = load_config(a.config)  # before any Ray start: a config error costs nothing
    local = _connect(a.address)
    if a.action == "status":
        print(json.dumps({n: {"status": str(s.status), "deployments": {d: str(x.status) for d, x in s.deployments.items()}}
                          for n, s in serve.status().applications.items()}, indent=1))
        return 0
    if a.action == "shutdown":
        serve.shutdown()
        print("attrlab: Serve shut down", file=sys.stderr)
        return 0
    states = deploy(schema, a.timeout)
    host, port = schema.http_options.host, schema.http_options.port
    print(json.dumps({"url": f"http://{host}:{port}", "applications": states}))
    if not local or a.detach:
        return 0
    print(f"attrlab: serving on http://{host}:{port} (docs: /docs); Ctrl-C stops", file=sys.stderr)
    # Ctrl-C, and SIGTERM from a process manager, shut Serve down cleanly (a background job of a
    # non-interactive shell starts with SIGINT ignored: restore it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        print("attrlab: Serve shut down", file=sys.stderr)
        return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
