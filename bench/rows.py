"""One benchmark row = `attrlab train METHOD --local` + `attrlab eval`, resumable (a row with a
metrics.json is not re-run). Shared by the ablation scripts in bench/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_row(method: str, data: Path, run: Path, steps: int, sets: list[str], threads: int = 1) -> dict:
    """Train (in-process loop, no Ray start-up) and evaluate one configuration; returns
    {"metrics": metrics.json, "wall_s": train + eval seconds}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not (run / "metrics.json").exists():
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "jobs.cli", "train", method, "--data", str(data), "--out", str(run),
               "--local", "--max-steps", str(steps), *[a for s in sets for a in ("--set", s)]]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "jobs.cli", "eval", str(run)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        (run / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")
    return {"metrics": json.loads((run / "metrics.json").read_text()),
            "wall_s": float((run / "wall_s.txt").read_text())}
