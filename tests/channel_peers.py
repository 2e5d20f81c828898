"""Real receivers for the result and alert channels, run in the test process on loopback.

- :class:`Hl7Receiver`: hl7apy's MLLP server; every message is parsed and validated strictly as HL7 2.5.1
  and answered with an ACK whose code the test chooses (AA, AE, AR) or not at all (down).
- :class:`WebhookReceiver`: an HTTP server that checks ``X-Screener-Signature`` with its own HMAC-SHA256.
- :class:`SmtpReceiver`: aiosmtpd's SMTP server, keeping every message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import threading
import traceback
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message as MailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message


@dataclass
class Received:
    text: str
    control_id: str
    valid: bool
    answered: str


class Hl7Receiver:
    """An MLLP server on ``port`` answering ORU^R01 with ``self.answer`` (``"AA"``, ``"AE"``, ``"AR"``)."""

    def __init__(self, port: int, answer: str = "AA") -> None:
        self.port = port
        self.answer = answer
        self.received: list[Received] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.server: MLLPServer | None = None
        self.thread: threading.Thread | None = None

    def _handler(self) -> type[AbstractHandler]:
        receiver = self

        class Handler(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                try:
                    return self._reply()
                except Exception as exc:  # recorded for the test to show, then the connection is closed
                    receiver.errors.append(
                        f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}\n{self.incoming_message!r}"
                    )
                    raise

            def _reply(self) -> str:
                text = self.incoming_message
                msg = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
                valid = bool(msg.validate())
                control = str(msg.msh.msh_10.value)
                code = receiver.answer
                with receiver.lock:
                    receiver.received.append(Received(text, control, valid, code))
                ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
                ack.msh.msh_3 = "TESTRIS"
                ack.msh.msh_9 = "ACK^R01^ACK"
                ack.msh.msh_10 = "ACK" + control[:17]
                ack.msh.msh_11 = "P"
                ack.msh.msh_12 = "2.5.1"
                ack.msa.msa_1 = code
                ack.msa.msa_2 = control
                if code != "AA":
                    ack.msa.msa_3 = "test receiver refuses"
                return "\x0b" + str(ack.to_er7()) + "\x1c\r"

        return Handler

    def start(self, tls: ssl.SSLContext | None = None) -> Hl7Receiver:
        """Listen (over TLS with ``tls``, a server-side context) and answer in a thread."""
        self.server = MLLPServer("127.0.0.1", self.port, {"ORU^R01^ORU_R01": (self._handler(),)}, timeout=10)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def accepted(self) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.answered == "AA"]


@dataclass
class Hook:
    headers: dict[str, str]
    body: bytes
    signature_ok: bool

    @property
    def document(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    secret: str
    status: int = 200
    hooks: list[Hook] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/screener-alerts"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                expected = "sha256=" + hmac.new(receiver.secret.encode(), body, hashlib.sha256).hexdigest()
                given = self.headers.get("X-Screener-Signature", "")
                receiver.hooks.append(
                    Hook(dict(self.headers.items()), body, hmac.compare_digest(expected, given))
                )
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class SmtpReceiver:
    """aiosmtpd on a free loopback port; ``messages`` holds every message received."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[MailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        receiver = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                receiver.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
                receiver.messages.append(message_from_bytes(envelope.content))
                return "250 OK"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=port)

    def start(self) -> SmtpReceiver:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()
