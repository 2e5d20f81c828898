"""Every use of pynetdicom internals, in one place, checked at start-up.

pynetdicom's public API does not cover five things the screener needs; each is done here and nowhere
else, against the pynetdicom minor versions in :data:`TESTED_MINOR_VERSIONS` (pyproject.toml pins them).
:func:`check` verifies that every internal touched below still exists and is still used the way these
hooks assume, and raises :class:`~screener.core.errors.IncompatibleLibraryError` naming the installed
pynetdicom version and what it lacks; :func:`install` (``screener serve``, :class:`Listener.start`) and
:func:`quiet_logging` (every command's logging set-up) call it first.

1. **Receive straight into the spool** (:func:`route_received_files`). With
   ``_config.STORE_RECV_CHUNKED_DATASET`` pynetdicom writes a C-STORE data set to a file it opens with
   ``dimse_messages.NamedTemporaryFile`` while the PDUs arrive; we replace that name with an opener that,
   for our listeners' associations, opens the file in the spool's ``.tmp/`` (hashing as it writes), so a
   received instance is renamed into place, never copied or decoded.
2. **Any UID on our listeners** (``_config.VALIDATORS["UI"]``): see :func:`_validate_ui`.
3. **Free an acceptor whose peer left before A-ASSOCIATE-RQ** (:func:`end_unrequested`, through
   ``Association.dul.to_user_queue``).
4. **Keep DIMSE responses for the caller** (:func:`keep_responses_for_caller`, through
   ``DIMSEServiceProvider.get_msg``/``msg_queue``): a race in the requestor's reactor loses responses.
5. **No data set or identifier in pynetdicom's logs** (:func:`quiet_logging`, ``_config.LOG_*``): PHI.

Also: our own server class is registered in ``AE._servers`` (:func:`register_server`), so
``AE.shutdown()`` stops it as it stops the servers pynetdicom starts itself.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom import AE, _config, association, dimse, dimse_messages, dimse_primitives, dul
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from screener.core.errors import IncompatibleLibraryError
from screener.core.logs import get_logger

log = get_logger("screener.pynetdicom_compat")

TESTED_MINOR_VERSIONS: tuple[str, ...] = ("3.0",)


def _assigns(function: Any, name: str) -> bool:
    """True when ``function``'s code reads or writes the attribute or global ``name``."""
    return name in getattr(getattr(function, "__code__", None), "co_names", ())


# What each hook relies on, as (what, still true?). Evaluated lazily, by check().
_REQUIREMENTS: tuple[tuple[str, Callable[[], bool]], ...] = (
    (
        "dimse_messages.NamedTemporaryFile, opened by DIMSEMessage.decode_msg",
        lambda: (
            hasattr(dimse_messages, "NamedTemporaryFile")
            and _assigns(dimse_messages.DIMSEMessage.decode_msg, "NamedTemporaryFile")
        ),
    ),
    (
        "_config.STORE_RECV_CHUNKED_DATASET, read by DIMSEMessage.decode_msg",
        lambda: (
            isinstance(getattr(_config, "STORE_RECV_CHUNKED_DATASET", None), bool)
            and _assigns(dimse_messages.DIMSEMessage.decode_msg, "STORE_RECV_CHUNKED_DATASET")
        ),
    ),
    ('_config.VALIDATORS["UI"]', lambda: callable(getattr(_config, "VALIDATORS", {}).get("UI"))),
    (
        "_config.LOG_HANDLER_LEVEL, LOG_REQUEST_IDENTIFIERS, LOG_RESPONSE_IDENTIFIERS",
        lambda: all(
            hasattr(_config, name)
            for name in ("LOG_HANDLER_LEVEL", "LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS")
        ),
    ),
    (
        "AE._servers, emptied by AE.shutdown",
        lambda: _assigns(AE.__init__, "_servers") and _assigns(AE.shutdown, "_servers"),
    ),
    (
        "DULServiceProvider.assoc and .to_user_queue",
        lambda: (
            isinstance(getattr(dul.DULServiceProvider, "assoc", None), property)
            and _assigns(dul.DULServiceProvider.__init__, "to_user_queue")
        ),
    ),
    ("ServiceUser.primitive", lambda: _assigns(association.ServiceUser.__init__, "primitive")),
    (
        "DIMSEServiceProvider.get_msg and .msg_queue, polled by Association._run_reactor",
        lambda: (
            callable(getattr(dimse.DIMSEServiceProvider, "get_msg", None))
            and _assigns(dimse.DIMSEServiceProvider.__init__, "msg_queue")
            and _assigns(Association._run_reactor, "get_msg")
        ),
    ),
    (
        "DIMSEPrimitive.is_valid_request",
        lambda: hasattr(dimse_primitives.DIMSEPrimitive, "is_valid_request"),
    ),
)


def check() -> None:
    """Verify that every pynetdicom internal this module touches is there and used as assumed.

    Raises:
        IncompatibleLibraryError: naming the installed pynetdicom version and each missing internal.
    """
    missing = []
    for what, holds in _REQUIREMENTS:
        try:
            ok = holds()
        except (AttributeError, TypeError, KeyError):
            ok = False
        if not ok:
            missing.append(what)
    if missing:
        tested = ", ".join(f"{minor}.x" for minor in TESTED_MINOR_VERSIONS)
        raise IncompatibleLibraryError(
            f"pynetdicom {pynetdicom.__version__} lacks internals CXR Screener relies on: "
            f"{'; '.join(missing)}. Tested with pynetdicom {tested} (pinned in pyproject.toml): "
            "install one of those, or port screener/core/pynetdicom_compat.py"
        )


_LOCK = threading.Lock()
_installed = False
_pynetdicom_validate_ui: Callable[[Any], tuple[bool, str]] | None = None


def install() -> None:
    """Check, then install the process-wide hooks (1 and 2 above); idempotent. Raises what :func:`check`
    raises."""
    global _installed, _pynetdicom_validate_ui
    with _LOCK:
        if _installed:
            return
        check()
        _pynetdicom_validate_ui = _config.VALIDATORS["UI"]
        dimse_messages.NamedTemporaryFile = _open_received_file  # type: ignore[attr-defined]
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.VALIDATORS["UI"] = _validate_ui
        _installed = True


def quiet_logging(level: str) -> None:
    """Turn off pynetdicom's dataset and identifier logging (PHI); keep its messages at ``level``."""
    check()
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(level)


# --- 1. receive into the spool ------------------------------------------------------------------------

# AE -> opener of the file a C-STORE data set is received into, for the AEs of our listeners.
_RECEIVE_ROUTES: weakref.WeakKeyDictionary[AE, Callable[[Any], Any]] = weakref.WeakKeyDictionary()


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


def route_received_files(ae: AE, opener: Callable[[Any], Any]) -> None:
    """Receive ``ae``'s C-STORE data sets into the files ``opener(assoc)`` returns (after :func:`install`)."""
    install()
    with _LOCK:
        _RECEIVE_ROUTES[ae] = opener


def register_server(ae: AE, server: Any) -> None:
    """Have ``ae.shutdown()`` stop ``server`` (made with ``ae.make_server``), as for ``ae.start_server``."""
    ae._servers.append(server)


# --- 2. any UID on our listeners ------------------------------------------------------------------------


def _serves_our_listener(thread: threading.Thread) -> bool:
    """True in the reader (DUL) and association threads of our listeners' associations."""
    assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
    return isinstance(assoc, Association) and assoc.is_acceptor and assoc.ae in _RECEIVE_ROUTES


def _validate_ui(value: Any) -> tuple[bool, str]:
    """pynetdicom's UID check, except on our listener's associations, where every value passes.

    pynetdicom 3.0 checks the UIDs of a received command set while it turns the message into a primitive
    (``DIMSEMessage.message_to_primitive``, in the reader thread); a UID over 64 characters
    (PS3.5 9.1) fails there, the message is dropped as invalid (state machine Evt19) and the association
    aborted, so the peer never learns why. Passing the value through lets
    :class:`~screener.ingest.receive.Ingest`
    answer it with 0xC000 and a reason, and the response carries the request's UID back (PS3.7 9.3.1.2).
    Names in the spool never come from a UID, so no value is dangerous to take in.
    """
    if _serves_our_listener(threading.current_thread()):
        return True, ""
    assert _pynetdicom_validate_ui is not None  # set by install(), before this replaces it
    return _pynetdicom_validate_ui(value)


# --- 3. free an acceptor whose peer left early ----------------------------------------------------------


def end_unrequested(assoc: Any) -> None:
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


# --- 4. keep DIMSE responses for the caller ---------------------------------------------------------------


def keep_responses_for_caller(assoc: Association) -> Association:
    """Make ``assoc``'s reactor leave DIMSE responses to the ``send_*`` call waiting for them.

    Call it on an association this process requested, before its first ``send_*`` call; returns
    ``assoc``. Blocking reads (the ``send_*`` calls) are unchanged.

    pynetdicom 3.0 runs a reactor thread for every association, also on the requesting side
    (``Association._run_reactor``). ``send_c_store`` and the other ``send_*`` calls pause it through a
    checkpoint before sending the request, then wait for the response on the DIMSE message queue::

        reactor: _is_paused = True; _reactor_checkpoint.wait(); _is_paused = False; dimse.get_msg(block=False)
        send_*:  _reactor_checkpoint.clear(); wait until _is_paused; send request; dimse.get_msg(block=True)

    When one ``send_*`` call ends it sets the checkpoint, which wakes the reactor; if the next call clears
    the checkpoint before the woken reactor has run again, ``_is_paused`` is still True from before, the
    call goes ahead, and the reactor's next non-blocking ``get_msg`` can take the response off the queue (a
    queue hands an item to whichever getter takes the lock first). The reactor passes it to
    ``_serve_request``, which logs "Received unexpected C-STORE service message" and drops it; the caller
    waits ``dimse_timeout`` for nothing and aborts the association. A peer that answers fast (a duplicate,
    in well under a millisecond) and a busy host make it more likely: about 1 store in 2,500 on this
    2-core machine, with DCMTK ``storescp`` as the peer.

    Here the reactor takes requests only (what it is there to serve, e.g. a peer's C-STORE
    sub-operations); responses, and the ``(None, None)`` that tells a waiting caller the connection is
    gone, stay queued for the ``send_*`` call waiting on them.
    """
    dimse = assoc.dimse
    queue = dimse.msg_queue
    blocking_get = dimse.get_msg

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        if block:
            return blocking_get(block=True)
        # Only the reactor reads without blocking: hand it the head of the queue only if it is a request.
        with queue.mutex:
            if queue.queue:
                _, msg = queue.queue[0]
                if msg is not None and msg.is_valid_request:
                    return queue.queue.popleft()  # type: ignore[no-any-return]
        return None, None

    setattr(dimse, "get_msg", get_msg)  # noqa: B010 - an instance attribute: mypy forbids method assignment
    return assoc
