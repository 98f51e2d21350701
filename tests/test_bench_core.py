"""bench/core.py: rows are checked, BENCHMARKS.md merges by figure id and keeps what a run did not
re-measure (the last GPU figures survive a CPU-only run)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bench.core import read_rows, row, write_markdown
from jobs.cli import main


def test_row_ratio_defaults_to_ours_over_baseline_and_checks_its_shape() -> None:
    r = row("serve/batching_c32_rank", "batched vs unbatched", 30.0, "req/s", baseline=20.0, goal=">= 3x", met=False)
    assert r.ratio == pytest.approx(1.5) and r.group == "serve" and r.machine and r.measured
    r.check()
    with pytest.raises(ValueError, match="a goal needs a verdict"):
        dataclasses.replace(r, met=None).check()
    with pytest.raises(ValueError, match="not a finite number"):
        dataclasses.replace(r, ours=float("nan")).check()
    with pytest.raises(ValueError, match="must start with its group"):
        dataclasses.replace(r, group="train").check()


def test_markdown_merges_by_id_and_keeps_rows_a_run_did_not_measure(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    gpu = row("gpu/mfu_resnet50", "MFU", 41.0, "%", goal=">= 35%", met=True)
    old = row("train/ray_overhead", "TorchTrainer vs in-process", 90.0, "samples/s", baseline=100.0,
              goal=">= 0.95", met=False, note="worker start-up")
    write_markdown([gpu, old], md)
    new = dataclasses.replace(old, ours=97.0, ratio=0.97, met=True, note="")
    rows = write_markdown([new], md)
    assert {r.id: r for r in rows} == {"gpu/mfu_resnet50": gpu, "train/ray_overhead": new}
    assert read_rows(md) == rows
    text = md.read_text()
    assert "| train/ray_overhead |" in text and "| gpu/mfu_resnet50 |" in text
    assert "2 goals met, 0 not met" in text and "Goals not met" not in text
    write_markdown([dataclasses.replace(new, met=False, note="bound by 2 cores")], md)
    assert "- **train/ray_overhead**: bound by 2 cores" in md.read_text()
    # hand-written notes after the rows survive a re-run; a "|" in a cell is escaped, not lost
    md.write_text(md.read_text() + "\n## Profiles\npy-spy says: decode\n")
    write_markdown([dataclasses.replace(new, note="d = ||r_q - r||^2")], md)
    text = md.read_text()
    assert text.endswith("\n## Profiles\npy-spy says: decode\n") and text.count("## Profiles") == 1
    assert "d = \\|\\|r_q - r\\|\\|^2" in text
    assert {r.id: r for r in read_rows(md)}["train/ray_overhead"].note == "d = ||r_q - r||^2"


def test_bench_cli_refuses_an_unknown_group(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_every_group_module_exists_with_run() -> None:
    import importlib

    from bench.cli import GROUPS

    for name, target in GROUPS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_category_probe_rows_are_well_formed_and_it_fits_its_train_images() -> None:
    from bench.dataset_baselines import category_probe
    from shards.datasets import BuildOptions, plan_embedded

    plan = plan_embedded("attrworld", BuildOptions(seed=0, size=32, count=90, options={}))
    load = {split: [plan.load(s) for s in specs] for split, specs in plan.splits.items()}
    rows = category_probe(load["train"], load["query"] + load["gallery"], steps=40, batch=16, seed=0, lr=3e-3,
                          every=20)
    assert [r[0] for r in rows] == [20, 40]
    assert all(0.0 <= acc <= 1.0 for _, tr, un in rows for acc in (tr, un))
    assert rows[-1][1] >= 0.5  # 8 categories: chance is 0.125; 40 steps memorise a few dozen images


def test_coop_ablation_cells_show_one_seed_as_is_and_several_as_mean_and_range() -> None:
    from bench.coop_ablation import cell

    assert cell([0.3416]) == "34.16"
    assert cell([0.3, 0.45, None]) == "37.5 [30.0, 45.0]"  # a missing metric is left out, not counted as 0
    assert cell([None]) == "-"


def test_crop_study_crops_track_the_box_or_stay_at_the_fixed_centre() -> None:
    import io
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from bench.dataset_baselines import square_crops

    img = np.zeros((64, 64, 3), np.uint8)
    img[20:24, 40:44] = 255  # a 4 px white square, its box centre at (42/64, 22/64)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    sample = SimpleNamespace(image=buf.getvalue(), boxes={"mark": (40 / 64, 20 / 64, 44 / 64, 24 / 64)})
    tracking = square_crops([sample], "mark", 0.25, 32, None)[0]  # 16 px each side of the centre, 1:1 scale
    assert tracking.shape == (32, 32, 3)
    bright = np.argwhere(tracking[..., 0] > 128)
    assert bright.min(0).tolist() == [14, 14] and bright.max(0).tolist() == [17, 17]
    off = square_crops([sample], "mark", 0.25, 32, None, np.array([[4 / 64, -2 / 64]]))[0]  # centre 4 px right, 2 up
    moved = np.argwhere(off[..., 0] > 128)  # (row, col): the square 2 px lower and 4 px further left
    assert moved.min(0).tolist() == [16, 10] and moved.max(0).tolist() == [19, 13]
    fixed = square_crops([sample], "mark", 0.25, 32, (0.25, 0.25))[0]  # x in [0, 32) px: misses the square
    assert fixed.max() == 0
    corner = square_crops([sample], "mark", 0.25, 32, (0.0, 0.0))[0]  # three quarters outside the image
    assert corner.max() == 0 and corner.shape == (32, 32, 3)


def test_deml_crop_study_box_view_zooms_the_true_box_and_box_stats_match_hand_computed() -> None:
    import numpy as np
    import torch

    from bench.deml_crop_study import box_stats, box_view

    x = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    x[0, :, 16:32, 32:48] = 255  # a 16 px white square: box (0.5, 0.25, 0.75, 0.5)
    box = torch.tensor([[0.5, 0.25, 0.75, 0.5]])
    rng = np.random.default_rng(0)
    full = box_view(x, box, 1.0, 0.0, rng)[0, 0]  # side 1.0 x the box: the square fills the view
    assert full.shape == (64, 64) and full[2:-2, 2:-2].min() == 255
    half = box_view(x, box, 2.0, 0.0, rng)[0, 0]  # side 2 x the box: the square is the central 32 px
    bright = torch.nonzero(half > 128)
    assert bright.min(0).values.tolist() == [16, 16] and bright.max(0).values.tolist() == [47, 47]
    assert half[:12].max() == 0 and half[52:].max() == 0
    moved = box_view(x, box, 2.0, 0.25, np.random.default_rng(1))[0, 0]  # the centre moved: not the same view
    assert not torch.equal(moved, half)

    true = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 0.75]])
    pred = torch.tensor([[0.1, 0.0, 0.6, 0.5], [0.0, 0.0, 0.5, 0.5]])  # 1st: centre 0.1 right; 2nd: misses
    s = box_stats(pred, true)
    assert s["centre_inside"] == 0.5
    assert abs(s["centre_err_x"] - (0.1 + 0.5) / 2) < 1e-6 and abs(s["centre_err_y"] - (0.0 + 0.375) / 2) < 1e-6
    assert abs(s["side_ratio"] - 1.0) < 1e-6  # both predicted sides 0.5 vs longer true sides 0.5
    assert abs(s["true_centre_spread_x"] - 0.25) < 1e-6 and abs(s["true_centre_spread_y"] - 0.1875) < 1e-6


def test_deml_split_tensors_reads_every_image_with_its_category_and_first_box(tiny_attrworld) -> None:
    import numpy as np

    from bench.deml_ablation import split_tensors
    from shards.format import read_meta

    meta = read_meta(tiny_attrworld)
    x, cats, boxes = split_tensors(tiny_attrworld, "train")
    assert x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32)  # the shards' own size
    assert len(cats) == len(x) == meta.extra["split_counts"]["train"]
    assert set(cats.tolist()) <= set(range(8)) and len(set(cats.tolist())) > 1
    assert meta.attributes[0].name == "smile" and boxes is not None  # every face has a mouth box
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    assert boxes.shape == (len(x), 4) and (boxes[:, 2] > boxes[:, 0]).all() and cy.mean() > 0.55  # mostly low in the face
    small, _, _ = split_tensors(tiny_attrworld, "train", size=16)
    assert small.shape[1:] == (3, 16, 16)
