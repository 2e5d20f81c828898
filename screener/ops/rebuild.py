"""``screener db rebuild --from-spool``: ``instances`` and ``studies`` re-created from the spool files.

The spool is the record of truth (every acknowledged instance is an fsynced file there before 0x0000 is
answered); the database is its index. After a lost database this walks every spool file, oldest first,
reads its header exactly as the listener does (:func:`screener.ingest.receive.read_header`: the data set's own
UIDs, no pixels), and records it as the listener would have: ``queued`` (classified again by the worker),
``skipped`` (not a chest storage class) or ``failed`` (a header that cannot be parsed). A second file of
an instance already recorded becomes an ``instance_clashes`` row (first kept), as at reception.

Idempotent: files any row already refers to, and instances already recorded, are left as they are, so an
instance that has a prediction keeps it and is never classified twice. The store's identity is taken from
the spool (or made, for a store from before identities), so ``serve`` starts on the rebuilt database.
Results this screener built (SR / Secondary Capture files of the outbox, under ``pacs.uid_root``, and HL7
ORU^R01 messages) are not instances: they are left for the worker and sender to build and send again
(their UIDs and HL7 control IDs are deterministic, so a PACS or RIS that has them receives the same ones).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from screener.core import audit
from screener.core.config import Config
from screener.core.db.models import ClashAction, Delivery, Instance, InstanceClash, InstanceStatus
from screener.core.errors import StoreIdentityError
from screener.core.identity import (
    database_identity,
    spool_identity,
    write_database_identity,
    write_spool_identity,
)
from screener.core.logs import get_logger
from screener.core.progress import Progress
from screener.core.spool import Spool
from screener.ingest.listener import CHEST_SOP_CLASSES
from screener.ingest.receive import read_header, upsert_study

log = get_logger("screener.rebuild")

REBUILD_ACTOR = "db rebuild"
BATCH = 200  # rows per transaction


@dataclass
class RebuildSummary:
    files: int = 0
    already_known: int = 0
    instances: dict[str, int] = field(default_factory=dict)  # new rows by status
    clashes: int = 0
    own_results: int = 0
    unreadable: int = 0
    identity: str = ""

    def render(self) -> str:
        made = ", ".join(f"{n} {status}" for status, n in sorted(self.instances.items())) or "none"
        return (
            f"spool files: {self.files}; already in the database: {self.already_known}; "
            f"instances recorded: {made}; clashes recorded: {self.clashes}; "
            f"our own results left to rebuild: {self.own_results}; unreadable: {self.unreadable}; "
            f"store identity: {self.identity}"
        )


def _transfer_syntax(path: Path) -> str:
    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", "") or "")[:64]
    except Exception:  # noqa: BLE001 - a damaged meta group is recorded as unknown, as read_header does
        return ""


def _own_result(config: Config, sop_instance_uid: str | None) -> bool:
    root = config.pacs.uid_root.rstrip(".")
    return bool(root) and sop_instance_uid is not None and sop_instance_uid.startswith(f"{root}.")


def _hl7_message(path: Path) -> bool:
    """An HL7 ORU^R01 of the outbox (screener.results.channels): our own result, not an instance."""
    with path.open("rb") as f:
        return f.read(4) == b"MSH|"


def rebuild_from_spool(config: Config, engine: Engine) -> RebuildSummary:
    """Record every spool file the database does not know yet; returns what was done.

    Raises StoreIdentityError when the database carries another store's identity than the spool.
    """
    spool = Spool(config.storage.spool_dir, config.storage.min_free_bytes)
    on_spool = spool_identity(spool)
    in_db = database_identity(engine)
    if on_spool is not None and in_db is not None and on_spool != in_db:
        raise StoreIdentityError(
            f"database {engine.url.render_as_string(hide_password=True)} carries identity {in_db}, the spool "
            f"{spool.root} {on_spool}: it indexes another store; rebuild into a new, empty database"
        )
    summary = RebuildSummary()
    with Session(engine) as session:
        known_names = set(session.scalars(select(Instance.spool_name)))
        known_names.update(n for n in session.scalars(select(InstanceClash.spool_name)) if n)
        known_names.update(session.scalars(select(Delivery.spool_name)))
        kept = {
            uid: digest for uid, digest in session.execute(select(Instance.sop_instance_uid, Instance.sha256))
        }
    files = sorted(spool.names(), key=lambda item: (item[1], item[0]))  # oldest first: the first copy wins
    summary.files = len(files)
    pending: list[tuple[Instance | InstanceClash, str | None]] = []  # (row, its study's UID)
    with Progress(len(files)) as bar:
        for name, mtime in files:
            bar.step("rebuilding the index from the spool")
            if name in known_names:
                summary.already_known += 1
                continue
            path = spool.path(name)
            header = read_header(path)
            uid = header.sop_instance_uid
            if _own_result(config, uid) or (uid is None and _hl7_message(path)):
                summary.own_results += 1
                continue
            if uid is None or len(uid) > 64:
                summary.unreadable += 1
                log.warning(
                    "rebuild.unreadable", spool_name=name, reason=header.problem or "no SOP Instance UID"
                )
                continue
            digest = spool.sha256_of(name)
            size = path.stat().st_size
            received = datetime.fromtimestamp(mtime, UTC)
            if uid in kept:
                summary.clashes += 1
                clash = (
                    InstanceClash(
                        sop_instance_uid=uid,
                        kept_sha256=kept[uid],
                        received_sha256=digest,
                        received_size_bytes=size,
                        calling_ae_title="",
                        action=ClashAction.KEPT_FIRST,
                        spool_name=name,
                        received_at=received,
                    ),
                    None,
                )
                pending.append(clash)
            else:
                sop_class = (header.sop_class_uid or "")[:64]
                if header.problem is not None:
                    status, reason = InstanceStatus.FAILED, header.problem
                elif sop_class not in CHEST_SOP_CLASSES:
                    status = InstanceStatus.SKIPPED
                    reason = f"SOP class {sop_class or '(none)'} is not a chest radiography storage class"
                else:
                    status, reason = InstanceStatus.QUEUED, None
                kept[uid] = digest
                summary.instances[status.value] = summary.instances.get(status.value, 0) + 1
                instance = Instance(
                    sop_instance_uid=uid,
                    sop_class_uid=sop_class,
                    study_id=None,
                    series_instance_uid=header.series_instance_uid,
                    transfer_syntax_uid=_transfer_syntax(path),
                    calling_ae_title="",  # not in the file: unknown after a rebuild
                    spool_name=name,
                    sha256=digest,
                    size_bytes=size,
                    status=status,
                    status_reason=reason,
                    attempts=0,
                    received_at=received,
                    updated_at=received,
                )
                pending.append((instance, header.study_instance_uid))
            if len(pending) >= BATCH:
                _flush(engine, pending)
    _flush(engine, pending)
    identity = on_spool or in_db or str(uuid.uuid4())
    summary.identity = write_database_identity(engine, identity)
    write_spool_identity(spool, summary.identity)
    log.info("rebuild.done", **{k: v for k, v in summary.__dict__.items() if k != "identity"})
    return summary


def _flush(engine: Engine, pending: list[tuple[Instance | InstanceClash, str | None]]) -> None:
    """Commit the pending rows (with their studies) in one transaction, and empty the list."""
    if not pending:
        return
    with Session(engine) as session, session.begin():
        for row, study in pending:
            if isinstance(row, Instance):
                if study is not None:
                    row.study_id = upsert_study(session, study)
                session.add(row)
                session.flush()
                audit.record(
                    session,
                    audit.INSTANCE_RECEIVED,
                    actor=REBUILD_ACTOR,
                    subject=row.sop_instance_uid,
                    detail={"sha256": row.sha256, "bytes": row.size_bytes, "status": row.status.value},
                )
            else:
                session.add(row)
    pending.clear()
