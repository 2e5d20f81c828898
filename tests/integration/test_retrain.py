"""`trainer labels import`, `trainer retrain` (nightly job) and its lock, through the real CLI."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.helpers import SCREENER
from tests.unit.test_evaluate import REQUIRED_KEYS

TRAINER = SCREENER.with_name("trainer")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env.update(
        {
            "SCREENER__DATABASE__URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
            "SCREENER__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
            "SCREENER__TRAINER__WORKDIR": str(tmp_path / "training"),
            "SCREENER__TRAINER__LOCK_FILE": str(tmp_path / "training" / "retrain.lock"),
            "SCREENER__LOGGING__LEVEL": "WARNING",
            **extra,
        }
    )
    return env


def _trainer(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TRAINER), *args], env=env, capture_output=True, text=True, timeout=1200)


def test_labels_import_keeps_good_rows_and_reports_bad_ones_by_line(tmp_path: Path):
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "sop_instance_uid,study_instance_uid,accession_number,label,confirmed_by\n"
        "1.2.3.4,,,covid19,dr-a\n"
        "1.2.3.5,,,tuberculosis,dr-a\n"
        ",1.2.3,,Normal,dr-b\n"
        ",,,normal,dr-b\n"
        "1.2.x,,,normal,dr-b\n"
        ",,ACC-SECRET-77,viral_pneumonia,dr-c\n"
    )
    env = _env(tmp_path)
    res = _trainer(env, "labels", "import", str(csv))
    assert res.returncode == 0, res.stderr
    assert "imported 3 labels; 3 rows rejected" in res.stdout
    errors = res.stderr.splitlines()
    assert [e.split(":")[1] for e in errors if e.startswith(str(csv))] == ["3", "5", "6"]
    assert "tuberculosis" in res.stderr
    assert "ACC-SECRET-77" not in res.stdout + res.stderr
    engine = create_engine(env["SCREENER__DATABASE__URL"])
    with engine.connect() as conn:
        labels = sorted(r[0] for r in conn.execute(text("SELECT label FROM labels")))
    engine.dispose()
    assert labels == ["covid19", "normal", "viral_pneumonia"]


def _small_dataset(root: Path, cxr3_dir: Path, per_class: int) -> Path:
    for cls in ("covid19", "normal", "viral_pneumonia"):
        (root / cls).mkdir(parents=True)
        for png in sorted((cxr3_dir / cls).glob("*.png"))[:per_class]:
            (root / cls / png.name).symlink_to(png)
    return root


@pytest.mark.slow
def test_train_register_activate_then_evaluate_with_report_and_plots(tmp_path: Path, cxr3_dir: Path):
    data = _small_dataset(tmp_path / "data", cxr3_dir, 20)
    env = _env(tmp_path)
    out = tmp_path / "models" / "quick-cli"
    res = _trainer(
        env,
        "train",
        "--data",
        str(data),
        "--preset",
        "quick",
        "--epochs",
        "1",
        "--samples-per-epoch",
        "64",
        "--out",
        str(out),
        "--model-version",
        "quick-cli",
        "--register",
        "--activate",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "quick-cli promoted: no model was active" in res.stdout
    split_csv = out.with_name("quick-cli-test-split.csv")
    assert split_csv.is_file()
    run = out.with_name("quick-cli-run")  # the run lives beside --out, and says so first
    assert res.stdout.startswith(f"training run folder: {run} "), res.stdout
    for name in ("best.safetensors", "metrics.csv", "curves.png"):
        assert len(list(run.glob(f"*/{name}"))) == 2, f"{name} missing from {run}"
    assert not list(run.rglob("checkpoint.*")), "resumable checkpoints outlive the finished run"
    assert not (tmp_path / "training").exists()  # nothing under trainer.workdir (formerly ./var/training)
    card = json.loads((out / "card.json").read_text())
    assert 0.0 <= card["fusion_weight"] <= 1.0 and card["metrics"]
    evaluated = _trainer(
        env, "evaluate", "--model", str(out), "--data", str(split_csv), "--out", str(tmp_path / "eval")
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report) >= REQUIRED_KEYS, REQUIRED_KEYS - set(report)
    assert sum(map(sum, report["confusion"])) == report["n"] > 0
    for png in ("confusion.png", "roc.png", "reliability.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 10_000


@pytest.mark.slow
def test_retrain_twice_then_nothing_to_do_and_a_held_lock_exits_0(tmp_path: Path, cxr3_dir: Path):
    data = _small_dataset(tmp_path / "base", cxr3_dir, 12)
    env = _env(
        tmp_path,
        SCREENER__TRAINER__BASE_DATA=str(data),
        SCREENER__TRAINER__EPOCHS="1",
        SCREENER__TRAINER__SAMPLES_PER_EPOCH="64",
    )
    first = _trainer(env, "retrain")
    assert first.returncode == 0, first.stdout + first.stderr  # nothing active before: promoted
    assert first.stdout.startswith("retrain: promoted"), first.stdout
    runs = list((tmp_path / "training" / "models").glob("*-run"))
    assert len(runs) == 1 and not list(runs[0].rglob("checkpoint.*")), runs
    assert len(list(runs[0].glob("*/best.safetensors"))) == 2
    second = _trainer(env, "retrain")
    assert second.returncode == 3, second.stdout + second.stderr
    assert "kept the active model: 0 new confirmed labels" in second.stdout

    lock = tmp_path / "training" / "retrain.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        third = _trainer(env, "retrain")
    finally:
        os.close(fd)
    assert third.returncode == 0 and "another run holds" in third.stdout

    engine = create_engine(env["SCREENER__DATABASE__URL"])
    with engine.connect() as conn:
        query = text("SELECT status, model_version FROM training_runs ORDER BY id")
        runs = [tuple(r) for r in conn.execute(query)]
        active = conn.execute(text("SELECT version FROM model_versions WHERE status = 'active'")).scalar()
    engine.dispose()
    assert [r[0] for r in runs] == ["promoted", "kept"]
    assert active == runs[0][1]
    listing = _trainer(env, "models", "list")
    assert active in listing.stdout and "active" in listing.stdout
