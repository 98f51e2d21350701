"""deml on cluttered_digits: how much of the zero-shot gap is localisation? (issue 5 study)

One learner (deml's U + L_act: models.deml with one scale, one learner, binomial deviance and
activation decay, d = --dim: 512 as jobs/configs/deml.yaml) is trained for the same steps on
different views of the same images, then Recall@K is measured on the unseen digits 5-9 (test split, leave-one-out, cosine):

  whole   the whole image (what scale 1 of every DeML row sees)
  box*    the digit's true box (shards' `ink` box), squared to its longer side x F, zoomed to 64 px
  jit*    the same box x 1.35, its centre moved by N(0, sigma) per axis and image (a localiser's error)
  oam     the OAM box of a trained deml run's first scale (--oam-run; what its scale 2 sees)

With --oam-run it also prints how that run's OAM boxes sit on the true boxes. The loop is
in-memory (no Ray, DeepSpeed or shard streaming) so that a row takes about 80 s on one core;
its whole-image row is not the platform's U + L_act row (same model and loss, other data order).

    python bench/deml_crop_study.py --data data/shards/cluttered_digits \
        [--oam-run runs/deml_ablation/d31] [--rows whole,box1.2,box1.35,box1.6,jit0.035,jit0.07,oam] \
        [--steps 1500] [--dim 512]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.deml_ablation import split_tensors  # noqa: E402
from models.deml import Deml, DemlConfig, deml_loss  # noqa: E402
from models.deml_attention import crop_and_zoom  # noqa: E402
from models.retrieval import knn_recall_at_k  # noqa: E402

SIZE, CROP = 64, 60  # the benchmark's augment: resize 64, random (train) / centre (eval) 60 px crops


def load_split(data: Path, split: str) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """(uint8 images [N, 3, 64, 64], category ids [N], the digit's true box [N, 4] in image fractions)."""
    x, cats, boxes = split_tensors(data, split, SIZE)
    if boxes is None:
        raise SystemExit(f"{data}: the {split!r} shards carry no region boxes; the crop study needs the digit's box")
    return torch.from_numpy(x), cats, torch.from_numpy(boxes)


def box_view(x: torch.Tensor, boxes: torch.Tensor, factor: float, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """Square crops about each true box (side = longer box side x factor, centre + N(0, sigma)),
    zoomed to the image size; outside the image is the border colour."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    if sigma > 0:
        off = torch.from_numpy(rng.normal(0.0, sigma, (len(x), 2))).float()
        cx, cy = cx + off[:, 0], cy + off[:, 1]
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * factor
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, 0, 2], theta[:, 1, 2] = cx * 2 - 1, cy * 2 - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, padding_mode="border", align_corners=False).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def oam_boxes(run: Path, x: torch.Tensor) -> torch.Tensor:
    """The first scale's OAM boxes [N, 4] (pixels) of a trained deml run, on the whole images."""
    from jobs.evaluate import load_model_dir

    _, _, model, _ = load_model_dir(run)
    if not isinstance(model, Deml) or model.cfg.scales < 2:
        raise SystemExit(f"--oam-run {run}: not a deml run with model.scales >= 2")
    out = []
    for k in range(0, len(x), 256):
        o = model.scales[0](model.norm(x[k:k + 256]))
        out.append(model.next_input(o)[1])
    return torch.cat(out)


def box_stats(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """How predicted boxes (image fractions) sit on the true ones."""
    pc, tc = (pred[:, :2] + pred[:, 2:]) / 2, (true[:, :2] + true[:, 2:]) / 2
    inside = ((pc >= true[:, :2]) & (pc <= true[:, 2:])).all(1).float().mean()
    side = torch.maximum(true[:, 2] - true[:, 0], true[:, 3] - true[:, 1])
    spread = (tc - tc.mean(0)).abs().mean(0)
    return {"centre_inside": float(inside), "centre_err_x": float((pc - tc)[:, 0].abs().mean()),
            "centre_err_y": float((pc - tc)[:, 1].abs().mean()), "side_ratio": float(((pred[:, 2] - pred[:, 0]) / side).mean()),
            "true_centre_spread_x": float(spread[0]), "true_centre_spread_y": float(spread[1])}


def train_eval(xtr: torch.Tensor, ytr: np.ndarray, xte: torch.Tensor, yte: np.ndarray, steps: int, seed: int,
               dim: int = 512, lr: float = 1e-3, classes: int = 5, per_class: int = 6) -> dict[str, float]:
    """jobs/configs/deml.yaml's U + L_act recipe: Adam (learners 10x), weight decay 2e-4, 50 warm-up
    steps then cosine, batches of 5 classes x 6 images, random 60 px crops; R@K on the test images."""
    from jobs.engine import lr_factor, make_optimizer
    from jobs.schema import OptimSection, ScheduleSection
    from models.deml import optim_groups

    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg = DemlConfig(scales=1, learners=1, cam="none", dim=dim, diversity="none")
    model = Deml(cfg, "category")
    # the platform's optimiser and schedule (learners at 10x, as jobs/train.py builds them)
    opt = make_optimizer(optim_groups(model, cfg)["main"], OptimSection(name="adam", lr=lr, weight_decay=2e-4))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, ScheduleSection(max_steps=steps, kind="cosine", warmup_steps=50)))
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(ytr.tolist()):
        by_class.setdefault(int(c), []).append(i)
    model.train()
    for _ in range(steps):
        idx = [i for c in rng.sample(sorted(by_class), classes) for i in rng.sample(by_class[c], per_class)]
        offs = [(rng.randrange(SIZE - CROP + 1), rng.randrange(SIZE - CROP + 1)) for _ in idx]
        xb = torch.stack([xtr[i, :, r:r + CROP, c:c + CROP] for i, (r, c) in zip(idx, offs)])
        loss = deml_loss(model, model(xb, train=True), torch.as_tensor(ytr[idx]).long(), cfg, {})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    m = (SIZE - CROP) // 2
    with torch.no_grad():
        e = torch.cat([model(xte[k:k + 256, :, m:m + CROP, m:m + CROP]) for k in range(0, len(xte), 256)]).numpy()
    r = knn_recall_at_k(e, yte, e, yte, ks=(1, 2, 4, 8), exclude_self=np.arange(len(yte)))
    return {f"r@{k.split('@')[1]}": float(v) for k, v in r.items()}


def view_of(row: str, x: torch.Tensor, boxes: torch.Tensor, oam: torch.Tensor | None, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if row == "whole":
        return x
    if row.startswith("box"):
        return box_view(x, boxes, float(row[3:]), 0.0, rng)
    if row.startswith("jit"):
        return box_view(x, boxes, 1.35, float(row[3:]), rng)
    if row == "oam":
        assert oam is not None
        return crop_and_zoom(x.float(), oam).round().clamp(0, 255).to(torch.uint8)
    raise SystemExit(f"--rows: unknown row {row!r} (whole, boxF, jitSIGMA, oam)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--oam-run", type=Path, help="a trained deml run with model.scales >= 2 (adds the 'oam' row)")
    ap.add_argument("--rows", default="whole,box1.2,box1.35,box1.6,jit0.035,jit0.07,oam")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=512, help="embedding size d (jobs/configs/deml.yaml: 512)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for r in a.rows.split(",") if r and (r != "oam" or a.oam_run)]
    xtr, ytr, btr = load_split(a.data, "train")
    xte, yte, bte = load_split(a.data, "test")
    oam = None
    result: dict[str, dict] = {}
    if a.oam_run:
        oam = {"train": oam_boxes(a.oam_run, xtr), "test": oam_boxes(a.oam_run, xte)}
        result["oam_boxes"] = box_stats(oam["test"] / SIZE, bte)
        print("OAM boxes on the test images:", json.dumps({k: round(v, 3) for k, v in result["oam_boxes"].items()}))
    print(f"\n| view | R@1 | R@2 | R@4 | R@8 | s |\n|---|---|---|---|---|---|")
    for row in rows:
        t0 = time.perf_counter()
        r = train_eval(view_of(row, xtr, btr, oam and oam["train"], a.seed), ytr,
                       view_of(row, xte, bte, oam and oam["test"], a.seed + 1), yte, a.steps, a.seed, a.dim)
        result[row] = {**r, "wall_s": time.perf_counter() - t0}
        print(f"| {row} | {r['r@1']:.3f} | {r['r@2']:.3f} | {r['r@4']:.3f} | {r['r@8']:.3f} | {result[row]['wall_s']:.0f} |",
              flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
