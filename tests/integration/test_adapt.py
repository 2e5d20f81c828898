"""`trainer adapt`: a base model fine-tuned on a "site's" labelled images, through the real CLI.

The base is the tiny test model (resnet18 + resnet18 at 64 px, 8 cxr3 images per class); the site is 10
other real cxr3 images per class. The figures of such a model mean nothing; the test checks the
contract: a new, verifiable model directory whose card names its base, the site data's digest and the
before/after figures on site images it never trained on, a gate re-fitted on the site, the printed
summary, the exit status, and registration as a candidate.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from screener.model.modelcard import CLASSES, load_model_dir
from tests.helpers import SCREENER, train_tiny_model

TRAINER = SCREENER.with_name("trainer")


@pytest.mark.slow
def test_adapt_writes_a_model_whose_card_records_base_site_digest_and_figures(tmp_path: Path) -> None:
    value = os.environ.get("CXR3_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("CXR3_DIR not set to the cxr3 dataset folder")
    cxr3 = Path(value)
    base, _ = train_tiny_model(tmp_path / "base", cxr3, 8, "base-1")
    site = tmp_path / "site"
    for cls in CLASSES:
        (site / cls).mkdir(parents=True)
        for png in sorted((cxr3 / cls).glob("*.png"))[8:18]:  # images the base never saw
            (site / cls / png.name).symlink_to(png)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env.update(
        {
            "SCREENER__DATABASE__URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
            "SCREENER__LOGGING__LEVEL": "WARNING",
        }
    )
    out = tmp_path / "models" / "site-1"
    args = ["adapt", "--model", str(base), "--data", str(site), "--out", str(out)]
    res = subprocess.run(
        [str(TRAINER), *args, "--epochs", "1", "--samples-per-epoch", "16", "--register"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode in (0, 3), res.stdout + res.stderr  # 3: not better than its base on the site
    assert f"model base-1+site (adapted from base-1) written to {out}" in res.stdout
    assert "site test split (n=" in res.stdout and "macro ROC AUC" in res.stdout
    assert (res.returncode == 3) == ("NOT better than its base" in res.stdout)

    loaded = load_model_dir(out)  # every file verified
    card = loaded.card
    assert card.parent_version == "base-1" and card.version == "base-1+site"
    adaptation = card.metrics["adaptation"]
    assert adaptation["base_model"] == "base-1" and adaptation["site_images"] == 30
    assert adaptation["site_data_digest"] == card.training_data_digest
    counts = adaptation["split_counts"]
    n_test = sum(counts["test"].values())
    assert n_test > 0 and adaptation["before"]["n"] == adaptation["after"]["n"] == n_test
    for side in ("before", "after"):
        assert set(adaptation[side]) >= {"accuracy", "macro_auc", "ece", "sensitivity"}
    assert card.gate is not None and card.gate.fitted_on["n"] == sum(counts["train"].values())
    held_out = out.with_name("site-1-site-test.csv")
    with held_out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_test and {Path(r["path"]).name for r in rows} <= {
        p.name for p in site.rglob("*.png")
    }

    again = subprocess.run([str(TRAINER), *args], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already exists" in again.stderr

    engine = create_engine(env["SCREENER__DATABASE__URL"])
    with engine.connect() as conn:
        status = conn.execute(
            text("SELECT status FROM model_versions WHERE version = 'base-1+site'")
        ).scalar()
    engine.dispose()
    assert status == "candidate"
    assert (
        json.loads((out / "card.json").read_text())["metrics"]["adaptation"]["after"] == adaptation["after"]
    )
