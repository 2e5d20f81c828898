"""Our side of pynetdicom associations we request (SCU): a guard for a race that loses DIMSE responses.

pynetdicom 3.0 runs a reactor thread for every association, also on the requesting side
(``Association._run_reactor``). ``send_c_store`` and the other ``send_*`` calls pause it through a
checkpoint before sending the request, then wait for the response on the DIMSE message queue:

    reactor:  _is_paused = True; _reactor_checkpoint.wait(); _is_paused = False; dimse.get_msg(block=False)
    send_*:   _reactor_checkpoint.clear(); wait until _is_paused; send request; dimse.get_msg(block=True)

When one ``send_*`` call ends it sets the checkpoint, which wakes the reactor; if the next call clears the
checkpoint before the woken reactor has run again, ``_is_paused`` is still True from before, the call goes
ahead, and the reactor's next non-blocking ``get_msg`` can take the response off the queue (a queue hands
an item to whichever getter takes the lock first). The reactor passes it to ``_serve_request``, which logs
"Received unexpected C-STORE service message" and drops it; the caller waits ``dimse_timeout`` for
nothing and aborts the association. A peer that answers fast (a duplicate, in well under a millisecond)
and a busy host make it more likely: about 1 store in 2,500 on this 2-core machine, with DCMTK
``storescp`` as the peer.

:func:`keep_responses_for_caller` lets the reactor take requests only (what it is there to serve, e.g. a
peer's C-STORE sub-operations); responses, and the ``(None, None)`` that tells a waiting caller the
connection is gone, stay queued for the ``send_*`` call waiting on them.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.association import Association


def keep_responses_for_caller(assoc: Association) -> Association:
    """Make ``assoc``'s reactor leave DIMSE responses to the ``send_*`` call waiting for them.

    Call it on an association this process requested, before its first ``send_*`` call; returns
    ``assoc``. Blocking reads (the ``send_*`` calls) are unchanged.
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
