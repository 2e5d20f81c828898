"""The DICOM listener: a pynetdicom AE answering C-ECHO and C-STORE.

The C-STORE handler is thin (STYLE: pynetdicom): take the Part 10 file as received, hand it to
:class:`~screener.ingest.receive.Ingest`, answer its status, and write one canonical log line. Nothing is
decoded in the association thread beyond the study/series UIDs.

Data sets are received straight into the spool: pynetdicom's chunked receive writes each C-STORE data
set, behind a preamble and file meta group, to a file it opens while the PDUs arrive; we have it open that
file in the spool's ``.tmp/`` (hashing as it writes), so a received instance is renamed into place, never
copied or decoded. That hook and every other use of pynetdicom internals live in
:mod:`screener.core.pynetdicom_compat`.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import threading
import time
import typing
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from screener.core.config import ListenerConfig
from screener.core.errors import SpoolError
from screener.core.logs import get_logger, uid_hash
from screener.core.metrics import Metrics
from screener.core.pynetdicom_compat import end_unrequested, register_server, route_received_files
from screener.core.spool import Incoming
from screener.ingest.receive import STATUS_OUT_OF_RESOURCES, Ingest, IngestOutcome, IngestResult, Received

log = get_logger("screener.listener")

VERIFICATION = "1.2.840.10008.1.1"

# Storage SOP classes of chest radiography (PS3.4 Annex B.5).
CHEST_SOP_CLASSES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image Storage
    }
)

# Uncompressed and the common compressed transfer syntaxes, so a PACS never has to transcode.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 Image Compression
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL Options (Lossless Only)
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
_REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
_REJECT_BUSY = (0x02, 0x03, 0x01)  # transient, presentation provider, temporary congestion


def _sop_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else "unknown"


class _Server(ThreadedAssociationServer):
    """pynetdicom's server with TCP_NODELAY on every accepted socket and a non-blocking TLS accept.

    DCMTK peers leave Nagle on; without TCP_NODELAY small instances stall ~40 ms each. The TLS
    handshake is moved out of the accept loop into the association thread, so a client that never
    sends its ClientHello cannot stall other connections.
    """

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Every socket, not only TLS ones: without a timeout pynetdicom's reader blocks forever in recv()
        # when a peer stops in the middle of a PDU, and the association holds its slot for good.
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


def build_ssl_context(config: ListenerConfig) -> ssl.SSLContext | None:
    tls = config.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2: forward-secret AEAD suites only (RFC 9325 4.2, the suites of DICOM's BCP 195 profiles,
    # PS3.15 B.9); Python's default list also offers CBC suites. TLS 1.3 suites are all AEAD.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL")
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


class Listener:
    """Owns the AE and its server; :meth:`start` serves in the background, :meth:`drain` stops it."""

    def __init__(self, config: ListenerConfig, ingest: Ingest, metrics: Metrics | None = None) -> None:
        self.config = config
        self.ingest = ingest
        self.metrics = metrics or Metrics()
        self.metrics.declare_ingest_outcomes(o.value for o in IngestOutcome)
        self._accept: threading.Thread | None = None
        self._draining = threading.Event()
        self._server: _Server | None = None
        self._allowed = self._parse_allowed(config.allowed_calling_aets)
        self.ae = self._make_ae()
        # Files being received, by path, with their association (for clean-up when it ends early).
        self._receiving: dict[str, tuple[Incoming, Any]] = {}
        self._receiving_lock = threading.Lock()

    @staticmethod
    def _parse_allowed(entries: tuple[str, ...]) -> dict[str, set[str] | None]:
        allowed: dict[str, set[str] | None] = {}
        for entry in entries:
            aet, _, host = entry.partition("@")
            aet = aet.strip()
            if not host:
                allowed[aet] = None  # any host
            elif aet not in allowed or allowed[aet] is not None:
                hosts = allowed.setdefault(aet, set())
                assert hosts is not None
                hosts.add(host)
        return allowed

    def _make_ae(self) -> AE:
        c = self.config
        ae = AE(ae_title=c.ae_title)
        ae.maximum_associations = c.max_associations
        ae.acse_timeout = c.acse_timeout
        ae.dimse_timeout = c.dimse_timeout
        ae.network_timeout = c.network_timeout
        ae.maximum_pdu_size = c.max_pdu_size
        ae.require_called_aet = c.require_called_aet
        ae.add_supported_context(VERIFICATION)
        sop_classes = set(CHEST_SOP_CLASSES)
        if c.accept_all_storage:
            sop_classes.update(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
        for sop_class in sorted(sop_classes):
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        assert self._server is not None, "listener not started"
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        # Checks pynetdicom's internals first: IncompatibleLibraryError names what is missing.
        route_received_files(self.ae, self._open_incoming)
        server = self.ae.make_server(
            (self.config.host, self.config.port),
            ssl_context=build_ssl_context(self.config),
            evt_handlers=handlers,
            server_class=_Server,
        )
        register_server(self.ae, server)
        self._accept = threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True)
        self._accept.start()
        self._server = typing.cast(_Server, server)
        if not self._allowed:
            log.warning(
                "listener.open_to_all_callers",
                hint="listener.allowed_calling_aets is empty: any calling AE title may store; list your PACS",
            )
        log.info(
            "listener.started",
            ae_title=self.config.ae_title,
            host=self.config.host,
            port=self.port,
            tls=self.config.tls.enabled,
            max_associations=self.config.max_associations,
        )

    def is_alive(self) -> bool:
        """True while the accept loop runs and the listener is not draining (the /healthz check)."""
        return self._accept is not None and self._accept.is_alive() and not self._draining.is_set()

    def active_associations(self) -> int:
        if self._server is None:
            return 0
        return sum(1 for a in self._server.active_associations if a.is_alive())

    def drain(self, seconds: float) -> bool:
        """Stop accepting, let in-flight associations finish for up to ``seconds``, abort the rest.

        Returns True when every association finished by itself.
        """
        self._draining.set()
        server = self._server
        if server is None:
            return True
        in_flight = self.active_associations()
        log.info("listener.draining", in_flight=in_flight, drain_seconds=seconds)
        server.shutdown()  # stops the accept loop and closes the listening socket
        deadline = time.monotonic() + seconds
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [a for a in server.active_associations if a.is_alive()]
        for assoc in left:
            assoc.abort()
        log.info("listener.stopped", aborted=len(left))
        return not left

    # --- event handlers (run in association threads) ---

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()  # ae_title is set later
        host = str(assoc.requestor.address)
        reason = None
        if self._draining.is_set():
            reason, rsd = "shutting down", _REJECT_BUSY
        elif self._allowed:
            hosts = self._allowed.get(calling, set())
            if calling not in self._allowed or (hosts is not None and host not in hosts):
                reason, rsd = "calling AE title not in listener.allowed_calling_aets", _REJECT_CALLING_AET
        if reason is None:
            return
        log.warning("association.rejected", calling_ae=calling, peer=host, reason=reason)
        assoc.acse.send_reject(*rsd)
        assoc.is_rejected = True
        assoc.kill()

    def _on_c_echo(self, event: Any) -> int:
        log.info("echo.received", calling_ae=str(event.assoc.requestor.ae_title).strip())
        return 0x0000

    def _open_incoming(self, assoc: Any) -> Any:
        """Open the spool file a data set of ``assoc`` is received into (reader thread)."""
        try:
            incoming = self.ingest.spool.open_incoming()
        except SpoolError as exc:
            log.error("instance.spool_unwritable", detail=str(exc))
            return tempfile.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
        with self._receiving_lock:
            self._receiving[incoming.name] = (incoming, assoc)
        return incoming

    def _on_ended(self, event: Any) -> None:
        """Delete what an association that ended mid-transfer left half-received."""
        with self._receiving_lock:
            left = [name for name, (_, assoc) in self._receiving.items() if assoc is event.assoc]
            incomings = [self._receiving.pop(name)[0] for name in left]
        for incoming in incomings:
            incoming.discard()
        if incomings:
            log.info("association.partial_discarded", files=len(incomings))

    def _on_conn_close(self, event: Any) -> None:
        """The connection is gone: free an acceptor still waiting for A-ASSOCIATE-RQ, clean up the rest."""
        end_unrequested(event.assoc)
        self._on_ended(event)

    def _take_incoming(self, event: Any) -> Incoming:
        """The received data set as an :class:`Incoming` spool temporary (copied only as a fallback)."""
        path = event.dataset_path  # None unless the chunked receive is on
        if path is not None:
            with self._receiving_lock:
                found = self._receiving.pop(str(path), None)
            if found is not None:
                return found[0]
        incoming = self.ingest.spool.open_incoming()
        if path is None:
            incoming.write(event.encoded_dataset())
        else:  # received outside the spool (it could not be opened there): copy it in
            with Path(path).open("rb") as src:
                shutil.copyfileobj(src, incoming, 1 << 20)
        return incoming

    def _on_c_store(self, event: Any) -> int:
        started = time.perf_counter()
        request = event.request
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_class = str(request.AffectedSOPClassUID)
        sop_uid = str(request.AffectedSOPInstanceUID)
        transfer_syntax = str(event.context.transfer_syntax)
        size = 0
        try:
            incoming = self._take_incoming(event)
            size = incoming.size
            result = self.ingest.receive_within(
                Received(
                    sop_instance_uid=sop_uid,
                    sop_class_uid=sop_class,
                    transfer_syntax_uid=transfer_syntax,
                    calling_ae_title=calling,
                    incoming=incoming,
                )
            )
        except SpoolError as exc:
            result = IngestResult(IngestOutcome.SPOOL_ERROR, STATUS_OUT_OF_RESOURCES, detail=str(exc))
        except Exception as exc:
            log.exception("instance.handler_error", error=type(exc).__name__)
            result = IngestResult(
                IngestOutcome.SPOOL_ERROR, STATUS_OUT_OF_RESOURCES, detail=type(exc).__name__
            )
        self.metrics.instance_received(result.outcome)
        fields: dict[str, Any] = {
            "calling_ae": calling,
            "sop_class": _sop_name(sop_class),
            "transfer_syntax": _sop_name(transfer_syntax),
            "bytes": size,
            "ms": round((time.perf_counter() - started) * 1000, 2),
            "status": f"0x{result.status:04X}",
            "outcome": result.outcome.value,
            "sop_uid": uid_hash(sop_uid),
            "study_uid": uid_hash(result.study_instance_uid),
        }
        if result.detail:
            fields["detail"] = result.detail
        if result.status == 0x0000:
            log.info("instance.received", **fields)
        else:
            log.warning("instance.received", **fields)
        return result.status
