"""Training run folders: where a run keeps its working files, what is left once it is done, and retention.

A run lives beside the model directory it makes: ``--out var/models/quick-1`` trains in
``var/models/quick-1-run/`` (one ``<index>-<arch>/`` folder per candidate backbone), next to the
``quick-1-test-split.csv`` and ``quick-1-eval/`` siblings. Re-running the same command after an
interruption resumes from the checkpoints there; ``run.json`` records what the run was asked for, so a
different command cannot resume it by mistake.

While a backbone trains, its folder holds a resumable checkpoint (model, optimizer state and RNG state:
about three times the weights). Once the model directory is written nothing can resume any more, so
:func:`finish_run` drops the checkpoints and keeps what an audit reads: each backbone's best weights,
``metrics.csv`` and ``curves.png``. :func:`prune_runs` deletes the oldest runs of the nightly job beyond
``trainer.keep_runs``; the model directories themselves (the registry points at them) are never touched.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from screener.core.errors import TrainingError
from screener.core.logs import get_logger
from trainer.train import CHECKPOINT_JSON, CHECKPOINT_TENSORS

log = get_logger("trainer.runs")

RUN_SUFFIX = "-run"
RUN_FILE = "run.json"


def run_dir_for(model_dir: Path) -> Path:
    """The folder of the run that makes ``model_dir``: its sibling ``<name>-run``."""
    return model_dir.with_name(f"{model_dir.name}{RUN_SUFFIX}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write(run_dir: Path, record: dict[str, Any]) -> None:
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(run_dir / RUN_FILE)


def _read(run_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def open_run(run_dir: Path, *, kind: str, model_dir: Path, recipe: dict[str, Any]) -> bool:
    """Create ``run_dir`` for a new run, or reopen it to resume one asked for with the same ``recipe``.

    ``kind`` is ``train`` or ``retrain`` (only the latter is pruned). Returns True when an earlier run is
    resumed. Raises :class:`TrainingError` when ``run_dir`` exists but is not a run folder, or holds a run
    of a different recipe (resuming it would mix two trainings).
    """
    recipe = json.loads(json.dumps(recipe, default=str))  # paths as strings, as they read back
    if run_dir.exists():
        record = _read(run_dir)
        if record is None:
            raise TrainingError(
                f"{run_dir} exists but is not a training run folder (no readable {RUN_FILE}): move it away "
                "or choose another --out"
            )
        if record.get("recipe") != recipe:
            raise TrainingError(
                f"{run_dir} holds an interrupted run of another command ({record.get('recipe')}): delete it "
                "to start this one, or re-run the original command to resume it"
            )
        record.update(resumed_at=_now(), finished_at=None)
        _write(run_dir, record)
        return True
    run_dir.mkdir(parents=True)
    _write(
        run_dir,
        {
            "kind": kind,
            "model_dir": str(model_dir),
            "recipe": recipe,
            "started_at": _now(),
            "finished_at": None,
        },
    )
    return False


def finish_run(run_dir: Path, version: str) -> int:
    """Drop the resumable checkpoints of a run whose model directory is written; returns the bytes freed.

    Keeps each backbone's ``best.safetensors``, ``metrics.csv`` and ``curves.png`` and records the model
    version and the finishing time in ``run.json``.
    """
    freed = 0
    for name in (CHECKPOINT_TENSORS, CHECKPOINT_JSON):
        for path in run_dir.glob(f"*/{name}"):
            freed += path.stat().st_size
            path.unlink()
    record = _read(run_dir) or {}
    record.update(version=version, finished_at=_now())
    _write(run_dir, record)
    log.info("run.finished", folder=str(run_dir), freed_mb=round(freed / 1e6, 1))
    return freed


def prune_runs(folder: Path, keep: int, *, kind: str = "retrain") -> list[Path]:
    """Delete the oldest run folders of ``kind`` directly under ``folder`` beyond the newest ``keep``.

    ``keep = 0`` keeps them all. Only folders with a ``run.json`` of that kind are considered; model
    directories and anything else stay. Returns the folders deleted, oldest first.
    """
    if keep <= 0 or not folder.is_dir():
        return []
    runs: list[tuple[str, Path]] = []
    for path in folder.iterdir():
        if not path.name.endswith(RUN_SUFFIX) or path.is_symlink() or not path.is_dir():
            continue
        record = _read(path)
        if record is not None and record.get("kind") == kind:
            runs.append((str(record.get("started_at", "")), path))
    runs.sort()
    removed = [path for _, path in runs[: max(0, len(runs) - keep)]]
    for path in removed:
        shutil.rmtree(path)
    if removed:
        log.info("runs.pruned", folder=str(folder), removed=[p.name for p in removed], kept=keep)
    return removed
