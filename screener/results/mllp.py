"""MLLP (HL7 Minimal Lower Layer Protocol, HL7 v2.5.1 Appendix C.4) client: one message, one answer.

A message travels as ``<VT> message <FS><CR>`` (0x0B ... 0x1C 0x0D) over TCP, optionally inside TLS; the
receiver answers with one framed ACK on the same connection. This module owns only the socket and the
framing; what the ACK means is :mod:`screener.results.hl7`'s business, and what a failure means for the
delivery is the outbox's.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
MAX_ANSWER_BYTES = 1024 * 1024  # an ACK is a few hundred bytes; anything past this is not one


class MllpError(OSError):
    """The exchange failed before a whole answer arrived (refused, reset, timed out, not framed)."""


def frame(message: str) -> bytes:
    """``message`` (ER7, segments separated by CR) framed for MLLP, UTF-8 encoded."""
    return START_BLOCK + message.encode("utf-8") + END_BLOCK


def unframe(data: bytes) -> str:
    """The message inside one MLLP block.

    Raises:
        MllpError: ``data`` is not one ``<VT> ... <FS><CR>`` block.
    """
    start = data.find(START_BLOCK)
    end = data.find(END_BLOCK, start + 1)
    if start < 0 or end < 0:
        raise MllpError("the answer is not an MLLP block (no <VT> ... <FS><CR>)")
    return data[start + 1 : end].decode("utf-8", errors="replace")


def client_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext | None:
    """A TLS context verifying the receiver (and presenting our certificate when given); None: plain TCP."""
    if ca_file is None and cert_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def exchange(
    host: str,
    port: int,
    message: str,
    *,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> str:
    """Send ``message`` to ``host:port`` and return the answer's text, within ``timeout`` seconds overall.

    Raises:
        MllpError: connection refused or reset, TLS failure, timeout, or an answer that is not framed.
    """
    deadline = time.monotonic() + timeout
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise MllpError(f"cannot connect to {host}:{port}: {type(exc).__name__}: {exc}") from exc
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        sock.sendall(frame(message))
        answer = b""
        while END_BLOCK not in answer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MllpError(f"no complete answer from {host}:{port} within {timeout:g} s")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                raise MllpError(f"{host}:{port} closed the connection before answering")
            answer += chunk
            if len(answer) > MAX_ANSWER_BYTES:
                raise MllpError(f"{host}:{port} answered more than {MAX_ANSWER_BYTES} bytes without <FS><CR>")
        return unframe(answer)
    except MllpError:
        raise
    except (OSError, ssl.SSLError) as exc:
        raise MllpError(f"exchange with {host}:{port} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        raw.close()
