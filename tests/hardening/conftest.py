"""Shared pieces of the hardening suite (`pytest tests/hardening`).

Every hardening test records the figures RELIABILITY.md quotes (how many tries, how many lost, p99, peak
memory) through the ``figure`` fixture. They are appended as JSON lines to the file named by
``HARDENING_FIGURES`` (default ``var/hardening-figures.jsonl``) so one run of the suite produces the table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

FIGURES_ENV = "HARDENING_FIGURES"
ROUNDS_ENV = "HARDENING_ROUNDS"

Figure = Callable[..., None]


def rounds(default: int) -> int:
    """Repetitions of a randomised fault test: ``HARDENING_ROUNDS`` when set, else ``default``."""
    value = os.environ.get(ROUNDS_ENV, "").strip()
    return int(value) if value else default


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Figure:
    """``figure(name, value, unit="", **detail)`` records one measured figure of the running test."""
    path = Path(os.environ.get(FIGURES_ENV) or "var/hardening-figures.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(name: str, value: float | int | str, unit: str = "", **detail: object) -> None:
        line = {
            "test": request.node.nodeid,
            "name": name,
            "value": value,
            "unit": unit,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **detail,
        }
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=str) + "\n")
        print(f"FIGURE {name} = {value} {unit}".rstrip())

    return record
