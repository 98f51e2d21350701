"""A training progress bar for the driver, fed by rank 0's RUN_DIR/train_log.jsonl.

Ray Train workers run in other processes (other machines); the driver sees their progress through
the log file rank 0 appends to, which it shares on a local cluster or shared storage. Where it does
not (object-store storage), the bar simply stays at the start. `attrlab train` shows it on stderr.
"""
from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def follow(run_dir: Path, total: int, label: str, poll_s: float = 1.0) -> Iterator[None]:
    from tqdm import tqdm

    log = Path(run_dir) / "train_log.jsonl"
    offset = log.stat().st_size if log.exists() else 0
    # a terminal gets a live bar; a log file a plain line at every quarter, not a flood of redraws
    bar = tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
               disable=not sys.stderr.isatty())
    quarter = [0]

    def plain(step: int, post: dict[str, str]) -> None:
        if bar.disable and total > 0 and step * 4 // total > quarter[0]:
            quarter[0] = step * 4 // total
            extra = "".join(f", {k} {v}" for k, v in post.items())
            print(f"{label}: step {step}/{total}{extra}", file=sys.stderr, flush=True)
    stop = threading.Event()

    def read_new() -> None:
        nonlocal offset
        if not log.exists():
            return
        with open(log) as f:
            f.seek(offset)
            chunk = f.read()
        done = chunk.rfind("\n") + 1  # a half-written last line waits for the next poll
        offset += len(chunk[:done].encode())
        for line in chunk[:done].splitlines():
            row = json.loads(line)
            if "step" in row and row["step"] > bar.n:
                bar.update(row["step"] - bar.n)
            post = {k.split("/", 1)[1]: f"{v:.3g}" for k, v in row.items() if k.startswith("loss/")}
            if "samples_per_s" in row:
                post["samples/s"] = f"{row['samples_per_s']:.1f}"
            if post:
                bar.set_postfix(post, refresh=False)
            if "step" in row:
                plain(row["step"], post)

    def loop() -> None:
        while not stop.wait(poll_s):
            with contextlib.suppress(OSError, ValueError):
                read_new()

    thread = threading.Thread(target=loop, name="attrlab-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError, ValueError):
            read_new()
        bar.close()
