"""Liveness for containers: `python -m bot.health` exits 0 if the bot is alive, else 1.

In webhook mode it asks the bot's own `GET /healthz`. Long polling has no port to ask, so
with HEARTBEAT_FILE set the bot touches that file every HEARTBEAT_INTERVAL seconds while it
is running and its storage takes updates (what /healthz reports too), and the check looks
at the file's age: older than HEARTBEAT_STALE, the bot has stopped, its event loop is stuck,
or its storage is failing. One line on stdout says which.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from bot.logs import LogThrottle
from bot.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:  # the check itself stays light: it runs every 30 s beside the bot
    from bot.context import ParleyApp

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0
"""Seconds between two touches of HEARTBEAT_FILE."""

HEARTBEAT_STALE = 30.0
"""A heartbeat older than this (six missed touches) means the bot is not alive."""

HEALTHZ_TIMEOUT = 5.0


def alive(app: ParleyApp) -> bool:
    """Running, services up, and storage taking updates (the same test as /healthz)."""
    from bot.durability import DurableBot

    if not app.running or app.bot_data.services is None:
        return False
    bot = app.bot
    return not (isinstance(bot, DurableBot) and bot.inbox and not bot.inbox.healthy)


def _touch(path: Path) -> None:
    path.touch()


async def keep_heartbeat(app: ParleyApp, path: Path, interval: float = HEARTBEAT_INTERVAL) -> None:
    """Touch `path` every `interval` seconds while the bot is alive; remove it on the way out."""
    failures = LogThrottle(600.0)
    beaten = False
    try:
        while True:
            if alive(app):
                try:
                    await asyncio.to_thread(_touch, path)
                    beaten = True
                except OSError as exc:
                    if count := failures.hit():
                        log.warning(
                            "HEARTBEAT_FILE %s can't be written (%s; %d times since the last such"
                            " line): the container will be reported unhealthy",
                            path,
                            exc.strerror or type(exc).__name__,
                            count,
                        )
            # Until the first beat, look often: the start should be seen as soon as it's done.
            await asyncio.sleep(interval if beaten else min(interval, 0.25))
    finally:
        # Gone at once on a stop, not only once it has gone stale.
        await asyncio.to_thread(path.unlink, missing_ok=True)


def _healthz_url(settings: Settings) -> str:
    host = settings.webhook_listen
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.webhook_port}/healthz"


def check(settings: Settings, now: float | None = None) -> tuple[bool, str]:
    """(alive?, one line saying why) for the bot these settings describe."""
    if settings.webhook_url and settings.webhook_port != 0:
        url = _healthz_url(settings)
        try:
            with urllib.request.urlopen(url, timeout=HEALTHZ_TIMEOUT) as answer:
                return True, f"ok: {url} answered {answer.status}"
        except urllib.error.HTTPError as exc:
            return False, f"unhealthy: {url} answered {exc.code}"
        except OSError as exc:
            reason = getattr(exc, "reason", None) or exc
            return False, f"unhealthy: {url} did not answer ({reason})"
    path = settings.heartbeat_file
    if path is None:
        return False, (
            "unknown: long polling has no port to ask; set HEARTBEAT_FILE (the image does)"
        )
    try:
        modified = path.stat().st_mtime
    except OSError:
        return False, f"unhealthy: no heartbeat at {path} (the bot is not running)"
    age = (time.time() if now is None else now) - modified
    if age > HEARTBEAT_STALE:
        return False, f"unhealthy: the heartbeat at {path} is {age:.0f} s old"
    return True, f"ok: heartbeat {age:.0f} s old"


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"unhealthy: configuration error: {exc}")
        return 1
    ok, line = check(settings)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
