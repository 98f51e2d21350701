"""A real Prometheus server on loopback, for checking what Ray's metrics export serves.

`ensure_prometheus()` finds a prometheus binary or installs one; `start_prometheus()` runs it on
127.0.0.1 and waits until it is ready; `query()` asks its HTTP API for an instant vector;
`write_config()` points cluster/prometheus.yml at Ray's service-discovery file (`ray_sd_file()`),
or at one written by `write_sd_file()`.

No PyPI package ships the server, and prometheus.io / GitHub downloads are not reachable from
our machines, so the install route is Debian's `prometheus` package: `apt-get download` plus
`dpkg-deb -x` into a cache directory (no root needed once apt's lists exist, no service started,
no postinst run). The binary is a Go program that links only libc.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from cluster.connect import free_port
from shards.format import ShardError

DEFAULT_CACHE = Path.home() / ".cache" / "attrlab" / "prometheus"
CONFIG_TEMPLATE = Path(__file__).with_name("prometheus.yml")
RAY_SD_FILE = "prom_metrics_service_discovery.json"  # ray._private.ray_constants
_HOW_TO = ("install Debian's package (apt-get update && apt-get install prometheus) "
           "or set PROMETHEUS_BIN=/path/to/prometheus")


class PrometheusError(ShardError):
    """Prometheus could not be found, installed, started or queried (one clear line)."""


def _works(binary: Path) -> bool:
    try:
        return subprocess.run([str(binary), "--version"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _install_from_debian(cache_dir: Path) -> Path:
    """Download Debian's .deb and unpack it under cache_dir/root; returns the binary's path."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise PrometheusError(f"prometheus not found and this is no Debian system: {_HOW_TO}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        for attempt in (1, 2):
            got = subprocess.run(["apt-get", "download", "-q", "prometheus"], cwd=tmp,
                                 capture_output=True, text=True, timeout=600)
            if got.returncode == 0 or attempt == 2 or os.geteuid() != 0:
                break
            # A fresh machine has empty package lists: refresh them once, then retry.
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
        debs = sorted(Path(tmp).glob("prometheus_*.deb"))
        if got.returncode != 0 or not debs:
            why = (got.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
            raise PrometheusError(f"apt-get download prometheus failed ({why}): {_HOW_TO}")
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, timeout=300)
        target = cache_dir / "root"
        # Rename into place so a concurrent caller never sees a half-unpacked tree.
        try:
            unpacked.rename(target)
        except OSError:
            if not (target / "usr/bin/prometheus").exists():
                raise
    return target / "usr/bin/prometheus"


def ensure_prometheus(cache_dir: Path | None = None) -> Path:
    """Path of a working prometheus: $PROMETHEUS_BIN, PATH, the cache, else a fresh install."""
    env = os.environ.get("PROMETHEUS_BIN")
    if env:
        if not _works(Path(env)):
            raise PrometheusError(f"PROMETHEUS_BIN={env}: not a working prometheus binary")
        return Path(env)
    on_path = shutil.which("prometheus")
    if on_path and _works(Path(on_path)):
        return Path(on_path)
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    cached = cache_dir / "root/usr/bin/prometheus"
    if cached.exists() and _works(cached):
        return cached
    binary = _install_from_debian(cache_dir)
    if not _works(binary):
        raise PrometheusError(f"{binary} was installed but does not run: {_HOW_TO}")
    return binary


def write_config(dest: Path, sd_files: list[Path], scrape_interval: str | None = None) -> Path:
    """Copy cluster/prometheus.yml to dest, scraping the targets listed in sd_files."""
    import yaml  # Ray depends on PyYAML

    cfg = yaml.safe_load(CONFIG_TEMPLATE.read_text())
    if scrape_interval:
        cfg["global"]["scrape_interval"] = scrape_interval
        cfg["global"]["evaluation_interval"] = scrape_interval
    cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(p) for p in sd_files]
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def ray_sd_file(temp_dir: str | Path = "/tmp/ray") -> Path:
    """Ray's service-discovery file for a Ray started with this _temp_dir and its dashboard:
    a symlink into session_<...>/. Its first write may list only the dashboard's own target."""
    return Path(temp_dir) / RAY_SD_FILE


def write_sd_file(dest: Path, targets: list[str]) -> Path:
    """A file_sd list for a Ray without its dashboard (no SD file then), e.g. the targets
    f"127.0.0.1:{n['MetricsExportPort']}" for n in ray.nodes() (it listens on 0.0.0.0)."""
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    tmp.replace(dest)  # atomic: prometheus may read the file at any moment
    return dest


class PrometheusProcess:
    """A running prometheus; `.url` is its base address. Stops on `.stop()` or leaving `with`."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: prometheus flushes its head block and exits
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> PrometheusProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_prometheus(config: Path, data_dir: Path, port: int = 0,
                     timeout: float = 60.0, binary: Path | None = None) -> PrometheusProcess:
    """Run prometheus on 127.0.0.1:port (a free one if 0) and wait until /-/ready answers."""
    binary = binary or ensure_prometheus()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = data_dir / "prometheus.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(binary), f"--config.file={config}", f"--storage.tsdb.path={data_dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=info"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = PrometheusProcess(proc, url, log)
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PrometheusError(f"prometheus exited with code {proc.returncode} on start "
                                  f"(log {log}):\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError as e:  # not listening yet, or 503 while the TSDB loads
            last = e
        time.sleep(0.2)
    server.stop()
    raise PrometheusError(f"prometheus at {url} not ready after {timeout:.0f} s (last answer: {last}; "
                          f"log {log}):\n{server.log_tail()}")


def query(url: str, promql: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Instant query: the `data.result` list of /api/v1/query ({'metric': {...}, 'value': [t, v]})."""
    q = urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=timeout) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # 400/422 carry Prometheus' own error as JSON
        try:
            body = json.loads(e.read())
        except ValueError:
            body = {"errorType": f"HTTP {e.code}", "error": e.reason}
    except OSError as e:
        raise PrometheusError(f"prometheus at {url}: {e}") from e
    if body.get("status") != "success":
        raise PrometheusError(f"query {promql!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]
