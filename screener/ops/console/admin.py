"""Admin actions that run the same code as the command lines.

Deliveries are re-driven with :func:`screener.results.sender.retry_deliveries` (``screener deliveries
retry``). Promotion through the gate and rollback are the trainer's (``trainer models promote|rollback``):
the screener never imports the trainer, so they run as that command, with this daemon's settings file, as
the scheduler runs ``trainer retrain``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from screener.core.errors import ScreenerError

TRAINER_TIMEOUT_SECONDS = 600.0


class AdminError(ScreenerError):
    """An admin action could not run (the trainer command is missing or did not finish in time)."""


@dataclass(frozen=True)
class CommandResult:
    """How a trainer command ended: its exit code and its last lines of output (no PHI: model versions and
    figures only)."""

    command: str
    exit_code: int
    output: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def trainer_command(
    args: list[str], config_source: str | None, timeout: float = TRAINER_TIMEOUT_SECONDS
) -> CommandResult:
    """Run ``trainer ARGS...`` beside this interpreter with ``SCREENER_CONFIG`` = ``config_source``."""
    trainer = Path(sys.executable).with_name("trainer")
    if not trainer.is_file():
        raise AdminError(
            f"the trainer command is not installed beside {sys.executable}: pip install the package"
        )
    env = dict(os.environ)
    if config_source:
        env["SCREENER_CONFIG"] = config_source
    try:
        done = subprocess.run(
            [str(trainer), *args], env=env, capture_output=True, text=True, check=False, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise AdminError(f"trainer {' '.join(args)} did not finish within {timeout:.0f} s") from None
    lines = [line for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()]
    return CommandResult(f"trainer {' '.join(args)}", done.returncode, "\n".join(lines[-20:]))


def promote(version: str, config_source: str | None, *, force: bool = False) -> CommandResult:
    """``trainer models promote VERSION [--force]``: exit 0 promoted, 3 refused by the gate."""
    return trainer_command(["models", "promote", version, *(["--force"] if force else [])], config_source)


def rollback(config_source: str | None) -> CommandResult:
    """``trainer models rollback``."""
    return trainer_command(["models", "rollback"], config_source)
