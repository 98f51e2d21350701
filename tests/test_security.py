"""Security defaults (issue 10), each proven without a Ray cluster:

1. nothing read from disk or network is unpickled: an AST scan of the product code (torch.load
   only with weights_only=True, no pickle/dill/cloudpickle loads, yaml safe loaders only, no
   eval/exec, no np.load(allow_pickle=True), no shell=True), and a .pt file whose pickle would
   run code is refused by the loaders attrlab uses for user-supplied weights;
2. importers refuse image paths that leave --src ('..', absolute, a symlink out) with one line
   naming the file, line and entry, and the writer never writes outside --out;
3. a YAML config with a python-object tag is refused by `attrlab train --config` before training;
4. HTTP payload limits: proven in tests/test_serve_schemas.py (413 for an oversized
   Content-Length or streamed body, too many / too large images, decompression bombs).
"""
from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from shards.format import AttributeSpec, DatasetMeta, Sample, ShardError
from shards.plan import DatasetPlan, safe_join
from shards.writer import write_dataset

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("jobs", "models", "serve", "shards", "cluster", "bench")


# ----------------------------------------------------------------------------- 1. unsafe loads
PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
PICKLE_CALLS = {f"{m}.{f}" for m in PICKLE_MODULES for f in ("load", "loads", "Unpickler")} | {
    "joblib.load", "pandas.read_pickle", "marshal.load", "marshal.loads", "shelve.open"}
YAML_UNSAFE_CALLS = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
YAML_SAFE_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}
YAML_UNSAFE_LOADERS = {"yaml.Loader", "yaml.FullLoader", "yaml.UnsafeLoader", "yaml.CLoader", "yaml.CFullLoader",
                       "yaml.CUnsafeLoader"}
SHELL_CALLS = {"os.system", "os.popen"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """local name -> dotted origin, from every import in the module (function-level ones too)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _has_star_kwargs(call: ast.Call) -> bool:
    return any(k.arg is None for k in call.keywords)


def _call_problem(name: str, call: ast.Call, aliases: dict[str, str]) -> str | None:
    name = name.replace("torch.serialization.load", "torch.load")
    if name == "torch.load":
        if not _is_const(_kw(call, "weights_only"), True):
            return "torch.load without weights_only=True"
    elif name in PICKLE_CALLS:
        return f"{name}: unpickling runs code from the file"
    elif name == "numpy.load":
        allow = _kw(call, "allow_pickle")
        if (allow is not None and not _is_const(allow, False)) or _has_star_kwargs(call):
            return "np.load with allow_pickle (not a literal False)"
    elif name in YAML_UNSAFE_CALLS:
        return f"{name}: use yaml.safe_load"
    elif name in ("yaml.load", "yaml.load_all"):
        loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        if loader is None or _dotted(loader, aliases) not in YAML_SAFE_LOADERS:
            return f"{name} without SafeLoader: use yaml.safe_load"
    elif name in ("eval", "exec", "builtins.eval", "builtins.exec"):
        return f"{name}(): runs arbitrary code"
    elif name in SHELL_CALLS:
        return f"{name}: runs a shell; use subprocess with an argument list"
    elif name.startswith("subprocess."):
        shell = _kw(call, "shell")
        if shell is not None and not _is_const(shell, False):
            return f"{name} with shell=True"
    return None


def parse(source: str, filename: str) -> ast.Module:
    """ast.parse, tried again on CPython 3.11's spurious "AST constructor recursion depth mismatch"
    SystemError (python/cpython#106905, seen here while the session's Ray threads run): the same
    source parses on the next try, and a real syntax error is still a SyntaxError."""
    for _ in range(2):
        try:
            return ast.parse(source, filename)
        except SystemError:
            pass
    return ast.parse(source, filename)


def unsafe_uses(source: str, filename: str = "<src>") -> list[tuple[int, str]]:
    """(line, problem) for every unsafe load / eval / shell in `source`."""
    tree = parse(source, filename)
    aliases = _aliases(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (name := _dotted(node.func, aliases)):
            if why := _call_problem(name, node, aliases):
                found.append((node.lineno, why))
        elif isinstance(node, (ast.Attribute, ast.Name)) and isinstance(node.ctx, ast.Load):
            if (name := _dotted(node, aliases)) in YAML_UNSAFE_LOADERS:
                found.append((node.lineno, f"{name}: only yaml.SafeLoader / CSafeLoader construct no objects"))
    return sorted(set(found))


def product_files() -> list[Path]:
    return sorted(p for d in PRODUCT_DIRS for p in (ROOT / d).rglob("*.py"))


def test_no_unsafe_loads_eval_or_shell_in_product_code() -> None:
    files = product_files()
    assert len(files) > 50, "the scan found too few files; is ROOT right?"
    problems = [f"{p.relative_to(ROOT)}:{line}: {why}"
                for p in files for line, why in unsafe_uses(p.read_text(encoding="utf-8"), str(p))]
    assert not problems, "unsafe calls:\n" + "\n".join(problems)


BAD_SNIPPET = """\
import pickle, dill, yaml, subprocess, os
import numpy as np
import torch as T
from cloudpickle import loads as cl
from yaml import FullLoader
from torch import load
T.load("a.pt")
T.load("a.pt", weights_only=False)
load("a.pt", map_location="cpu")
pickle.load(f)
dill.loads(b)
cl(b)
np.load("x.npy", allow_pickle=True)
yaml.load(text)
yaml.load(text, Loader=FullLoader)
yaml.unsafe_load(text)
x = yaml.Loader
eval("1")
exec("x = 1")
subprocess.run("ls", shell=True)
os.system("ls")
"""
GOOD_SNIPPET = """\
import yaml, subprocess, numpy as np, torch
from safetensors.torch import load_file
torch.load("a.pt", map_location="cpu", weights_only=True)
np.load("x.npy")
np.load("x.npy", allow_pickle=False)
yaml.safe_load(text)
yaml.safe_load_all(text)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.load(text, Loader=yaml.CSafeLoader)
subprocess.run(["ls"], check=True)
subprocess.run(["ls"], shell=False)
model.eval()
load_file("m.safetensors")
"""


def test_the_scan_flags_every_unsafe_pattern_and_nothing_safe() -> None:
    bad = unsafe_uses(BAD_SNIPPET)
    assert sorted({line for line, _ in bad}) == list(range(7, 22)), bad
    assert unsafe_uses(GOOD_SNIPPET) == []


class _RunsCode:
    """Unpickling this creates `marker` (open(marker, 'w')): a stand-in for any code in a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _evil_pt(path: Path, marker: Path) -> Path:
    """A state_dict-shaped .pt file with the payload in place of one tensor."""
    torch.save({"features.0.weight": _RunsCode(marker), "features.0.bias": torch.zeros(64)}, path)
    return path


def test_the_payload_runs_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control: without weights_only the file really does run code (so the refusals below mean something)."""
    marker = tmp_path / "control-ran"
    torch.load(_evil_pt(tmp_path / "control.pt", marker), weights_only=False)
    assert marker.exists()


def _refuses(tmp_path: Path, load) -> None:
    """`load(path to an evil .pt)` raises one ShardError line naming the file, and no code ran."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "code-ran"
    path = _evil_pt(tmp_path / "weights.pt", marker)
    with pytest.raises(ShardError) as e:
        load(path)
    assert not marker.exists(), "the pickle's code ran"
    assert str(path) in str(e.value) and "weights_only" in str(e.value) and "\n" not in str(e.value)


def test_backbone_weights_files_are_loaded_weights_only(tmp_path: Path) -> None:
    from models.backbones import backbone_state, feature_net, load_torchvision_state

    _refuses(tmp_path / "a", lambda p: load_torchvision_state(p, "alexnet"))
    _refuses(tmp_path / "b", lambda p: backbone_state("alexnet", str(p)))        # stn_ranker, trip: model.weights
    _refuses(tmp_path / "c", lambda p: feature_net("resnet18", str(p)))          # coop_embed: model.weights


def test_external_latents_and_fid_weights_are_loaded_weights_only(tmp_path: Path) -> None:
    from models.latent_external import load_external
    from models.trip_eval import inception_fid

    attrs = tmp_path / "list_attr_celeba.txt"
    attrs.write_text("1\nSmiling\n000001.jpg 1\n")
    _refuses(tmp_path / "a", lambda p: load_external(p, attrs))                   # attrlab latent fit --latents
    pytest.importorskip("torchmetrics.image.fid")
    img = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    _refuses(tmp_path / "b", lambda p: inception_fid(str(p), img, img))           # trip: model.inception_weights


@pytest.fixture
def attrlab(capsys: pytest.CaptureFixture):
    def run(*argv: str) -> tuple[int, str]:
        code = main([str(a) for a in argv])
        return code, capsys.readouterr().err
    return run


def test_train_refuses_a_pickled_weights_file_before_training(tmp_path: Path, tiny_attrworld: Path, attrlab) -> None:
    marker = tmp_path / "code-ran"
    weights = _evil_pt(tmp_path / "alexnet.pt", marker)
    out = tmp_path / "run"
    code, err = attrlab("train", "stn_ranker", "--data", tiny_attrworld, "--out", out, "--local",
                        "--set", "model.backbone=alexnet", "--set", f"model.weights={weights}")
    assert code == 2 and not marker.exists()
    assert err.count("\n") == 1 and str(weights) in err and "weights_only" in err, err
    assert not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------- 2. paths
def _tree(root: Path, skip: Path) -> dict[str, tuple]:
    """Everything under root (links not followed) except `skip`: path -> what it is (files: size, mtime)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (("link", os.readlink(p)) if p.is_symlink() else ("dir",) if p.is_dir()
                                             else ("file", st.st_size, st.st_mtime_ns))
    return out


def _outside_image(tmp_path: Path, name: str) -> Path:
    from PIL import Image

    target = tmp_path / "outside" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (200, 10, 10)).save(target, format="PNG" if name.endswith(".png") else "JPEG")
    return target


def _generic(src: Path) -> Path:
    from tests.test_importers_metric import make_generic
    return make_generic(src)


def _sop(src: Path) -> Path:
    from tests.test_importers_metric import make_sop
    return make_sop(src)


def _cub(src: Path) -> Path:
    from tests.test_importers_metric import make_cub
    return make_cub(src)


def _celeba(src: Path) -> Path:
    from tests.test_importers_attr import celeba_replica
    return celeba_replica(src)


# importer -> (replica, list file naming the image, its entry, 1-based line, folder the entry is relative to)
IMPORTS = {
    "generic": (_generic, "labels.csv", "a.png", 2, ""),
    "sop": (_sop, "Ebay_train.txt", "bicycle_final/111085122871_1.JPG", 2, ""),
    "cub200": (_cub, "CUB_200_2011/images.txt", "001.Black_footed_Albatross/Black_footed_Albatross_0001_101.jpg", 1,
               "CUB_200_2011/images"),
    "celeba": (_celeba, "Eval/list_eval_partition.txt", "000001.jpg", 1, "Img/img_align_celeba"),
}


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("name", sorted(IMPORTS))
def test_import_refuses_paths_that_leave_src(tmp_path: Path, attrlab, name: str, attack: str) -> None:
    make, list_file, entry, line, base = IMPORTS[name]
    src, out = make(tmp_path / "src"), tmp_path / "out"
    target = _outside_image(tmp_path, "x" + Path(entry).suffix)
    listed = src / list_file
    if attack == "symlink":  # the listed name is unchanged; the file is a link out of --src
        (src / base / entry).unlink()
        (src / base / entry).symlink_to(target)
        bad = entry
    else:
        bad = str(target) if attack == "absolute" else "../" * 12 + str(target.relative_to(target.anchor))
        text = listed.read_text()
        assert text.count(entry) == 1
        listed.write_text(text.replace(entry, bad))
    before = _tree(tmp_path, skip=out)
    code, err = attrlab("shards", "import", name, "--src", src, "--out", out, "--workers", "1", "--no-progress")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("attrlab: error: ")
    assert f"{listed}:{line}" in err and repr(bad) in err and "escapes" in err, err
    assert _tree(tmp_path, skip=out) == before  # nothing written outside --out (nor anything changed)
    assert not out.exists() or not any(p.is_symlink() for p in out.rglob("*"))


@pytest.mark.parametrize("name, folder", [("lfwa", "lfw"), ("zap50k", "ut-zap50k-images-square"),
                                          ("lfw10", "LFW10/images")])
def test_import_refuses_an_image_folder_linked_out_of_src(tmp_path: Path, attrlab, name: str, folder: str) -> None:
    from tests.test_importers_attr import REPLICAS

    src = REPLICAS[name][0](tmp_path / "src")
    shutil.move(src / folder, tmp_path / "elsewhere")
    (src / folder).symlink_to(tmp_path / "elsewhere")
    code, err = attrlab("shards", "import", name, "--src", src, "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "image folder" in err and "escapes" in err, err
    assert not (tmp_path / "out").exists()


def test_every_imported_plan_is_checked_to_read_only_inside_src(tmp_path: Path) -> None:
    """plan_import's own guard, whatever an importer did: each spec's path, resolved, lies in --src."""
    from shards.importers import ImportOptions, check_inside_src, plan_import

    src = _generic(tmp_path / "src")
    plan = plan_import("generic", src, ImportOptions(val_fraction=0.0))
    spec = plan.splits["train"][0]
    Path(spec["path"]).unlink()
    Path(spec["path"]).symlink_to(_outside_image(tmp_path, "x.png"))  # swapped after planning
    with pytest.raises(ShardError, match=f"sample {spec['key']!r}: image .* outside --src"):
        check_inside_src(plan, src)


def test_safe_join_is_the_one_check() -> None:
    root = ROOT / "shards"
    assert safe_join(root, "importers/generic.py") == root / "importers" / "generic.py"
    assert safe_join(root, "importers/../plan.py") == root / "plan.py"  # '..' that stays inside is fine
    for rel, why in [("../README.md", "through '..'"), (str(root / "plan.py"), "an absolute path"),
                     ("a\0b", "NUL")]:
        with pytest.raises(ShardError, match="where.txt:3: image") as e:
            safe_join(root, rel, "where.txt:3: image")
        assert why in str(e.value) and repr(rel) in str(e.value)


def _meta(splits: tuple[str, ...] = ("train",)) -> DatasetMeta:
    return DatasetMeta(name="evil", attributes=(AttributeSpec("a", "binary"),), categories=(), splits=splits)


def _sample(spec: dict) -> Sample:
    from shards.plan import encode_image

    return Sample(key=spec["key"], image=encode_image(torch.zeros(4, 4, 3, dtype=torch.uint8).numpy()), ext="png",
                  split=spec["split"], attributes={"a": 1})


@pytest.mark.parametrize("key, extra_file, message", [
    ("../../escaped", None, "sample key '../../escaped'"),
    ("{tmp}/escaped", None, "sample key '{tmp}/escaped'"),
    ("ok", "../escaped.txt", "extra file '../escaped.txt'"),
    ("ok", "{tmp}/escaped.txt", "extra file '{tmp}/escaped.txt'"),
])
def test_writer_never_writes_outside_out(tmp_path: Path, key: str, extra_file: str | None, message: str) -> None:
    key, message = key.format(tmp=tmp_path), message.format(tmp=tmp_path)
    extra = {extra_file.format(tmp=tmp_path): b"x"} if extra_file else {}
    out = tmp_path / "deep" / "out"
    out.parent.mkdir()  # ../../escaped from out lands in tmp_path, which is watched
    plan = DatasetPlan(meta=_meta(), splits={"train": [{"key": key, "split": "train"}]}, load=_sample, extra_files=extra)
    before = _tree(tmp_path, skip=out)
    with pytest.raises(ShardError) as e:
        write_dataset(plan, out, shard_size=2, progress=False)
    assert message in str(e.value)
    assert _tree(tmp_path, skip=out) == before
    assert not any(p.is_symlink() or p.name.startswith("escaped") for p in out.rglob("*"))


def test_writer_refuses_a_split_name_that_is_a_path(tmp_path: Path) -> None:
    meta = _meta()
    object.__setattr__(meta, "splits", ("../../escaped",))  # DatasetMeta itself refuses it; the writer re-checks
    plan = DatasetPlan(meta=meta, splits={"../../escaped": []}, load=_sample)
    out = tmp_path / "deep" / "out"
    with pytest.raises(ShardError, match="split name '../../escaped'"):
        write_dataset(plan, out, progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


# ----------------------------------------------------------------------------- 3. YAML
def test_train_config_with_a_python_tag_is_refused_before_anything_runs(tmp_path: Path, tiny_attrworld: Path,
                                                                        attrlab) -> None:
    marker = tmp_path / "marker"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'schedule: !!python/object/apply:os.system ["touch {marker}"]\n')
    out = tmp_path / "run"
    code, err = attrlab("train", "stn_ranker", "--data", tiny_attrworld, "--out", out, "--config", cfg, "--local")
    assert code == 2 and not marker.exists()
    assert err.count("\n") == 1 and f"{cfg}:1" in err and "python/object/apply" in err, err
    assert not out.exists()
