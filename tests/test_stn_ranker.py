"""stn_ranker: losses against naive oracles, the boundary rule, STN geometry, parameter groups,
the two-stage switch, predict/evaluate and local AlexNet weights. CPU, 32 px, small backbone."""
from __future__ import annotations

import math
from typing import Any, Iterator

import pytest
import torch

from jobs.config import ConfigError
from jobs.config import build as build_config
from models import stn_ranker as sr
from models.losses import boundary_grad, boundary_loss, outside_mask, ranknet_loss, st_loss
from models.registry import StepInfo
from models.stn import crop_box, make_theta, warp
from shards.format import AttributeSpec, DatasetMeta, Pair, ShardError

META = DatasetMeta(
    name="tiny",
    attributes=(AttributeSpec("smile", "continuous", localised=True), AttributeSpec("red", "binary"),
                AttributeSpec("young", "continuous")),
    categories=("x",), splits=("train", "test"))
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()  # 2 shared cores: intra-op threads only add contention at 32 px
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(**kw: Any) -> sr.StnRanker:
    torch.manual_seed(0)
    return sr.build(sr.StnRankerConfig(**kw), META)


def _images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _batch(attrs: list[int], labels: list[float], seed: int = 0) -> dict[str, Any]:
    n = len(attrs)
    return {"image_a": _images(n, seed), "image_b": _images(n, seed + 1), "attribute": torch.tensor(attrs),
            "label": torch.tensor(labels)}


def _info(step: int = 0, **kw: Any) -> StepInfo:
    return StepInfo(step=step, max_steps=100, device=CPU, **kw)


def _grads(params: Any) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


# -- losses -----------------------------------------------------------------------------------------

def test_ranknet_loss_matches_a_naive_per_pair_loop_and_is_stable() -> None:
    v1 = torch.tensor([0.3, -1.2, 2.0, 0.0, 250.0, -250.0, 80.0, 0.7], dtype=torch.float64)
    v2 = torch.tensor([0.1, 0.4, 2.0, 1.5, -250.0, 250.0, -80.0, 0.7], dtype=torch.float64)
    lab = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 0.5, 1.0], dtype=torch.float64)

    def log_sigmoid(d: float) -> float:  # log(e^d / (1 + e^d)), written per sign to stay finite
        return -math.log1p(math.exp(-d)) if d >= 0 else d - math.log1p(math.exp(d))

    want = []
    for a, b, L in zip(v1.tolist(), v2.tolist(), lab.tolist()):
        d = a - b
        want.append(-L * log_sigmoid(d) - (1 - L) * log_sigmoid(-d))  # log(1 - P) = log sigmoid(-d)
    got = ranknet_loss(v1, v2, lab, reduction="none")
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-9)
    assert math.isclose(got[4].item(), 500.0) and math.isclose(got[6].item(), 80.0, rel_tol=1e-9)
    assert math.isclose(ranknet_loss(v1, v2, lab).item(), sum(want) / len(want), rel_tol=1e-9)
    x = torch.tensor([300.0, -300.0], requires_grad=True)
    ranknet_loss(x, torch.zeros(2), torch.tensor([0.5, 1.0])).backward()
    assert torch.isfinite(x.grad).all() and torch.allclose(x.grad, torch.tensor([0.25, -0.5]))


def test_st_loss_outside_mask_and_eq4_weights_by_hand() -> None:
    s, tx, ty = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([1.0, 3.0, 0.2]), torch.tensor([-1.0, 0.5, -4.0])
    assert torch.allclose(st_loss(s, tx, ty), torch.tensor([0.25 + 0.25, 1.44 + 0.04, 0.0036 + 1.44]))
    assert outside_mask(s, tx, ty).tolist() == [False, True, True]  # |0.5|; |1.2|; |-1.2|
    rank, st1, st2 = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0]), torch.tensor([5.0, 6.0, 7.0, 8.0])
    o1, o2 = torch.tensor([False, True, False, True]), torch.tensor([False, False, True, True])
    want = (1.0 + 20.0 + 7.0 + (40.0 + 8.0)) / 4  # (1-l1)(1-l2) rank + l1 st1 + l2 st2
    assert math.isclose(boundary_loss(rank, st1, st2, o1, o2).item(), want)


def test_boundary_grad_replaces_outside_gradients_and_leaves_inside_ones() -> None:
    s0, tx0, ty0 = [0.3, 0.5, 0.4], [1.0, 3.0, 0.5], [-1.0, 0.1, -3.5]  # inside, outside x, outside y
    coef = torch.tensor([[0.7, -1.3, 2.1], [0.2, 0.9, -0.4], [1.5, 0.3, 0.8]])

    def run(rule: bool, w: float = 0.5) -> list[torch.Tensor]:
        s, tx, ty = (torch.tensor(v, requires_grad=True) for v in (s0, tx0, ty0))
        a, b, c = boundary_grad(s, tx, ty, w) if rule else (s, tx, ty)
        assert torch.equal(a, s) and torch.equal(b, tx) and torch.equal(c, ty)  # identity forward
        (coef[0] * a * b + coef[1] * c ** 2 + coef[2] * torch.sin(a * c)).sum().backward()
        return [s.grad, tx.grad, ty.grad]

    plain, ruled = run(False), run(True)
    for g_plain, g_rule in zip(plain, ruled):
        assert math.isclose(g_rule[0].item(), g_plain[0].item(), rel_tol=1e-6)  # inside: plain autograd
    for i in (1, 2):  # outside: 0.5 * grad of 0.5*s^2*(tx^2+ty^2)
        s, tx, ty = s0[i], tx0[i], ty0[i]
        want = [0.5 * s * (tx ** 2 + ty ** 2), 0.5 * s ** 2 * tx, 0.5 * s ** 2 * ty]
        assert [g[i].item() for g in ruled] == pytest.approx(want, rel=1e-6)


# -- the boundary rule inside the model -------------------------------------------------------------

def _push_outside(m: sr.StnRanker) -> None:
    with torch.no_grad():
        m.localiser.translation_head.weight.zero_()
        m.localiser.translation_head.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # smile: s*tx = 1.65


def test_gradient_mode_outside_replacement_in_the_model_and_ranker_unaffected() -> None:
    m = _model(mode="stn_only", boundary="gradient")
    m.eval()  # no dropout: the two runs must see the same network
    _push_outside(m)
    batch = _batch([0, 0, 0], [1.0, 0.0, 1.0])
    ranker_params = [*m.ranker.parameters(), m.crop_w]

    def run(rule: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        x = torch.cat([batch["image_a"], batch["image_b"]])
        out = m(x, torch.zeros(6, dtype=torch.long), boundary_weight=1 / 3 if rule else None)
        v = out["score"][:, 0]
        ranknet_loss(v[:3], v[3:], batch["label"]).backward()
        return _grads(ranker_params), _grads(m.localiser.translation_head.parameters()), out

    r_plain, t_plain, _ = run(False)
    r_rule, t_rule, out = run(True)
    for a, b in zip(r_plain, r_rule):  # the ranker's gradient is untouched by the rule
        assert torch.allclose(a, b, atol=1e-7)
    s, tx = out["s"][:, 0].detach(), out["tx"][:, 0].detach()
    assert (s * tx > 1).all()
    # d tx / d bias_tx = 1: the bias gradient is the sum of the replacements w * s^2 * tx
    assert math.isclose(t_rule[1][0].item(), (s ** 2 * tx).sum().item() / 3, rel_tol=1e-5)
    assert not math.isclose(t_plain[1][0].item(), t_rule[1][0].item(), rel_tol=1e-3)


def test_loss_mode_eq4_st_gradient_never_reaches_the_ranker() -> None:
    m = _model(mode="stn_only", boundary="loss")
    m.eval()
    _push_outside(m)  # every image outside: Eq. 4 keeps only the ST terms
    loss = sr.step(m, _batch([0, 0, 2], [1.0, 0.0, 0.5]), m.cfg, info := _info())["main"]
    loss.backward()
    assert info.logs["stn/outside_frac"] == pytest.approx(2 / 3)  # 'young' is not pushed outside
    s, tx = 0.33, 5.0
    assert m.crop_w.grad[0].abs().sum() == 0  # smile pairs: no ranking gradient
    assert m.crop_w.grad[1].abs().sum() > 0  # the inside 'young' pair still ranks
    assert m.localiser.translation_head.bias.grad[0].item() == pytest.approx(4 * 2 * s * s * tx / 3, rel=1e-4)
    m.zero_grad(set_to_none=True)
    sr.step(m, _batch([0, 0], [1.0, 0.0]), m.cfg, _info())["main"].backward()  # only outside pairs
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in [*m.ranker.parameters(), m.crop_w])
    assert m.localiser.translation_head.bias.grad[0] != 0


# -- STN geometry -----------------------------------------------------------------------------------

def test_theta_crop_box_centre_half_and_translation_direction() -> None:
    theta = make_theta(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert torch.equal(theta[0], torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]))
    assert torch.allclose(crop_box(theta), torch.tensor([[0.25, 0.25, 0.75, 0.75]]))
    img = torch.arange(64.0).view(1, 1, 8, 8)
    assert torch.allclose(warp(img, theta, 4), img[..., 2:6, 2:6], atol=1e-5)  # the centre half, exactly

    dot = torch.zeros(1, 3, 32, 32)
    dot[..., 7:10, 23:26] = 1.0  # a bright dot, top right; centre pixel (row 8, col 24)
    cx, cy = 24.5 / 32 * 2 - 1, 8.5 / 32 * 2 - 1
    s = torch.tensor([0.25])
    toward = make_theta(s, torch.tensor([cx / 0.25]), torch.tensor([cy / 0.25]))
    away = make_theta(s, torch.tensor([-cx / 0.25]), torch.tensor([-cy / 0.25]))
    crop = warp(dot, toward, 16)
    assert crop.max() > 0.9 and crop[..., 7:9, 7:9].min() > 0.9  # the dot sits at the crop centre
    assert warp(dot, away, 16).max() == 0
    x0, y0, x1, y1 = crop_box(toward)[0].tolist()
    assert x0 < 24.5 / 32 < x1 and y0 < 8.5 / 32 < y1 and x1 - x0 == pytest.approx(0.25)


def test_initial_scale_is_init_scale_through_the_bias() -> None:
    m = _model(init_scale=0.5, scale_ratio=0.05)
    s, tx, ty = m.localiser(m.norm(_images(5)))
    assert s.shape == (5, 2) and torch.allclose(s, torch.full_like(s, 0.5))
    assert torch.equal(m.localiser.scale_head.weight, torch.zeros_like(m.localiser.scale_head.weight))
    assert m.localiser.scale_head.bias[0].item() == pytest.approx(10.0)
    assert tx.std() > 0 and (s * tx).abs().max() < 0.5  # random, small translations


# -- parameter groups -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["combined", "stn_only", "global_only"])
def test_param_groups_cover_every_parameter_once_with_multipliers(mode: str) -> None:
    m = _model(mode=mode, stn_lr_mult=0.1, scale_lr_mult=0.5)
    groups = sr.optim_groups(m, m.cfg)["main"]
    ids = [id(p) for g in groups for p in g.params]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in m.parameters() if p.requires_grad}
    mults = {g.name: g.lr_mult for g in groups}
    if mode == "global_only":
        assert mults == {"ranker": 1.0}
        return
    assert mults == pytest.approx({"ranker": 1.0, "stn": 0.1, "stn_scale": 0.05, "stn_translation": 0.1})
    by = {g.name: {id(p) for p in g.params} for g in groups}
    assert by["stn_scale"] == {id(p) for p in m.localiser.scale_head.parameters()}
    assert by["stn_translation"] == {id(p) for p in m.localiser.translation_head.parameters()}


# -- two-stage schedule -----------------------------------------------------------------------------

def test_two_stage_switch_keeps_the_scores_and_starts_the_global_half() -> None:
    m = _model(mode="combined", stage1_steps=10)
    m.eval()  # no dropout: identical forward passes
    batch = _batch([0, 2, 0], [1.0, 0.0, 0.5])
    before = sr.predict(m, batch["image_a"], tta=1)["score"]
    losses, gw = [], []
    for step in (9, 10):
        m.zero_grad(set_to_none=True)
        info = _info(step)
        loss = sr.step(m, batch, m.cfg, info)["main"]
        loss.backward()
        losses.append(loss.item())
        gw.append(m.global_w.grad.abs().sum().item())
        assert info.logs["train/stage"] == (1.0 if step == 9 else 2.0)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)  # combined(step 10) == STN-only(step 9)
    assert gw[0] == 0 and gw[1] > 0
    assert torch.equal(m.global_w, torch.zeros_like(m.global_w))
    assert torch.allclose(sr.predict(m, batch["image_a"], tta=1)["score"], before)


# -- multi-attribute heads, ignored pairs, autocast -------------------------------------------------

def test_multi_attribute_head_selection_and_per_head_gradients() -> None:
    m = _model(mode="stn_only", attributes=("smile", "young"))
    m.eval()
    x, cols = _images(4), torch.tensor([1, 0, 1, 1])
    per = m(x, cols)["score"][:, 0]
    full = m(x)["score"]
    assert full.shape == (4, 2) and torch.allclose(per, full[torch.arange(4), cols], atol=1e-5)
    sr.step(m, _batch([2, 2, 1], [1.0, 0.0, 1.0]), m.cfg, info := _info())["main"].backward()  # young only
    assert info.logs["train/pairs"] == 2
    assert m.crop_w.grad[0].abs().sum() == 0 and m.crop_w.grad[1].abs().sum() > 0
    sg = m.localiser.scale_head.weight.grad
    assert sg[0].abs().sum() == 0 and sg[1].abs().sum() > 0
    tg = m.localiser.translation_head.weight.grad.view(2, 2, -1)  # rows (attribute, tx|ty)
    assert tg[0].abs().sum() == 0 and tg[1].abs().sum() > 0


def test_single_attribute_ignores_other_pairs_and_autocast_runs() -> None:
    m = _model(attributes=("young",), stage1_steps=0)
    assert m.attributes == ("young",)
    info = _info()
    loss = sr.step(m, _batch([0, 1], [1.0, 0.0]), m.cfg, info)["main"]  # no 'young' pair
    assert loss.item() == 0 and loss.grad_fn is not None and info.logs["train/pairs"] == 0
    loss.backward()
    info = _info(autocast_dtype=torch.bfloat16)
    loss = sr.step(m, _batch([2, 0, 2], [1.0, 1.0, 0.5]), m.cfg, info)["main"]
    loss.backward()
    assert torch.isfinite(loss) and info.logs["train/pairs"] == 2 and "train/pair_acc" in info.logs


# -- predict and evaluate ---------------------------------------------------------------------------

def test_predict_shapes_and_centre_crop() -> None:
    m = _model(mode="combined", tta_crop_frac=0.75)
    x = _images(3)
    for tta in (1, 10):
        out = sr.predict(m, x, tta=tta)
        assert out["score"].shape == (3, 2) and out["box"].shape == (3, 2, 4)
    m.eval()
    assert torch.allclose(sr.predict(m, x, tta=1)["score"], m(x[..., 4:28, 4:28].contiguous())["score"], atol=1e-5)
    box = sr.predict(m, x, tta=1)["box"]
    assert torch.allclose(box[..., 2] - box[..., 0], torch.full((3, 2), 0.33), atol=1e-5)
    assert sr.predict(_model(mode="global_only"), x, tta=1)["box"].tolist() == [[[0.0, 0.0, 1.0, 1.0]] * 2] * 3
    with pytest.raises(ShardError, match="tta"):
        sr.predict(m, x, tta=3)


def _const(values: list[float]) -> torch.Tensor:
    """uint8 images [n, 3, 16, 16] of constant brightness (the fake predictor's score)."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 16, 16).to(torch.uint8)


class _Loaders:
    """The EvalData interface over hand-made batches and pairs."""

    def __init__(self, samples: list[dict[str, Any]], pairs: list[Pair]) -> None:
        self.samples, self._pairs = samples, pairs

    def __call__(self, split: str, kind: str = "samples", full_image: bool = False) -> list[dict[str, Any]]:
        assert split == "__eval__" and kind == "samples" and full_image
        return self.samples

    def pairs(self) -> list[Pair]:
        return self._pairs


def test_evaluate_hand_computed_accuracy_and_hits(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model(tta_crops=1)
    nan = float("nan")
    no = [nan] * 4
    # brightness = the fake predictor's score for both ranked attributes (smile, young)
    samples = [{"image": _const([10, 20, 5]), "key": ["k0", "k1", "k2"],
                "boxes": torch.tensor([[[0.4, 0.4, 0.6, 0.6], no, [0.0, 0.0, 0.2, 0.2]],
                                       [[0.0, 0.0, 0.3, 0.3], no, no],
                                       [no, no, [0.5, 0.5, 1.0, 1.0]]])},
               {"image": _const([50, 7, 90]), "key": ["k3", "k4", "k5"], "boxes": torch.full((3, 3, 4), nan)}]
    pairs = [Pair("k0", "k1", "smile", "more", "test"),   # 10 < 20: wrong
             Pair("k0", "k2", "smile", "more", "test"),   # 10 > 5: right
             Pair("k1", "k0", "smile", "less", "test"),   # 20 > 10: wrong
             Pair("k2", "k4", "smile", "less", "test"),   # 5 < 7: right      -> smile 2/4
             Pair("k4", "k5", "young", "similar", "test"),  # similar: excluded
             Pair("k4", "k0", "young", "more", "test"),   # 7 < 10: wrong
             Pair("k5", "k1", "young", "less", "test"),   # 90 > 20: wrong    -> young 0/2
             Pair("k3", "k0", "red", "more", "test"),     # binary attribute, not ranked
             Pair("k3", "gone", "smile", "more", "test")]  # key not in the evaluated images
    loaders = _Loaders(samples, pairs)

    def fake_predict(model: Any, images: torch.Tensor, tta: int | None = None) -> dict[str, torch.Tensor]:
        v = images.float().mean((1, 2, 3))  # every crop centred at (0.5, 0.5)
        return {"score": torch.stack([v, v], 1), "box": torch.tensor([0.25, 0.25, 0.75, 0.75]).expand(len(v), 2, 4)}

    monkeypatch.setattr(sr, "predict", fake_predict)
    got = sr.evaluate(m, loaders, m.cfg, META)
    assert got["rank_acc/smile"] == pytest.approx(0.5) and got["rank_acc/young"] == 0.0
    assert got["rank_acc"] == pytest.approx(0.25) and got["rank_pairs"] == 6
    # smile boxes: hit, miss; young boxes: miss, hit (0.5 on the edge counts)
    assert got["stn_hit/smile"] == 0.5 and got["stn_hit/young"] == 0.5 and got["stn_hit"] == 0.5
    # box centres in the crop [0.25, 0.75]^2: smile (0.5, 0.5) yes, (0.15, 0.15) no; young (0.1, 0.1) no,
    # (0.75, 0.75) on the edge yes -> 0.5 each
    assert got["stn_cover"] == 0.5
    monkeypatch.undo()
    real = sr.evaluate(m, loaders, m.cfg, META)  # the real predictor on the same data
    assert set(real) == set(got) and all(0 <= v <= 1 for k, v in real.items() if k != "rank_pairs")
    snap = sr.snapshot(m, loaders, m.cfg, META)
    assert snap["keys"].tolist() == ["k0", "k1", "k2", "k3", "k4", "k5"]
    assert snap["attributes"].tolist() == ["smile", "young"]
    assert snap["box"].shape == (6, 2, 4) and snap["score"].shape == (6, 2)
    unboxed = _Loaders([dict(b, boxes=torch.full_like(b["boxes"], nan)) for b in samples], pairs)
    assert not any(k.startswith("stn_") for k in sr.evaluate(m, unboxed, m.cfg, META))


# -- config, build validation, local AlexNet weights ------------------------------------------------

def test_config_and_attribute_validation() -> None:
    cfg = build_config(sr.StnRankerConfig, {"attributes": ["young"], "mode": "stn_only", "boundary": "loss"})
    assert cfg.attributes == ("young",) and sr.build(cfg, META).attributes == ("young",)
    with pytest.raises(ConfigError, match="tta_crops"):
        build_config(sr.StnRankerConfig, {"tta_crops": 5})
    with pytest.raises(ShardError, match=r"'red' is binary.*\['smile', 'young'\]"):
        sr.build(sr.StnRankerConfig(attributes=("red",)), META)
    with pytest.raises(ShardError, match=r"'nose' is not an attribute.*\['smile', 'young'\]"):
        sr.build(sr.StnRankerConfig(attributes=("smile", "nose")), META)


def test_alexnet_local_weights_round_trip_and_clear_errors(tmp_path: Any) -> None:
    import torchvision

    with torch.device("meta"):
        shapes = torchvision.models.alexnet(weights=None).state_dict()
    ref = {k: torch.full(v.shape, float(i)) for i, (k, v) in enumerate(shapes.items())}  # cheap, distinct
    path = tmp_path / "alexnet.pt"
    torch.save(ref, path)
    m = sr.build(sr.StnRankerConfig(backbone="alexnet", weights=str(path), attributes=("smile",)), META)
    assert torch.equal(m.localiser.trunk.features[0].weight, ref["features.0.weight"])
    assert torch.equal(m.ranker.trunk.features[10].bias, ref["features.10.bias"])
    assert torch.equal(m.ranker.head[4].weight, ref["classifier.4.weight"])  # fc7
    assert m.ranker.feature_dim == 4096 and m.localiser.fc.in_features == 4608
    assert all(p.requires_grad and not p.is_meta for p in m.parameters())
    assert m.localiser.trunk.features[0].weight.data_ptr() != m.ranker.trunk.features[0].weight.data_ptr()
    fresh = sr.build(sr.StnRankerConfig(backbone="alexnet", attributes=("smile",)), META)  # random init
    assert all(not p.is_meta for p in fresh.parameters()) and fresh.ranker.head[1].weight.std() > 0
    bad = tmp_path / "bad.pt"
    torch.save({"features.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(ShardError, match=r"bad\.pt: not a torchvision AlexNet state_dict"):
        sr.build(sr.StnRankerConfig(backbone="alexnet", weights=str(bad)), META)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ShardError, match=r"junk\.pt: cannot be read"):
        sr.build(sr.StnRankerConfig(backbone="alexnet", weights=str(tmp_path / "junk.pt")), META)
    with pytest.raises(ShardError, match="not found"):
        sr.build(sr.StnRankerConfig(backbone="alexnet", weights=str(tmp_path / "none.pt")), META)
    with pytest.raises(ShardError, match="only for backbone 'alexnet'"):
        sr.build(sr.StnRankerConfig(backbone="small", weights=str(path)), META)
