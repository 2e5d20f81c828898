"""Running the console inside ``screener serve``: uvicorn in a thread, stopped with the daemon."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import uvicorn

from screener.core.errors import ConfigError
from screener.core.logs import get_logger
from screener.ops.console.web import ConsoleContext, build_app

log = get_logger("screener.console")

START_SECONDS = 10.0
GRACE_SECONDS = 3


class ConsoleServer:
    """The console's HTTP(S) server in a daemon thread; :meth:`stop` asks it to finish and waits."""

    def __init__(self, ctx: ConsoleContext) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self._config = uvicorn.Config(
            build_app(ctx),
            host=settings.host,
            port=settings.port,
            ssl_certfile=str(settings.tls.cert_file) if settings.tls.cert_file else None,
            ssl_keyfile=str(settings.tls.key_file) if settings.tls.key_file else None,
            # console.tls.ca_file + require_client_cert: only browsers with a certificate that CA signed.
            ssl_ca_certs=str(settings.tls.ca_file) if settings.tls.ca_file else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls.require_client_cert else ssl.CERT_NONE,
            log_config=None,  # our structlog configuration; and no access log (paths and client addresses)
            access_log=False,
            server_header=False,
            proxy_headers=False,
            lifespan="off",
            timeout_graceful_shutdown=GRACE_SECONDS,  # then open keep-alive connections are dropped
        )
        self._server = uvicorn.Server(self._config)
        self.thread = threading.Thread(target=self._server.run, name="console", daemon=True)

    def start(self) -> None:
        """Bind and serve; raises ConfigError when the port cannot be bound."""
        settings = self.ctx.settings
        try:  # fail at start-up with a clear message rather than in the thread
            with socket.create_server((settings.host, settings.port)):
                pass
        except OSError as exc:
            raise ConfigError(
                "console.port",
                settings.port,
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            ) from exc
        self.thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self._server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        scheme = "https" if self.ctx.tls else "http"
        log.info(
            "console.ready",
            url=settings.base_url or f"{scheme}://{settings.host}:{settings.port}",
            tls=self.ctx.tls,
        )

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the requests in flight (at most ``GRACE_SECONDS``), then release the database pool."""
        self._server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.ctx.engine.dispose()
