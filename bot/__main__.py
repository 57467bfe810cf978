"""`python -m bot`: load settings, set up logging, run the bot with long polling."""

from __future__ import annotations

import asyncio
import logging
import sys
from secrets import token_urlsafe
from typing import TYPE_CHECKING

from pydantic import SecretStr

from bot.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from bot.context import ParleyApp


def _validate(settings: Settings) -> None:
    """Checks beyond single variables, so misconfiguration fails at start in one line."""
    from bot.services.profiles import ProfileError, load_profiles

    try:
        load_profiles(settings.profiles_file, settings.assistant_instructions)
    except ProfileError as exc:
        raise ConfigError(f"PROFILES_FILE: {exc}") from None
    if settings.openai_api_key is None and settings.openai_base_url is None:
        raise ConfigError(
            "OPENAI_API_KEY is not set"
            " (or set OPENAI_BASE_URL for a local OpenAI-compatible server)"
        )


USAGE = "usage: python -m bot [check]"


def new_event_loop(choice: str = "auto") -> asyncio.AbstractEventLoop:
    """uvloop where it is installed, unless EVENT_LOOP=asyncio.

    The bot's own work is mostly HTTP on the event loop; uvloop cut its CPU per message
    by about a fifth in bench/run.py (8.5 -> 6.9 ms on the quick run).
    """
    if choice == "auto":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    """Run the bot until SIGINT/SIGTERM; exit 2 with a one-line error on bad configuration."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["check"]:
        from bot.check import main as check

        return check()
    if args:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        _validate(settings)
    except ConfigError as exc:
        print(f"parley: configuration error: {exc}", file=sys.stderr)
        return 2

    # Imported after the settings check so a configuration error stays fast and quiet.
    from bot.app import ALLOWED_UPDATES, build_application
    from bot.logs import setup_logging

    if settings.webhook_url and settings.webhook_secret is None:
        # Made here, not when the webhook is set, so the log filter knows it from the start.
        settings = settings.model_copy(update={"webhook_secret": SecretStr(token_urlsafe(32))})
    setup_logging(settings.log_level, settings.secrets())
    app = build_application(settings)
    loop = new_event_loop(settings.event_loop)
    logging.getLogger("bot").info("event loop: %s", type(loop).__module__.split(".")[0])
    if settings.webhook_url:
        from bot import webhook

        webhook.run(app, settings, ALLOWED_UPDATES, loop)
    else:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            runner.run(poll(app, settings, ALLOWED_UPDATES))
    return 0


async def poll(app: ParleyApp, settings: Settings, allowed_updates: list[str]) -> None:
    """Long polling until SIGINT or SIGTERM: Application.run_polling's steps, plus a drain.

    On a stop signal fetching stops, replies in flight finish within SHUTDOWN_GRACE, the
    updates not started stay in the inbox for the next start, and the process exits within
    the grace period whatever state storage or the network are in.
    """
    from bot.durability import drain_updates, handle_stop_signals

    stop = asyncio.Event()
    handle_stop_signals(stop, settings.shutdown_grace)
    await app.initialize()
    try:
        if app.post_init:
            await app.post_init(app)
        assert app.updater is not None
        await app.updater.start_polling(allowed_updates=allowed_updates)
        await app.start()
        try:
            await stop.wait()
        finally:
            drain_updates(app, settings.shutdown_grace)
            if app.updater.running:
                await app.updater.stop()
            if app.running:
                await app.stop()
                if app.post_stop:
                    await app.post_stop(app)
    finally:
        await app.shutdown()
        if app.post_shutdown:
            await app.post_shutdown(app)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
