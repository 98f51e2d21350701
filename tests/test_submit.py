"""`attrlab submit` / `attrlab jobs` against a real local Ray head with token authentication on.

The head is `ray start --head --block` in its own session (start_new_session) with its own ports
and --temp-dir, RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN in its environment (so ~/.ray is
never touched). `ray stop` would stop every Ray process on the machine, including other test
sessions', so teardown instead sends SIGTERM to our `ray start --block` process (it drains and
stops its own daemons) and then SIGKILLs whatever is left in that process session.
The venv's bin is first on the head's PATH, as for a head started from an activated venv, so the
job's `python -m jobs.cli` is this interpreter.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from cluster import job_client, submit
from jobs.cli import main

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- no cluster needed


def test_address_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = job_client.SubmitConfig(address="cfg-head:8265")
    env = {"RAY_ADDRESS": "env-head:8265"}
    assert job_client.resolve_address("flag-head:1", cfg, "c.yaml", env) == job_client.Target("http://flag-head:1", "--address")
    assert job_client.resolve_address(None, cfg, "c.yaml", env) == job_client.Target("http://env-head:8265", "RAY_ADDRESS")
    assert job_client.resolve_address(None, cfg, "c.yaml", {"RAY_ADDRESS": "auto"}).source == "c.yaml"
    assert job_client.resolve_address(None, job_client.SubmitConfig(), "c.yaml", {}) == job_client.Target(job_client.DEFAULT_ADDRESS, "default")
    assert job_client.normalise_address("https://h:443/", "x").url == "https://h:443"
    with pytest.raises(job_client.ClusterError, match="not a dashboard URL"):
        job_client.normalise_address("ray://h:10001", "--address")


def test_token_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "env_file").write_text("from-env-path\n")
    (tmp_path / "cfg_file").write_text("from-config\n")
    cfg = job_client.SubmitConfig(token_path=str(tmp_path / "cfg_file"))
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "env_file")}
    assert job_client.find_token(cfg, "c.yaml", env).token == "from-env"
    assert job_client.find_token(cfg, "c.yaml", {**env, "RAY_AUTH_TOKEN": ""}).token == "from-env-path"
    assert job_client.find_token(cfg, "c.yaml", {}).token == "from-config"
    assert job_client.find_token(job_client.SubmitConfig(), "c.yaml", {}).token is None
    default = job_client.default_token_path()
    default.parent.mkdir(parents=True)
    default.write_text("from-default")
    found = job_client.find_token(job_client.SubmitConfig(), "c.yaml", {})
    assert found.token == "from-default" and "from-default" not in repr(found)


def test_unreachable_address_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["jobs", "list", "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"attrlab: error: cannot reach the Ray dashboard at http://127.0.0.1:{port} (address from --address)")
    assert "\n" not in err and "Traceback" not in err


def test_config_is_strict_and_overlays_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("adress: http://x:8265\n")
    assert main(["jobs", "list", "--config", str(bad)]) == 2
    assert "adress: unknown key" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("python: /opt/venv/bin/python\nruntime_env: {env_vars: {A: '1'}}\n")
    cfg = job_client.load_config(good)
    assert cfg.python == "/opt/venv/bin/python" and cfg.runtime_env.env_vars == {"A": "1"}
    assert cfg.runtime_env.excludes == job_client.load_config().runtime_env.excludes  # kept from the default


def test_command_checked_locally_and_quoted() -> None:
    args = submit.job_command(["--", "shards", "info", "/data/my shards"])
    assert submit.entrypoint("python", args) == "python -m jobs.cli shards info '/data/my shards'"
    with pytest.raises(job_client.ClusterError, match="nothing to submit"):
        submit.job_command(["--"])
    with pytest.raises(job_client.ClusterError, match="talks to the cluster"):
        submit.job_command(["jobs", "list"])
    with pytest.raises(SystemExit):  # attrlab's own usage error, before anything is sent
        submit.job_command(["shards", "biuld"])


def test_upload_excludes_keep_the_package_small(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import create_package

    excludes = list(job_client.load_config().runtime_env.excludes)
    tree = tmp_path / "tree"
    for rel in ("pyproject.toml", "jobs/cli.py", "shards/data/keep.py", "data/lfw/train-000000.tar",
                "runs/r1/model.pt", ".venv/lib/x.py", ".git/HEAD", "jobs/__pycache__/cli.pyc", "big.tar"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    create_package(str(tree), tmp_path / "t.zip", include_gitignore=True, excludes=excludes)
    names = {n for n in zipfile.ZipFile(tmp_path / "t.zip").namelist() if not n.endswith("/")}
    assert names == {"pyproject.toml", "jobs/cli.py", "shards/data/keep.py"}
    # the real checkout: source only
    create_package(str(submit.project_root()), tmp_path / "repo.zip", include_gitignore=True, excludes=excludes)
    repo = zipfile.ZipFile(tmp_path / "repo.zip").namelist()
    assert "jobs/cli.py" in repo and "cluster/submit.py" in repo
    assert (tmp_path / "repo.zip").stat().st_size < 5 * 2**20


# ---------------------------------------------------------------- a real head with token auth


@dataclass(frozen=True)
class Head:
    url: str
    token: str
    pid: int


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop only this head: SIGTERM its `ray start --block`, then kill leftovers of its session."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.pid) == proc.pid or temp_dir in " ".join(p.info["cmdline"] or ()):
                mine.append(p)
        except (OSError, psutil.Error):
            continue
    for p in mine:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip(f"no `ray` next to {sys.executable}")
    temp_dir = tempfile.mkdtemp(prefix="alray-", dir="/tmp")  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    gcs, dash, client, nm, om, agent_http, agent_grpc, metrics, renv = _free_ports(9)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    cmd = [str(ray_bin), "start", "--head", "--block", "--num-cpus", "2", "--object-store-memory", str(100 * 2**20),
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--node-manager-port", str(nm), "--object-manager-port", str(om),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(renv),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        import requests

        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(url + "/api/version", timeout=2).status_code == 401:  # up, and token auth on
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray head did not start:\n" + (Path(temp_dir) / "head.log").read_text()[-3000:])
            time.sleep(0.5)
        yield Head(url, token, proc.pid)
    finally:
        _stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture()
def as_client(head: Head, monkeypatch: pytest.MonkeyPatch) -> Head:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    return head


@dataclass(frozen=True)
class Runs:
    ok_id: str
    ok_rc: int
    ok_out: str
    ok_err: str
    bad_id: str
    bad_rc: int
    bad_err: str
    lfw: Path


def _job_id(text: str) -> str:
    return next(w for w in text.split() if w.startswith("attrlab-shards-"))


@pytest.fixture(scope="module")
def runs(head: Head, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """A failing job submitted with --no-wait, a good one followed to the end, then the failing one followed."""
    out = tmp_path_factory.mktemp("submit")
    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)
    mp.setenv("RAY_AUTH_TOKEN", head.token)
    cap = _Capture()
    try:
        with cap:
            bad_rc = main(["submit", "--no-wait", "--address", head.url, "--", "shards", "validate", str(out / "nonexistent")])
        assert bad_rc == 0, cap.err
        bad_id = cap.out.strip()
        with cap:
            ok_rc = main(["submit", "--address", head.url, "--", "shards", "build", "lfw_subset",
                          "--out", str(out / "lfw"), "--no-progress"])
        ok_out, ok_err = cap.out, cap.err
        with cap:
            follow_rc = main(["jobs", "logs", bad_id, "--follow", "--address", head.url])
    finally:
        mp.undo()
    return Runs(_job_id(ok_err), ok_rc, ok_out, ok_err, bad_id, follow_rc, cap.err, out / "lfw")


class _Capture:
    """Redirect stdout/stderr for a module-scoped fixture (capsys is function-scoped)."""

    def __enter__(self) -> None:
        import io

        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self._out, self._err = io.StringIO(), io.StringIO()

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self._saved
        self.out, self.err = self._out.getvalue(), self._err.getvalue()


# the head and its jobs take ~40 s together on 2 shared cores
head_test = pytest.mark.slow
quiet_sdk = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")  # inside Ray's tail_job_logs


@head_test
@quiet_sdk
def test_submit_streams_logs_and_succeeds(runs: Runs) -> None:
    assert runs.ok_rc == 0, runs.ok_err
    assert f"submitted job {runs.ok_id}" in runs.ok_err and f"job {runs.ok_id} SUCCEEDED" in runs.ok_err
    assert "lfw_subset at" in runs.ok_out and "150 images in 1 shards" in runs.ok_out  # the summary, streamed
    assert (runs.lfw / "manifest.json").is_file() and (runs.lfw / "train-000000.tar").is_file()


@head_test
@quiet_sdk
def test_failing_job_exits_1_with_status(runs: Runs) -> None:
    assert runs.bad_id.startswith("attrlab-shards-")
    assert runs.bad_rc == 1
    assert f"job {runs.bad_id} FAILED" in runs.bad_err and "exit code 2" in runs.bad_err


@head_test
@quiet_sdk
def test_jobs_list_logs_status(runs: Runs, as_client: Head, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["jobs", "list", "--address", as_client.url]) == 0
    listed = capsys.readouterr().out
    assert runs.ok_id in listed and runs.bad_id in listed and "SUCCEEDED" in listed and "FAILED" in listed
    assert main(["jobs", "logs", runs.ok_id, "--address", as_client.url]) == 0
    assert "lfw_subset at" in capsys.readouterr().out
    assert main(["jobs", "status", runs.bad_id, "--address", as_client.url]) == 0
    assert f"{runs.bad_id}: FAILED" in capsys.readouterr().out
    assert main(["jobs", "status", "no-such-job", "--address", as_client.url]) == 2
    assert "no job 'no-such-job'" in capsys.readouterr().err


@head_test
@quiet_sdk
def test_wrong_or_missing_token_is_a_clear_error(as_client: Head, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["jobs", "list", "--address", as_client.url]) == 2
    err = capsys.readouterr().err
    assert "rejected the auth token from RAY_AUTH_TOKEN" in err and "ray get-auth-token" in err
    assert "not-the-token" not in err and as_client.token not in err and "Traceback" not in err
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    assert main(["jobs", "list", "--address", as_client.url]) == 2
    err = capsys.readouterr().err
    assert "requires an auth token and none was found" in err and "RAY_AUTH_TOKEN (not set)" in err
    # the config's token_path is the fix the message offers
    (tmp_path / "token").write_text(as_client.token)
    cfg = tmp_path / "submit.yaml"
    cfg.write_text(f"address: {as_client.url}\ntoken_path: {tmp_path / 'token'}\n")
    assert main(["jobs", "list", "--config", str(cfg)]) == 0


@head_test
@quiet_sdk
def test_ctrl_c_leaves_the_job_running(as_client: Head, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(as_client.url, headers={"Authorization": f"Bearer {as_client.token}"})
    before = {j.submission_id for j in client.list_jobs()}

    def interrupt_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(j.submission_id not in before and str(j.status) == "RUNNING" for j in client.list_jobs()):
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
                return
            time.sleep(0.3)

    watcher = threading.Thread(target=interrupt_when_running, daemon=True)
    # a fresh `attrlab` process has Python's own SIGINT handler; an earlier in-process Ray Train run may have
    # left its handler installed, which swallows the signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watcher.start()
        rc = main(["submit", "--address", as_client.url, "--", "shards", "build", "attrworld", "--count", "4000",
                   "--workers", "1", "--no-progress", "--out", str(tmp_path / "aw")])
        watcher.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    job_id = _job_id(err)
    try:
        assert rc == 130 and "the job keeps running" in err and f"attrlab jobs stop {job_id}" in err
        assert str(client.get_job_status(job_id)) == "RUNNING"
        assert main(["jobs", "stop", job_id, "--address", as_client.url]) == 0
    finally:
        client.stop_job(job_id)  # whatever happened above, leave nothing running
    deadline = time.monotonic() + 30
    while str(client.get_job_status(job_id)) != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert str(client.get_job_status(job_id)) == "STOPPED"


@head_test
def test_follow_falls_back_to_polling_when_the_stream_breaks(runs: Runs, as_client: Head, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from ray.job_submission import JobSubmissionClient

    async def broken(self: object, job_id: str):  # type: ignore[no-untyped-def]
        raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")
        yield ""

    monkeypatch.setattr(JobSubmissionClient, "tail_job_logs", broken)
    assert main(["jobs", "logs", runs.ok_id, "--follow", "--address", as_client.url]) == 0
    got = capsys.readouterr()
    assert "polling the logs instead" in got.err and "lfw_subset at" in got.out
