"""Received bytes -> durable spool file + committed ``instances`` row -> a DICOM status.

This is the whole C-STORE contract (DESIGN "No acknowledged instance is ever lost"):
0x0000 only after the file and its directory are fsynced and the row is committed; 0xA700 when the
spool is below its floor or the database is unreachable, with nothing half-written left behind;
the same SOP Instance UID with the same bytes is a no-op success; with different bytes the first
copy is kept and the clash recorded (or refused, by ``listener.on_conflict``). A data set whose own
SOP Instance or SOP Class UID is not the one its C-STORE command names is refused (0xC001 / 0xA900), or,
with ``listener.on_mismatch = "keep"``, kept once under the data set's own UID with the disagreement
recorded in ``instance_clashes``.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from pydicom.multival import MultiValue
from pydicom.uid import UID
from sqlalchemy import Engine, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from screener.core import audit
from screener.core.db.models import (
    ClashAction,
    Delivery,
    Instance,
    InstanceClash,
    InstanceStatus,
    Study,
    utcnow,
)
from screener.core.errors import SpoolError, SpoolFullError
from screener.core.identity import same_store
from screener.core.logs import get_logger, uid_hash
from screener.core.spool import Incoming, Spool
from screener.imaging.part10 import read_header_elements

log = get_logger("screener.ingest")

# DICOM status codes (PS3.4 Annex B.2.3 and PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DUPLICATE_REFUSED = 0x0111  # PS3.7 C.5.4 "Duplicate SOP Instance"
STATUS_CANNOT_UNDERSTAND = 0xC000
# PS3.4 Table B.2-1 "Error: Data Set does not match SOP Class": the command's Affected SOP Class UID is not
# the data set's SOP Class UID (0008,0016).
STATUS_SOP_CLASS_MISMATCH = 0xA900
# PS3.4 Table B.2-1 "Error: Cannot understand" (0xCxxx, the value is ours): the command's Affected SOP
# Instance UID is not the data set's SOP Instance UID (0008,0018). 0xC000 stays "the command's UID is no UID".
STATUS_INSTANCE_MISMATCH = 0xC001


class IngestOutcome(enum.StrEnum):
    """What became of one received C-STORE (the ``outcome`` of its log line and metric label)."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    CLASH_KEPT_FIRST = "clash_kept_first"
    CLASH_REFUSED = "clash_refused"
    SPOOL_FULL = "spool_full"
    QUEUE_FULL = "queue_full"
    SPOOL_ERROR = "spool_error"
    DATABASE_UNAVAILABLE = "database_unavailable"
    INVALID = "invalid"
    MISMATCH_REFUSED = "mismatch_refused"
    MISMATCH_KEPT = "mismatch_kept"


@dataclass(frozen=True)
class Received:
    """One C-STORE request as it arrived: identifiers from the command set, and its Part 10 file.

    ``incoming`` is a temporary file in the spool holding preamble, file meta and the data set as
    received; :meth:`Ingest.receive` either commits it into the spool or deletes it.
    """

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    incoming: Incoming


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    status: int
    study_instance_uid: str | None = None
    detail: str | None = None


SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E


@dataclass(frozen=True)
class _Header:
    study_instance_uid: str | None
    series_instance_uid: str | None
    problem: str | None
    # The data set's own identity (0008,0016) and (0008,0018) as written, None where absent or unreadable.
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None


def _uid_value(value: object) -> str | None:
    """A UI element's value as one string without its padding; None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, MultiValue):
        # A backslash splits a value (PS3.5 6.4); a UID has one value, and pynetdicom keys a command whose
        # UID holds several by the first (DIMSEMessage.message_to_primitive): read the data set's alike.
        value = value[0] if len(value) else None
        if value is None:
            return None
    text = str(value).rstrip("\x00 ")
    return text or None


def read_header(path: Path) -> _Header:
    """SOP class, SOP instance, study and series UIDs from a Part 10 file's data set (not its file meta),
    reading no further than the pixel data. Never raises: a malformed header is the ``problem``."""
    try:
        ds = read_header_elements(
            path, [SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID]
        )
        sop_class = _uid_value(ds.get("SOPClassUID"))
        sop_instance = _uid_value(ds.get("SOPInstanceUID"))
        study = ds.get("StudyInstanceUID")
        series = ds.get("SeriesInstanceUID")
    except Exception as exc:  # noqa: BLE001 - any malformed header is this instance's answer, not a crash
        # pydicom raises a wide range for hostile bytes (struct.error, zlib.error, RecursionError from
        # deeply nested sequences, ...): each means "stored, marked failed", never 0xA700 and a retry loop.
        return _Header(None, None, f"header could not be parsed ({type(exc).__name__})")
    study_uid = str(study).strip() if study else None
    series_uid = str(series).strip() if series else None
    if not study_uid:
        return _Header(
            None, series_uid, "dataset has no Study Instance UID (0020,000D)", sop_class, sop_instance
        )
    if len(study_uid) > 64:
        return _Header(
            None, series_uid, "Study Instance UID is longer than 64 characters", sop_class, sop_instance
        )
    if series_uid and len(series_uid) > 64:
        series_uid = None
    return _Header(study_uid, series_uid, None, sop_class, sop_instance)


@dataclass(frozen=True)
class Mismatch:
    """What a C-STORE command said that its data set contradicts (PS3.4 B.2.3 / PS3.7 9.1.1.1)."""

    command_sop_instance_uid: str
    command_sop_class_uid: str
    status: int  # the refusal: STATUS_SOP_CLASS_MISMATCH or STATUS_INSTANCE_MISMATCH
    detail: str  # UIDs as hashes only (instance UIDs can identify a patient's examination)


def find_mismatch(rx: Received, header: _Header) -> Mismatch | None:
    """Whether the data set names another SOP class or instance than the command did.

    Only values the data set actually carries are compared: a header that cannot be parsed, or lacks the
    element, is no evidence of a disagreement (it is stored and marked failed, as before).
    """
    problems: list[str] = []
    status = 0
    if header.sop_class_uid is not None and header.sop_class_uid != rx.sop_class_uid:
        status = STATUS_SOP_CLASS_MISMATCH
        problems.append(
            f"the data set's SOP Class UID {_class_text(header.sop_class_uid)} is not the command's Affected "
            f"SOP Class UID {_class_text(rx.sop_class_uid)}"
        )
    if header.sop_instance_uid is not None and header.sop_instance_uid != rx.sop_instance_uid:
        status = status or STATUS_INSTANCE_MISMATCH
        problems.append(
            f"the data set's SOP Instance UID (hash {uid_hash(header.sop_instance_uid)}) is not the "
            f"command's Affected SOP Instance UID (hash {uid_hash(rx.sop_instance_uid)})"
        )
    if not problems:
        return None
    return Mismatch(
        command_sop_instance_uid=rx.sop_instance_uid,
        command_sop_class_uid=rx.sop_class_uid,
        status=status,
        detail="; ".join(problems),
    )


def _class_text(uid: str) -> str:
    """A SOP Class UID for a log line: a standard one by UID and name; any other value only as a hash
    (a hostile data set can carry any text there)."""
    name = UID(uid).name
    return f"(hash {uid_hash(uid)})" if name == uid else f"{uid} ({name})"


def _log_late(done: Future[IngestResult], rx: Received, started: float) -> None:
    """The outcome of a reception the association stopped waiting for (it answered 0xA700)."""
    exc = done.exception()
    log.warning(
        "instance.late_outcome",
        outcome=done.result().outcome.value if exc is None else IngestOutcome.SPOOL_ERROR.value,
        error=type(exc).__name__ if exc is not None else None,
        seconds=round(time.monotonic() - started, 2),
        sop_uid=uid_hash(rx.sop_instance_uid),
        hint="answered 0xA700 already; a stored instance makes the peer's retry a duplicate (0x0000)",
    )


def upsert_study(session: Session, study_uid: str) -> int:
    """The id of the ``studies`` row of ``study_uid``, made if new; its last reception is now."""
    now = utcnow()
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(
        insert(Study)
        .values(study_instance_uid=study_uid, first_received_at=now, last_received_at=now)
        .on_conflict_do_nothing(index_elements=["study_instance_uid"])
    )
    session.execute(update(Study).where(Study.study_instance_uid == study_uid).values(last_received_at=now))
    study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
    assert study_id is not None
    return study_id


class QueueGauge:
    """Instances waiting for classification (status ``queued``), counted cheaply for back-pressure.

    The database is asked at most once per ``interval`` seconds; in between, instances this process
    queues are added locally, so one listener never overshoots its high-water mark.
    """

    def __init__(self, sessions: sessionmaker[Session], interval: float = 0.5) -> None:
        self.sessions = sessions
        self.interval = interval
        self._lock = threading.Lock()
        self._value: int | None = None
        self._read_at = 0.0

    def current(self) -> int:
        """The queued count, at most ``interval`` seconds old (raises SQLAlchemyError)."""
        with self._lock:
            now = time.monotonic()
            if self._value is None or now - self._read_at >= self.interval:
                with self.sessions() as session:
                    self._value = session.scalar(
                        select(func.count())
                        .select_from(Instance)
                        .where(Instance.status == InstanceStatus.QUEUED)
                    )
                self._read_at = now
            return self._value or 0

    def added(self) -> None:
        with self._lock:
            if self._value is not None:
                self._value += 1


class Ingest:
    def __init__(
        self,
        spool: Spool,
        sessions: sessionmaker[Session],
        *,
        refuse_conflicts: bool,
        chest_sop_classes: frozenset[str],
        queue_high_water: int = 0,
        keep_mismatches: bool = False,
        database_problem: Callable[[], str | None] | None = None,
        deadline_seconds: float | None = None,
        max_waiting: int = 32,
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.refuse_conflicts = refuse_conflicts
        self.keep_mismatches = keep_mismatches
        # Why the database is no longer this store's (deleted, replaced:
        # screener.core.identity.DatabaseGuard).
        self.database_problem = database_problem
        # receive_within: an answer within this many seconds, with at most max_waiting receptions at once.
        self.deadline_seconds = deadline_seconds
        self.max_waiting = max_waiting
        self._slots = threading.BoundedSemaphore(max_waiting)
        self.chest_sop_classes = chest_sop_classes
        self.queue_high_water = queue_high_water
        self.queue = QueueGauge(sessions)

    def receive_within(self, rx: Received) -> IngestResult:
        """:meth:`receive`, answered within ``deadline_seconds``: 0xA700 when it takes longer.

        A database that does not answer at all (stopped, frozen, a network partition) never returns from a
        call: no server-side timeout can fire. So the reception runs in its own thread and the association
        waits at most ``deadline_seconds``. What that thread does afterwards stays whole: the row is
        committed with its file (the peer's retry is then a duplicate, answered 0x0000) or the file is
        removed, exactly as for a database that is down. At most ``max_waiting`` receptions wait at once;
        past that, 0xA700 at once, so a frozen database cannot pile up threads and open files.
        """
        if self.deadline_seconds is None:
            return self.receive(rx)
        if not self._slots.acquire(blocking=False):
            rx.incoming.discard()
            return IngestResult(
                IngestOutcome.DATABASE_UNAVAILABLE,
                STATUS_OUT_OF_RESOURCES,
                detail=f"{self.max_waiting} receptions still wait for the database; the peer should retry",
            )
        answer: Future[IngestResult] = Future()
        started = time.monotonic()

        def run() -> None:
            try:
                answer.set_result(self.receive(rx))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting association thread
                answer.set_exception(exc)
            finally:
                self._slots.release()

        threading.Thread(target=run, name="ingest", daemon=True).start()
        try:
            return answer.result(timeout=self.deadline_seconds)
        except FutureTimeout:
            answer.add_done_callback(lambda done: _log_late(done, rx, started))
            return IngestResult(
                IngestOutcome.DATABASE_UNAVAILABLE,
                STATUS_OUT_OF_RESOURCES,
                detail=f"no answer from the database within {self.deadline_seconds:g} s "
                "(database.statement_timeout_seconds + 1); nothing is left half-written; the peer should "
                "retry",
            )

    def receive(self, rx: Received) -> IngestResult:
        """Commit ``rx.incoming`` into the spool with its ``instances`` row, or delete it; the answer.

        Whatever the outcome, no temporary file remains afterwards.
        """
        try:
            return self._receive(rx)
        finally:
            rx.incoming.discard()  # a committed file was renamed away: this removes only refused ones

    def _receive(self, rx: Received) -> IngestResult:
        lost = self.database_problem() if self.database_problem is not None else None
        if lost is not None:
            return IngestResult(
                IngestOutcome.DATABASE_UNAVAILABLE,
                STATUS_OUT_OF_RESOURCES,
                detail=f"{lost}: nothing is acknowledged until the store is recovered; the peer should retry",
            )
        for name, uid in (
            ("Affected SOP Instance UID", rx.sop_instance_uid),
            ("Affected SOP Class UID", rx.sop_class_uid),
        ):
            if not uid or len(uid) > 64:
                # Cannot be keyed or recorded; PS3.5 9.1 caps UIDs at 64 characters.
                return IngestResult(
                    IngestOutcome.INVALID,
                    STATUS_CANNOT_UNDERSTAND,
                    detail=f"{name} in the C-STORE request is "
                    f"{'empty' if not uid else f'{len(uid)} characters long'}; a UID has 1 to 64 "
                    "(PS3.5 9.1): the sender must send the instance with a valid UID",
                )
        try:
            rx.incoming.check()
        except SpoolError as exc:
            return self._spool_failed(exc)
        digest = rx.incoming.sha256
        header = read_header(rx.incoming.path)
        mismatch = find_mismatch(rx, header)
        if mismatch is not None:
            keyed = self._keyed_by_data_set(rx, header, mismatch)
            if isinstance(keyed, IngestResult):
                return keyed
            rx = keyed
        try:
            kept = self._kept_sha256(rx.sop_instance_uid)
        except SQLAlchemyError as exc:
            return self._db_down(exc)
        if kept is not None:
            return self._repeat(rx, kept, digest, mismatch)
        if self.queue_high_water:
            try:
                queued = self.queue.current()
            except SQLAlchemyError as exc:
                return self._db_down(exc)
            if queued >= self.queue_high_water:
                return IngestResult(
                    IngestOutcome.QUEUE_FULL,
                    STATUS_OUT_OF_RESOURCES,
                    detail=f"{queued} instances wait for classification, at or above "
                    f"listener.queue_high_water = {self.queue_high_water}: the sender should retry later; "
                    "check that a worker is running and keeping up",
                )

        status, reason = self._initial_status(rx, header)
        try:
            self.spool.check_room(0)
            entry = self.spool.commit(rx.incoming)
        except SpoolError as exc:
            return self._spool_failed(exc)

        try:
            with self.sessions.begin() as session:
                study_id = None
                if header.study_instance_uid is not None:
                    study_id = self._upsert_study(session, header.study_instance_uid)
                session.add(
                    Instance(
                        sop_instance_uid=rx.sop_instance_uid,
                        sop_class_uid=rx.sop_class_uid,
                        study_id=study_id,
                        series_instance_uid=header.series_instance_uid,
                        transfer_syntax_uid=rx.transfer_syntax_uid,
                        calling_ae_title=rx.calling_ae_title,
                        spool_name=entry.name,
                        sha256=entry.sha256,
                        size_bytes=entry.size_bytes,
                        status=status,
                        status_reason=reason,
                        attempts=0,
                    )
                )
                audit.record(
                    session,
                    audit.INSTANCE_RECEIVED,
                    actor=rx.calling_ae_title,
                    subject=rx.sop_instance_uid,
                    detail={"sha256": entry.sha256, "bytes": entry.size_bytes, "status": status.value},
                )
                if mismatch is not None:
                    session.add(self._mismatch_row(rx, mismatch, kept_sha256=entry.sha256))
        except IntegrityError:
            # Another association committed the same SOP Instance UID first.
            self.spool.remove(entry.name)
            try:
                kept = self._kept_sha256(rx.sop_instance_uid)
            except SQLAlchemyError as exc:
                return self._db_down(exc)
            if kept is None:
                return IngestResult(
                    IngestOutcome.DATABASE_UNAVAILABLE,
                    STATUS_OUT_OF_RESOURCES,
                    detail="integrity error, retry",
                )
            return self._repeat(rx, kept, digest, mismatch)
        except SQLAlchemyError as exc:
            self.spool.remove(entry.name)
            return self._db_down(exc)
        if status is InstanceStatus.QUEUED:
            self.queue.added()
        if mismatch is not None:
            return IngestResult(
                IngestOutcome.MISMATCH_KEPT,
                STATUS_SUCCESS,
                study_instance_uid=header.study_instance_uid,
                detail=f"{mismatch.detail}: kept under the data set's UIDs (listener.on_mismatch = keep)",
            )
        return IngestResult(
            IngestOutcome.STORED, STATUS_SUCCESS, study_instance_uid=header.study_instance_uid
        )

    def _keyed_by_data_set(
        self, rx: Received, header: _Header, mismatch: Mismatch
    ) -> Received | IngestResult:
        """The request re-keyed by its data set's own UIDs (``on_mismatch = keep``), or the refusal."""
        refusal = IngestResult(
            IngestOutcome.MISMATCH_REFUSED,
            mismatch.status,
            study_instance_uid=header.study_instance_uid,
            detail=f"{mismatch.detail}; the sender must send the command its data set's own UIDs",
        )
        if not self.keep_mismatches:
            return refusal
        instance_uid = header.sop_instance_uid or rx.sop_instance_uid
        class_uid = header.sop_class_uid or rx.sop_class_uid
        if len(instance_uid) > 64 or len(class_uid) > 64:  # no UID (PS3.5 9.1): cannot be a key
            return dataclasses.replace(
                refusal, detail=f"{mismatch.detail}; the data set's UID is longer than 64 characters"
            )
        return dataclasses.replace(rx, sop_instance_uid=instance_uid, sop_class_uid=class_uid)

    @staticmethod
    def _mismatch_row(rx: Received, mismatch: Mismatch, *, kept_sha256: str) -> InstanceClash:
        """The audit of a command/data set disagreement whose data set is held under its own UID."""
        return InstanceClash(
            sop_instance_uid=rx.sop_instance_uid,
            kept_sha256=kept_sha256,
            received_sha256=rx.incoming.sha256,
            received_size_bytes=rx.incoming.size,
            calling_ae_title=rx.calling_ae_title,
            action=ClashAction.MISMATCH_KEPT,
            spool_name=None,  # the bytes are the instance's own file, or the same bytes already held
            command_sop_instance_uid=mismatch.command_sop_instance_uid,
            command_sop_class_uid=mismatch.command_sop_class_uid,
        )

    def _initial_status(self, rx: Received, header: _Header) -> tuple[InstanceStatus, str | None]:
        if header.problem is not None:
            return InstanceStatus.FAILED, header.problem
        if rx.sop_class_uid not in self.chest_sop_classes:
            return (
                InstanceStatus.SKIPPED,
                f"SOP class {rx.sop_class_uid} is not a chest radiography storage class "
                "(accepted because listener.accept_all_storage = true)",
            )
        return InstanceStatus.QUEUED, None

    def _kept_sha256(self, sop_instance_uid: str) -> str | None:
        with self.sessions() as session:
            return session.scalar(
                select(Instance.sha256).where(Instance.sop_instance_uid == sop_instance_uid)
            )

    @staticmethod
    def _upsert_study(session: Session, study_uid: str) -> int:
        return upsert_study(session, study_uid)

    def _repeat(
        self, rx: Received, kept_sha256: str, digest: str, mismatch: Mismatch | None = None
    ) -> IngestResult:
        if kept_sha256 == digest:
            if mismatch is not None:  # the same bytes again, under a command that named something else
                try:
                    with self.sessions.begin() as session:
                        session.add(self._mismatch_row(rx, mismatch, kept_sha256=kept_sha256))
                except SQLAlchemyError as exc:
                    return self._db_down(exc)
                return IngestResult(
                    IngestOutcome.DUPLICATE,
                    STATUS_SUCCESS,
                    detail=f"{mismatch.detail}: the data set is already stored under its own UID",
                )
            healed = self._restore_missing_file(rx)
            if isinstance(healed, IngestResult):
                return healed
            detail = "same bytes already stored"
            if healed:
                detail += "; the stored file was missing and the resent bytes replace it"
            return IngestResult(IngestOutcome.DUPLICATE, STATUS_SUCCESS, detail=detail)
        action = ClashAction.REFUSED if self.refuse_conflicts else ClashAction.KEPT_FIRST
        try:
            self._record_clash(rx, kept_sha256, digest, action, mismatch)
        except SQLAlchemyError as exc:
            return self._db_down(exc)
        if action is ClashAction.REFUSED:
            return IngestResult(
                IngestOutcome.CLASH_REFUSED,
                STATUS_DUPLICATE_REFUSED,
                detail="SOP Instance UID already stored with different bytes (listener.on_conflict = refuse)",
            )
        return IngestResult(
            IngestOutcome.CLASH_KEPT_FIRST,
            STATUS_SUCCESS,
            detail="SOP Instance UID already stored with different bytes",
        )

    def _restore_missing_file(self, rx: Received) -> bool | IngestResult:
        """Before answering a repeat 0x0000, make sure the kept copy still exists.

        A commit whose reply was lost (the database crashed or failed over inside COMMIT) leaves a row
        although the listener answered 0xA700 and removed the file; the sender's retry then arrives as a
        "duplicate". Answering it 0x0000 would acknowledge bytes nobody holds, so the resent (identical)
        bytes take the missing file's place, and a row that failed for want of its file is queued again.
        True when the file was restored; an :class:`IngestResult` when the database or spool failed.
        """
        try:
            with self.sessions() as session:
                row = session.execute(
                    select(Instance.id, Instance.spool_name, Instance.status).where(
                        Instance.sop_instance_uid == rx.sop_instance_uid
                    )
                ).first()
        except SQLAlchemyError as exc:
            return self._db_down(exc)
        if row is None or self.spool.path(row.spool_name).exists():
            return False
        try:
            entry = self.spool.commit(rx.incoming)
        except SpoolError as exc:
            return self._spool_failed(exc)
        try:
            with self.sessions.begin() as session:
                values: dict[str, object] = {"spool_name": entry.name}
                if row.status is InstanceStatus.FAILED:
                    values.update(status=InstanceStatus.QUEUED, status_reason=None, attempts=0)
                session.execute(update(Instance).where(Instance.id == row.id).values(**values))
                audit.record(
                    session,
                    audit.INSTANCE_RESTORED,
                    actor=rx.calling_ae_title,
                    subject=rx.sop_instance_uid,
                    detail={"sha256": entry.sha256, "bytes": entry.size_bytes},
                )
        except SQLAlchemyError as exc:
            self.spool.remove(entry.name)
            return self._db_down(exc)
        log.warning("instance.file_restored", sop=uid_hash(rx.sop_instance_uid))
        return True

    def _record_clash(
        self, rx: Received, kept: str, digest: str, action: ClashAction, mismatch: Mismatch | None = None
    ) -> None:
        """Audit the clash; with keep_first also keep the new bytes once, for a person to compare."""
        with self.sessions() as session:
            seen = session.scalar(
                select(InstanceClash.id).where(
                    InstanceClash.sop_instance_uid == rx.sop_instance_uid,
                    InstanceClash.received_sha256 == digest,
                )
            )
        spool_name = None
        if action is ClashAction.KEPT_FIRST and seen is None:
            try:
                spool_name = self.spool.commit(rx.incoming).name
            except SpoolError:
                spool_name = None  # the audit row still records the clash
        try:
            with self.sessions.begin() as session:
                session.add(
                    InstanceClash(
                        sop_instance_uid=rx.sop_instance_uid,
                        kept_sha256=kept,
                        received_sha256=digest,
                        received_size_bytes=rx.incoming.size,
                        calling_ae_title=rx.calling_ae_title,
                        action=action,
                        spool_name=spool_name,
                        command_sop_instance_uid=mismatch.command_sop_instance_uid if mismatch else None,
                        command_sop_class_uid=mismatch.command_sop_class_uid if mismatch else None,
                    )
                )
        except SQLAlchemyError:
            if spool_name is not None:
                self.spool.remove(spool_name)
            raise

    @staticmethod
    def _spool_failed(exc: SpoolError) -> IngestResult:
        outcome = IngestOutcome.SPOOL_FULL if isinstance(exc, SpoolFullError) else IngestOutcome.SPOOL_ERROR
        return IngestResult(outcome, STATUS_OUT_OF_RESOURCES, detail=str(exc))

    @staticmethod
    def _db_down(exc: SQLAlchemyError) -> IngestResult:
        return IngestResult(
            IngestOutcome.DATABASE_UNAVAILABLE,
            STATUS_OUT_OF_RESOURCES,
            detail=f"database unavailable ({type(exc).__name__}); the sender should retry",
        )


def reconcile_spool(spool: Spool, engine: Engine, grace_seconds: float) -> tuple[int, int]:
    """Start-up repair: remove temporaries of dead processes and files no row refers to.

    Orphans are removed only while the spool and the database carry one identity
    (:func:`screener.core.identity.same_store`): the files of a lost or another database's instances are
    acknowledged instances, never orphans. Returns (temporaries removed, orphans removed).
    """
    temporaries = spool.remove_stale_temporaries()
    if not same_store(spool, engine):
        log.error(
            "spool.orphan_sweep_skipped",
            reason="the spool and the database do not carry one identity: no file is deleted",
        )
        return temporaries, 0
    with Session(engine) as session:
        known = set(session.scalars(select(Instance.spool_name)))
        known.update(n for n in session.scalars(select(InstanceClash.spool_name)) if n is not None)
        known.update(session.scalars(select(Delivery.spool_name)))
    return temporaries, spool.remove_orphans(known, grace_seconds)
