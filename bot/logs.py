"""Logging set-up: levels, and a filter that keeps secrets out of every line the bot prints.

Python prints some things by itself, outside any logger: an uncaught exception (in the main
thread or another), an exception ignored in a destructor or callback, a warning. Those can
carry a secret too (PTB's InvalidToken names the token; aiohttp's errors name the URL, and
Telegram's URLs contain the token), so `setup_logging` routes them through the log as well.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TextIO
from urllib.parse import quote

REDACTED = "[REDACTED]"

log = logging.getLogger(__name__)


class RedactSecrets(logging.Filter):
    """Replaces every secret wherever it appears in a record's final message or traceback.

    httpx logs Telegram request URLs, which contain the token; this is the safety net behind
    keeping those loggers at WARNING. A secret is also found URL-encoded, and a bot token's
    secret half (after the colon) on its own, in any case: PTB capitalizes a server's error
    description (`str.capitalize` lowercases the rest), so a token a server quotes back in
    it (a proxy naming the path it could not route, say) reaches the bot lowercased.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        forms: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            forms |= {secret, quote(secret, safe="")}
            _, colon, tail = secret.partition(":")
            if colon:
                forms.add(tail)  # a bot token is "<bot id>:<secret>"
        self._secrets = sorted((s for s in forms if len(s) >= 6), key=len, reverse=True)
        self._pattern = (
            re.compile("|".join(map(re.escape, self._secrets)), re.IGNORECASE)
            if self._secrets
            else None
        )

    def redact(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        redacted = self.redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(level: str, secrets: Iterable[str], stream: TextIO | None = None) -> None:
    """Configure the root logger once: format, level, and secret redaction on every handler.

    What Python would print by itself (uncaught exceptions, warnings) goes through it too.
    """
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
    route_python_output()


def route_python_output() -> None:
    """Send what Python prints on its own through the log, and so through its filter.

    The asyncio loop's exception handler already logs (the "asyncio" logger, under uvloop
    too); these are the rest: sys.excepthook, threading.excepthook, sys.unraisablehook and
    warnings.showwarning.
    """
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    sys.unraisablehook = _unraisable
    # Not logging.captureWarnings: it does nothing if called before, whoever has since
    # replaced showwarning again.
    warnings.showwarning = _warning


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    log.critical("uncaught exception", exc_info=(kind, value, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return  # as Python's own hook: a thread's sys.exit() is not an error
    name = args.thread.name if args.thread is not None else "?"
    exc_info: ExcInfo = (args.exc_type, args.exc_value, args.exc_traceback)
    log.critical("uncaught exception in thread %s", name, exc_info=exc_info)


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    try:
        where = repr(unraisable.object) if unraisable.object is not None else ""
    except Exception:
        where = "<object repr() failed>"
    what = unraisable.err_msg or "Exception ignored in"
    value = unraisable.exc_value
    if value is None:
        log.error("%s: %s", what, where)
        return
    log.error(
        "%s: %s", what, where, exc_info=(unraisable.exc_type, value, unraisable.exc_traceback)
    )


def _warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    text = warnings.formatwarning(message, category, filename, lineno, line)
    logging.getLogger("py.warnings").warning("%s", text.rstrip())


class LogThrottle:
    """Rate-limits one repeated log line: the first occurrence, then one summary a period.

    A client hammering the webhook with a wrong secret would otherwise write a line per
    request. `hit()` says whether to log now, and how many occurrences that line stands for.
    """

    def __init__(self, period: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self._clock = clock
        self._next = float("-inf")
        self._count = 0

    def hit(self) -> int:
        """Count one occurrence; the count to report if a line is due now, else 0."""
        self._count += 1
        now = self._clock()
        if now < self._next:
            return 0
        count, self._count = self._count, 0
        self._next = now + self.period
        return count
