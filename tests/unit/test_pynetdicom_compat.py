"""pynetdicom internals are touched in one module (screener/core/pynetdicom_compat.py), checked at start-up,
and
pinned to the minor versions it was tested with; C-STORE statuses are read from pynetdicom.status."""

from __future__ import annotations

import threading
import tomllib
from pathlib import Path

import pynetdicom
import pytest
from packaging.requirements import Requirement
from pynetdicom import _config, dimse_messages
from pynetdicom.dimse import DIMSEServiceProvider

from screener.core import pynetdicom_compat
from screener.core.errors import IncompatibleLibraryError, ScreenerError
from screener.results.sender import DELIVERED_WARNINGS, classify_status

REPO = Path(__file__).resolve().parents[2]


def test_the_installed_pynetdicom_has_every_internal_we_touch():
    pynetdicom_compat.check()


@pytest.mark.parametrize(
    ("owner", "name", "named"),
    [
        (dimse_messages, "NamedTemporaryFile", "dimse_messages.NamedTemporaryFile"),
        (_config, "STORE_RECV_CHUNKED_DATASET", "_config.STORE_RECV_CHUNKED_DATASET"),
        (_config, "LOG_REQUEST_IDENTIFIERS", "_config.LOG_HANDLER_LEVEL, LOG_REQUEST_IDENTIFIERS"),
        (DIMSEServiceProvider, "get_msg", "DIMSEServiceProvider.get_msg"),
    ],
)
def test_a_missing_internal_stops_start_up_naming_it_and_the_version(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, named: str
):
    monkeypatch.delattr(owner, name)  # as a pynetdicom release without it would be
    with pytest.raises(IncompatibleLibraryError) as caught:
        pynetdicom_compat.check()
    message = str(caught.value)
    assert isinstance(caught.value, ScreenerError)
    assert f"pynetdicom {pynetdicom.__version__}" in message and named in message
    assert "3.0.x" in message


def test_pynetdicom_is_pinned_to_the_tested_minor_versions():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in deps if Requirement(d).name == "pynetdicom"]
    for minor in pynetdicom_compat.TESTED_MINOR_VERSIONS:
        assert pin.specifier.contains(f"{minor}.99")  # every patch release of a tested minor version
    assert not pin.specifier.contains("3.1.0") and not pin.specifier.contains("4.0.0")
    installed = ".".join(pynetdicom.__version__.split(".")[:2])
    assert installed in pynetdicom_compat.TESTED_MINOR_VERSIONS


def test_install_keeps_pynetdicoms_own_uid_check_outside_our_listeners():
    pynetdicom_compat.install()
    pynetdicom_compat.install()  # idempotent
    assert dimse_messages.NamedTemporaryFile is pynetdicom_compat._open_received_file
    assert _config.STORE_RECV_CHUNKED_DATASET is True
    # Not an association thread of ours: pynetdicom's validator still answers (64 characters at most).
    results: list[tuple[bool, str]] = []
    thread = threading.Thread(target=lambda: results.append(_config.VALIDATORS["UI"]("1." + "2" * 70)))
    thread.start()
    thread.join()
    assert results[0][0] is False
    assert _config.VALIDATORS["UI"]("1.2.840.10008.1.1")[0] is True


def test_quiet_logging_turns_off_dataset_and_identifier_logs():
    pynetdicom_compat.quiet_logging("WARNING")
    assert _config.LOG_HANDLER_LEVEL == "none"
    assert _config.LOG_REQUEST_IDENTIFIERS is False and _config.LOG_RESPONSE_IDENTIFIERS is False


@pytest.mark.parametrize(
    ("status", "delivered", "retryable", "error"),
    [
        (0x0000, True, False, None),
        (0xB000, True, False, None),  # Coercion of Data Elements
        (0xB007, True, False, None),  # Data Set Does Not Match SOP Class (warning)
        (0xB123, True, False, None),  # any other warning: stored
        (0x0111, True, False, None),  # Duplicate SOP Instance: our deterministic UID is there
        (0xA700, False, True, "peer out of resources (0xA700)"),
        (0xA7FF, False, True, "peer out of resources (0xA7FF)"),
        (0xA900, False, False, "peer says the data set does not match the SOP class (0xA900)"),
        (0xC000, False, False, "peer cannot understand the data set (0xC000)"),
        (0xCFFF, False, False, "peer cannot understand the data set (0xCFFF)"),
        (0x0110, False, True, "failure status 0x0110"),  # Processing Failure
        (0xA801, False, True, "failure status 0xA801"),  # a Move/Get status: not ours to know
        (None, False, True, "no response (association refused, aborted or timed out)"),
    ],
)
def test_delivery_outcome_of_each_cstore_status(
    status: int | None, delivered: bool, retryable: bool, error: str | None
):
    outcome = classify_status(status)
    assert (outcome.delivered, outcome.retryable, outcome.error) == (delivered, retryable, error)


def test_the_delivered_warnings_come_from_the_storage_status_table():
    # Storage's own (PS3.4 Table B.2-1), the general ones it lists (PS3.7 C), and the duplicate.
    assert {0xB000, 0xB006, 0xB007, 0x0107, 0x0116, 0x0111} == DELIVERED_WARNINGS
