"""Third-party loggers that would write identifiers are held back whatever the daemon's level."""

from __future__ import annotations

import io
import logging

from screener.core.config import LoggingConfig
from screener.core.logs import configure_logging


def test_highdicom_uid_lines_are_not_logged_even_at_debug() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(LoggingConfig(level="DEBUG", format="json"), stream=out)
        # What highdicom.base writes for every object it creates (a full SOP Instance UID).
        logging.getLogger("highdicom.base").info('created SR instance "1.2.826.0.1.3680043.8.498.1"')
        logging.getLogger("screener.test").info("kept")
    finally:
        root.handlers, root.level = saved
    text = out.getvalue()
    assert "kept" in text
    assert "1.2.826.0.1.3680043.8.498.1" not in text
