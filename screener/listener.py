"""The DICOM listener: a pynetdicom AE answering C-ECHO and C-STORE.

The C-STORE handler is thin (STYLE: pynetdicom): take the Part 10 file as received, hand it to
:class:`~screener.ingest.Ingest`, answer its status, and write one canonical log line. Nothing is
decoded in the association thread beyond the study/series UIDs.

Data sets are received straight into the spool: pynetdicom's chunked receive
(``_config.STORE_RECV_CHUNKED_DATASET``) writes each C-STORE data set, behind a preamble and file meta
group, to a file it opens while the PDUs arrive; we have it open that file in the spool's ``.tmp/``
(hashing as it writes), so a received instance is renamed into place, never copied or decoded.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import threading
import time
import typing
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from screener.config import ListenerConfig
from screener.errors import SpoolError
from screener.ingest import STATUS_OUT_OF_RESOURCES, Ingest, IngestResult, Outcome, Received
from screener.logs import get_logger, uid_hash
from screener.metrics import Metrics
from screener.spool import Incoming

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


# AE -> opener of the file a C-STORE data set is received into, for the AEs of our listeners.
_RECEIVE_ROUTES: weakref.WeakKeyDictionary[AE, Callable[[Any], Any]] = weakref.WeakKeyDictionary()
_ROUTES_LOCK = threading.Lock()


def _open_received_file(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``NamedTemporaryFile`` in pynetdicom's chunked receive.

    pynetdicom 3.0 (``dimse_messages.DIMSEMessage.decode_msg``) opens the file from the association's
    reader thread, a ``DULServiceProvider`` whose ``assoc`` names the association: receptions of our
    listeners go into their spool, anything else gets pynetdicom's own temporary file.
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    route = _RECEIVE_ROUTES.get(assoc.ae) if assoc is not None else None
    if route is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)  # pynetdicom closes and deletes it
    return route(assoc)


def _route_received_files(ae: AE, opener: Callable[[Any], Any]) -> bool:
    """Receive ``ae``'s C-STORE data sets through ``opener``; False when pynetdicom lacks the hook."""
    if not hasattr(dimse_messages, "NamedTemporaryFile"):
        return False
    with _ROUTES_LOCK:
        _RECEIVE_ROUTES[ae] = opener
        dimse_messages.NamedTemporaryFile = _open_received_file
        _config.STORE_RECV_CHUNKED_DATASET = True
    return True


def _serves_our_listener(thread: threading.Thread) -> bool:
    """True in the reader (DUL) and association threads of our listeners' associations."""
    assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
    return isinstance(assoc, Association) and assoc.is_acceptor and assoc.ae in _RECEIVE_ROUTES


_PYNETDICOM_VALIDATE_UI: Callable[[Any], tuple[bool, str]] = _config.VALIDATORS["UI"]


def _validate_ui(value: Any) -> tuple[bool, str]:
    """pynetdicom's UID check, except on our listener's associations, where every value passes.

    pynetdicom 3.0 checks the UIDs of a received command set while it turns the message into a primitive
    (``DIMSEMessage.message_to_primitive``, in the reader thread); a UID over 64 characters
    (PS3.5 9.1) fails there, the message is dropped as invalid (state machine Evt19) and the association
    aborted, so the peer never learns why. Passing the value through lets :class:`~screener.ingest.Ingest`
    answer it with 0xC000 and a reason, and the response carries the request's UID back (PS3.7 9.3.1.2).
    Names in the spool never come from a UID, so no value is dangerous to take in.
    """
    if _serves_our_listener(threading.current_thread()):
        return True, ""
    return _PYNETDICOM_VALIDATE_UI(value)


def _accept_any_uid_on_listeners() -> None:
    with _ROUTES_LOCK:
        _config.VALIDATORS["UI"] = _validate_ui


def _end_unrequested(assoc: Any) -> None:
    """End the wait of an acceptor whose connection closed before any A-ASSOCIATE indication.

    pynetdicom 3.0 (``Association.run_reactor``) has the acceptor wait up to ``acse_timeout`` for the
    A-ASSOCIATE-RQ on ``dul.to_user_queue``. When the peer closes first (a port scanner, a TLS scanner, a
    load balancer's TCP health check: PS3.8 state machine Sta2 + Evt17, action AA-5) or after the DUL
    itself refused the request (Sta13, AR-5 / AA-2), the DUL stops but puts nothing on that queue, so the
    association thread lives on for ``acse_timeout`` and counts against ``maximum_associations``: a burst
    of such connections locks real peers out with A-ASSOCIATE-RJ "local limit exceeded". ``None`` on the
    queue is what ``receive_pdu`` returns on timeout, so the thread ends at once, down the path pynetdicom
    takes for a timed-out request (kill, close the socket). Called from the DUL thread inside the state
    machine action: it only puts on a queue, it never waits for that thread.
    """
    if not assoc.is_acceptor or assoc.requestor.primitive is not None:
        return  # the request was delivered: the association ends through its own reactor
    pending = list(assoc.dul.to_user_queue.queue)
    if any(isinstance(primitive, A_ASSOCIATE) for primitive in pending):
        return  # delivered, not yet taken
    log.debug("connection.closed_before_association", peer=str(assoc.requestor.address))
    assoc.dul.to_user_queue.put(None)


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
        chunked = _route_received_files(self.ae, self._open_incoming)
        _accept_any_uid_on_listeners()
        server = self.ae.make_server(
            (self.config.host, self.config.port),
            ssl_context=build_ssl_context(self.config),
            evt_handlers=handlers,
            server_class=_Server,
        )
        self.ae._servers.append(server)  # pynetdicom's shutdown() removes it from this list
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
            receive_to_spool=chunked,
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
        _end_unrequested(event.assoc)
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
            result = IngestResult(Outcome.SPOOL_ERROR, STATUS_OUT_OF_RESOURCES, detail=str(exc))
        except Exception as exc:
            log.exception("instance.handler_error", error=type(exc).__name__)
            result = IngestResult(Outcome.SPOOL_ERROR, STATUS_OUT_OF_RESOURCES, detail=type(exc).__name__)
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
