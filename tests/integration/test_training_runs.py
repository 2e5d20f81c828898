"""Training run folders (trainer/runs.py): beside the model directory, resumable only by the same command,
slimmed to what an audit reads once the model exists, and the nightly job's old runs pruned by
trainer.keep_runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from screener.core.config import load_config
from screener.core.errors import ConfigError, TrainingError
from screener.imaging.pixels import PreprocessSpec
from trainer.data import ImageDataset, limit_per_class, load_samples
from trainer.runs import RUN_FILE, finish_run, open_run, prune_runs, run_dir_for
from trainer.train import (
    BEST_WEIGHTS,
    CHECKPOINT_JSON,
    CHECKPOINT_TENSORS,
    CURVES_PNG,
    METRICS_CSV,
    TrainConfig,
    train_backbone,
)


def test_the_run_lives_beside_the_model_directory(tmp_path: Path):
    assert run_dir_for(tmp_path / "models" / "quick-1") == tmp_path / "models" / "quick-1-run"


def test_a_run_resumes_only_for_the_same_recipe(tmp_path: Path):
    run = tmp_path / "m-run"
    recipe = {"preset": "quick", "data": [str(tmp_path / "data")], "seed": 0, "pretrained_dir": None}
    assert open_run(run, kind="train", model_dir=tmp_path / "m", recipe=recipe) is False
    assert open_run(run, kind="train", model_dir=tmp_path / "m", recipe=dict(recipe)) is True
    with pytest.raises(TrainingError, match="another command"):
        open_run(run, kind="train", model_dir=tmp_path / "m", recipe={**recipe, "seed": 1})
    stranger = tmp_path / "photos-run"
    stranger.mkdir()
    with pytest.raises(TrainingError, match="not a training run folder"):
        open_run(stranger, kind="train", model_dir=tmp_path / "photos", recipe=recipe)


def test_finish_keeps_best_weights_metrics_and_curves_of_a_real_backbone(cxr3_dir: Path, tmp_path: Path):
    samples = limit_per_class(load_samples(cxr3_dir), 4, seed=0)
    spec = PreprocessSpec(input_size=64)
    run = tmp_path / "tiny-run"
    open_run(run, kind="train", model_dir=tmp_path / "tiny", recipe={})
    cfg = TrainConfig(arch="resnet18", input_size=64, epochs=1, batch_size=4, limit_batches=1)
    train_backbone(
        cfg, ImageDataset(samples, spec), ImageDataset(samples[:4], spec), run / "0-resnet18", progress=False
    )
    backbone = run / "0-resnet18"
    before = {p.name: p.stat().st_size for p in backbone.iterdir()}
    assert before[CHECKPOINT_TENSORS] > 2 * before[BEST_WEIGHTS]  # weights + Adam's two moments

    freed = finish_run(run, "tiny-1")

    assert freed >= before[CHECKPOINT_TENSORS]
    assert sorted(p.name for p in backbone.iterdir()) == sorted([BEST_WEIGHTS, METRICS_CSV, CURVES_PNG])
    assert CHECKPOINT_JSON in before
    record = json.loads((run / RUN_FILE).read_text())
    assert record["version"] == "tiny-1" and record["finished_at"]


def _nightly_run(models: Path, version: str, started: str, kind: str = "retrain") -> Path:
    run = run_dir_for(models / version)
    open_run(run, kind=kind, model_dir=models / version, recipe={"version": version})
    record = json.loads((run / RUN_FILE).read_text())
    (run / RUN_FILE).write_text(json.dumps({**record, "started_at": started}))
    (models / version).mkdir()  # its model directory: never pruned
    return run


def test_prune_keeps_the_newest_nightly_runs_and_nothing_else(tmp_path: Path):
    models = tmp_path / "models"
    models.mkdir()
    runs = [_nightly_run(models, f"quick-{n}", f"2026-12-0{n}T02:30:00+00:00") for n in (3, 1, 4, 2)]
    manual = _nightly_run(models, "by-hand", "2026-11-01T00:00:00+00:00", kind="train")
    unrelated = models / "notes-run"
    unrelated.mkdir()

    removed = prune_runs(models, keep=2)

    assert removed == [runs[1], runs[3]]  # quick-1, quick-2: the two oldest
    left = {"quick-1", "quick-2", "quick-3", "quick-4", "quick-3-run", "quick-4-run", "by-hand"}
    assert {p.name for p in models.iterdir()} == {*left, "by-hand-run", "notes-run"}
    assert manual.is_dir() and unrelated.is_dir()
    assert prune_runs(models, keep=0) == []  # 0 keeps every run


def test_keep_runs_is_a_validated_setting(tmp_path: Path):
    assert load_config(None, environ={}).trainer.keep_runs == 5
    assert load_config(None, environ={"SCREENER__TRAINER__KEEP_RUNS": "2"}).trainer.keep_runs == 2
    with pytest.raises(ConfigError, match="keep_runs"):
        load_config(None, environ={"SCREENER__TRAINER__KEEP_RUNS": "-1"})
