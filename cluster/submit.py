"""`attrlab submit` and `attrlab jobs list|logs|status|stop`: attrlab commands as Ray jobs.

`attrlab submit [--address URL] [--no-wait] [--env K=V]... -- <attrlab args...>` ships the
repository (the directory holding pyproject.toml, minus the excludes in cluster/submit.yaml) as
the job's `runtime_env.working_dir` and runs `<python> -m jobs.cli <args>` there, so the cluster
imports the top-level packages (cluster, jobs, models, serve, shards) as they are in this
checkout; attrlab need not be pip-installed on the nodes, but its dependencies must be (the
launcher's setup commands install them). `<python>` is the config's `python` (default `python`,
the first one on the PATH the head was started with). Paths in <args> are paths on the cluster;
a relative one lands in the job's temporary working directory.

Address: --address, then RAY_ADDRESS, then the config's `address`, then http://127.0.0.1:8265
(the Ray dashboard / job server; `host:port` without a scheme means http). The dashboard is probed
first (`/api/authentication_mode`, which needs no token): no answer is one error line naming the
address and where it came from.

Token: when the cluster runs with token authentication (Ray's default since 2.5x), the token is
taken from RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then the config's `token_path`,
then Ray's default ~/.ray/auth_token, and sent as `Authorization: Bearer <token>`. It is never
printed. A 401/403 is one error line listing where it looked and how to fix it.

Exit codes: 0 job SUCCEEDED (or submitted, with --no-wait); 1 job FAILED or STOPPED (the status
and Ray's error message are printed); 2 a user-fixable problem (address, token, config, unknown
job id); 130 Ctrl-C while following, which leaves the job running and prints how to follow or
stop it. Logs go to stdout, attrlab's own status lines to stderr; with --no-wait stdout holds
only the job id.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from cluster.job_client import (DEFAULT_ADDRESS, ClusterError, Connection, SubmitConfig, Target, connect,
                                load_config)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CLIENT_COMMANDS = ("submit", "jobs")


# ---------------------------------------------------------------- submit


def project_root() -> Path:
    """The directory holding pyproject.toml: the source tree shipped as the job's working_dir."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ClusterError(f"{root} holds no pyproject.toml: attrlab submit ships the source tree, so run it "
                           "from a checkout (pip install -e .)")
    return root


def job_command(raw: list[str]) -> list[str]:
    """The attrlab arguments after `--`, checked against attrlab's own parser before anything is sent."""
    args = raw[1:] if raw[:1] == ["--"] else list(raw)
    if not args:
        raise ClusterError("nothing to submit: give the attrlab command after --, "
                           "e.g. attrlab submit -- shards build lfw_subset --out /shared/lfw")
    first = next((a for a in args if not a.startswith("-")), "")
    if first in CLIENT_COMMANDS:
        raise ClusterError(f"`{first}` talks to the cluster from here; submit a command that runs there, e.g. shards or demo")
    from jobs.cli import build_parser

    build_parser().parse_args(args)  # a typo exits 2 here with attrlab's usage, not on the cluster
    return args


def entrypoint(python: str, args: list[str]) -> str:
    return f"{python} -m jobs.cli {shlex.join(args)}"


def _kv(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ClusterError(f"--env {item!r}: expected KEY=VALUE")
        out[k] = v
    return out


def runtime_env(cfg: SubmitConfig, extra_env: dict[str, str]) -> dict[str, Any]:
    env: dict[str, Any] = {"working_dir": str(project_root()), "excludes": list(cfg.runtime_env.excludes)}
    env_vars = {**cfg.runtime_env.env_vars, **extra_env}
    if env_vars:
        env["env_vars"] = env_vars
    return env


def _hints(job_id: str, target: Target) -> str:
    flag = f" --address {target.url}" if target.source == "--address" else ""
    return (f"  follow: attrlab jobs logs {job_id} --follow{flag}\n"
            f"  stop:   attrlab jobs stop {job_id}{flag}")


def _note(msg: str) -> None:
    print(f"attrlab: {msg}", file=sys.stderr, flush=True)


def cmd_submit(a: argparse.Namespace) -> int:
    cfg, name = load_config(a.config), _config_name(a.config)
    args = job_command(a.command)
    env = runtime_env(cfg, _kv(a.env))
    conn = connect(a.address, cfg, name)
    submission_id = f"attrlab-{args[0].lstrip('-') or 'job'}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    with conn.errors():
        job_id = conn.client.submit_job(entrypoint=entrypoint(cfg.python, args), runtime_env=env,
                                        submission_id=submission_id,
                                        metadata={"attrlab": shlex.join(args), "user": getpass.getuser()})
    if a.no_wait:
        print(job_id, flush=True)
        _note(f"submitted job {job_id} to {conn.target.url}\n{_hints(job_id, conn.target)}")
        return 0
    _note(f"submitted job {job_id} to {conn.target.url}: attrlab {shlex.join(args)}")
    return follow(conn, job_id)


def follow(conn: Connection, job_id: str) -> int:
    """Stream the job's logs until it ends; 0 SUCCEEDED, 1 FAILED/STOPPED, 130 on Ctrl-C (job keeps running)."""
    printed = [0]  # characters written so far, so the polling fallback prints only the rest
    try:
        try:
            with conn.errors(job_id):
                asyncio.run(_stream(conn.client, job_id, printed))
        except _StreamBroken as e:
            _note(f"the log stream broke ({e}); polling the logs instead")
            _poll(conn, job_id, printed)
        info = _wait_terminal(conn, job_id)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        _note(f"stopped following {job_id}; the job keeps running on the cluster\n{_hints(job_id, conn.target)}")
        return 130
    return report(info, conn)


class _StreamBroken(Exception):
    """The log websocket failed after connecting (not an auth or unknown-job refusal)."""


async def _stream(client: Any, job_id: str, printed: list[int]) -> None:
    import aiohttp

    try:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            printed[0] += len(chunk)
    except aiohttp.WSServerHandshakeError:
        raise  # refused (401/403/404): Connection.errors explains it
    except (RuntimeError, aiohttp.ClientError) as e:
        raise _StreamBroken(str(e) or type(e).__name__) from None


def _poll(conn: Connection, job_id: str, printed: list[int], every_s: float = 2.0) -> None:
    while True:
        with conn.errors(job_id):
            status = str(conn.client.get_job_status(job_id))
            logs = conn.client.get_job_logs(job_id)
        sys.stdout.write(logs[printed[0]:])
        sys.stdout.flush()
        printed[0] = max(printed[0], len(logs))
        if status in TERMINAL:
            return
        time.sleep(every_s)


def _wait_terminal(conn: Connection, job_id: str, timeout_s: float = 30.0) -> Any:
    """The log stream closes when the job ends; the status can lag it by a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        with conn.errors(job_id):
            info = conn.client.get_job_info(job_id)
        if str(info.status) in TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def report(info: Any, conn: Connection) -> int:
    status, job_id = str(info.status), info.submission_id or info.job_id
    took = f" in {(info.end_time - info.start_time) / 1000:.1f} s" if info.end_time and info.start_time else ""
    if status == "SUCCEEDED":
        _note(f"job {job_id} SUCCEEDED{took}")
        return 0
    if status in TERMINAL:
        full = info.message or ""  # Ray appends the last logs, which were streamed already
        message = full.split(", last available logs")[0].strip().replace("\n", " ")
        _note(f"job {job_id} {status}{took}: {message or 'no message'}")
        if "No module named" in full:
            _note(f"the job's python lacks a dependency: install attrlab's dependencies on the nodes, or set `python:` "
                  f"in {conn.config_name} to an interpreter that has them")
        return 1
    _note(f"job {job_id} is still {status} on {conn.target.url}\n{_hints(job_id, conn.target)}")
    return 1


# ---------------------------------------------------------------- jobs list|logs|status|stop


def _config_name(path: Path | None) -> str:
    return str(path) if path is not None else "cluster/submit.yaml"


def _connect(a: argparse.Namespace) -> Connection:
    return connect(a.address, load_config(a.config), _config_name(a.config))


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def cmd_list(a: argparse.Namespace) -> int:
    conn = _connect(a)
    with conn.errors():
        jobs = sorted(conn.client.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [(j.submission_id or j.job_id or "-", str(j.status), _when(j.start_time),
             (j.metadata or {}).get("attrlab") or j.entrypoint or "-") for j in jobs]
    if not rows:
        print(f"no jobs on {conn.target.url}")
        return 0
    w0 = max(len("JOB"), *(len(r[0]) for r in rows))
    print(f"{'JOB':<{w0}}  {'STATUS':<9}  {'STARTED':<19}  COMMAND")
    for job_id, status, started, command in rows:
        print(f"{job_id:<{w0}}  {status:<9}  {started:<19}  {command[:80]}")
    return 0


def cmd_logs(a: argparse.Namespace) -> int:
    conn = _connect(a)
    if a.follow:
        return follow(conn, a.job_id)
    with conn.errors(a.job_id):
        sys.stdout.write(conn.client.get_job_logs(a.job_id))
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    conn = _connect(a)
    with conn.errors(a.job_id):
        info = conn.client.get_job_info(a.job_id)
    message = (info.message or "").strip().replace("\n", " ")
    print(f"{a.job_id}: {info.status}" + (f" ({message})" if message else ""))
    return 0


def cmd_stop(a: argparse.Namespace) -> int:
    conn = _connect(a)
    with conn.errors(a.job_id):
        status = str(conn.client.get_job_status(a.job_id))
        if status in TERMINAL:
            _note(f"job {a.job_id} already ended: {status}")
            return 0
        conn.client.stop_job(a.job_id)
    _note(f"stop requested for {a.job_id} (was {status}); `attrlab jobs status {a.job_id}` shows when it has stopped")
    return 0


def add_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None, help="Ray dashboard URL (default: RAY_ADDRESS, the config, "
                        f"{DEFAULT_ADDRESS})")
    common.add_argument("--config", type=Path, default=None, help="YAML read on top of cluster/submit.yaml")

    p = sub.add_parser("submit", parents=[common], help="run an attrlab command as a Ray job on a cluster",
                       description="Run `attrlab <args>` as a Ray job, shipping this source tree. Paths in <args> are "
                       "paths on the cluster.", usage="attrlab submit [options] -- <attrlab args...>")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable for the job")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the attrlab command to run, after --")
    p.set_defaults(func=cmd_submit)

    j = sub.add_parser("jobs", help="list, follow, inspect and stop Ray jobs")
    s = j.add_subparsers(dest="jobs_cmd", required=True)
    s.add_parser("list", parents=[common], help="jobs on the cluster").set_defaults(func=cmd_list)
    lg = s.add_parser("logs", parents=[common], help="a job's logs")
    lg.add_argument("job_id")
    lg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends (exit 1 if it fails)")
    lg.set_defaults(func=cmd_logs)
    for name, func, text in (("status", cmd_status, "a job's status and message"),
                             ("stop", cmd_stop, "ask a running job to stop")):
        q = s.add_parser(name, parents=[common], help=text)
        q.add_argument("job_id")
        q.set_defaults(func=func)
