"""coop_embed paper figures (models/coop_embed_figures.py): helpers on hand-built cases, and the
three PNGs from an untrained model on the tiny attrworld shards (real loaders) or fake loaders."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import coop_embed_figures as F

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- helpers ---------------------------------------------------------------------------------------

def test_match_colour_hit_miss_and_unlabelled() -> None:
    assert F.match_colour("id1", "id1") == F.GREEN
    assert F.match_colour("id1", "id2") == F.RED
    assert F.match_colour("", "") == F.GREY  # no instance label: neither hit nor miss
    assert F.match_colour("", "id2") == F.GREY


def test_nearest_ranks_and_leaves_the_query_out() -> None:
    gallery = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    query = np.array([[0.0, 0.0], [1.0, 0.1]])
    assert F.nearest(query, gallery, 3).tolist() == [[0, 1, 3], [1, 3, 0]]  # tie 1 / 3: lower id first
    # leave-one-out: query i is gallery item self_ids[i] and must not retrieve itself
    assert F.nearest(gallery[[0, 1]], gallery, 2, self_ids=np.array([0, 1])).tolist() == [[1, 3], [3, 0]]


def test_endpoints_farthest_centres_and_nearest_images() -> None:
    # groups on a line: A around 0, B around 1, C around 10; -1 = no label (ignored)
    emb = np.array([[-0.2], [0.0], [0.3], [0.8], [1.0], [1.1], [9.0], [10.0], [10.2], [5.0]])
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, -1])
    # centres A=0.033, B=0.967, C=9.733 -> pairs (A, C), (B, C), (A, B); nearest images 1, 4, 7
    assert F.endpoints(emb, labels, n_pairs=3) == [(1, 7), (4, 7), (1, 4)]
    assert F.endpoints(emb, labels, n_pairs=1) == [(1, 7)]
    assert F.endpoints(emb, np.array([0] * 9 + [-1]), n_pairs=2) == []  # a single group


def test_thin_path_keeps_marked_positions_within_cap() -> None:
    assert F.thin_path(5, (0, 2, 3, 4), cap=12) == [0, 1, 2, 3, 4]
    pos = F.thin_path(30, (0, 16, 17, 29), cap=12)
    assert len(pos) <= 12 and pos == sorted(set(pos))
    assert {0, 16, 17, 29} <= set(pos)


def test_framed_draws_a_border_of_the_colour() -> None:
    img = np.full((4, 6, 3), 7, np.uint8)
    out = F.framed(img, "red", size=6, width=2)
    assert out.shape == (10, 10, 3)
    assert (out[0, :] == [255, 0, 0]).all() and (out[:, -1] == [255, 0, 0]).all()
    assert (out[3:7, 2:8] == 7).all()  # the image, centred vertically on a white square
    assert (out[2, 2:8] == 255).all()
    assert (F.framed(img, None, 6, 2)[0, 0] == 255).all()  # no frame = white


# -- figures on real shards --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tiny_attrworld: Path) -> tuple[Any, Any, Any]:
    from jobs.cli_train import resolve_config_class
    from jobs.config import build as build_config
    from models.coop_embed import build, prepare_meta
    from shards.format import read_meta

    run_cfg = build_config(resolve_config_class("coop_embed"), {"data": {
        "augment": {"resize": 32, "size": 28}, "loader": {"num_workers": 0, "batch_size": 16}}})
    meta = prepare_meta(read_meta(tiny_attrworld), tiny_attrworld, "train")
    torch.manual_seed(0)
    return run_cfg, meta, build(run_cfg.model, meta)


def _run(setup: tuple[Any, Any, Any], root: Path, split: str, out: Path, **model_cfg: Any) -> list[tuple[str, str]]:
    from jobs.train import EvalData

    run_cfg, meta, model = setup
    cfg = dataclasses.replace(run_cfg.model, **model_cfg)
    return F.figures(model, EvalData(run_cfg, str(root), split), cfg, meta, out, out)


def _read_png(path: Path) -> np.ndarray:
    import matplotlib.pyplot as plt

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = plt.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    return (img[..., :3] * 255).round().astype(np.uint8)


def _has_colour(img: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((np.abs(img.astype(int) - rgb).max(-1) <= 10).sum() > 20)


def test_figures_on_the_gallery_with_query_split(setup: Any, tiny_attrworld: Path, tmp_path: Path) -> None:
    made = _run(setup, tiny_attrworld, "gallery", tmp_path, query_split="query", gallery_split="gallery")
    assert [c.split(" ")[1] for c, _ in made] == ["3", "4", "5"]
    assert "split 'query'" in made[0][0] and "leave-one-out" not in made[0][0]
    # this gallery holds one category: Fig. 4 keeps the attribute row, with a note; Fig. 5 one row
    assert "fewer than two categories" in made[1][0] and "only one category" in made[2][0]
    fig3, fig4, fig5 = (_read_png(tmp_path / name) for _, name in made)
    assert fig3.shape[0] < 1.2 * fig3.shape[1]  # 4 query rows x 5 columns: about square
    assert fig5.shape[1] > 4 * fig5.shape[0]  # 1 row of 11 columns
    assert _has_colour(fig5, (50, 205, 50)) and _has_colour(fig5, (255, 0, 0))  # typical / atypical
    assert _has_colour(fig4, (255, 0, 0))  # the largest step


def test_figures_fall_back_to_leave_one_out(setup: Any, tiny_attrworld: Path, tmp_path: Path) -> None:
    made = _run(setup, tiny_attrworld, "gallery", tmp_path, query_split="no_such_split", gallery_split="gallery")
    assert "leave-one-out within 'gallery'" in made[0][0] and "no split 'no_such_split'" in made[0][0]
    fig3 = _read_png(tmp_path / made[0][1])
    assert fig3.shape[0] > 1.2 * fig3.shape[1]  # 6 query rows x 5 columns
    assert _has_colour(fig3, (50, 205, 50))  # each instance has 5 more images: some hits


def test_figures_on_a_split_with_several_categories(setup: Any, tiny_attrworld: Path, tmp_path: Path) -> None:
    made = _run(setup, tiny_attrworld, "train", tmp_path)  # not the gallery split: leave-one-out
    assert "leave-one-out within 'train'" in made[0][0]
    notes = ("fewer than", "unreachable", "only one category")
    assert not any(n in c for n in notes for c, _ in made[1:])  # 2 category rows + 1 attribute row
    fig4, fig5 = _read_png(tmp_path / made[1][1]), _read_png(tmp_path / made[2][1])
    assert fig4.shape[0] > 3.5 * 90  # 3 rows of 1.2 in at 90 dpi
    assert 2.5 * fig5.shape[0] < fig5.shape[1] < 3.5 * fig5.shape[0]  # 3 rows x 11 columns


def test_unknown_attribute_is_a_clear_error(setup: Any, tiny_attrworld: Path, tmp_path: Path) -> None:
    from jobs.train import EvalData

    run_cfg, meta, model = setup
    with pytest.raises(ValueError, match="'nope' is not one of the model's attributes"):
        F.figures(model, EvalData(run_cfg, str(tiny_attrworld), "gallery"), run_cfg.model, meta, tmp_path,
                  tmp_path, attribute="nope")


# -- degenerate data: notes, never an exception --------------------------------------------------------

class FakeLoaders:
    """Stands in for jobs.train.EvalData: one batch for '__eval__', no other split."""

    def __init__(self, n: int, n_attrs: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.split = "gallery"
        self.batch = {"image": torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                      "attributes": torch.full((n, n_attrs), float("nan")), "category": torch.full((n,), -1),
                      "instance": [""] * n, "key": [f"k{i}" for i in range(n)]}

    def __call__(self, which: str = "__eval__", kind: str = "samples", full_image: bool = False) -> list[dict]:
        from shards.format import ShardError

        if which != "__eval__":
            raise ShardError(f"no split {which!r}")
        return [self.batch]


@pytest.mark.parametrize("n", [1, 2])
def test_figures_with_tiny_unlabelled_data_give_notes(setup: Any, tmp_path: Path, n: int) -> None:
    run_cfg, meta, model = setup
    made = F.figures(model, FakeLoaders(n, len(meta.attribute_names)), run_cfg.model, meta, tmp_path, tmp_path)
    assert len(made) == 3 and all((tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE for _, name in made)
    assert "no split 'query'" in made[0][0]
    if n == 2:  # one query, one neighbour, no instance labels
        assert "no instance labels" in made[0][0]
        assert _has_colour(_read_png(tmp_path / made[0][1]), (153, 153, 153))  # grey frame
    note = _read_png(tmp_path / made[2][1])  # Fig. 5: no category -> a 6 x 1.2 in note
    assert note.shape[:2] == (108, 540)
