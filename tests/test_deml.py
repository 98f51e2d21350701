"""deml (Chen & Deng 2019): losses against naive oracles, the OAM on a synthetic blob, the GRL,
embedding shapes over an (I, J) grid, metrics on hand-built arrays, and a Ray Train run."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.losses import (activation_decay, binomial_deviance_loss, grad_reverse, learner_contrastive_hinge,
                           nontrivial_term, pairwise_discrepancy)


# -- losses against naive loops --------------------------------------------------------------------

def test_binomial_deviance_matches_eq5_written_as_a_loop() -> None:
    torch.manual_seed(0)
    emb, lab = torch.randn(9, 5, dtype=torch.float64), torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1])
    alpha, beta, c = 2.0, 0.5, 35.0
    pos, neg = [], []
    for p, q in itertools.combinations(range(9), 2):
        d = float(emb[p] @ emb[q] / (emb[p].norm() * emb[q].norm()))
        s = int(lab[p] == lab[q])
        gamma = 1.0 if s else c
        (pos if s else neg).append(math.log(1 + math.exp(-(2 * s - 1) * alpha * (d - beta) * gamma)))
    want = sum(pos) / len(pos) + sum(neg) / len(neg)
    assert binomial_deviance_loss(emb, lab, alpha, beta, c).item() == pytest.approx(want, rel=1e-5)
    # a batch without positive pairs keeps only the negative term
    one_each = torch.arange(4)
    negs = [math.log(1 + math.exp(70 * (float(F.cosine_similarity(emb[p], emb[q], 0)) - 0.5)))
            for p, q in itertools.combinations(range(4), 2)]
    assert binomial_deviance_loss(emb[:4], one_each).item() == pytest.approx(sum(negs) / 6, rel=1e-5)


def test_activation_decay_and_nontrivial_term_match_eq6_literally() -> None:
    torch.manual_seed(1)
    f = torch.randn(7, 4, dtype=torch.float64)
    assert activation_decay(f).item() == pytest.approx(sum(float(r @ r) for r in f) / (2 * 7))
    w = torch.randn(3, 6, dtype=torch.float64)
    a = w @ w.T - torch.eye(3, dtype=torch.float64)
    assert nontrivial_term(w).item() == pytest.approx(float(torch.trace(a * a)))
    rows = F.normalize(w, dim=1)  # unit rows: the non-trivial solution costs nothing
    assert nontrivial_term(rows).item() == pytest.approx(0.0, abs=1e-12)


def test_gradient_reversal_flips_and_scales_the_gradient_only() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, -0.5 * torch.arange(3.0).expand(5, 3))


def test_pairwise_discrepancy_and_contrastive_hinge_match_loops() -> None:
    torch.manual_seed(2)
    outs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    want = sum(float((outs[j][b] - outs[k][b]).pow(2).sum()) for b in range(4) for j in range(3) for k in range(3)) / 4
    assert pairwise_discrepancy(outs).item() == pytest.approx(want, rel=1e-6)
    z = [F.normalize(o, dim=1) for o in outs]
    terms = [max(0.0, 1.5 - float((z[j][b] - z[k][b]).norm())) ** 2 / 2
             for b in range(4) for j, k in itertools.combinations(range(3), 2)]
    assert learner_contrastive_hinge(outs, margin=1.5).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


# -- object-attention module -----------------------------------------------------------------------

def _blob_map(h: int = 8, w: int = 8, rows: slice = slice(5, 7), cols: slice = slice(1, 3)) -> torch.Tensor:
    torch.manual_seed(3)
    u = torch.ones(1, 6, h, w) + 0.01 * torch.randn(1, 6, h, w)
    u[:, :, rows, cols] = torch.tensor([3.0, -2, 1, 4, 0, 2])[None, :, None, None]
    return u


def test_random_walk_collects_mass_on_the_salient_blob() -> None:
    from models.deml_attention import random_walk_map

    m = random_walk_map(_blob_map(), steps=10)[0]
    assert m.sum().item() == pytest.approx(1.0, abs=1e-5)
    blob = m[5:7, 1:3]
    rest = (m.sum() - blob.sum()) / (64 - 4)
    assert blob.min() > 5 * rest  # each blob node holds 5x the mass of an average background node
    assert m.argmax().item() in {5 * 8 + 1, 5 * 8 + 2, 6 * 8 + 1, 6 * 8 + 2}


def test_oam_box_surrounds_the_blob_and_crop_zooms_it() -> None:
    from models.deml_attention import attention_map, crop_and_zoom, crop_boxes

    att = attention_map([_blob_map()], (64, 64))
    x0, y0, x1, y1 = crop_boxes(att, min_frac=0.1)[0].tolist()
    # the blob covers pixels x 8..24, y 40..56 of the 64 px input
    assert x0 <= 10 and x1 >= 22 and y0 <= 42 and y1 >= 54, (x0, y0, x1, y1)
    assert (x1 - x0) == pytest.approx(y1 - y0) and x1 - x0 < 40  # square and not the whole image
    # crop & zoom: a horizontal ramp cropped to its right half spans the right half's values
    ramp = torch.arange(64.0).expand(1, 3, 64, 64).contiguous()
    out = crop_and_zoom(ramp, torch.tensor([[32.0, 0.0, 64.0, 64.0]]))
    assert out.shape == (1, 3, 64, 64)
    assert out[0, 0, 10, 0].item() == pytest.approx(32.0, abs=0.6) and out[0, 0, 10, -1].item() == pytest.approx(63, abs=0.6)
    # a flat map gives the whole image
    assert crop_boxes(torch.zeros(1, 16, 16))[0].tolist() == [0.0, 0.0, 16.0, 16.0]
    # min_frac >= 1 (the no-zoom ablation) gives the whole image even for the blob
    assert crop_boxes(att, min_frac=1.0)[0].tolist() == [0.0, 0.0, 64.0, 64.0]


# -- modules and shapes ----------------------------------------------------------------------------

@pytest.mark.parametrize("scales,learners,cam", [(1, 1, "none"), (1, 4, "se"), (2, 1, "se"), (2, 2, "spatial"),
                                                 (3, 3, "se")])
def test_embedding_shapes_over_an_i_by_j_grid(scales: int, learners: int, cam: str) -> None:
    from models.deml import Deml, DemlConfig

    cfg = DemlConfig(scales=scales, learners=learners, dim=128, cam=cam)
    torch.manual_seed(0)
    model = Deml(cfg, "category").eval()
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    dj = 128 // (scales * learners)  # floor when not divisible (3 x 3: 14 each, 126 in all)
    emb = model(images)
    assert emb.shape == (3, scales * learners * dj) and model.embedding_dim == emb.shape[1]
    for row in model.learner_slices():
        for s in row:
            assert torch.allclose(emb[:, s].norm(dim=1), torch.ones(3), atol=1e-5)  # each part L2-normalised
    outs = model(images, train=True)
    assert len(outs) == scales and all(len(o.embs) == learners and o.embs[0].shape == (3, dj) for o in outs)
    if scales > 1:  # later scales see a zoomed crop of the same size
        assert outs[1].inputs.shape == outs[0].inputs.shape and not torch.equal(outs[1].inputs, outs[0].inputs)


def test_adversary_is_sign_invariant_with_orthonormal_rows() -> None:
    from models.deml_attention import Adversary, ChannelAttention

    adv = Adversary(8, 4)
    w = adv.net.weight
    assert torch.allclose(w @ w.T, torch.eye(4), atol=1e-5)
    z = torch.randn(5, 8)
    assert torch.allclose(adv(z), adv(-z))  # negated learners do not escape it
    cam = ChannelAttention(6, hidden=4)
    u = torch.randn(2, 6, 5, 5)
    cap, weights = cam(u)
    assert weights.shape == (2, 6) and bool(((weights > 0) & (weights < 1)).all())
    assert torch.allclose(cap, u * weights[:, :, None, None])


def test_config_and_label_errors_name_the_key() -> None:
    from models.deml import DemlConfig, label_field
    from shards.format import DatasetMeta, ShardError

    with pytest.raises(ValueError, match="model.cam 'none'"):
        DemlConfig(cam="none", learners=2)
    with pytest.raises(ValueError, match="model.dim"):
        DemlConfig(dim=3, scales=2, learners=2)
    with pytest.raises(ValueError, match="model.oam_min_frac"):
        DemlConfig(oam_min_frac=-0.5)
    meta = DatasetMeta(name="x", attributes=(), categories=(), splits=("test",), extra={"retrieval_label": "instance"})
    assert label_field(DemlConfig(), meta) == "instance"
    assert label_field(DemlConfig(label="category"), meta) == "category"
    with pytest.raises(ShardError, match="model.label"):
        label_field(DemlConfig(), DatasetMeta(name="y", attributes=(), categories=(), splits=("test",), extra={"retrieval_label": "pose"}))


def test_retrieval_metrics_on_hand_built_embeddings() -> None:
    from models.deml import Deml, DemlConfig, retrieval_metrics

    m = Deml(DemlConfig(scales=1, learners=2, dim=4), "category")  # two 2-d learners
    e = np.array([[1, 0, 0, 1], [1, 0, 0, 1], [0, 1, 0.6, 0.8], [0, 1, -0.6, 0.8]], np.float32)
    # learner 1 separates the classes; learner 2 puts images 2 and 3 nearer class 0 than each other
    out = retrieval_metrics(m, {"emb": e, "category": np.array([0, 0, 1, 1])}, None, (1, 2))
    assert out["r@1"] == 1.0 and out["ca1.1_r@1"] == 1.0 and out["ca1.2_r@1"] == 0.5
    # per image cosine between the learners: 0, 0, 0.8, 0.8
    assert out["sim"] == pytest.approx(0.4) and out["sim_std"] == pytest.approx(np.std([0, 0, .8, .8], ddof=1), rel=1e-5)


def test_googlenet_split_from_a_local_state_dict(tmp_path: Path) -> None:
    import torchvision

    from models.backbones import split_net
    from shards.format import ShardError

    ref = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()
    path = tmp_path / "googlenet.pt"
    torch.save(ref, path)  # saved with the auxiliary heads: they are ignored
    fnet, gnet, fch, gch = split_net("googlenet", str(path))
    assert torch.equal(fnet[0].conv.weight, ref["conv1.conv.weight"]) and (fch, gch) == (480, 1024)
    taps = gnet(fnet(torch.randn(1, 3, 64, 64)))
    assert [t.shape[1] for t in taps] == [832, 1024]
    torch.save({"conv1.conv.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ShardError, match="not a torchvision GoogLeNet"):
        split_net("googlenet", str(tmp_path / "bad.pt"))


# -- end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shards.datasets import BuildOptions, plan_embedded
    from shards.writer import write_dataset

    out = tmp_path_factory.mktemp("data") / "cluttered_digits"
    plan = plan_embedded("cluttered_digits", BuildOptions(seed=0, size=40, count=400, options={"clutter": "2"}))
    write_dataset(plan, out, shard_size=100, workers=1, progress=False)
    return out


@pytest.mark.slow
def test_ray_train_run_improves_zero_shot_recall_over_its_untrained_start(ray_session: object, tiny_digits: Path,
                                                                          tmp_path: Path) -> None:
    """2 Ray Train workers + DeepSpeed, DeML(2, 2) with the adversary, 120 steps: leave-one-out R@1
    over the training images rises well above the same network at its initial weights (the
    zero-shot gain needs a longer budget: bench/deml_ablation.py)."""
    from jobs.checkpoints import latest_export
    from jobs.cli import main
    from jobs.evaluate import load_export
    from jobs.train import EvalData

    run = tmp_path / "run"
    sets = ["data.augment.resize=40", "data.augment.size=40", "data.loader.num_workers=0", "eval.every_steps=120",
            "checkpoint.every_steps=120", "data.loader.images_per_class=4", "schedule.warmup_steps=0",
            "scaling.cpus_per_worker=0.5", "model.curve_images=100", "model.dim=32", "data.val_split=train"]
    assert main(["train", "deml", "--data", str(tiny_digits), "--out", str(run), "--workers", "2",
                 "--max-steps", "120", *[x for s in sets for x in ("--set", s)]]) == 0
    method, cfg, model, meta = load_export(latest_export(run))
    assert list((run / "snapshots").glob("*.npz")), "Fig. 5 curve snapshots are recorded"

    def metrics(m: torch.nn.Module) -> dict[str, float]:
        return method.evaluate(m, EvalData(cfg, str(tiny_digits), "train", method="deml", meta=meta), cfg.model, meta)

    torch.manual_seed(cfg.seed)  # rank 0's initial weights (jobs/train.py seeds seed + rank)
    start = metrics(method.build(cfg.model, meta).eval())
    end = metrics(model)
    assert end["r@1"] > start["r@1"] + 0.1, (start["r@1"], end["r@1"])
    assert {"r@1", "r@2", "r@4", "r@8", "oa1_r@1", "oa2_r@1", "sim"} <= set(end)


def test_report_figures_draw_oam_cam_and_curves(tiny_digits: Path, tmp_path: Path) -> None:
    from jobs.cli_train import resolve_config_class
    from jobs.config import build
    from jobs.train import EvalData
    from models import registry
    from shards.format import read_meta

    method = registry.get("deml")
    cfg = build(resolve_config_class("deml"), {"data": {"augment": {"resize": 40, "size": 40},
                                                         "loader": {"num_workers": 0, "batch_size": 8}}})
    meta = read_meta(tiny_digits)
    model = method.build(cfg.model, meta)
    snaps = tmp_path / "run" / "snapshots"
    snaps.mkdir(parents=True)
    for step, (tr, te) in ((10, (0.3, 0.2)), (20, (0.6, 0.3))):
        np.savez(snaps / f"step_{step:07d}.npz", **{"train_r@1": np.float32(tr), "test_r@1": np.float32(te)})
    out = tmp_path / "report"
    out.mkdir()
    made = method.figures(model, EvalData(cfg, str(tiny_digits), "test", method="deml", meta=meta), cfg.model, meta,
                          tmp_path / "run", out)
    names = [n for _, n in made]
    assert names == ["deml_oam.png", "deml_cam.png", "deml_curves.png"]
    assert all((out / n).stat().st_size > 1000 for n in names)
    assert model.training  # eval mode only while drawing


@pytest.mark.parametrize("diversity,adversary", [("adversary", "orthogonal"), ("adversary", "mlp"), ("hinge", "orthogonal")])
def test_diversity_game_adversary_descends_learners_ascend(diversity: str, adversary: str) -> None:
    """Eq. 4 through the GRL: a small step along -grad lowers L_adv for the adversary's own
    parameters and raises it for the learners' (the max-min game in one backward pass); the
    hinge variant is minimised by the learners directly."""
    from models.deml import Deml, DemlConfig, deml_loss

    torch.manual_seed(0)
    cfg = DemlConfig(scales=1, learners=3, dim=24, diversity=diversity, adversary=adversary)
    m = Deml(cfg, "category")
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])

    def div_term() -> torch.Tensor:
        terms: dict[str, torch.Tensor] = {}
        deml_loss(m, m(images, train=True), labels, cfg, terms)
        return terms[diversity]

    m.eval()  # fixed BatchNorm statistics: only the parameters move between evaluations
    before = div_term()
    m.zero_grad()
    before.backward()
    learners = list(m.scales[0].learners.parameters())
    adv = [] if m.scales[0].adversary is None else list(m.scales[0].adversary.parameters())
    with torch.no_grad():
        for p in learners + adv:
            p.data.add_(p.grad, alpha=-1e-3)  # what the optimiser does with the (reversed) gradients
    if diversity == "hinge":
        assert div_term().item() < before.item()
        return
    with torch.no_grad():  # undo the adversary's step: the learners alone raise L_adv
        for p in adv:
            p.data.add_(p.grad, alpha=1e-3)
    assert div_term().item() > before.item()
    with torch.no_grad():  # undo the learners', take the adversary's: it lowers L_adv
        for p in learners:
            p.data.add_(p.grad, alpha=1e-3)
        for p in adv:
            p.data.add_(p.grad, alpha=-1e-3)
    assert div_term().item() < before.item()
