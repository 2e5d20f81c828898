"""A C-STORE whose command names another SOP instance or class than its data set (issue 16, finding 3).

The command's Affected SOP Class/Instance UIDs come, in pynetdicom's chunked send, from the file meta of
the file it sends; a file whose meta disagrees with its data set gives exactly the request a PACS with a
stale index sends. Real loopback associations against `screener serve`.
"""

from __future__ import annotations

import io
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid

from screener.core.logs import uid_hash
from tests.helpers import (
    CR_STORAGE,
    DX_PRESENTATION,
    assert_spool_consistent,
    dataset_offset,
    rg1_pixels,
    small_cr,
    store,
    store_file_raw,
)

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _mismatched_file(
    folder: Path, *, study: str, data_set_uid: str, command_uid: str, command_class: str = CR_STORAGE
) -> tuple[Path, Dataset]:
    """A CR data set named ``data_set_uid`` in a file whose meta says ``command_uid``/``command_class``."""
    ds = small_cr(rg1_pixels(64), study_uid=study, sop_uid=data_set_uid)
    path = folder / f"{command_uid}.dcm"
    _save_with_meta(ds, path, command_uid, command_class)
    return path, ds


def _save_with_meta(ds: Dataset, path: Path, sop_uid: str, sop_class: str) -> None:
    """Save ``ds`` as Part 10 with file meta naming ``sop_uid``/``sop_class`` (pydicom would copy the data
    set's own into the meta)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    meta = FileMetaDataset(ds.file_meta)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.MediaStorageSOPClassUID = sop_class
    out = io.BytesIO()
    write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
    path.write_bytes(bytes(128) + b"DICM" + out.getvalue() + data[dataset_offset(data) :])


def _mr_file(folder: Path, uid: str, study: str) -> Path:
    """An MR data set in a file whose meta (so the command) says DX For Presentation."""
    ds = small_cr(rg1_pixels(64), study_uid=study, sop_uid=uid)
    ds.SOPClassUID = MR_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = MR_STORAGE
    ds.Modality = "MR"
    path = folder / f"mr-{uid}.dcm"
    _save_with_meta(ds, path, uid, DX_PRESENTATION)
    return path


def _send_file(port: int, path: Path, command_class: str) -> int | None:
    """C-STORE of ``path`` as it is (the command's UIDs from its file meta); the status."""
    return store_file_raw(port, path, context_class=command_class, timeout=30)


def test_mismatches_are_refused_by_default_with_a_logged_reason(make_server, tmp_path: Path):
    server = make_server().start()
    study, genuine, claimed = generate_uid(), generate_uid(), generate_uid()

    # Instance UID: the command says `claimed`, the data set is `genuine`.
    path, ds = _mismatched_file(tmp_path, study=study, data_set_uid=genuine, command_uid=claimed)
    assert _send_file(server.port, path, CR_STORAGE) == 0xC001
    # SOP class: a DX command carrying an MR data set (the case).
    mr_uid = generate_uid()
    mr = _mr_file(tmp_path, mr_uid, study)
    assert _send_file(server.port, mr, DX_PRESENTATION) == 0xA900

    assert server.rows("SELECT count(*) FROM instances")[0][0] == 0, "nothing refused is kept"
    assert server.spool_files() == set() and server.temp_files() == []
    refused = [e for e in server.log_events() if e.get("outcome") == "mismatch_refused"]
    assert [e["status"] for e in refused] == ["0xC001", "0xA900"]
    assert uid_hash(genuine) in refused[0]["detail"] and uid_hash(claimed) in refused[0]["detail"]
    assert "MR Image Storage" in refused[1]["detail"] and "Digital X-Ray" in refused[1]["detail"]
    log = server.log_text()
    assert genuine not in log and claimed not in log and mr_uid not in log, "UIDs only as hashes"

    # The genuine instance, sent as itself, is then stored once.
    assert store(server.port, [ds]) == [0x0000]
    assert server.rows("SELECT sop_instance_uid, status FROM instances") == [(genuine, "queued")]
    assert_spool_consistent(server)


def test_keep_stores_once_under_the_data_sets_uid_and_records_the_clash(make_server, tmp_path: Path):
    server = make_server(SCREENER__LISTENER__ON_MISMATCH="keep").start()
    study, genuine, claimed = generate_uid(), generate_uid(), generate_uid()
    path, ds = _mismatched_file(tmp_path, study=study, data_set_uid=genuine, command_uid=claimed)
    assert _send_file(server.port, path, CR_STORAGE) == 0x0000
    assert _send_file(server.port, path, CR_STORAGE) == 0x0000  # the same again: audited, not stored twice
    assert store(server.port, [ds]) == [0x0000]  # then the genuine instance under its own UID

    rows = server.rows("SELECT sop_instance_uid, sop_class_uid, status, sha256 FROM instances")
    assert len(rows) == 1, "one instance, so one classification"
    ((uid, sop_class, status, digest),) = rows
    assert (uid, sop_class, status) == (genuine, CR_STORAGE, "queued")
    clashes = server.rows(
        "SELECT sop_instance_uid, action, command_sop_instance_uid, command_sop_class_uid, kept_sha256 "
        "FROM instance_clashes ORDER BY id"
    )
    assert clashes[:2] == [(genuine, "mismatch_kept", claimed, CR_STORAGE, digest)] * 2
    # The genuine send's file meta differs from the kept file's (it named `claimed`): a bytes clash.
    assert [(c[1], c[2]) for c in clashes[2:]] == [("kept_first", None)]
    outcomes = [e["outcome"] for e in server.log_events() if e["event"] == "instance.received"]
    assert outcomes == ["mismatch_kept", "duplicate", "clash_kept_first"]
    assert claimed not in server.log_text() and genuine not in server.log_text()
    assert_spool_consistent(server)


def test_keep_files_a_wrong_class_under_the_data_sets_class(make_server, tmp_path: Path):
    """A DX command with an MR data set is kept as MR, so it is skipped, never classified as a chest."""
    server = make_server(SCREENER__LISTENER__ON_MISMATCH="keep").start()
    mr = _mr_file(tmp_path, generate_uid(), generate_uid())
    assert _send_file(server.port, mr, DX_PRESENTATION) == 0x0000
    ((sop_class, status, reason),) = server.rows("SELECT sop_class_uid, status, status_reason FROM instances")
    assert (sop_class, status) == (MR_STORAGE, "skipped")
    assert "not a chest radiography storage class" in reason
    assert server.rows("SELECT action, command_sop_class_uid FROM instance_clashes") == [
        ("mismatch_kept", DX_PRESENTATION)
    ]
    assert_spool_consistent(server)
