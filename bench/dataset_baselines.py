"""Baselines that calibrate the embedded datasets' difficulty (no shards, no training code).

Renders the datasets in memory (plan + load) and measures:
  (a) raw-pixel cosine Recall@1/@5: attrworld query -> gallery by identity (zero-shot instance
      retrieval) and cluttered_digits' test split against itself by class, excluding the query;
  (b) attrworld: a global-image ranker per continuous attribute, a small CNN trained with RankNet
      (BCE on score differences; labels 1 / 0 / 0.5 for more / less / similar) on the train pairs
      for a fixed budget, scored by ordered-pair accuracy on the test pairs;
  (c) the same ranker, same budget, fed the ground-truth box crop of the attribute (resized to
      the same input size): an upper-bound hint of what localisation buys;
  (d) with --category-steps N: a category probe, coop_embed's small CPU backbone + a linear
      8-way classifier trained from scratch on the train split's categories (flips), accuracy
      on the train images and on the unseen identities (query + gallery) along the way: how
      learnable the categories are from this many identities;
  (e) with --crop-study H[,H...]: the (c) ranker fed square crops of half-side H (image fractions;
      the paper's STN scale 1/3 is H = 1/6) centred on the ground-truth box of each image, and the
      same crops centred on the MEAN box centre over those images: what an STN that tracks the region
      per image buys, against one that learned only where the region is on average; with
      --crop-jitter S[,S...] also tracking crops whose centres miss by N(0, S) per axis: how
      precisely the STN must track.

    python bench/dataset_baselines.py                       # defaults, ~4-6 min on 1 core
    python bench/dataset_baselines.py --steps 200 --attrs smile,eye_open --skip-digits
    python bench/dataset_baselines.py --opt subtlety=0.5 --opt clutter=20
    python bench/dataset_baselines.py --skip-digits --skip-rank --category-steps 5000   # (d), ~9 min
    python bench/dataset_baselines.py --skip-digits --skip-rank --crop-study 0.08,0.167,0.3 --attrs smile  # (e), ~1 min
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shards.datasets import BuildOptions, plan_embedded  # noqa: E402


def decode(sample) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"))


def recall_at_k(q: np.ndarray, q_lab: np.ndarray, g: np.ndarray, g_lab: np.ndarray, ks=(1, 5),
                exclude_self: bool = False) -> dict[int, float]:
    """Cosine Recall@K (hit if any of the K nearest gallery items shares the label)."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    g = g / np.linalg.norm(g, axis=1, keepdims=True).clip(1e-12)
    sim = q @ g.T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    top = np.argsort(-sim, axis=1)[:, :max(ks)]
    hit = g_lab[top] == q_lab[:, None]
    return {k: float(hit[:, :k].any(1).mean()) for k in ks}


def pixels_of(samples) -> np.ndarray:
    return np.stack([decode(s).astype(np.float32).ravel() for s in samples])


# ---------------------------------------------------------------------------------------------- ranker

def make_ranker():
    import torch.nn as nn

    def block(cin, cout, stride=1):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16, 2), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                         *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))


def train_and_eval(images: np.ndarray, index: dict[str, int], train_pairs, test_pairs, steps: int, batch: int,
                   seed: int, lr: float) -> tuple[float, float]:
    """-> (test ordered-pair accuracy, train ordered-pair accuracy on up to 1000 pairs)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    label = {"more": 1.0, "less": 0.0, "similar": 0.5}
    ti = np.array([index[p.key_i] for p in train_pairs])
    tj = np.array([index[p.key_j] for p in train_pairs])
    ty = np.array([label[p.relation] for p in train_pairs], np.float32)
    x_all = torch.from_numpy(images)  # N, H, W, 3 uint8

    def batch_of(idx):
        return x_all[idx].permute(0, 3, 1, 2).float().div_(255).sub_(0.5)

    model = make_ranker()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        b = rng.integers(0, len(ti), batch)
        s = model(batch_of(np.concatenate([ti[b], tj[b]]))).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(s[:batch] - s[batch:], torch.from_numpy(ty[b]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    def accuracy(pairs):
        ordered = [p for p in pairs if p.relation != "similar"]
        if not ordered:
            return float("nan")
        need = sorted({index[p.key_i] for p in ordered} | {index[p.key_j] for p in ordered})
        score = {}
        with torch.no_grad():
            for k in range(0, len(need), 256):
                chunk = need[k:k + 256]
                for i, v in zip(chunk, model(batch_of(np.array(chunk))).squeeze(1).tolist()):
                    score[i] = v
        ok = [(score[index[p.key_i]] > score[index[p.key_j]]) == (p.relation == "more") for p in ordered]
        return float(np.mean(ok))

    return accuracy(test_pairs), accuracy(train_pairs[:1000])


def crop_images(samples, attr: str, size: int) -> np.ndarray:
    from PIL import Image

    out = []
    for s in samples:
        im = Image.open(io.BytesIO(s.image)).convert("RGB")
        w, h = im.size
        x0, y0, x1, y1 = s.boxes[attr]
        box = (int(np.floor(x0 * w)), int(np.floor(y0 * h)), max(int(np.ceil(x1 * w)), int(np.floor(x0 * w)) + 1),
               max(int(np.ceil(y1 * h)), int(np.floor(y0 * h)) + 1))
        out.append(np.asarray(im.crop(box).resize((size, size), Image.BILINEAR)))
    return np.stack(out)


def square_crops(samples, attr: str, half: float, size: int, centre: tuple[float, float] | None,
                 offsets: np.ndarray | None = None) -> np.ndarray:
    """Crops of side 2 * half (image fractions; zeros outside the image) resized to size x size,
    centred on each sample's `attr` box centre, or on the fixed `centre` (x, y) when given;
    `offsets` [N, 2] (image fractions) moves each sample's centre: a localiser's tracking error."""
    from PIL import Image

    out = []
    for i, s in enumerate(samples):
        im = Image.open(io.BytesIO(s.image)).convert("RGB")
        w, h = im.size
        x0, y0, x1, y1 = s.boxes[attr]
        cx, cy = centre if centre is not None else ((x0 + x1) / 2, (y0 + y1) / 2)
        if offsets is not None:
            cx, cy = cx + float(offsets[i, 0]), cy + float(offsets[i, 1])
        box = ((cx - half) * w, (cy - half) * h, (cx + half) * w, (cy + half) * h)
        out.append(np.asarray(im.transform((size, size), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR)))
    return np.stack(out)


def _fractions(text: str, what: str) -> list[float]:
    try:
        values = [float(h) for h in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 0.08,0.167") from None
    if not all(0 < h <= 0.5 for h in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each {what} must be in (0, 0.5] (a fraction of the image)")
    return values


def half_sides(text: str) -> list[float]:
    """--crop-study's value: comma-separated half-sides in (0, 0.5]."""
    return _fractions(text, "half-side")


def sigmas(text: str) -> list[float]:
    """--crop-jitter's value: comma-separated standard deviations in (0, 0.5]."""
    return _fractions(text, "sigma")


def crop_study(pool, index, plan, attrs: list[str], halves: list[float], steps: int, batch: int, seed: int,
               lr: float, jitters: list[float] = ()) -> None:
    """(e): per attribute and half-side, test accuracy of crops tracking the region vs fixed at its
    mean; with `jitters`, also tracking crops whose centres miss by N(0, sigma) per axis and image."""
    size = decode(pool[0]).shape[0]
    print(f"\ncrop study: {steps} steps x {batch} pairs; half-side H as a fraction of the image "
          f"(STN scale s = 2H); accuracy on ordered test pairs")
    print(f"{'attribute':12s} {'H':>6s} {'tracking':>9s} {'mean-placed':>12s} {'(train tracking/mean)':>22s}")
    for a in attrs:
        if a not in pool[0].boxes:
            print(f"{a:12s} (no region box: a global attribute, skipped)")
            continue
        boxes = np.array([s.boxes[a] for s in pool])
        mean = (float((boxes[:, 0] + boxes[:, 2]).mean() / 2), float((boxes[:, 1] + boxes[:, 3]).mean() / 2))
        tr = [p for p in plan.pairs if p.attribute == a and p.split == "train"]
        te = [p for p in plan.pairs if p.attribute == a and p.split == "test"]
        for half in halves:
            acc_t, tr_t = train_and_eval(square_crops(pool, a, half, size, None), index, tr, te, steps, batch, seed, lr)
            acc_m, tr_m = train_and_eval(square_crops(pool, a, half, size, mean), index, tr, te, steps, batch, seed, lr)
            print(f"{a:12s} {half:6.3f} {acc_t:9.3f} {acc_m:12.3f} {tr_t:11.3f}/{tr_m:.3f}", flush=True)
            for sigma in jitters:  # fixed per image (a localiser errs the same way on the same image)
                off = np.random.default_rng(seed).normal(0.0, sigma, (len(pool), 2))
                acc_j, tr_j = train_and_eval(square_crops(pool, a, half, size, None, off), index, tr, te, steps,
                                             batch, seed, lr)
                print(f"{'':12s} {half:6.3f} tracking off by N(0, {sigma:.3f}): {acc_j:.3f} (train {tr_j:.3f})",
                      flush=True)


# ---------------------------------------------------------------------------------------------- category probe

def category_probe(train: list, unseen: list, steps: int, batch: int, seed: int, lr: float,
                   every: int = 500) -> list[tuple[int, float, float]]:
    """-> [(step, train accuracy on up to 1000 train images, unseen-identity accuracy)]."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from models.backbones import feature_net, to_unit as unit

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    def tensors(samples):
        x = torch.from_numpy(np.stack([decode(s) for s in samples])).permute(0, 3, 1, 2)
        return x, torch.tensor([s.category for s in samples])

    (xt, yt), (xu, yu) = tensors(train), tensors(unseen)
    n_cat = int(max(yt.max(), yu.max())) + 1
    trunk, dim = feature_net("small")
    model = nn.Sequential(trunk, nn.Linear(dim, n_cat))
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def accuracy(x, y):
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(unit(x[i:i + 256])).argmax(1) for i in range(0, len(x), 256)])
        model.train()
        return float((pred == y).float().mean())

    out = []
    for step in range(1, steps + 1):
        b = torch.from_numpy(rng.integers(0, len(xt), batch))
        x = unit(xt[b])
        flip = torch.from_numpy(rng.random(batch) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = F.cross_entropy(model(x), yt[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            out.append((step, accuracy(xt[:1000], yt[:1000]), accuracy(xu, yu)))
            print(f"  step {step:5d}: train {out[-1][1]:.3f}  unseen identities {out[-1][2]:.3f}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=None, help="attrworld images (default: the dataset default)")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--opt", action="append", default=[], help="attrworld --opt key=value (repeatable)")
    ap.add_argument("--attrs", default="", help="comma-separated continuous attributes to rank (default: all)")
    ap.add_argument("--steps", type=int, default=400, help="ranker training steps per attribute")
    ap.add_argument("--batch", type=int, default=32, help="pairs per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-rank", action="store_true")
    ap.add_argument("--skip-crop", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--digits-count", type=int, default=None)
    ap.add_argument("--category-steps", type=int, default=0, help="(d) category probe steps (0: skip)")
    ap.add_argument("--crop-study", type=half_sides, default=[], help="(e) comma-separated crop half-sides (image fractions)")
    ap.add_argument("--crop-jitter", type=sigmas, default=[],
                    help="(e) also tracking crops off by N(0, sigma) per axis: comma-separated sigmas (image fractions)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    opts = dict(o.split("=", 1) for o in args.opt)
    t0 = time.perf_counter()
    plan = plan_embedded("attrworld", BuildOptions(seed=args.seed, size=args.size, count=args.count, options=opts))
    samples = {split: [plan.load(s) for s in specs] for split, specs in plan.splits.items()}
    n_img = sum(len(v) for v in samples.values())
    t_render = time.perf_counter() - t0
    print(f"attrworld: {n_img} images rendered in {t_render:.1f} s ({1000 * t_render / n_img:.2f} ms/image incl. "
          f"planning); splits {plan.meta.extra['split_counts']}; options {opts or 'defaults'}")

    rows = []
    q, g = samples["query"], samples["gallery"]
    r = recall_at_k(pixels_of(q), np.array([s.instance for s in q]), pixels_of(g), np.array([s.instance for s in g]))
    g_ids = np.array([s.instance for s in g])
    chance = float(np.mean([(g_ids == s.instance).mean() for s in q]))
    rows.append(("attrworld identity query->gallery (raw-pixel cosine)", r[1], r[5], f"chance R@1 {chance:.3f}"))
    r = recall_at_k(pixels_of(q), np.array([s.category for s in q]), pixels_of(g), np.array([s.category for s in g]))
    rows.append(("attrworld category query->gallery (raw-pixel cosine)", r[1], r[5], "8 categories"))

    if not args.skip_digits:
        for mode in ("grey", "colour"):
            t1 = time.perf_counter()
            dp = plan_embedded("cluttered_digits", BuildOptions(seed=args.seed, count=args.digits_count,
                                                                options={"mode": mode}))
            test = [dp.load(s) for s in dp.splits["test"]]
            lab = np.array([s.category for s in test])
            r = recall_at_k(pixels_of(test), lab, pixels_of(test), lab, exclude_self=True)
            rows.append((f"cluttered_digits {mode} test, excl. self (raw-pixel cosine)", r[1], r[5],
                         f"{len(test)} images, {len(set(lab.tolist()))} classes, {time.perf_counter() - t1:.0f} s"))

    print("\nraw-pixel retrieval")
    print(f"{'task':60s} {'R@1':>6s} {'R@5':>6s}  note")
    for name, r1, r5, note in rows:
        print(f"{name:60s} {r1:6.3f} {r5:6.3f}  {note}")

    if args.category_steps:
        t1 = time.perf_counter()
        print(f"\ncategory probe: small CPU backbone + linear, {args.category_steps} steps x {args.batch} images, "
              f"Adam lr 1e-3; chance {1 / len(plan.meta.categories):.3f}")
        category_probe(samples["train"], q + g, args.category_steps, args.batch, args.seed, 1e-3)
        print(f"  {time.perf_counter() - t1:.0f} s")
    from shards.datasets.attrworld_render import CONTINUOUS

    attrs = [a for a in args.attrs.split(",") if a] or list(CONTINUOUS)
    pool = samples["train"] + samples["test"]
    index = {s.key: i for i, s in enumerate(pool)}
    if args.crop_study:
        crop_study(pool, index, plan, attrs, args.crop_study, args.steps, args.batch, args.seed, args.lr,
                   args.crop_jitter)
    if args.skip_rank:
        return 0
    size = decode(pool[0]).shape[0]
    full = np.stack([decode(s) for s in pool])
    print(f"\nrankers: {args.steps} steps x {args.batch} pairs, Adam lr {args.lr}, {args.threads} thread(s), "
          f"input {size}px; accuracy on ordered test pairs")
    print(f"{'attribute':12s} {'region':8s} {'global':>7s} {'crop':>7s} {'(train global/crop)':>20s} {'pairs':>6s} {'s':>5s}")
    for a in attrs:
        t1 = time.perf_counter()
        tr = [p for p in plan.pairs if p.attribute == a and p.split == "train"]
        te = [p for p in plan.pairs if p.attribute == a and p.split == "test"]
        acc_g, tr_g = train_and_eval(full, index, tr, te, args.steps, args.batch, args.seed, args.lr)
        acc_c = tr_c = float("nan")
        region = plan.meta.extra["regions"][a]
        if a in pool[0].boxes and not args.skip_crop:
            acc_c, tr_c = train_and_eval(crop_images(pool, a, size), index, tr, te, args.steps, args.batch,
                                         args.seed, args.lr)
        n_ord = sum(p.relation != "similar" for p in te)
        print(f"{a:12s} {region:8s} {acc_g:7.3f} {acc_c:7.3f} {tr_g:9.3f}/{tr_c:.3f}{'':5s} {n_ord:6d} "
              f"{time.perf_counter() - t1:5.0f}", flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
