"""What every method's `attrlab report` figures share (matplotlib is imported only when drawing)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, title: str, out: Path, name: str, fontsize: int = 8) -> str:
    """Title, tighten, write OUT/NAME as PNG, close; returns NAME (the report links it)."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(Path(out) / name, dpi=90)
    plt.close(fig)
    return name
