"""The cluster definitions, checked without a cluster, cloud credentials or network.

ray_cluster.yaml and cluster/local.yaml go through Ray's own launcher validation (prepare_config +
validate_config, what `ray up` runs before touching a provider) and every `ray start` line through
`ray start`'s real option parser; cluster/kuberay/*.yaml through the real `attrlab` parser, the
strict config loader and Ray Serve's deploy schema; cluster/deepspeed/*.json through
jobs/engine.py's merge and DeepSpeed's own config parser. Beside validity, the security settings:
token auth on every node, the dashboard on loopback where nothing else must reach it, the metrics
port, the token file private, and attrlab installed by the setup commands.
"""
from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from tests.test_security import parse

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = {"aws": REPO / "ray_cluster.yaml", "local": REPO / "cluster" / "local.yaml"}
KUBERAY = REPO / "cluster" / "kuberay"
GPU_CONFIGS = REPO / "jobs" / "configs" / "gpu"
DEEPSPEED = REPO / "cluster" / "deepspeed"
METHODS = ("stn_ranker", "coop_embed", "deml", "latent_retrieval", "trip")
MOUNT = "/mnt/attrlab"  # the shared volume in every KubeRay pod (cluster/kuberay/storage.yaml)
# What jobs/engine.py:deepspeed_config sets or drops itself: in a DeepSpeed JSON these would be
# overridden or silently discarded, or (optimizer, scheduler) fight the loop's own optimiser and lr.
ENGINE_OWNED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "steps_per_print", "wall_clock_breakdown", "bf16", "fp16", "amp",
                "torch_autocast", "optimizer", "scheduler"}


# -- helpers -------------------------------------------------------------------------------------
def load_launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER[name].read_text())


def ray_start_args(command: str) -> tuple[list[str], list[str]] | None:
    """(environment assignments, arguments) of the `ray start` in a shell line, None without one."""
    for part in re.split(r";|&&", command):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i:i + 2] == ["ray", "start"]:
                return words[:i], words[i + 2:]
    return None


def parse_ray_start(args: list[str]) -> dict[str, Any]:
    """`ray start`'s own click parser (options and types checked; nothing is started)."""
    from ray.scripts.scripts import start

    return start.make_context("start", list(args)).params


def kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(kind, RayCluster spec) of every RayCluster, RayJob and RayService manifest."""
    where = {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
             "RayService": lambda s: s["rayClusterConfig"]}
    return [(d["kind"], where[d["kind"]](d["spec"])) for _, d in kuberay_docs() if d["kind"] in where]


def groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def one(kind: str) -> dict[str, Any]:
    found = [d for _, d in kuberay_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {KUBERAY}, found {len(found)}"
    return found[0]


def pyproject_gpu_extra() -> str:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (spec,) = extras["gpu"]
    return spec


def nginx_bytes(size: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
    m = re.fullmatch(r"(\d+)([kmg]?)", size.lower())
    assert m, size
    return int(m.group(1)) * units[m.group(2)]


# -- Ray cluster launcher ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_config_passes_rays_own_validation(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load_launcher(name)))
    validate_config(prepared)  # ray-schema.json (no unknown keys) + node-type rules
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    if name == "aws":
        workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
        assert workers and all(v["resources"].get("GPU", 0) >= 1 and v["max_workers"] >= 1 for v in workers.values())
        assert types[prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_every_ray_start_has_token_auth_loopback_dashboard_and_metrics_port(name: str) -> None:
    cfg = load_launcher(name)
    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        starts = [s for s in map(ray_start_args, cfg[key]) if s is not None]
        assert len(starts) == 1, f"{name}: {key} should hold one `ray start`"
        env, args = starts[0]
        assert "RAY_AUTH_MODE=token" in env, f"{name}: {key} starts Ray without token auth"
        params = parse_ray_start(args)
        assert params["head"] is head
        assert params["metrics_export_port"] == 8080
        if head:
            assert params["dashboard_host"] == "127.0.0.1"  # `ray dashboard` tunnels to it over SSH
    assert "0.0.0.0" not in LAUNCHER[name].read_text()


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_the_token_file_is_shipped_to_every_node_and_kept_private(name: str) -> None:
    cfg = load_launcher(name)
    mounts = {remote: local for remote, local in cfg["file_mounts"].items() if remote.endswith(".ray/auth_token")}
    assert list(mounts.values()) == ["~/.ray/auth_token"]  # what `ray get-auth-token --generate` wrote
    remote = next(iter(mounts))
    assert f"chmod 600 {remote}" in cfg["setup_commands"]
    # shells on the nodes (ray exec / attach, jobs' own `ray` calls) talk to the cluster in token mode
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_setup_installs_attrlab_on_head_and_workers(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config

    cfg = load_launcher(name)
    (tarball,) = [r for r, local in cfg["file_mounts"].items() if local == "dist/attrlab.tar.gz"]
    prepared = prepare_config(copy.deepcopy(cfg))
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        cmds = prepared[key]
        assert any(f"tar -xzf {tarball}" in c for c in cmds), key
        assert any(re.search(r'pip install .*-e "\$HOME/attrlab"', c) for c in cmds), key
        assert any('-e "$HOME/attrlab[gpu]"' in c and f'"{pyproject_gpu_extra()}"' in c for c in cmds), key
        # the cluster runs the Ray version `ray up` / `attrlab submit` run with here
        assert any(f"=={ray.__version__}" in c and "ray[" in c for c in cmds), key
    # Ray's workers start in `ray start`'s directory: the unpacked tree, where relative config paths resolve
    unpacked = re.search(rf"tar -xzf {re.escape(tarball)} -C (\S+)", " ".join(cfg["setup_commands"])).group(1)
    for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert ray_start_args(c) is None or f"cd {unpacked} && " in c, c
    if name == "aws":
        assert any("boto3" in c for c in prepared["head_setup_commands"])  # the autoscaler calls EC2


def test_aws_and_local_share_setup_and_start_commands() -> None:
    aws, local = load_launcher("aws"), load_launcher("local")
    assert aws["setup_commands"] == local["setup_commands"]
    assert aws["worker_start_ray_commands"] == local["worker_start_ray_commands"]
    assert aws["file_mounts"] == local["file_mounts"]
    strip = [c.replace(" --num-cpus=0", "") for c in aws["head_start_ray_commands"]]
    assert strip == local["head_start_ray_commands"]  # AWS keeps work off its CPU-only head


# -- KubeRay -------------------------------------------------------------------------------------
def test_kuberay_manifests_parse_and_name_known_kinds() -> None:
    kinds = sorted(d["kind"] for _, d in kuberay_docs())
    assert kinds == ["Ingress", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayService"]
    for _, d in kuberay_docs():
        if d["kind"].startswith("Ray"):
            assert d["apiVersion"] == "ray.io/v1"


def test_kuberay_clusters_use_token_auth_metrics_port_and_the_right_dashboard_host() -> None:
    images = set()
    for kind, spec in ray_cluster_specs():
        assert spec["authOptions"] == {"mode": "token"}, kind
        assert spec["rayVersion"] == ray.__version__, kind  # token auth needs >= 2.52; image = client
        for name, g in groups(spec):
            params = {k: str(v) for k, v in g["rayStartParams"].items()}
            assert params.get("metrics-export-port") == "8080", (kind, name)
            # KubeRay turns rayStartParams into `ray start --key=value`: the real parser checks them
            parse_ray_start((["--head"] if name == "head" else ["--address=head:6379"])
                            + [f"--{k}={v}" for k, v in params.items()])
            pod = g["template"]["spec"]
            images |= {c["image"] for c in pod["containers"]}
            mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert MOUNT in mounts, (kind, name)
        head_host = spec["headGroupSpec"]["rayStartParams"]["dashboard-host"]
        # a plain RayCluster keeps it on loopback (kubectl port-forward); RayJob's submitter and
        # RayService's operator must reach it through the head Service, behind the token
        assert head_host == ("127.0.0.1" if kind == "RayCluster" else "0.0.0.0"), kind
    assert len(images) == 1, images
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert re.search(rf"ARG RAY_IMAGE=rayproject/ray:{re.escape(ray.__version__)}\S*-gpu", dockerfile)


@pytest.fixture(scope="module")
def attrlab_parser() -> Any:
    from jobs.cli import build_parser

    return build_parser()


def test_rayjob_runs_attrlab_train_with_a_config_that_loads(attrlab_parser: Any) -> None:
    from jobs.cli_train import load_run_config

    job = one("RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "attrlab"  # the console script of pyproject.toml
    a = attrlab_parser.parse_args(argv[1:])
    assert a.cmd == "train" and a.method in METHODS and not a.local
    assert a.config is not None and not a.config.is_absolute() and (REPO / a.config).is_file(), a.config
    cfg = load_run_config(a.method, REPO / a.config, a.set)
    # relative --config and deepspeed.config_file resolve in the uploaded working_dir on every node
    assert job["submissionMode"] == "K8sJobMode"  # HTTPMode does not upload a local working_dir
    workdir = yaml.safe_load(job["runtimeEnvYAML"])["working_dir"]
    assert re.search(rf"^WORKDIR {re.escape(workdir)}$", (KUBERAY / "Dockerfile").read_text(), re.M)
    # data and run directory on the shared volume (a relative --out would die with the job's temp dir)
    for p in (a.data, a.out):
        assert str(p).startswith(MOUNT + "/"), p
    spec = job["rayClusterSpec"]
    workers = a.workers or cfg.scaling.workers
    gpus = a.gpus_per_worker if a.gpus_per_worker is not None else cfg.scaling.gpus_per_worker
    have = 0.0
    for name, g in groups(spec)[1:]:
        res = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(res["cpu"]) >= cfg.scaling.cpus_per_worker, name
        have += int(g["maxReplicas"]) * float(res.get("nvidia.com/gpu", 0))
    assert have >= workers * gpus, f"{workers} workers x {gpus} GPUs, the RayJob's cluster has {have}"


def test_rayservice_serves_serve_yaml_behind_tls_and_auth() -> None:
    from ray.serve.schema import ServeDeploySchema

    svc = one("RayService")
    v2 = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(v2)
    # serve/serve.yaml with exactly the two documented changes (rayservice.yaml's comment)
    expected = yaml.safe_load((REPO / "serve" / "serve.yaml").read_text())
    expected["http_options"]["host"] = "0.0.0.0"
    for app in expected["applications"]:
        for spec in app["args"]["models"].values():
            for k, p in spec.items():
                assert not Path(p).is_absolute(), p
                spec[k] = f"{MOUNT}/{p}"
    assert v2 == expected
    for app in v2["applications"]:  # the builder it names exists (without importing Serve's app)
        module, func = app["import_path"].split(":")
        tree = parse((REPO / Path(*module.split("."))).with_suffix(".py").read_text(), module)
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), app["import_path"]
    # what rayjob.yaml trains is what this serves
    job_out = shlex.split(one("RayJob")["spec"]["entrypoint"])
    method, out = job_out[2], job_out[job_out.index("--out") + 1]
    assert v2["applications"][0]["args"]["models"][method]["run"] == out
    # the only way in from outside: an Ingress with TLS in front of KubeRay's serve Service
    ing = one("Ingress")
    assert ing["spec"]["tls"] and all(t.get("secretName") for t in ing["spec"]["tls"])
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/auth-type"] == "basic" and ann["nginx.ingress.kubernetes.io/auth-secret"]
    limit = v2["applications"][0]["args"]["limits"]["max_body_bytes"]
    assert nginx_bytes(ann["nginx.ingress.kubernetes.io/proxy-body-size"]) >= limit
    backends = [p["backend"]["service"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends == [{"name": f"{svc['metadata']['name']}-serve-svc", "port": {"number": v2["http_options"]["port"]}}]


# -- DeepSpeed configs and the GPU method configs -------------------------------------------------
def gpu_config(method: str) -> Any:
    from jobs.cli_train import load_run_config

    path = GPU_CONFIGS / f"{method}.yaml"
    assert path.is_file(), path  # load_run_config falls back to defaults for a missing file
    return load_run_config(method, path, [])


@pytest.mark.parametrize("path", sorted(DEEPSPEED.glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_json_holds_no_key_the_engine_owns_and_parses_in_deepspeed(path: Path) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    data = json.loads(path.read_text())
    stage = int(re.search(r"zero(\d)", path.name).group(1))
    assert data["zero_optimization"]["stage"] == stage
    assert not ENGINE_OWNED & set(data), sorted(ENGINE_OWNED & set(data))
    assert data["zero_allow_untested_optimizer"] is True  # torch SGD (stn_ranker) is off DeepSpeed's list
    parsed = DeepSpeedConfig({**data, "train_micro_batch_size_per_gpu": 2})  # zero section: unknown keys fail
    assert parsed.zero_optimization_stage == stage


@pytest.mark.parametrize("method", METHODS)
def test_gpu_config_loads_strictly_and_merges_into_its_deepspeed_file(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    from jobs.engine import deepspeed_config

    cfg = gpu_config(method)
    ds = cfg.deepspeed
    assert cfg.scaling.gpus_per_worker >= 1 and ds.enabled and ds.precision == "bf16"
    # the YAML names it relative to attrlab; loading makes it absolute (what every worker opens)
    assert ds.config_file == str(REPO / yaml.safe_load((REPO / "jobs/configs/gpu" / f"{method}.yaml").read_text())["deepspeed"]["config_file"])
    data = json.loads(Path(ds.config_file).read_text())
    stage = data["zero_optimization"]["stage"]
    assert ds.zero_stage == stage, "jobs/engine.py sets the stage from deepspeed.zero_stage, not the file"
    # ZeRO-3 shards the weights: rank-0 validation and the rank-0 state_dict export would see none
    assert stage in (1, 2)
    monkeypatch.chdir("/")  # an absolute config_file: opened from any working directory
    merged = deepspeed_config(ds, cfg.data.loader.batch_size, cfg.schedule, cfg.optim)
    assert merged["zero_optimization"] == {**data["zero_optimization"], "stage": stage}
    assert merged["train_micro_batch_size_per_gpu"] == cfg.data.loader.batch_size
    assert "bf16" not in merged and "fp16" not in merged  # bf16 is autocast in the step
    assert DeepSpeedConfig(merged).zero_optimization_stage == stage


@pytest.mark.parametrize("method", METHODS)
def test_gpu_config_initialises_deepspeed_and_resumes_its_checkpoint(method: str, world_of_one: None, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """deepspeed.initialize's optimiser check runs on CPU too (ZeRO refuses an unlisted
    torch.optim.SGD unless the config allows it), and the ZeRO checkpoint it writes passes the
    engine's load-time checks; the model is a stand-in."""
    import torch

    from jobs.engine import Engines
    from models.registry import ParamGroup

    cfg = gpu_config(method)
    monkeypatch.chdir(REPO)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    engines = Engines(model, {"main": [ParamGroup("all", list(model.parameters()))]}, cfg.optim, cfg.schedule,
                      cfg.deepspeed, micro_batch=2)
    loss = model(torch.randn(2, 4)).pow(2).mean()
    engines.backward("main", loss)
    engines.step("main")
    assert engines.engines["main"].zero_optimization_stage() == cfg.deepspeed.zero_stage
    engines.save(str(tmp_path))
    engines.load(str(tmp_path))


@pytest.mark.parametrize("method", METHODS)
def test_gpu_config_builds_its_paper_model(method: str, tiny_attrworld: Path) -> None:
    """The paper backbones and sizes build (on the meta device: no memory, no weights)."""
    from jobs.cli_train import check_build
    from models import registry

    check_build(registry.get(method), gpu_config(method), tiny_attrworld)
