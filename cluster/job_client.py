"""The client side of `attrlab submit` / `attrlab jobs`: reaching a Ray cluster's job server (the
dashboard's job API). Holds the client config (cluster/submit.yaml), the address and token
look-ups, the dashboard probe, and the mapping of the SDK's exceptions to one-line errors. The
look-up orders are documented in cluster/submit.py. (cluster/connect.py is the other direction:
how attrlab's own commands join or start a Ray cluster.)
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from jobs import config as config_lib
from shards.format import ShardError

DEFAULT_CONFIG = Path(__file__).with_name("submit.yaml")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class ClusterError(ShardError):
    """A user-fixable problem reaching or using the cluster; printed as one line, exit 2."""


@dataclass(frozen=True)
class RuntimeEnvConfig:
    excludes: tuple[str, ...] = ()
    env_vars: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SubmitConfig:
    address: str | None = None
    token_path: str | None = None
    python: str = "python"
    connect_timeout_s: float = 5.0
    runtime_env: RuntimeEnvConfig = field(default_factory=RuntimeEnvConfig)

    def __post_init__(self) -> None:
        if not self.python.strip():
            raise ValueError("python: must name an interpreter command, e.g. python")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s: must be > 0")


def load_config(path: Path | None = None) -> SubmitConfig:
    """cluster/submit.yaml, with `path` (if given) read on top of it."""
    default = config_lib.load(SubmitConfig, DEFAULT_CONFIG)
    return default if path is None else config_lib.load(SubmitConfig, path, base=config_lib.to_dict(default))


# ---------------------------------------------------------------- address and token


@dataclass(frozen=True)
class Target:
    url: str
    source: str  # "--address", "RAY_ADDRESS", "<config file>" or "default"


def normalise_address(raw: str, source: str) -> Target:
    from urllib.parse import urlsplit

    url = raw.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClusterError(f"address {raw!r} (from {source}) is not a dashboard URL; expected http://HOST:8265 "
                           "(the Ray dashboard, not a ray:// client or GCS address)")
    return Target(url, source)


def resolve_address(flag: str | None, cfg: SubmitConfig, config_name: str,
                    environ: Mapping[str, str] = os.environ) -> Target:
    """--address, then RAY_ADDRESS (unless "auto"), then the config's address, then the default."""
    env = environ.get("RAY_ADDRESS", "").strip()
    for raw, source in ((flag, "--address"), (env if env != "auto" else None, "RAY_ADDRESS"),
                        (cfg.address, config_name)):
        if raw:
            return normalise_address(raw, source)
    return Target(DEFAULT_ADDRESS, "default")


@dataclass(frozen=True)
class TokenLookup:
    token: str | None = field(default=None, repr=False)
    source: str | None = None
    searched: tuple[str, ...] = ()


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"  # where `ray get-auth-token --generate` writes it


def find_token(cfg: SubmitConfig, config_name: str, environ: Mapping[str, str] = os.environ) -> TokenLookup:
    """RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then the config's token_path, then ~/.ray/auth_token."""
    searched = []
    value = environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return TokenLookup(value, "RAY_AUTH_TOKEN", ("RAY_AUTH_TOKEN",))
    searched.append("RAY_AUTH_TOKEN (not set)")
    files = [(environ.get("RAY_AUTH_TOKEN_PATH"), "RAY_AUTH_TOKEN_PATH"),
             (cfg.token_path, f"token_path in {config_name}"), (str(default_token_path()), "Ray's default")]
    for raw, label in files:
        if not raw:
            searched.append(f"{label} (not set)")
            continue
        path = Path(raw).expanduser()
        try:
            value = path.read_text().strip()
        except OSError:
            searched.append(f"{label} {path} (no such file)")
            continue
        if value:
            return TokenLookup(value, f"{label} {path}", tuple(searched) + (f"{label} {path}",))
        searched.append(f"{label} {path} (empty)")
    return TokenLookup(None, None, tuple(searched))


# ---------------------------------------------------------------- connection


def _reason(e: BaseException) -> str:
    text = str(e)
    for pattern, reason in (("refused", "connection refused"), ("timed out|Timeout", "no answer in time"),
                            ("Name or service not known|nodename nor servname|name resolution|getaddrinfo",
                             "host name not found"), ("unreachable", "network unreachable")):
        if re.search(pattern, text, re.IGNORECASE):
            return reason
    return type(e).__name__


@dataclass
class Connection:
    """A JobSubmissionClient plus what is needed to explain its failures in one line."""

    client: Any
    target: Target
    token: TokenLookup
    config_name: str

    def auth_error(self, status: int) -> ClusterError:
        where = "; ".join(self.token.searched)
        fix = (f"run `ray get-auth-token` on the head and export RAY_AUTH_TOKEN=<its output> (or save it to "
               f"{default_token_path()} or to token_path in {self.config_name})")
        if status == 401 or self.token.token is None:
            return ClusterError(f"the Ray cluster at {self.target.url} requires an auth token and none was found "
                                f"(looked in: {where}); {fix}")
        return ClusterError(f"the Ray cluster at {self.target.url} rejected the auth token from {self.token.source} "
                            f"(HTTP {status}: invalid token; looked in: {where}); {fix}")

    @contextlib.contextmanager
    def errors(self, job_id: str | None = None) -> Iterator[None]:
        """Map the SDK's exceptions to one-line ClusterErrors."""
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as e:
            raise self.auth_error(401 if "required" in e.message.lower() else 403) from None
        except aiohttp.WSServerHandshakeError as e:
            if e.status in (401, 403):
                raise self.auth_error(e.status) from None
            if e.status == 404 and job_id:
                raise no_such_job(job_id, self.target) from None
            raise ClusterError(f"following the logs at {self.target.url} failed: HTTP {e.status} {e.message}") from None
        except (ConnectionError, requests.exceptions.ConnectionError, aiohttp.ClientConnectionError) as e:
            raise unreachable(self.target, e) from None
        except RuntimeError as e:
            text = str(e)
            if job_id and ("404" in text or "does not exist" in text):
                raise no_such_job(job_id, self.target) from None
            raise ClusterError(f"the job server at {self.target.url} refused the request: {text.splitlines()[0]}") from None


def unreachable(target: Target, e: BaseException) -> ClusterError:
    return ClusterError(
        f"cannot reach the Ray dashboard at {target.url} (address from {target.source}): {_reason(e)}; check that "
        "the cluster is up (`ray status` on the head) and its dashboard listens there (port 8265 by default; a "
        "remote head needs --dashboard-host 0.0.0.0 or an SSH tunnel), or pass --address / set RAY_ADDRESS")


def no_such_job(job_id: str, target: Target) -> ClusterError:
    return ClusterError(f"no job {job_id!r} on {target.url}; `attrlab jobs list` shows the jobs there")


def _auth_mode(target: Target, timeout: float) -> str | None:
    """The cluster's auth mode ("token" or "disabled"), None if it does not say (older Ray)."""
    import requests

    try:
        r = requests.get(target.url + "/api/authentication_mode", timeout=timeout)
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, UnicodeError):
        raise ClusterError(f"address {target.url!r} (from {target.source}) is not a valid URL") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise unreachable(target, e) from None
    if r.status_code == 404:
        return None
    try:
        return str(r.json()["authentication_mode"])
    except (ValueError, KeyError, TypeError):
        raise ClusterError(f"{target.url} (from {target.source}) answered HTTP {r.status_code} but is not a Ray "
                           "dashboard; give the dashboard's port (8265 by default), not the GCS or Serve port") from None


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    """The SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override an explicit address: hide them."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


_RAY_CLIENT_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                       "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir")


def _no_default_exclude_notice(record: logging.LogRecord) -> bool:
    return "ignored by default when packaging" not in str(record.msg)  # Ray 2.60: ".git is now excluded"; so do we


def _quiet_ray_logs() -> None:
    """Ray's SDK logs each packaging step at INFO on its own handler; show them only with `attrlab -v`."""
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        for name in _RAY_CLIENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    notice = logging.getLogger("ray._private.runtime_env.working_dir")
    if _no_default_exclude_notice not in notice.filters:
        notice.addFilter(_no_default_exclude_notice)


def connect(address: str | None, cfg: SubmitConfig, config_name: str) -> Connection:
    """Resolve address and token, probe the dashboard, return a ready client."""
    target = resolve_address(address, cfg, config_name)
    mode = _auth_mode(target, cfg.connect_timeout_s)
    token = find_token(cfg, config_name) if mode != "disabled" else TokenLookup()
    conn = Connection(None, target, token, config_name)
    if mode == "token" and token.token is None:
        raise conn.auth_error(401)
    headers = {"Authorization": f"Bearer {token.token}"} if token.token else {}
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_logs()
    with conn.errors(), _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        conn.client = JobSubmissionClient(target.url, headers=headers)
    return conn
