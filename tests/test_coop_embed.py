"""coop_embed: each loss against a naive oracle, category proxies, masks, label coding and corruption."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.coop_embed import AttrInfo, CoopEmbedConfig, attribute_codes, corrupt_codes
from models.losses import (batch_all_triplet_loss, mean_rows, order_regulariser, proximity_matrix,
                           proxy_softmax_loss)


def test_proxy_softmax_loss_matches_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    emb, prox = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g)
    target = torch.tensor([0, 4, -1, 2, 2, -1])  # -1 = label missing: ignored
    cols = slice(2, 6)

    def naive(columns: slice | None) -> float:
        total, n = 0.0, 0
        for b in range(6):
            if target[b] < 0:
                continue
            e = emb[b] if columns is None else emb[b, columns]
            d = [float(((e - (prox[z] if columns is None else prox[z, columns])) ** 2).sum()) for z in range(5)]
            total += -(-d[target[b]] - math.log(sum(math.exp(-x) for x in d)))
            n += 1
        return total / n

    assert proxy_softmax_loss(emb, prox, target).item() == pytest.approx(naive(None), rel=1e-5)
    assert proxy_softmax_loss(emb, prox, target, cols).item() == pytest.approx(naive(cols), rel=1e-5)
    none = proxy_softmax_loss(emb, prox, torch.full((6,), -1))
    assert none.item() == 0.0


def test_order_regulariser_is_the_frobenius_distance_to_the_gaussian_prior() -> None:
    ranks = torch.arange(4)
    p = proximity_matrix(ranks, sigma=1.5)
    for v in range(4):
        for u in range(4):
            assert p[v, u].item() == pytest.approx(math.exp(-((v - u) ** 2) / (2 * 1.5 ** 2)), rel=1e-6)
    a = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    cos = [[float(torch.dot(a[i], a[j]) / (a[i].norm() * a[j].norm())) for j in range(4)] for i in range(4)]
    naive = math.sqrt(sum((cos[i][j] - p[i, j].item()) ** 2 for i in range(4) for j in range(4)))
    assert order_regulariser(a, ranks, 1.5).item() == pytest.approx(naive, rel=1e-5)
    # proxies whose cosine similarity falls with rank distance fit the prior better than shuffled ones
    ordered = torch.stack([torch.tensor([math.cos(t), math.sin(t)]) for t in (0.0, 0.5, 1.0, 1.5)])
    shuffled = ordered[[0, 3, 1, 2]]
    assert order_regulariser(ordered, ranks, 1.0) < order_regulariser(shuffled, ranks, 1.0)


def test_category_proxies_are_means_of_their_instance_proxies() -> None:
    p = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
    cat = torch.tensor([0, 2, 0, 2, 2, -1, 0])
    centres, present = mean_rows(p, cat, 4)
    assert present.tolist() == [True, False, True, False]
    assert torch.allclose(centres[0], p[[0, 2, 6]].mean(0))
    assert torch.allclose(centres[2], p[[1, 3, 4]].mean(0))
    assert torch.count_nonzero(centres[1]) == 0


def test_batch_all_triplet_loss_matches_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(7, 3, generator=g)
    lab = torch.tensor([0, 0, 1, 1, 2, 0, -1])
    margin = 0.5
    hinges = []
    for a in range(7):
        for p in range(7):
            for n in range(7):
                if a == p or min(lab[a], lab[p], lab[n]) < 0 or lab[a] != lab[p] or lab[a] == lab[n]:
                    continue
                h = float((emb[a] - emb[p]).norm() - (emb[a] - emb[n]).norm() + margin)
                if h > 0:
                    hinges.append(h)
    assert batch_all_triplet_loss(emb, lab, margin).item() == pytest.approx(sum(hinges) / len(hinges), rel=1e-5)
    assert batch_all_triplet_loss(emb, torch.tensor([0, 1, 2, 3, 4, 5, 6]), margin).item() == 0.0  # no positives


INFOS = [AttrInfo("smile", 0, "continuous", 5, True), AttrInfo("hat", 2, "binary", 2, False),
         AttrInfo("style", 1, "categorical", 4, False)]


def test_attribute_codes_bin_continuous_values_and_keep_missing() -> None:
    values = torch.tensor([[0.0, 3.0, 1.0], [0.199, 0.0, 0.0], [0.2, float("nan"), 1.0],
                           [1.0, 2.0, float("nan")], [float("nan"), 1.0, 0.0]])
    codes = attribute_codes(values, INFOS)
    assert codes.tolist() == [[0, 1, 3], [0, 0, 0], [1, 1, -1], [4, -1, 2], [-1, 0, 1]]


def test_corruption_is_per_instance_deterministic_and_at_the_requested_rate() -> None:
    n_inst = 400
    instances = [f"id{i:04d}" for i in range(n_inst) for _ in range(2)]  # two images per instance
    codes = torch.tensor([[2, 1, 3]] * len(instances))
    for mode in ("absence", "swap", "both"):
        out = corrupt_codes(codes, instances, INFOS, mode, 0.4, seed=7)
        again = corrupt_codes(codes, instances, INFOS, mode, 0.4, seed=7)
        assert torch.equal(out, again)
        assert torch.equal(out[0::2], out[1::2]), "both images of an instance are corrupted alike"
        changed = (out[0::2] != codes[0::2])
        assert changed.sum(1).max() <= 1, "one attribute value per instance"
        rate = changed.any(1).float().mean().item()
        assert 0.33 < rate < 0.47, rate
        if mode == "absence":
            assert set(out[changed.repeat_interleave(2, 0)].tolist()) == {-1}
        if mode == "swap":
            assert (out >= 0).all()
        if mode == "both":
            vals = out[0::2][changed]
            assert (vals == -1).any() and (vals >= 0).any()
    assert torch.equal(corrupt_codes(codes, instances, INFOS, "none", 0.0, 0), codes)


@pytest.fixture(scope="module")
def coop_meta(tiny_attrworld: Path):  # noqa: ANN201
    from models.coop_embed import prepare_meta
    from shards.format import read_meta

    return prepare_meta(read_meta(tiny_attrworld), tiny_attrworld, "train")


@pytest.mark.parametrize("head", ["cooperative", "csn", "mtl"])
def test_subspace_masks_are_disjoint_and_cover_the_embedding(head: str, coop_meta) -> None:  # noqa: ANN001
    from models.coop_embed import build

    m = build(CoopEmbedConfig(head=head, subspace_width=3), coop_meta)
    k = len(m.infos)
    owner = np.zeros(m.dim, int)
    for s in m.normalise_blocks():
        owner[np.arange(m.dim)[s]] += 1
    assert (owner == 1).all(), "every column in exactly one normalised block"
    if head != "mtl":
        assert m.dim == (k + (2 if head == "csn" else 0)) * 3
        cols = [set(np.arange(m.dim)[s].tolist()) for s in m.attribute_slices()]
        assert all(not (a & b) for i, a in enumerate(cols) for b in cols[i + 1:])
    if head == "cooperative":
        assert set().union(*cols) == set(range(m.dim))


def test_proxy_and_backbone_learning_rates_and_fixed_proxies(coop_meta) -> None:  # noqa: ANN001
    from models.coop_embed import build, optim_groups

    m = build(CoopEmbedConfig(), coop_meta)
    groups = {g.name: g for g in optim_groups(m, CoopEmbedConfig())["main"]}
    assert (groups["backbone"].lr_mult, groups["head"].lr_mult, groups["proxies"].lr_mult) == (0.1, 1.0, 10.0)
    assert any(p is m.instance_proxies for p in groups["proxies"].params)
    fixed_cfg = CoopEmbedConfig(learn_instance_proxies=False, learn_attribute_proxies=False)
    fixed = build(fixed_cfg, coop_meta)
    assert "proxies" not in {g.name for g in optim_groups(fixed, fixed_cfg)["main"]}
    assert not fixed.instance_proxies.requires_grad
    assert len(fixed.instance_proxies) == len(coop_meta.extra["coop_embed_vocab"]["instances"])


@pytest.fixture(scope="module")
def easy_attrworld(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 identities x 8 images, 32 px, no clutter / noise / blur / rotation: identities learnable in ~100 steps."""
    from shards.datasets import BuildOptions, plan_embedded
    from shards.writer import write_dataset

    out = tmp_path_factory.mktemp("easy") / "attrworld"
    plan = plan_embedded("attrworld", BuildOptions(seed=0, size=32, count=192, options={
        "images_per_identity": "8", "identities": "24", "pairs_per_attribute": "50", "clutter": "0", "noise": "0",
        "blur": "0", "rotation": "0", "lighting": "0.3"}))
    write_dataset(plan, out, shard_size=32, workers=1, progress=False)
    return out


@pytest.mark.slow
def test_ray_train_run_improves_retrieval_over_its_untrained_start(ray_session: object, easy_attrworld: Path,
                                                                    tmp_path: Path) -> None:
    """2 Ray Train workers + DeepSpeed, 120 steps: leave-one-out instance R@1 over the training
    identities' images (and category mAP) rise well above the same network at its initial weights."""
    from jobs.checkpoints import latest_export
    from jobs.cli import main
    from jobs.evaluate import load_export
    from jobs.train import EvalData

    run = tmp_path / "run"
    sets = ["data.augment.resize=32", "data.augment.size=28", "data.loader.num_workers=0", "eval.every_steps=120",
            "checkpoint.every_steps=120", "data.loader.classes_per_batch=6", "data.loader.images_per_class=2",
            "model.subspace_width=4", "data.val_split=train", "schedule.warmup_steps=0", "optim.lr=0.003",
            "scaling.cpus_per_worker=0.5"]
    assert main(["train", "coop_embed", "--data", str(easy_attrworld), "--out", str(run), "--workers", "2",
                 "--max-steps", "120", *[x for s in sets for x in ("--set", s)]]) == 0
    method, cfg, model, meta = load_export(latest_export(run))

    def metrics(m: torch.nn.Module) -> dict[str, float]:
        return method.evaluate(m, EvalData(cfg, str(easy_attrworld), "train", method="coop_embed", meta=meta),
                               cfg.model, meta)

    torch.manual_seed(cfg.seed)  # rank 0's initial weights (jobs/train.py seeds seed + rank)
    start = metrics(method.build(cfg.model, meta).eval())
    end = metrics(model)
    assert end["instance_r@1"] > start["instance_r@1"] + 0.1, (start["instance_r@1"], end["instance_r@1"])
    assert end["category_map"] > start["category_map"] + 0.1, (start["category_map"], end["category_map"])


def test_resnet50_trunk_from_a_local_state_dict_and_clear_errors(tmp_path: Path) -> None:
    import torchvision

    from models.backbones import feature_net
    from shards.format import ShardError

    ref = torchvision.models.resnet50(weights=None).state_dict()
    good = tmp_path / "r50.pt"
    torch.save(ref, good)
    net, dim = feature_net("resnet50", str(good))
    assert dim == 2048 and torch.equal(net.conv1.weight, ref["conv1.weight"])
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(ShardError, match=r"bad\.pt: not a torchvision ResNet-50 state_dict"):
        feature_net("resnet50", str(bad))
    with pytest.raises(ShardError, match="only for the resnet backbones"):
        feature_net("small", str(good))
