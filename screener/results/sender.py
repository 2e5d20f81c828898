"""The sender: deliveries outbox -> C-STORE SCU to each PACS destination, with retry, backoff and dead-letter.

Status handling (PS3.4 B.2.3), read from pynetdicom's status tables (``pynetdicom.status``): success and
every warning (0xB000, 0xB006, 0xB007 of the Storage Service Class, or any other) are delivered; 0x0111
(the peer already holds this SOP Instance) counts as delivered too, because our UIDs are deterministic.
Refused or aborted associations, timeouts and
"Refused: Out of Resources" (0xA7xx) are retried with exponential backoff up to
``pacs.backoff_max_seconds``; "Data Set Does Not Match SOP Class" (0xA9xx) and "Cannot Understand"
(0xCxxx) are fatal, and so is running out of ``pacs.max_attempts``: the row becomes ``dead`` until an
operator runs ``screener deliveries retry``. Any other failure is retried.
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from screener.core import audit
from screener.core.config import PacsConfig, PacsDestination
from screener.core.db.models import Delivery, DeliveryChannel, DeliveryStatus, utcnow
from screener.core.db.queue import LeasedQueue
from screener.core.leases import owner_id
from screener.core.logs import get_logger, uid_hash
from screener.core.metrics import Metrics
from screener.core.pynetdicom_compat import keep_responses_for_caller
from screener.core.spool import Spool
from screener.results.alerts import Alert, raise_alert
from screener.results.channels import ChannelSender, Claimed, DeliveryOutcome, ResultChannels
from screener.results.watch import AlertWatch

log = get_logger("screener.sender")

# 0x0111 "Duplicate SOP Instance" (a failure in pynetdicom.status.GENERAL_STATUS): the peer already holds
# the object, and our UIDs are derived from (study, model version, revision), so it holds this result.
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
# Warnings of the Storage Service Class table (PS3.4 Table B.2-1 and the general ones of PS3.7 C): stored,
# so delivered; with the duplicate.
DELIVERED_WARNINGS = frozenset(
    {code for code, (category, _) in STORAGE_SERVICE_CLASS_STATUS.items() if category == STATUS_WARNING}
    | {STATUS_DUPLICATE_SOP_INSTANCE}
)
# What the failures of the Storage Service Class table mean for a delivery: (retryable, our wording).
_STORAGE_FAILURES: dict[str, tuple[bool, str]] = {
    "Refused: Out of Resources": (True, "peer out of resources"),
    "Data Set Does Not Match SOP Class": (False, "peer says the data set does not match the SOP class"),
    "Cannot Understand": (False, "peer cannot understand the data set"),
}
SENT_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def classify_status(status: int | None, error: str | None = None) -> DeliveryOutcome:
    """What a C-STORE response status (or its absence) means for a delivery."""
    if status is None:
        return DeliveryOutcome(
            False, True, error or "no response (association refused, aborted or timed out)"
        )
    if code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING) or status in DELIVERED_WARNINGS:
        return DeliveryOutcome(True, False, None)
    hexed = f"0x{status:04X}"
    _, meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))
    if meaning in _STORAGE_FAILURES:
        retryable, wording = _STORAGE_FAILURES[meaning]
        return DeliveryOutcome(False, retryable, f"{wording} ({hexed})")
    return DeliveryOutcome(False, True, f"failure status {hexed}")


def backoff_seconds(attempts: int, pacs: PacsConfig) -> float:
    """Delay before the next try after ``attempts`` failed ones: doubling from the initial delay, capped."""
    return float(min(pacs.backoff_max_seconds, pacs.backoff_initial_seconds * 2 ** max(0, attempts - 1)))


def _ssl_context(dest: PacsDestination) -> ssl.SSLContext | None:
    if dest.tls_ca_file is None and dest.tls_cert_file is None:
        return None
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(dest.tls_ca_file) if dest.tls_ca_file else None
    )
    if dest.tls_cert_file and dest.tls_key_file:
        ctx.load_cert_chain(str(dest.tls_cert_file), str(dest.tls_key_file))
    return ctx


class Sender:
    def __init__(
        self,
        pacs: PacsConfig,
        db: Engine,
        spool: Spool,
        stop: threading.Event,
        metrics: Metrics | None = None,
        *,
        shadow: bool = False,
        channels: ResultChannels | None = None,
        watch: AlertWatch | None = None,
    ) -> None:
        self.pacs = pacs
        # HL7, webhook and email deliveries (screener.results.channels); alerts checked in the loop.
        self.channels = channels
        self.channel_sender = ChannelSender(channels, spool) if channels is not None else None
        self.watch = watch
        self.shadow = shadow  # results.mode = "shadow": deliver nothing; queued deliveries wait for live
        self.metrics = metrics or Metrics()
        self.sessions: sessionmaker[Session] = sessionmaker(db, expire_on_commit=False)
        self.db = db
        self.spool = spool
        self.stop = stop
        self.owner = owner_id(uuid.uuid4().hex[:8])
        self.destinations = {d.name: d for d in pacs.destinations}
        # A delivery's lease outlasts a whole association (connect, send, release) with room to spare.
        self.queue = LeasedQueue(db, Delivery, owner=self.owner, lease_seconds=pacs.timeout_seconds * 4 + 60)
        self.thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        log.info("sender.started", destinations=sorted(self.destinations))
        try:
            released = self.queue.release_dead()
            if released:
                log.warning("leases.released", deliveries=released, why="their sender on this host is gone")
        except SQLAlchemyError as exc:
            log.warning("sender.database_unavailable", error=type(exc).__name__)
        if self.shadow:
            log.warning(
                "sender.shadow_mode",
                note="results.mode is shadow: nothing is sent; deliveries already queued wait for live mode",
            )
            self.stop.wait()
        while not self.stop.is_set():
            try:
                if self.watch is not None and self.watch.due():
                    self.watch.check()
                self.sweep()
            except SQLAlchemyError as exc:
                log.warning("sender.database_unavailable", error=type(exc).__name__)
            self.stop.wait(self.pacs.sweep_seconds)
        log.info("sender.stopped")

    def sweep(self, limit: int = 50) -> int:
        """Send every due delivery once. Returns how many were attempted."""
        claimed = self._claim(limit)
        by_destination: dict[str, list[tuple[int, str, str, int]]] = {}
        others: dict[int, int] = {}  # HL7, webhook, email: delivery id -> attempts
        for row in claimed:
            if row[5] != DeliveryChannel.DICOM.value:
                others[row[0]] = row[4]
                continue
            by_destination.setdefault(row[1], []).append((row[0], row[2], row[3], row[4]))
        if others:
            self._deliver_others(others)
        for name, items in by_destination.items():
            dest = self.destinations.get(name)
            if dest is None:
                for delivery_id, _, _, attempts in items:
                    self._record(
                        delivery_id,
                        attempts,
                        DeliveryOutcome(False, False, f"destination {name} is no longer configured"),
                    )
                continue
            self._send(dest, items)
        return len(claimed)

    def _claim(self, limit: int) -> list[tuple[int, str, str, str, int, str]]:
        now = utcnow()
        rows = self.queue.claim(
            limit,
            where=[
                Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.FAILED]),
                Delivery.next_attempt_at <= now,
                self.queue.free(now),
            ],
            order_by=[Delivery.next_attempt_at, Delivery.id],
            values={"attempts": Delivery.attempts + 1},
            returning=[
                Delivery.id,
                Delivery.destination,
                Delivery.spool_name,
                Delivery.sop_instance_uid,
                Delivery.attempts,
                Delivery.channel,
            ],
            now=now,
        )
        return [(int(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]), str(r[5])) for r in rows]

    def _deliver_others(self, attempts_by_id: dict[int, int]) -> None:
        """One attempt of each claimed HL7, webhook or email delivery, in id order."""
        with self.sessions() as session:
            rows = session.execute(
                select(
                    Delivery.id,
                    Delivery.channel,
                    Delivery.destination,
                    Delivery.spool_name,
                    Delivery.payload,
                    Delivery.event,
                    Delivery.idempotency_key,
                )
                .where(Delivery.id.in_(sorted(attempts_by_id)))
                .order_by(Delivery.id)
            ).all()
        # Each try may take up to its channel's timeout: give back what is left before half the lease is
        # gone, so no other sender takes over a row this one is still sending (a duplicate message).
        deadline = time.monotonic() + self.queue.lease.total_seconds() / 2
        for n, row in enumerate(rows):
            if time.monotonic() > deadline:
                rest = [int(r[0]) for r in rows[n:]]
                self.queue.release(rest, {"attempts": Delivery.attempts - 1, "next_attempt_at": utcnow()})
                break
            item = Claimed(*row)
            if self.channel_sender is None:
                outcome = DeliveryOutcome(
                    False, True, f"this sender does not serve the {item.channel} channel"
                )
            else:
                outcome = self.channel_sender.deliver(item)
            self._record(
                item.id,
                attempts_by_id[item.id],
                outcome,
                channel=item.channel,
                name=item.destination,
                key=item.idempotency_key,
            )

    def _send(self, dest: PacsDestination, items: list[tuple[int, str, str, int]]) -> None:
        ae = AE(ae_title=self.pacs.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.pacs.timeout_seconds
        datasets: list[tuple[int, Any, str, int]] = []
        for delivery_id, spool_name, sop_uid, attempts in items:
            try:
                ds = dcmread(self.spool.path(spool_name))
            except (OSError, ValueError) as exc:
                self._record(
                    delivery_id, attempts, DeliveryOutcome(False, False, f"result file unreadable: {exc}")
                )
                continue
            datasets.append((delivery_id, ds, sop_uid, attempts))
        if not datasets:
            return
        for sop_class in sorted({str(ds.SOPClassUID) for _, ds, _, _ in datasets}):
            ae.add_requested_context(sop_class, SENT_TRANSFER_SYNTAXES)
        ctx = _ssl_context(dest)
        tls_args = (ctx, dest.host) if ctx is not None else None
        # The guard keeps a fast C-STORE response from being taken by pynetdicom's reactor
        # (screener.core.pynetdicom_compat.keep_responses_for_caller).
        assoc = keep_responses_for_caller(
            ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
        )
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "association refused or aborted"
            for delivery_id, _, _, attempts in datasets:
                self._record(
                    delivery_id, attempts, DeliveryOutcome(False, True, f"{why} by {dest.name}"), dest
                )
            return
        try:
            for delivery_id, ds, sop_uid, attempts in datasets:
                status: int | None = None
                error = None
                try:
                    rsp = assoc.send_c_store(ds)
                    status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                except (RuntimeError, OSError, ValueError) as exc:
                    error = f"send failed: {type(exc).__name__}"
                outcome = classify_status(status, error)
                self._record(delivery_id, attempts, outcome, dest, sop_uid=sop_uid, status=status)
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()

    def _record(
        self,
        delivery_id: int,
        attempts: int,
        outcome: DeliveryOutcome,
        dest: PacsDestination | None = None,
        *,
        sop_uid: str | None = None,
        status: int | None = None,
        channel: str = DeliveryChannel.DICOM.value,
        name: str | None = None,
        key: str | None = None,
    ) -> None:
        now = utcnow()
        name = dest.name if dest is not None else name
        values: dict[str, Any] = {}
        if outcome.delivered:
            values.update(status=DeliveryStatus.SENT, sent_at=now, last_error=None)
            final = "sent"
        elif outcome.retryable and attempts < self.pacs.max_attempts:
            delay = backoff_seconds(attempts, self.pacs)
            values.update(
                status=DeliveryStatus.FAILED,
                last_error=outcome.error,
                next_attempt_at=now + timedelta(seconds=delay),
            )
            final = "failed"
        else:
            reason = (
                outcome.error
                if not outcome.retryable
                else f"{outcome.error}; gave up after {attempts} attempts"
            )
            values.update(status=DeliveryStatus.DEAD, last_error=reason)
            final = "dead"
        with self.sessions.begin() as session:
            self.queue.finish(session, delivery_id, values)
            if final == "sent":
                audit.record(
                    session,
                    audit.RESULT_DELIVERED,
                    actor=self.owner,
                    subject=sop_uid or key or str(delivery_id),
                    detail={"destination": name, "delivery": delivery_id, "channel": channel},
                )
            alerting = channel in (DeliveryChannel.WEBHOOK.value, DeliveryChannel.EMAIL.value)
            if final == "dead" and not alerting and self.channels is not None:
                # In the transaction that gives up: an alert about an alert that died would loop.
                raise_alert(
                    session,
                    self.channels.routes,
                    Alert(
                        "delivery_dead",
                        f"delivery {delivery_id}",
                        {
                            "delivery": delivery_id,
                            "channel": channel,
                            "destination": name,
                            "error": values["last_error"],
                        },
                    ),
                    actor=self.owner,
                    now=now,
                )
        self.metrics.delivery_attempt(name or "unknown", final)
        event = log.info if final == "sent" else log.warning
        event(
            "delivery.attempt",
            delivery=delivery_id,
            channel=channel,
            destination=name,
            sop_uid=uid_hash(sop_uid),
            status=f"0x{status:04X}" if status is not None else None,
            outcome=final,
            attempts=attempts,
            error=outcome.error,
        )


def retry_deliveries(session: Session, ids: list[int] | None, dead: bool, channel: str | None = None) -> int:
    """Re-drive deliveries (by id, or every dead one, of ``channel`` when given): pending, due now, with a
    fresh attempt budget."""
    stmt = update(Delivery).values(
        status=DeliveryStatus.PENDING,
        next_attempt_at=utcnow(),
        attempts=0,
        lease_owner=None,
        lease_expires_at=None,
    )
    if ids:
        stmt = stmt.where(Delivery.id.in_(ids), Delivery.status != DeliveryStatus.SENT)
    elif dead:
        stmt = stmt.where(Delivery.status == DeliveryStatus.DEAD)
        if channel:
            stmt = stmt.where(Delivery.channel == DeliveryChannel(channel).value)
    else:
        return 0
    result = session.execute(stmt.execution_options(synchronize_session=False))
    return int(getattr(result, "rowcount", 0) or 0)


def list_deliveries(
    session: Session, status: str | None = None, limit: int = 200, channel: str | None = None
) -> list[Delivery]:
    stmt = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(Delivery.status == DeliveryStatus(status))
    if channel:
        stmt = stmt.where(Delivery.channel == DeliveryChannel(channel).value)
    return list(session.scalars(stmt))
