"""Logging set-up: levels, and a filter that keeps secrets out of every log line."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TextIO

REDACTED = "[REDACTED]"


class RedactSecrets(logging.Filter):
    """Replaces the bot token and API key wherever they appear in a record's final message.

    httpx logs Telegram request URLs, which contain the token; this is the safety net behind
    keeping those loggers at WARNING.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        redacted = message
        for secret in self._secrets:
            redacted = redacted.replace(secret, REDACTED)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        exc_text = record.exc_text
        if exc_text:
            for secret in self._secrets:
                exc_text = exc_text.replace(secret, REDACTED)
            record.exc_text = exc_text
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(level: str, secrets: Iterable[str], stream: TextIO | None = None) -> None:
    """Configure the root logger once: format, level, and secret redaction on every handler."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # These log every request URL at INFO, and Telegram's URLs contain the bot token.
    # aiosqlite logs every statement with its parameters, i.e. users' messages, at DEBUG.
    for name in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "aiosqlite"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
