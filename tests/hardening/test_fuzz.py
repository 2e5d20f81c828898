"""Hostile bytes down the path a received instance takes: spool -> header parse -> eligibility -> decode.

The harness lives in ``bench/fuzz.py`` (``python bench/fuzz.py --seconds N`` runs it for longer, with every
mutation); here it runs a fixed, derandomised budget. What an *escape* is, and how time and memory per
input are bounded, is written in that module's docstring.

Bugs the fuzzer found are kept as regression tests at the end, each with its minimal input.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import given

from bench.fuzz import (
    MIB,
    Case,
    Harness,
    Scope,
    Seed,
    apply,
    cases,
    fuzz_settings,
    run_one,
    seed_corpus,
)
from screener.core.config import EligibilityConfig
from screener.core.spool import Spool
from screener.imaging.pixels import PreprocessSpec
from screener.inference.prepare import prepare_instance
from screener.ingest.receive import read_header
from tests.hardening.conftest import Figure

EXAMPLES = 200  # HARDENING_FUZZ_EXAMPLES overrides; `python bench/fuzz.py --seconds N` runs longer
# The CI scope is every mutation family the bench runs, with smaller bombs to keep the budget.
CI_SCOPE = Scope(max_bomb_mib=32)


@pytest.fixture(scope="module")
def seeds() -> list[Seed]:
    return seed_corpus(full_size=("RG1_UNCR", "RG1_J2KI"))


def _harness(seeds: list[Seed], tmp_path: Path, *, header_must_answer: bool) -> Harness:
    harness = Harness(seeds, tmp_path / "spool", header_must_answer=header_must_answer)
    warm = harness.warm_up()
    assert {name: r.outcome for name, r in warm.items()} == {
        s.name: ("skipped" if s.name.startswith("RG3") else "ok") for s in seeds
    }, "every unmutated seed is analysed (RG3, an extremity, is skipped)"
    return harness


def test_fuzz_worker_path_gives_typed_answers_within_bounds(
    seeds: list[Seed], tmp_path: Path, figure: Figure
):
    """Spool write -> prepare_instance on the spooled file, as the worker runs it: no escape, bounded."""
    harness = _harness(seeds, tmp_path, header_must_answer=False)
    examples = int(os.environ.get("HARDENING_FUZZ_EXAMPLES") or EXAMPLES)

    @fuzz_settings(examples, derandomize=True)
    @given(case=cases(seeds, CI_SCOPE))
    def prop(case: Case) -> None:
        harness.property(case)

    started = time.perf_counter()
    prop()
    wall = time.perf_counter() - started
    stats = harness.stats
    assert stats.examples >= examples * 0.9, "hypothesis ran (almost) the whole budget"
    assert {"ok", "skipped", "failed"} <= set(stats.outcomes), stats.outcomes
    figure("fuzz inputs tried", stats.examples, "inputs", outcomes=stats.outcomes, wall_s=round(wall, 1))
    figure("fuzz max time per input", round(max(stats.full_seconds) * 1000, 1), "ms")
    figure("fuzz max peak memory per input", round(stats.peak_bytes / MIB, 1), "MiB")
    figure("fuzz escapes", len(stats.escapes), "")


def test_fuzz_listener_header_parse_answers_every_input(seeds: list[Seed], tmp_path: Path):
    """Spool write -> read_header, every mutation: read_header must answer (a problem string), not raise."""
    harness = _harness(seeds, tmp_path, header_must_answer=True)

    @fuzz_settings(EXAMPLES, derandomize=True)
    @given(case=cases(seeds, Scope()))
    def prop(case: Case) -> None:
        harness.property(case)

    prop()


# --- the bugs found, each with its minimal input ---------------------------------------------------------


def _seed(seeds: list[Seed], name: str) -> bytes:
    return next(s.data for s in seeds if s.name == name)


def _spooled(tmp_path: Path, data: bytes) -> Path:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.ensure_layout()
    return spool.path(spool.put(data).name)


@pytest.mark.parametrize(
    ("seed_name", "ops"),
    [
        pytest.param("RG1/10 explicit", (("truncate", 152),), id="truncated-in-file-meta"),
        pytest.param("RG1/10 explicit", (("nest", 500),), id="sequences-nested-500-deep"),
        pytest.param("RG1/10 deflated", (("flip", 354, 2),), id="corrupt-deflate-stream"),
        pytest.param(
            "RG1/10 explicit", (("syntax", "1.2.840.10008.1.2.1.99"),), id="explicit-labelled-deflated"
        ),
    ],
)
def test_read_header_answers_a_problem_for_damaged_files(
    seeds: list[Seed], tmp_path: Path, seed_name: str, ops: tuple[tuple[object, ...], ...]
):
    path = _spooled(tmp_path, apply(_seed(seeds, seed_name), ops))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = read_header(path)
    assert header.problem is not None


def test_deflate_bomb_costs_memory_in_proportion_to_what_was_sent(seeds: list[Seed], tmp_path: Path):
    data = apply(_seed(seeds, "RG1/10 explicit"), (("bomb", 48),))
    assert len(data) < MIB, "48 MiB of zeros deflate to a few tens of KiB"
    harness = Harness(seeds, tmp_path / "spool", header_must_answer=True)
    harness.warm_up()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_one(data, harness.spool, harness.spec, harness.rules, harness.bounds, header_must_answer=True)


@pytest.mark.parametrize(
    "descriptor",
    [(0, 0, 8), (1, 0, 8)],
    ids=["data-shorter-than-descriptor", "first-mapped-value-overflows"],
)
def test_voi_lut_disagreeing_with_its_descriptor_is_a_typed_decode_error(
    seeds: list[Seed], tmp_path: Path, descriptor: tuple[int, int, int]
):
    data = apply(_seed(seeds, "RG1/10 explicit"), (("lut", "VOILUTSequence", descriptor, b"\x00\x01"),))
    prepared = prepare_instance(
        1, str(_spooled(tmp_path, data)), PreprocessSpec(input_size=64), EligibilityConfig()
    )
    assert prepared.kind == "failed"
    assert prepared.reason is not None and "LUT" in prepared.reason


# --- found and fixed (screener/imaging/eligibility.py)
# ------------------------------------------------------------


def test_undecodable_header_value_is_skipped_with_its_name(seeds: list[Seed], tmp_path: Path):
    """Rows with an odd byte count: pydicom fails lazily, inside eligibility; the worker gets a reason."""
    data = apply(_seed(seeds, "RG1/10 explicit"), (("set", 0x00280010, "US", b"\x01\x02\x03"),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_instance(
            1, str(_spooled(tmp_path, data)), PreprocessSpec(input_size=64), EligibilityConfig()
        )
    assert prepared.kind == "skipped"
    assert prepared.reason is not None and "Rows cannot be decoded" in prepared.reason


def test_a_lying_length_never_puts_the_patient_name_in_a_reason(seeds: list[Seed], tmp_path: Path):
    """Modality's length field says 64: its value swallows the next elements, the patient name among them."""
    from bench.fuzz import CANARY_ID, CANARY_NAME, element_offsets

    data = _seed(seeds, "RG1/10 explicit")
    (offset,) = [off for tag, off, _ in element_offsets(data) if tag == 0x00080060]
    data = data[:offset] + (200).to_bytes(2, "little") + data[offset + 2 :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_instance(
            1, str(_spooled(tmp_path, data)), PreprocessSpec(input_size=64), EligibilityConfig()
        )
    assert prepared.kind == "skipped", prepared
    assert prepared.reason is not None and "malformed value" in prepared.reason
    assert CANARY_NAME.split("^")[0] not in prepared.reason and CANARY_ID not in prepared.reason
