"""docs/conformance.md stays in step with the lists the code uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from screener.ingest.listener import CHEST_SOP_CLASSES, TRANSFER_SYNTAXES
from screener.ops import conformance
from screener.results.sc import SC_SOP_CLASS_UID
from screener.results.sr import INDETERMINATE_CODE, PAPER_CONCEPTS, SR_SOP_CLASS_UID

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "conformance.md"


def test_committed_tables_match_the_code() -> None:
    document = DOC.read_text(encoding="utf-8")
    committed = conformance.extract_block(document)
    expected = conformance.generated_block(conformance.render_tables())
    assert committed == expected, (
        "docs/conformance.md is out of date with the code; run "
        "`python -m screener.ops.conformance --write docs/conformance.md` and review the diff"
    )


def test_document_names_every_class_syntax_and_code() -> None:
    document = DOC.read_text(encoding="utf-8")
    for uid in TRANSFER_SYNTAXES:
        assert f"`{uid}`" in document, uid
    for uid in CHEST_SOP_CLASSES:
        assert f"`{uid}`" in document, uid
    assert f"`{SR_SOP_CLASS_UID}`" in document
    assert "Comprehensive 3D SR Storage" in document
    assert f"`{SC_SOP_CLASS_UID}`" in document
    for code in [c.code for c in PAPER_CONCEPTS.values()] + [INDETERMINATE_CODE.value]:
        assert f"`{code}`" in document
    for status in ("`0x0000`", "`0xA700`", "`0x0111`", "`0xC000`"):
        assert status in document


def test_write_and_check_modes(tmp_path: Path) -> None:
    stale = tmp_path / "conformance.md"
    stale.write_text(f"# Title\n\nprose\n\n{conformance.BEGIN}\nold table\n{conformance.END}\n\nafter\n")
    cmd = [sys.executable, "-m", "screener.ops.conformance"]
    check = subprocess.run([*cmd, "--check", str(stale)], capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 1 and "out of date" in check.stderr

    write = subprocess.run([*cmd, "--write", str(stale)], capture_output=True, text=True, cwd=ROOT)
    assert write.returncode == 0, write.stderr
    text = stale.read_text()
    assert text.startswith("# Title\n\nprose\n\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text and "Table G.4" in text

    again = subprocess.run([*cmd, "--check", str(stale)], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr


def test_missing_markers_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BEGIN GENERATED"):
        conformance.splice("no markers here", "tables")
    doc = tmp_path / "x.md"
    doc.write_text("no markers\n")
    assert conformance.main(["--write", str(doc)]) == 2
    assert doc.read_text() == "no markers\n"
