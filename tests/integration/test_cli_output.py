"""Machine output is alone on stdout: every `--json`, `--format csv|json` and `config` command of `screener`
and `trainer`, run as a real subprocess with logging at INFO, pipes straight into a JSON or CSV parser
(log lines go to stderr). And `screener classify` reads a real chest radiograph written without preamble
or file meta information, as older modalities write it, and says what it assumed."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.helpers import SCREENER, rg1_dir

TRAINER = SCREENER.with_name("trainer")
REPORTS = ("daily", "positives", "turnaround", "performance", "deliveries")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Settings for a migrated, empty SQLite database; INFO logs as JSON lines (as under a pipe)."""
    root = tmp_path_factory.mktemp("cli-output")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCREENER")}
    env.update(
        {
            "SCREENER__DATABASE__URL": f"sqlite:///{root / 'screener.db'}",
            "SCREENER__STORAGE__SPOOL_DIR": str(root / "spool"),
            "SCREENER__LOGGING__LEVEL": "INFO",
            "SCREENER__LOGGING__FORMAT": "json",
        }
    )
    _run(SCREENER, env, "db", "upgrade")
    return env


def _run(program: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(program), *args], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.mark.parametrize(
    ("program", "args"),
    [
        (SCREENER, ("config",)),
        (TRAINER, ("config",)),
        (SCREENER, ("status", "--json")),
        (SCREENER, ("deliveries", "list", "--json")),
        *[(SCREENER, ("report", name, "--format", "json")) for name in REPORTS],
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v.name,
)
def test_json_output_parses_as_one_document(env: dict[str, str], program: Path, args: tuple[str, ...]):
    json.loads(_run(program, env, *args).stdout)


@pytest.mark.parametrize("name", REPORTS)
def test_csv_report_parses_with_its_header(env: dict[str, str], name: str):
    out = _run(SCREENER, env, "report", name, "--format", "csv").stdout
    assert not any(line.startswith("{") for line in out.splitlines()), out  # no JSON log line
    # One or more tables: an optional "# title" line, a header, its rows (an empty database may give a
    # table no columns at all).
    blocks: list[list[str]] = [[]]
    for line in out.splitlines():
        if line.startswith("# "):
            blocks.append([])
        elif line:
            blocks[-1].append(line)
    tables = [list(csv.reader(io.StringIO("\n".join(block)))) for block in blocks if block]
    assert tables or name in ("daily", "performance"), out
    for rows in tables:
        assert all(h.isidentifier() for h in rows[0]), rows[0]
        assert all(len(row) == len(rows[0]) for row in rows), rows


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """RG1_UNCR (CR, chest, PA) as it ships (Part 10) and re-written as a bare implicit VR little endian
    data set: no preamble, no file meta information."""
    root = tmp_path_factory.mktemp("bare")
    part10 = rg1_dir() / "RG1_UNCR.dcm"
    ds = pydicom.dcmread(part10)
    del ds.file_meta
    ds.preamble = None
    bare = root / "RG1_UNCR.bare"
    ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    head = bare.read_bytes()[:132]
    assert head[128:132] != b"DICM" and head[:4] == b"\x08\x00\x05\x00"  # starts with (0008,0005)
    return part10, bare


def test_classify_json_is_alone_on_stdout_and_reads_a_file_without_meta(
    env: dict[str, str], tiny_model_dir: Path, radiographs: tuple[Path, Path]
):
    part10, bare = radiographs
    res = _run(SCREENER, env, "classify", "--model", str(tiny_model_dir), "--json", str(part10), str(bare))
    doc = json.loads(res.stdout)  # failed while the engine.precision log line came first
    assert "engine.precision" in res.stderr
    first, second = doc["results"]
    assert first["status"] == second["status"] == "classified", doc
    assert first["note"] is None
    assert "no file meta information" in second["note"] and "Implicit VR Little Endian" in second["note"]
    assert second["probs"] == pytest.approx(first["probs"], abs=1e-6)  # the same pixels, the same answer

    text = _run(SCREENER, env, "classify", "--model", str(tiny_model_dir), str(bare)).stdout
    assert f"{bare}: {second['label']}" in text
    assert f"{bare}: note: no file meta information: read as Implicit VR Little Endian" in text
