"""Shared pieces of the hardening suite (`pytest tests/hardening`).

Every hardening test records the figures RELIABILITY.md quotes (how many tries, how many lost, p99, peak
memory) through the ``figure`` fixture. They are appended as JSON lines to the file named by
``HARDENING_FIGURES`` (default ``var/hardening-figures.jsonl``) so one run of the suite produces the table.
"""

from __future__ import annotations

import contextlib
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


FULL_STRENGTH_ROUNDS = 5
"""``tests/hardening/run`` sets ``HARDENING_ROUNDS=5``: from there on the suite runs at full strength."""


def full_strength() -> bool:
    """True under ``tests/hardening/run`` (``HARDENING_ROUNDS`` >= 5); CI runs the same tests smaller."""
    return rounds(2) >= FULL_STRENGTH_ROUNDS


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


def proc_status(pid: int) -> dict[str, int]:
    """Numeric fields of /proc/PID/status (``VmRSS``, ``VmHWM`` in KiB, ``Threads``); {} once it is gone."""
    fields: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return fields
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0])
    return fields


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and its direct children (e.g. a preprocessing pool), KiB."""
    total = proc_status(pid).get("VmRSS", 0)
    children: set[str] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):  # a pool started by any thread is listed there
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            children.update((task / "children").read_text().split())
    return total + sum(proc_status(int(c)).get("VmRSS", 0) for c in children)


class PeakSampler:
    """Samples a process tree's RSS in the background; ``peak_kib`` is the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import threading

        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return float(ordered[int(rank) - 1])
