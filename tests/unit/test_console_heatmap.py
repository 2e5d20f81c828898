"""The study page's heatmap overlay (models whose card has the heatmap output)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.console_data import ConsoleDb, client, make_db, sign_in


@pytest.fixture
def db(tmp_path: Path) -> ConsoleDb:
    return make_db(tmp_path)


def test_heatmap_overlay_is_served_where_the_prediction_has_one(db: ConsoleDb) -> None:
    import numpy as np
    from PIL import Image

    from screener.core.db.models import Prediction
    from screener.model.heatmap import encode_png

    sid = db.study_ids[0]
    ramp = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (32, 1))
    c = client(db)
    sign_in(c, "rui")
    assert "No heatmap" in c.get(f"/studies/{sid}").text
    assert c.get(f"/studies/{sid}/images/{sid}/heatmap.png").status_code == 404
    with Session(db.engine) as s, s.begin():
        pred = s.scalars(select(Prediction).where(Prediction.instance_id == sid)).one()
        pred.heatmap = encode_png(ramp)
    assert "heatmap overlay" in c.get(f"/studies/{sid}").text
    r = c.get(f"/studies/{sid}/images/{sid}/heatmap.png")
    assert r.status_code == 200
    rgb = np.asarray(Image.open(io.BytesIO(r.content)))
    assert rgb.shape == (512, 512, 3)
    # The map is hot on the right: colour (unequal channels) grows from left to right.
    spread = rgb.max(axis=2).astype(int) - rgb.min(axis=2).astype(int)
    assert spread[:, -64:].mean() > spread[:, :64].mean() + 20
