"""trip — "Fine-grained Image-to-Image Translation via Rival Preferences" (TRIP, ICLR 2021
submission; papers/trip.txt, authors' settings in REFERENCE_NOTES.md).

A generator G(x, v) (Table 3: RelGAN encoder / residual blocks / decoder, v in [-1, 1]^K
concatenated to the image channels, switchable normalisation, tanh) plays against a ranker
(Table 4: shared feature layers F, a rank head on F(y) - F(x) with K outputs, an LSGAN head).

Ranker loss   (Eq. 7a + 6a + GP): l_rank [sum_k (R_k(x, y) - r_k)^2 + lam sum_k R_k(x, G(x, v))^2]
                                  + l_g LSGAN_D + l_gp GP(D at interpolates of x and G(x, v))
Generator loss (Eq. 7b + 6b):     l_rank sum_k (R_k(x, G(x, v)) - v_k)^2 + l_g LSGAN_G
                                  + l_c |x - G(G(x, v), -v)|_1 + l_o orthogonal(G's conv weights)
                                  [+ l_rec |x - G(x, 0)|_1, RelGAN's reconstruction term, off by default]
K = 1 is Eq. 5a / 5b. `target: classification` is Table 2's "CLS (3)" row: the generator's rank
target is sign(v) (Eq. 3) instead of v (Eq. 4); `lam: 0`, `lambda_rank: 0`, `lambda_g: 0` are its
other rows. v ~ U(-1, 1)^K. The first `pretrain_steps` run with both rank terms off (App. C.2:
"pretrain our GAN only with L_gan", with the cycle term, so G first learns to reconstruct).

Real pairs (r): the relative attributes come from per-image labels (Sec. 4: "x > y when x is
smiling and y is not"), so trip trains on samples and pairs each image with the next one in the
batch; every target attribute of a pair is labelled at once (Eq. 7a). Binary: r = a_y - a_x in
{-1, 0, 1} (equal pairs kept, Remark 1). Continuous: sign(a_y - a_x) when |a_y - a_x| >= tau,
0 when < tau_sim, unlabelled in between or when a value is missing.

Updates alternate through the shared loop: the step returns {"generator", "ranker"}; the
generator's loss is built with the ranker frozen (models.registry.frozen) and the ranker's on
G(x, v).detach(), so each optimiser (Adam, betas from the optim section; lr multipliers
`generator_lr_mult` / `ranker_lr_mult`) sees only its own network's gradients.
Evaluation and figures: models/trip_eval.py, models/trip_figures.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from models.backbones import to_uint8, to_unit
from models.losses import (cycle_l1, gradient_penalty, lsgan_discriminator_loss, lsgan_generator_loss,
                           orthogonal_regulariser, trip_generator_rank_loss, trip_ranker_loss)
from models.registry import Method, ParamGroup, StepInfo, autocast, frozen, lazy_figures, scalar_attributes, unwrap
from models.trip_nets import Generator, Ranker
from shards.format import DatasetMeta, ShardError


@dataclass(frozen=True)
class TripConfig:
    """The `model:` section of trip (defaults: CPU-sized nets; paper sizes in trip_celeba.yaml)."""

    attributes: tuple[str, ...] = ("smile",)  # the K attributes v controls (continuous or binary)
    image_size: int = 32  # = data.augment.size; the ranker's dense heads are sized for it
    g_base: int = 16  # generator width (paper 64)
    g_down: int = 2  # stride-2 down/up-samplings (paper 2)
    g_res: int = 3  # residual blocks (paper 6)
    norm: Literal["switchable", "instance"] = "switchable"
    r_base: int = 16  # ranker width (paper 64)
    r_feat: int = 4  # ranker feature layers (paper 6 at 256 px)
    lam: float = 0.5  # rival-preference weight (Eq. 5a)
    lambda_rank: float = 1.0  # 0 = Table 2's "L_rank = 0"
    lambda_g: float = 0.5
    lambda_c: float = 2.5
    lambda_gp: float = 150.0
    # 1 = WGAN-GP's unit-gradient penalty (RelGAN, the authors); 0 = zero-centred. At 32 px a unit
    # gradient over the ~30-unit pixel distance between an image and its translation forces D's
    # outputs far apart, which the LSGAN targets 0 / 1 cannot follow (docs/RESULTS.md)
    gp_center: float = 1.0
    lambda_o: float = 1e-6
    lambda_rec: float = 0.0  # RelGAN's reconstruction |G(x, 0) - x|_1 (not in TRIP's losses; 0 = off)
    target: Literal["regression", "classification"] = "regression"  # Eq. 4 / Eq. 3
    pretrain_steps: int = 0
    generator_lr_mult: float = 5.0  # paper: G 5e-5, ranker 1e-5 (optim.lr = 1e-5)
    ranker_lr_mult: float = 1.0
    tau: float = 0.15  # continuous attributes: ordered pair when |a_y - a_x| >= tau
    tau_sim: float = 0.03  # ... similar (r = 0) when below
    # evaluation (models/trip_eval.py)
    oracle: str = ""  # an attr_oracle run (or export) directory; '' = no oracle metrics
    eval_images: int = 64
    aas_threshold: float = 0.5  # an attribute is "present" at oracle value >= this
    inception_weights: str = ""  # local FID Inception weights (torch-fidelity pt_inception): adds the standard `fid`
    figure_images: int = 6


class Trip(nn.Module):
    def __init__(self, cfg: TripConfig, names: tuple[str, ...], kinds: tuple[str, ...], cols: list[int]) -> None:
        super().__init__()
        self.cfg, self.attributes, self.kinds = cfg, names, kinds
        self.register_buffer("cols", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.register_buffer("binary", torch.tensor([k == "binary" for k in kinds]), persistent=False)
        k = len(names)
        self.generator = Generator(k, cfg.g_base, cfg.g_down, cfg.g_res, cfg.norm)
        self.ranker = Ranker(k, cfg.image_size, cfg.r_base, cfg.r_feat)

    to_unit = staticmethod(to_unit)
    to_uint8 = staticmethod(to_uint8)

    def translate(self, images: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] and v [B, K] -> translated uint8 images."""
        x = self.to_unit(images.to(self.cols.device))
        return self.to_uint8(self.generator(x, v.to(x.device)))


def _unwrap(model: nn.Module) -> Trip:
    return unwrap(model, Trip)


def build(cfg: TripConfig, meta: DatasetMeta) -> Trip:
    if not cfg.attributes:
        raise ShardError("model.attributes is empty; name the attributes v controls (continuous or binary)")
    names, kinds, cols = scalar_attributes(meta, tuple(cfg.attributes))
    if cfg.image_size % (2 ** cfg.g_down):
        raise ShardError(f"model.image_size {cfg.image_size} must be divisible by 2^model.g_down = {2 ** cfg.g_down}")
    if cfg.image_size % (2 ** cfg.r_feat):
        raise ShardError(f"model.image_size {cfg.image_size} must be divisible by 2^model.r_feat = {2 ** cfg.r_feat}")
    return Trip(cfg, names, kinds, cols)


def optim_groups(model: nn.Module, cfg: TripConfig) -> dict[str, list[ParamGroup]]:
    """Two optimisers: the generator first (its loss is built against the frozen ranker), then the ranker."""
    m = _unwrap(model)
    return {"generator": [ParamGroup("generator", list(m.generator.parameters()), cfg.generator_lr_mult)],
            "ranker": [ParamGroup("ranker", list(m.ranker.parameters()), cfg.ranker_lr_mult)]}


def relative_targets(a_x: torch.Tensor, a_y: torch.Tensor, binary: torch.Tensor, tau: float,
                     tau_sim: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [B, K] in {-1, 0, 1}, known [B, K] bool) for pairs (x, y) from per-image values (NaN = missing):
    r > 0 when y shows more of the attribute than x (the rank head's direction)."""
    d = a_y.float() - a_x.float()
    present = ~torch.isnan(d)
    d = torch.nan_to_num(d)
    cont_r = torch.where(d.abs() >= tau, d.sign(), torch.zeros_like(d))
    cont_known = (d.abs() >= tau) | (d.abs() < tau_sim)
    r = torch.where(binary.view(1, -1), d.round().clamp(-1, 1), cont_r)
    known = present & (binary.view(1, -1) | cont_known)
    return r, known


def generator_weights(g: Generator) -> list[torch.Tensor]:
    """The conv / transposed-conv kernels the orthogonal regulariser constrains."""
    return [mod.weight for mod in g.modules() if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d))]


def step(model: nn.Module, batch: dict[str, Any], cfg: TripConfig, info: StepInfo) -> dict[str, torch.Tensor]:
    m, dev = _unwrap(model), info.device
    images = batch["image"].to(dev, non_blocking=True)
    if images.shape[-1] % (2 ** cfg.g_down) or images.shape[-2] % (2 ** cfg.g_down):
        raise ShardError(f"images of {tuple(images.shape[-2:])} px: data.augment.size must be divisible by "
                         f"2^model.g_down = {2 ** cfg.g_down} (set it to model.image_size = {cfg.image_size})")
    x = m.to_unit(images)
    vals = batch["attributes"].to(dev)[:, m.cols]
    r, known = relative_targets(vals, vals.roll(1, 0), m.binary, cfg.tau, cfg.tau_sim)
    y = x.roll(1, 0)  # pair (x_i, x_{i-1}): every image is in two pairs, once on each side
    b, k = len(x), len(m.attributes)
    v = torch.rand(b, k, device=dev) * 2 - 1
    w_rank = 0.0 if info.step < cfg.pretrain_steps else cfg.lambda_rank
    gen_target = v if cfg.target == "regression" else v.sign()
    with autocast(info):
        fake = m.generator(x, v)
        with frozen(m.ranker):  # generator phase: gradients reach G only
            f = m.ranker.features(torch.cat([x, fake]))
            fx, ff = f.chunk(2)
            g_rank = trip_generator_rank_loss(m.ranker.rank_from_features(fx, ff), gen_target)
            g_gan = lsgan_generator_loss(m.ranker.gan_from_features(ff))
        back = m.generator(fake, -v)
        g_cyc = cycle_l1(x, back)
        g_orth = orthogonal_regulariser(generator_weights(m.generator))
        g_loss = w_rank * g_rank + cfg.lambda_g * g_gan + cfg.lambda_c * g_cyc + cfg.lambda_o * g_orth
        if cfg.lambda_rec > 0:
            g_loss = g_loss + cfg.lambda_rec * cycle_l1(x, m.generator(x, torch.zeros_like(v)))
        # ranker phase: on the detached translation, gradients reach the ranker only
        fd = fake.detach()
        f = m.ranker.features(torch.cat([x, y, fd]))
        fx, fy, ff = f.chunk(3)
        r_real = m.ranker.rank_from_features(fx, fy)
        r_fake = m.ranker.rank_from_features(fx, ff)
        r_rank = trip_ranker_loss(r_real, r, r_fake, cfg.lam, known)
        d_gan = lsgan_discriminator_loss(m.ranker.gan_from_features(fx), m.ranker.gan_from_features(ff))
    gp = gradient_penalty(m.ranker.gan, x.float(), fd.float(), center=cfg.gp_center) if cfg.lambda_gp > 0 else d_gan * 0.0
    r_loss = w_rank * r_rank + cfg.lambda_g * d_gan + cfg.lambda_gp * gp
    with torch.no_grad():
        ordered = known & (r != 0)
        correct = ((r_real.sign() == r) & ordered).sum()
        stats = torch.stack([g_rank, g_gan, g_cyc, g_orth, r_rank, d_gan, gp, correct.float(), ordered.sum().float(),
                             (r_fake.float() * v.sign()).mean()]).float().tolist()  # one device sync
    names = ["g_rank", "g_gan", "g_cycle", "g_orth", "r_rank", "d_gan", "gp"]
    info.logs.update({f"train/{n}": val for n, val in zip(names, stats)})
    if stats[8]:
        info.logs["train/real_pair_acc"] = stats[7] / stats[8]
    info.logs["train/fake_rank_signed"] = stats[9]  # E[R(x, G(x, v)) sign(v)]: ~0.5 at the rival equilibrium
    info.logs["train/pretrain"] = float(w_rank == 0.0 and cfg.lambda_rank > 0)
    return {"generator": g_loss, "ranker": r_loss}


def _evaluate(*args: Any) -> dict[str, float]:
    from models import trip_eval

    return trip_eval.evaluate(*args)


METHOD = Method(
    name="trip",
    config_cls=TripConfig,
    data_kind="samples",
    build=build,
    optim_groups=optim_groups,
    step=step,
    evaluate=_evaluate,
    val_metric="spearman_v",
    describe="fine-grained image translation against a ranker with rival preferences (TRIP, ICLR 2021 submission)",
    figures=lazy_figures("models.trip_figures"),
    path_fields=("oracle", "inception_weights"),
)
