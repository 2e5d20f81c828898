"""A tiny progress bar on stderr (no dependency): ``with Progress(total) as bar: bar.step(label)``."""

from __future__ import annotations

import sys
import time
from types import TracebackType


class Progress:
    """Draws ``[#####.....] 5/10 label 12.3s`` on stderr: in place on a TTY, else one line per step."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.width = width
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, label: str = "") -> None:
        """Advance by one and redraw."""
        self.done = min(self.done + 1, self.total)
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {label} {time.perf_counter() - self.start:.1f}s"
        end = "\r" if self.tty else "\n"
        sys.stderr.write(f"\x1b[2K{line}{end}" if self.tty else f"{line}{end}")
        sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
