"""How every attrlab command reaches Ray: an existing cluster, or a local one started with safe defaults.

    connect(address)  ->  address / RAY_ADDRESS given: join that cluster (its own auth applies);
                          else: start a local Ray on this machine.

A local Ray started here keeps Ray's token authentication on (Ray's default since 2.5x; an
explicit RAY_AUTH_MODE=disabled in the environment is respected, with a warning) and binds the
dashboard and job server to loopback (ATTRLAB_DASHBOARD_HOST=0.0.0.0 opens it on purpose).
Serve's HTTP proxy is bound by serve.yaml's http_options.host (127.0.0.1 by default).
What Ray does not let us narrow: its internal gRPC ports (GCS, raylet, object manager) and the
metrics agent listen on the node's IP (Ray resolves 127.0.0.1 to it); the gRPC ports require the
token, the metrics port serves read-only metrics (firewall it: docs/CLUSTER.md).
"""
from __future__ import annotations

import os
import sys

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (for a local server or process group)."""
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def auth_disabled() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled"


def connect(address: str | None = None, *, num_cpus: int | None = None, namespace: str | None = None,
            log_to_driver: bool = False, dashboard: bool = False) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a local Ray; True when this call started one."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=log_to_driver)
        return False
    if auth_disabled():
        print("attrlab: warning: RAY_AUTH_MODE=disabled: this local Ray runs without token authentication",
              file=sys.stderr)
    ray.init(num_cpus=num_cpus, namespace=namespace, log_to_driver=log_to_driver, include_dashboard=dashboard,
             dashboard_host=os.environ.get("ATTRLAB_DASHBOARD_HOST", LOOPBACK))
    return True
