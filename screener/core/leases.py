"""Leases held by processes of this host that no longer exist are released at start-up.

A worker or sender that was killed leaves its claimed rows leased until the lease expires
(minutes). When the same host starts again it can tell, from the owner string
``host:pid:token``, which owners are dead, and give their rows back at once. Leases of other hosts
are left to expire: their processes may well be alive.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from screener.core.spool import pid_alive


def owner_id(token: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{token}"


def _dead_here(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    return not pid_alive(int(pid_text))


def release_dead_leases(session: Session, model: Any, values: dict[str, Any]) -> int:
    """Clear leases of dead local owners on ``model`` (a table with lease_owner/lease_expires_at).

    ``values`` are the extra columns to set on released rows (e.g. status back to queued).
    Returns how many rows were released.
    """
    owners = [
        o for o in session.scalars(select(model.lease_owner).where(model.lease_owner.is_not(None)).distinct())
    ]
    dead = [o for o in owners if _dead_here(o)]
    if not dead:
        return 0
    result = session.execute(
        update(model)
        .where(model.lease_owner.in_(dead))
        .values(lease_owner=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)
