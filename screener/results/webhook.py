"""Webhook alerts: a JSON POST signed with HMAC-SHA256, verified by the receiver with the shared secret.

Headers: ``Content-Type: application/json``, ``X-Screener-Event`` (the event), ``X-Screener-Delivery`` (the
idempotency key: the same on every retry, so a receiver can drop a duplicate) and
``X-Screener-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes, keyed with the secret>``.

A 2xx answer delivers. 408, 429 and 5xx, connection failures and timeouts are retried by the outbox; any
other 4xx means the receiver refuses this request as it is, and the delivery is dead (re-drive it after
fixing the receiver or the secret).
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.error
import urllib.request
from dataclasses import dataclass

SIGNATURE_HEADER = "X-Screener-Signature"
EVENT_HEADER = "X-Screener-Event"
DELIVERY_HEADER = "X-Screener-Delivery"
_RETRYABLE_HTTP = frozenset({408, 425, 429})


def signature(secret: str, body: bytes) -> str:
    """The ``X-Screener-Signature`` value of ``body``: ``sha256=`` and the hex HMAC-SHA256 digest."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """True when ``header`` is the signature of ``body`` under ``secret`` (constant-time comparison)."""
    return header is not None and hmac.compare_digest(signature(secret, body), header)


@dataclass(frozen=True)
class PostResult:
    delivered: bool
    retryable: bool
    error: str | None
    status: int | None


def post(url: str, secret: str, body: bytes, *, event: str, key: str, timeout: float) -> PostResult:
    """POST ``body`` to ``url`` with the signature headers; what the answer means for the delivery."""
    if not url.startswith(("http://", "https://")):  # the settings check this too; urllib also opens file:
        return PostResult(False, False, f"webhook url {url!r} is not http(s)", None)
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "cxr-screener",
            EVENT_HEADER: event,
            DELIVERY_HEADER: key,
            SIGNATURE_HEADER: signature(secret, body),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310  # nosec B310
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
        retryable = status >= 500 or status in _RETRYABLE_HTTP
        return PostResult(False, retryable, f"receiver answered HTTP {status}", status)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return PostResult(False, True, f"POST failed: {type(exc).__name__}: {reason}", None)
    if 200 <= status < 300:
        return PostResult(True, False, None, status)
    return PostResult(False, True, f"receiver answered HTTP {status}", status)
