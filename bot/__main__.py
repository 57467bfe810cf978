"""`python -m bot` (or `parley`): load settings, set up logging, run the bot.

Long polling, or a webhook server when WEBHOOK_URL is set; `check` checks a deployment.
Whatever stops the start is one line on stderr: exit 2 for a configuration the bot refuses,
1 for a start that failed (see bot/startup.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from secrets import token_urlsafe
from typing import TYPE_CHECKING

from pydantic import SecretStr

from bot.settings import ConfigError, Settings, load_settings, validate

if TYPE_CHECKING:
    from bot.context import ParleyApp

log = logging.getLogger("bot")

HELP = """\
usage: {prog} [check]

{run}run the bot: long polling, or a webhook server when WEBHOOK_URL is set;
{pad}it stops cleanly on Ctrl-C or SIGTERM
{check}check the configuration (as the bot does at start), reach Telegram and
{pad}the model API, look at the database; one line per check

Settings come from environment variables or a .env file in the current folder. The main ones:
  TELEGRAM_BOT_TOKEN  the bot's token from @BotFather (required)
  OPENAI_API_KEY      the model API key; or OPENAI_BASE_URL for an OpenAI-compatible server
  OPENAI_MODEL        the chat model (default gpt-5.4-mini)
  ADMIN_USER_IDS      numeric Telegram user ids of the admins; send /id to the bot to see yours
  DATABASE_URL        the SQLite file (default sqlite:///data/parley.sqlite3)
  WEBHOOK_URL         the public https URL to receive updates at, instead of long polling

Exit status: 0 stopped normally (check: all is well); 1 the start or a check failed;
2 the configuration is invalid (check reports that as a failed check: 1).
Every setting, and the whole guide: {readme}
"""


def _usage(prog: str) -> str:
    return f"usage: {prog} [check]  ({prog} --help for the commands and settings)"


def _help(prog: str) -> str:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    where = str(readme) if readme.is_file() else "README.md in Parley's source"
    width = len(prog) + 10
    return HELP.format(
        prog=prog,
        run=f"  {prog}".ljust(width),
        check=f"  {prog} check".ljust(width),
        pad=" " * width,
        readme=where,
    )


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
    """Run the bot until SIGINT/SIGTERM; a one-line error and exit 2 or 1 if it can't start."""
    args = sys.argv[1:] if argv is None else argv
    prog = "parley" if Path(sys.argv[0]).name == "parley" else "python -m bot"
    if args and args[0] in ("-h", "--help", "help"):
        print(_help(prog), end="")
        return 0
    if args == ["check"]:
        from bot.check import main as check

        return check()
    if args:
        print(_usage(prog), file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        validate(settings)
    except ConfigError as exc:
        print(f"parley: configuration error: {exc.for_a_deployer()}", file=sys.stderr)
        return 2

    # Imported after the settings check so a configuration error stays fast and quiet.
    from bot.app import build_application
    from bot.logs import setup_logging
    from bot.startup import describe

    if settings.webhook_url and settings.webhook_secret is None:
        # Made here, not when the webhook is set, so the log filter knows it from the start.
        settings = settings.model_copy(update={"webhook_secret": SecretStr(token_urlsafe(32))})
    setup_logging(settings.log_level, settings.secrets())
    app = build_application(settings)
    loop = new_event_loop(settings.event_loop)
    try:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            runner.run(run(app, settings))
    except KeyboardInterrupt:  # Ctrl-C before the bot's own stop handling was set up
        return 130
    except Exception as exc:
        # Everything opened is closed by now; what is left to say fits on one line.
        log.debug("the bot stopped on this error", exc_info=True)
        print(f"parley: {describe(exc, settings)}", file=sys.stderr)
        return 1
    return 0


async def run(app: ParleyApp, settings: Settings) -> None:
    """Check the model endpoints take their keys, then poll or serve the webhook."""
    from bot.app import ALLOWED_UPDATES
    from bot.startup import check_model_keys, initialize

    # A refused key stops the start before Telegram is asked. An endpoint merely out of
    # reach is logged only once Telegram has answered: offline, the one line says Telegram.
    notes = await check_model_keys(settings)
    await initialize(app)  # polling and the webhook find the application initialised
    for note in notes:
        log.warning("%s", note)
    if settings.webhook_url:
        from bot import webhook

        await webhook.serve(app, settings, ALLOWED_UPDATES)
    else:
        await poll(app, settings, ALLOWED_UPDATES)


async def poll(app: ParleyApp, settings: Settings, allowed_updates: list[str]) -> None:
    """Long polling until SIGINT or SIGTERM: Application.run_polling's steps, plus a drain.

    On a stop signal fetching stops, replies in flight finish within SHUTDOWN_GRACE, the
    updates not started stay in the inbox for the next start, and the process exits within
    the grace period whatever state storage or the network are in.
    """
    from bot.durability import drain_updates, handle_stop_signals
    from bot.startup import initialize, log_started

    stop = asyncio.Event()
    handle_stop_signals(stop, settings.shutdown_grace)
    await initialize(app)
    assert app.updater is not None
    try:
        if app.post_init:
            await app.post_init(app)
        await app.updater.start_polling(allowed_updates=allowed_updates)
        await app.start()
        log_started(app, settings)
        try:
            await stop.wait()
        finally:
            drain_updates(app, settings.shutdown_grace)
    finally:
        if app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()
        # Also when the start failed after post_init: it cancels what post_init started.
        if app.post_stop:
            await app.post_stop(app)
        await app.shutdown()
        if app.post_shutdown:
            await app.post_shutdown(app)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
