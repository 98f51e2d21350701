"""The shape every benchmark figure takes, the machine it was measured on, and BENCHMARKS.md.

A figure is a `Row`: what was measured, attrlab's number, the comparison's number measured in the
same run, their ratio, the goal, met or not, and the machine. `attrlab bench GROUP` runs a group's
figures (bench/cli.py) and `write_markdown` merges its rows into BENCHMARKS.md by figure id:
a re-run replaces its own rows and keeps the others, so the last GPU figures stay when a later
run has no GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

TABLE_BEGIN = "<!-- attrlab bench rows: generated, keep this line -->"
TABLE_END = "<!-- end of attrlab bench rows -->"


@dataclass(frozen=True)
class Row:
    id: str               # stable key, e.g. "train/ray_overhead"
    group: str            # train | data | retrieval | serve | methods | gpu
    what: str             # what was measured, in words
    ours: float           # attrlab's number
    unit: str             # its unit ("samples/s", "ms/query", ...)
    baseline: float | None = None  # the comparison's number, same run, same unit
    baseline_label: str = ""       # what the comparison is
    ratio: float | None = None     # the figure the goal is about (higher is better unless goal says <=)
    goal: str = ""                 # e.g. ">= 0.95", "< 50 ms/query"; "" = reported, no goal
    met: bool | None = None        # None when there is no goal
    machine: str = ""
    measured: str = ""             # UTC date-time
    note: str = ""                 # what limits it, when a goal is missed; the command

    def check(self) -> None:
        """A well-formed row (the smoke tests call this): finite numbers, a verdict iff a goal."""
        for name in ("ours", "baseline", "ratio"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{self.id}: {name} = {v!r} is not a finite number")
        if (self.goal == "") != (self.met is None):
            raise ValueError(f"{self.id}: a goal needs a verdict and a verdict a goal ({self.goal!r}, {self.met!r})")
        if not self.id.startswith(self.group + "/"):
            raise ValueError(f"{self.id}: id must start with its group {self.group!r}/")


def row(id: str, what: str, ours: float, unit: str, *, baseline: float | None = None, baseline_label: str = "",
        ratio: float | None = None, goal: str = "", met: bool | None = None, note: str = "") -> Row:
    """A Row stamped with this machine and time; ratio defaults to ours / baseline."""
    if ratio is None and baseline:
        ratio = ours / baseline
    return Row(id=id, group=id.split("/", 1)[0], what=what, ours=float(ours), unit=unit,
               baseline=None if baseline is None else float(baseline), baseline_label=baseline_label,
               ratio=ratio, goal=goal, met=met, machine=machine(), note=note,
               measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def at_least(value: float, goal: float) -> tuple[str, bool]:
    return f">= {goal:g}", value >= goal


def machine() -> str:
    """CPU model x logical cores, RAM, the accelerator if any, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    text = f"{cpu} x{os.cpu_count()}{mem}"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name(0)}"
        text += f", torch {torch.__version__}"
    except ImportError:
        pass
    return text


# ------------------------------------------------------------------------------------ markdown
def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"


def _cells(r: Row) -> list[str]:
    verdict = "-" if r.met is None else ("met" if r.met else "**not met**")
    return [r.id, r.what, f"{_fmt(r.ours)} {r.unit}", f"{_fmt(r.baseline)} {r.unit if r.baseline is not None else ''} "
            f"{('(' + r.baseline_label + ')') if r.baseline_label else ''}".strip(),
            _fmt(r.ratio), r.goal or "-", verdict, r.machine, r.measured, r.note]


HEADER = ["figure", "what", "attrlab", "comparison", "ratio", "goal", "verdict", "machine", "measured", "note"]


ROWS_JSON = "<!-- rows-json: "  # the rows as JSON, one line, after the table; hand-written notes may follow it


def _parts(path: Path) -> tuple[list[Row], str]:
    """(rows, hand-written notes) of an existing BENCHMARKS.md: the rows from the JSON comment next to
    the table, the notes as the text after that comment's line (profiles, how to read a figure)."""
    text = path.read_text() if path.is_file() else ""
    if ROWS_JSON not in text:
        return [], ""
    after = text.split(ROWS_JSON, 1)[1]
    blob, _, rest = after.partition(" -->")
    return [Row(**r) for r in json.loads(blob)], rest.split("\n", 1)[1] if "\n" in rest else ""


def read_rows(path: Path) -> list[Row]:
    """The rows of an existing BENCHMARKS.md (kept in a JSON comment next to the table)."""
    return _parts(path)[0]


def write_markdown(rows: list[Row], path: Path, intro: str = "") -> list[Row]:
    """Merge `rows` into BENCHMARKS.md by id (new ones replace old ones); returns all rows."""
    for r in rows:
        r.check()
    old, notes = _parts(path)
    merged = {r.id: r for r in old}
    merged.update({r.id: r for r in rows})
    order = ["train", "data", "retrieval", "serve", "methods", "gpu"]
    allrows = sorted(merged.values(), key=lambda r: (order.index(r.group) if r.group in order else 99, r.id))
    lines = ["# attrlab benchmarks", "", intro or (
        "Every speed figure as a ratio against a comparison measured in the same run, with its goal. "
        "Written by `attrlab bench all` (one group: `attrlab bench GROUP`); a group's re-run replaces "
        "its rows and keeps the rest, so GPU figures stay when a later run has no GPU."), "", TABLE_BEGIN,
        "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in allrows:  # a "|" inside a cell (a norm, ||r||) is escaped, as GitHub's tables read it
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |")
    missed = [r for r in allrows if r.met is False]
    lines += [TABLE_END, "", f"{sum(r.met is True for r in allrows)} goals met, {len(missed)} not met, "
              f"{sum(r.met is None for r in allrows)} figures without a goal.", ""]
    if missed:
        lines += ["## Goals not met", ""] + [f"- **{r.id}**: {r.note or 'no analysis yet'}" for r in missed] + [""]
    lines.append(ROWS_JSON + json.dumps([dataclasses.asdict(r) for r in allrows]) + " -->")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n" + notes)
    tmp.replace(path)  # atomic: an interrupted write leaves the old file whole
    return allrows


Group = Callable[[Any], list[Row]]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n for a measurement, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
