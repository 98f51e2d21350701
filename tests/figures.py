"""Figures the fault and multi-node tests measure, printed at the end of every pytest run
(tests/conftest.py: pytest_terminal_summary), so `make test` shows them without -s."""
from __future__ import annotations

FIGURES: list[str] = []


def figure(text: str) -> None:
    print("\n" + text)
    FIGURES.append(text)
