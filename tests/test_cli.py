"""`attrlab shards ...`: one-line errors on bad input, validate finds damage, build/info/demo work."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from shards.writer import write_dataset
from tests import toy


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "toy"
    write_dataset(toy.plan(), out, shard_size=5, progress=False)
    return out


@pytest.mark.parametrize("argv, message", [
    (["shards", "build", "nope", "--out", "{tmp}/x"], "unknown embedded dataset 'nope'"),
    (["shards", "build", "attrworld", "--out", "{tmp}/x", "--opt", "clutter"], "--opt 'clutter': expected KEY=VALUE"),
    (["shards", "build", "attrworld", "--out", "{tmp}/x", "--opt", "sparkle=3"], "--opt sparkle: not an option of attrworld"),
    (["shards", "build", "attrworld", "--out", "{tmp}/x", "--size", "7"], "--size"),
    (["shards", "build", "lfw_subset", "--out", "{tmp}/x", "--shard-size", "0"], "--shard-size 0: must be >= 1"),
    (["shards", "import", "cub200", "--src", "{tmp}/absent", "--out", "{tmp}/x"], "--src"),
    (["shards", "import", "imagenet", "--src", "{tmp}", "--out", "{tmp}/x"], "unknown dataset 'imagenet'"),
    (["shards", "import", "generic", "--src", "{tmp}", "--out", "{tmp}/inside"], "must not lie inside --src"),
    (["shards", "import", "generic", "--src", "{tmp}", "--out", "{tmp}/../o", "--val-fraction", "1.5"], "--val-fraction 1.5"),
    (["shards", "build", "lfw_subset", "--out", "{tmp}/x", "--workers", "-2"], "--workers -2: must be >= 1"),
    (["shards", "import", "generic", "--src", "{tmp}", "--out", "{tmp}/../o", "--resize", "-4"], "--resize -4: the longest side"),
    (["shards", "validate", "{tmp}"], "meta.json: missing"),
    (["shards", "info", "{tmp}"], "meta.json: missing"),
])
def test_bad_input_is_one_line_naming_the_problem(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                  argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert message in err and err.startswith("attrlab: error: ")
    assert len(err.strip().splitlines()) == 1  # no traceback


def test_validate_passes_a_good_set_and_names_each_bad_shard_and_key(capsys: pytest.CaptureFixture, good: Path,
                                                                     tmp_path: Path) -> None:
    code, out, _ = run(capsys, "shards", "validate", str(good))
    assert code == 0 and "OK (train 24, test 10 samples)" in out
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    # 1) an image overwritten in place: tar intact, checksum and decode fail
    line = (bad / "index" / "train.tsv").read_text().splitlines()[3]
    key, shard, off, size, *_ = line.split("\t")
    with open(bad / shard, "r+b") as f:
        f.seek(int(off))
        f.write(b"\x00" * int(size))
    # 2) a truncated shard
    (bad / "test-000001.tar").write_bytes((bad / "test-000001.tar").read_bytes()[:1200])
    # 3) a pair naming an unknown key
    pairs = (bad / "pairs.tsv").read_text().splitlines()
    pairs[1] = "\t".join(["ghost"] + pairs[1].split("\t")[1:])
    (bad / "pairs.tsv").write_text("\n".join(pairs) + "\n")
    code, out, _ = run(capsys, "shards", "validate", str(bad))
    assert code == 1
    assert f"{shard}: sha256 differs" in out and f"key {key!r}: image does not decode" in out
    assert "test-000001.tar: truncated or unreadable" in out
    assert "pairs.tsv:2: key 'ghost' is not a sample of split 'train'" in out


def test_info_prints_the_summary(capsys: pytest.CaptureFixture, good: Path) -> None:
    code, out, _ = run(capsys, "shards", "info", str(good))
    assert code == 0
    assert re.search(r"train\s+24 images in 5 shards, 23 pairs in 5 shards", out)
    assert "bright(cont*)" in out


def test_console_script_is_installed_and_builds_a_real_dataset(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("attrlab")
    assert exe.exists(), "pip install -e . should install the attrlab console script"
    out = tmp_path / "lfw"
    res = subprocess.run([str(exe), "shards", "build", "lfw_subset", "--out", str(out), "--no-progress", "--workers", "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "lfw_subset" in res.stdout and "images in" in res.stdout
    res = subprocess.run([str(exe), "shards", "validate", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_import_generic_end_to_end_and_rerun_resumes(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "photos"
    (src / "img").mkdir(parents=True)
    rows = ["path,split,category,instance,smile"]
    for i in range(6):
        Image.new("RGB", (20, 16), (40 * i, 10, 200)).save(src / "img" / f"p{i}.jpg")
        rows.append(f"img/p{i}.jpg,{'train' if i < 4 else 'test'},{'cat' if i % 2 else 'dog'},id{i // 2},{i / 10}")
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    (src / "pairs.csv").write_text("path_i,path_j,attribute,relation\nimg/p3.jpg,img/p0.jpg,smile,more\n")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "shards", "import", "generic", "--src", str(src), "--out", str(out), "--no-progress")
    assert code == 0, err
    assert re.search(r"train\s+4 images in 1 shards, 1 pairs in 1 shards", stdout)
    assert run(capsys, "shards", "validate", str(out))[0] == 0
    before = (out / "train-000000.tar").stat().st_ino
    assert run(capsys, "shards", "import", "generic", "--src", str(src), "--out", str(out), "--no-progress")[0] == 0
    assert (out / "train-000000.tar").stat().st_ino == before  # verified shard skipped on re-run
    from shards.reader import iter_samples

    labels = {r["key"]: r["label"] for r in iter_samples(out, "test")}
    assert sorted(v["attributes"]["smile"] for v in labels.values()) == [0.4, 0.5]
    assert (src / "labels.csv").read_text().startswith("path,split")  # the source is untouched
    import shutil

    other = tmp_path / "copy" / "photos"  # the same importer, name and options, another folder: not a resume
    shutil.copytree(src, other)
    code, _, err = run(capsys, "shards", "import", "generic", "--src", str(other), "--out", str(out), "--no-progress")
    assert code == 2 and f"imported from {src.resolve()}" in err and "--overwrite" in err, err
    assert (out / "train-000000.tar").stat().st_ino == before
