"""`attrlab bench gpu`: bf16 training throughput, MFU and stn_ranker inference (only where a GPU is).

  gpu/train_METHOD    training samples/s through the in-process loop (`attrlab train --local`) with
                      jobs/configs/gpu/METHOD.yaml (bf16 autocast, DeepSpeed as configured, one GPU);
                      the comparison is the training step alone on pre-loaded batches on the GPU
  gpu/mfu_BACKBONE    model FLOPs utilisation of one training step (forward + backward + optimiser)
                      of the method using that backbone (AlexNet: stn_ranker, ResNet-50: coop_embed,
                      GoogLeNet: deml), the best of eager / channels_last / torch.compile: FLOPs of one
                      step counted by torch.utils.flop_counter.FlopCounterMode, divided by the step's
                      time and the device's peak dense bf16 FLOPs; goal >= 35%
  gpu/stn_infer       stn_ranker inference (10 test-time crops + the STN boxes, bf16) per image in
                      batches of 256; goal <= 0.5 ms

Without a CUDA device it returns no rows (BENCHMARKS.md keeps the last GPU rows). It imports
nothing from Ray: the loop is `--local` (bench/gpu_device.sh runs it on a lent GPU machine).
ATTRLAB_GPU_BUDGET_S (seconds) bounds the whole group: the goal rows (inference, MFU) run first,
and work that would start after the budget is skipped and said, so a time-limited call still
returns the rows it measured. Training data: the embedded attrworld (64 px), resized
by each config's augmentation to its GPU size (224-256 px).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.core import Row, row
from bench.data_bench import timed

# peak dense bf16 tensor FLOPs by device name (most specific first; NVIDIA's data sheets)
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),   # SXM (torch reports "NVIDIA H100 80GB HBM3")
    ("GH200", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)
METHODS = ("stn_ranker", "coop_embed", "deml", "latent_retrieval", "trip")
BACKBONE = {"stn_ranker": "alexnet", "coop_embed": "resnet50", "deml": "googlenet"}
# what each GPU config needs on attrworld besides the loop's own settings
DATA_SETS: dict[str, list[str]] = {
    "stn_ranker": ["model.stage1_steps=10"],  # the full model (STN + ranker) after the first window
    "coop_embed": [],
    "deml": ["model.label=instance", "data.loader.class_field=instance"],  # 13 identities x 2 = batch 26
    "latent_retrieval": ["model.fit_iters=20", "model.lams=[0.0]", "model.queries=20", "model.figure_images=0"],
    "trip": ["model.eval_images=8"],
}


def peak_bf16_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(flops_per_step: float, seconds_per_step: float, peak: float) -> float:
    """Model FLOPs utilisation, a fraction of the peak."""
    return flops_per_step / seconds_per_step / peak


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (matmuls, convolutions, attention; forward and backward) of one call of fn."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def budget_deadline() -> float | None:
    """time.monotonic() deadline from ATTRLAB_GPU_BUDGET_S, or None (no limit)."""
    text = os.environ.get("ATTRLAB_GPU_BUDGET_S", "")
    if not text:
        return None
    try:
        return time.monotonic() + float(text)
    except ValueError:
        raise SystemExit(f"attrlab bench gpu: ATTRLAB_GPU_BUDGET_S={text!r}: give seconds, e.g. 480") from None


def _late(deadline: float | None, what: str) -> bool:
    if deadline is not None and time.monotonic() > deadline:
        print(f"attrlab bench gpu: {what}: skipped, ATTRLAB_GPU_BUDGET_S spent", file=sys.stderr)
        return True
    return False


def run(ctx: Any) -> list[Row]:
    if not torch.cuda.is_available():
        print("attrlab bench gpu: no CUDA device here, no GPU figures measured (BENCHMARKS.md keeps the last ones)",
              file=sys.stderr)
        return []
    from bench.data_bench import embedded

    deadline = budget_deadline()
    work = Path(ctx.work) / "gpu"
    data = embedded(Path(ctx.work), "attrworld", 200 if ctx.smoke else 2000, size=64)  # attrworld_64/
    device = torch.device("cuda", 0)
    steps, log_every = (6, 2) if ctx.smoke else (100, 20)
    # the rows with goals first (inference, MFU), then the loop's samples/s per method
    infer = None
    try:
        infer = stn_inference(device, data, batch=32 if ctx.smoke else 256)
    except Exception as e:
        print(f"attrlab bench gpu: stn_ranker inference failed: {e}", file=sys.stderr)
    alone: dict[str, dict[str, Any]] = {}
    for method in BACKBONE:
        if _late(deadline, f"{method} step benchmark"):
            continue
        try:
            alone[method] = step_bench(method, data, device, config=gpu_config(method), sets=DATA_SETS[method],
                                       steps=3 if ctx.smoke else 20, warmup=2 if ctx.smoke else 5,
                                       deadline=deadline)
        except Exception as e:
            print(f"attrlab bench gpu: {method}: the step benchmark failed: {e}", file=sys.stderr)
    loop = {}
    for method in METHODS:
        if _late(deadline, f"{method} training loop"):
            continue
        try:
            loop[method] = loop_rate(method, data, work / "runs" / method, steps, log_every,
                                     config=gpu_config(method), sets=DATA_SETS[method])
        except Exception as e:  # one method's failure is reported, the others still measured
            print(f"attrlab bench gpu: {method}: the training loop failed: {e}", file=sys.stderr)
    return gpu_rows(torch.cuda.get_device_name(device), loop, alone, infer)


def gpu_rows(name: str, loop: dict[str, float], alone: dict[str, dict[str, Any]],
             infer: tuple[float, str, int] | None) -> list[Row]:
    """Rows from loop_rate's samples/s per method, step_bench's results per backbone method and
    stn_inference's (ms per image, note, batch), on the device called `name`."""
    rows = []
    for method, rate in loop.items():
        a = alone.get(method)
        rows.append(row(f"gpu/train_{method}", f"{method}: training samples/s through the in-process loop "
                        f"(attrlab train --local, jobs/configs/gpu/{method}.yaml, bf16, one {name}) vs the step alone on "
                        "pre-loaded batches (eager)", rate, "samples/s",
                        baseline=None if a is None else a["samples_per_s"]["eager"],
                        baseline_label="" if a is None else "step alone",
                        note="" if a is None else f"loader alone: {a['loader_per_s']:.0f} samples/s "
                        f"({a['loader_workers']} workers, from 64 px shards)"))
    peak = peak_bf16_flops(name)
    if peak is None and alone:
        print(f"attrlab bench gpu: no peak bf16 FLOPs known for {name!r}: no MFU (add it to PEAK_BF16)", file=sys.stderr)
    for method, a in alone.items() if peak else ():
        best = min(a["s_per_step"], key=a["s_per_step"].get)
        u = 100 * mfu(a["flops"], a["s_per_step"][best], peak)
        tf = a["flops"] / a["s_per_step"][best] / 1e12
        others = ", ".join(f"{k} {100 * mfu(a['flops'], v, peak):.1f}%" for k, v in a["s_per_step"].items() if k != best)
        rows.append(row(f"gpu/mfu_{BACKBONE[method]}", f"{BACKBONE[method]} ({method}, batch {a['batch']}): one training "
                        f"step's FLOPs (FlopCounterMode) / step time / peak dense bf16 of {name} ({peak / 1e12:.0f} TFLOPS), "
                        "best of eager, channels_last, torch.compile", u, "% of peak", goal=">= 35%", met=u >= 35,
                        note=f"{best}: {tf:.0f} TFLOPS, {a['flops'] / 1e9:.1f} GFLOP per step"
                        + (f"; {others}" if others else "")
                        + ("" if u >= 35 else "; not profiled yet (torch.profiler over step_bench's step): the "
                           "suspects are the per-GPU batch size, non-matmul kernels (normalisation, pooling, the "
                           "method's heads and losses, the optimiser) and host-side gaps between kernels")))
    if infer is not None:
        ms, note, batch = infer
        rows.append(row("gpu/stn_infer", f"stn_ranker inference (jobs/configs/gpu/stn_ranker.yaml: AlexNet, 10 test-time "
                        f"crops of 227 at 256 px + STN boxes, bf16) per image, batches of {batch}, one {name}",
                        ms, "ms/image", goal="<= 0.5 ms", met=ms <= 0.5, note=note))
    return rows


def gpu_config(method: str) -> Path:
    from jobs.cli_train import CONFIG_DIR

    return CONFIG_DIR / "gpu" / f"{method}.yaml"


# ------------------------------------------------------------------------------ the loop
def loop_rate(method: str, data: Path, run_dir: Path, steps: int, log_every: int, *, config: Path | None,
              sets: list[str]) -> float:
    """Median samples/s of the loop's log windows after the first (`attrlab train --local`)."""
    from jobs.cli import main

    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: a finished one would only resume
    args = ["train", method, "--data", str(data), "--out", str(run_dir), "--local", "--max-steps", str(steps),
            *(["--config", str(config)] if config else [])]
    for s in [*sets, "scaling.workers=1", "tracking.enabled=false", f"schedule.log_every={log_every}",
              f"eval.every_steps={10 * steps}", f"checkpoint.every_steps={10 * steps}"]:
        args += ["--set", s]
    if main(args) != 0:
        raise RuntimeError(f"attrlab {' '.join(args)} failed")
    logs = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in logs if "samples_per_s" in r]
    return statistics.median(rates[1:] or rates)


# ------------------------------------------------------------------------------ the step alone
def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def step_bench(method_name: str, data: Path, device: torch.device, *, config: Path | None, sets: list[str],
               steps: int, warmup: int, variants: tuple[str, ...] = ("eager", "channels_last", "compile"),
               deadline: float | None = None) -> dict[str, Any]:
    """One method's training step on pre-loaded batches on `device`: FLOPs per step, seconds per
    step and samples/s for each variant that runs, the loader's own rate and the batch size.
    Variants after `deadline` (time.monotonic()) are skipped; eager always runs."""
    from bench.data_bench import loader_rate, stepper
    from jobs.train import train_loader
    from jobs.cli_train import load_run_config
    from models import registry
    from shards.format import read_meta

    method = registry.get(method_name)
    cfg = load_run_config(method_name, config, [*sets, f"data.path={data.resolve()}"])
    meta = read_meta(data)
    if method.prepare_meta is not None:
        meta = method.prepare_meta(meta, data, cfg.data.train_split)
    loader = train_loader(method, cfg, data)
    micro = loader.dataset.batch_size()
    load, _, kept = loader_rate(loader, 10 if steps > 3 else 2, keep=4)
    batches = [_to(b, device) for b in kept]
    out: dict[str, Any] = {"s_per_step": {}, "samples_per_s": {}, "loader_per_s": load, "batch": micro,
                           "loader_workers": cfg.data.loader.num_workers}
    for variant in variants:
        if variant != "eager" and _late(deadline, f"{method_name} {variant}"):
            continue
        torch.manual_seed(0)
        try:
            model = method.build(cfg.model, meta).to(device)
            if variant == "channels_last":
                model = model.to(memory_format=torch.channels_last)
            elif variant == "compile":
                model.compile()  # in place: the class stays, so the method's unwrap() still finds it
            one = stepper(method, cfg, model, batches, micro, device)
            if variant == "eager":
                one()  # warm (cuDNN algorithm choice) before counting
                out["flops"] = count_flops(one)
            t = timed(one, steps, warmup, device)
        except Exception as e:  # e.g. torch.compile unavailable for a model: the others still count
            print(f"attrlab bench gpu: {method_name} {variant}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        out["s_per_step"][variant] = t
        out["samples_per_s"][variant] = micro / t
    if "eager" not in out["s_per_step"]:
        raise RuntimeError(f"{method_name}: the eager step failed")
    return out


# ------------------------------------------------------------------------------ inference
def stn_inference(device: torch.device, data: Path, batch: int, n: int = 10, *, config: Path | None = None,
                  sets: tuple[str, ...] = ()) -> tuple[float, str, int]:
    """(ms per image, note, batch) of stn_ranker's predict (10 test-time crops) on random uint8 images
    with `config` (default: the GPU config); `data`: shards whose attributes the model ranks."""
    from jobs.cli_train import load_run_config
    from models import registry
    from models.stn_ranker import predict
    from shards.format import read_meta

    cfg = load_run_config("stn_ranker", config or gpu_config("stn_ranker"), [*sets, f"data.path={data.resolve()}"])
    model = registry.get("stn_ranker").build(cfg.model, read_meta(data)).to(device).eval()
    size = cfg.data.augment.resize
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    per: dict[str, float] = {}
    for variant in ("eager", "channels_last"):
        m = model.to(memory_format=torch.channels_last) if variant == "channels_last" else model
        x = images.contiguous(memory_format=torch.channels_last) if variant == "channels_last" else images
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            per[variant] = 1000 * timed(lambda: predict(m, x), n, 3, device) / batch
    best = min(per, key=per.get)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        one_crop = 1000 * timed(lambda: predict(model, images, tta=1), n, 3, device) / batch
    return per[best], f"{best}; " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()) + f" ms; 1 crop: {one_crop:.3f} ms", batch
