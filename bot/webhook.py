"""Webhook mode: an aiohttp server that takes Telegram's updates, plus /healthz.

Every request must carry the secret token given to setWebhook (compared in constant time);
anything else is refused before its body is read.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from aiohttp import web
from telegram import Bot, Update
from telegram.error import InvalidToken, TelegramError

from bot.context import ParleyApp
from bot.durability import MAX_UPDATE_ID, DurableBot, drain_updates, handle_stop_signals
from bot.errors import StorageUnavailable, WriterClosed
from bot.logs import LogThrottle
from bot.settings import Settings
from bot.startup import StartupError, initialize, log_started, redact, unreachable

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_UPDATE_BYTES = 1024 * 1024  # Telegram's updates are far smaller


def parse_update(body: bytes, bot: Bot) -> Update | None:
    """The update in a webhook body, or None if it isn't one (never raises).

    Valid JSON is not enough: an array, a number, an update_id that is not a small
    non-negative integer (2**70, NaN), or nesting too deep to parse is refused.
    """
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    update_id = data.get("update_id")
    if type(update_id) is not int or not 0 <= update_id <= MAX_UPDATE_ID:
        return None
    try:
        return Update.de_json(data, bot)
    except Exception:  # any shape PTB can't read is the sender's problem, not a 500
        return None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON a Telegram update can hold")


def make_server(app: ParleyApp, path: str, secret: str) -> web.Application:
    """The web app: POST `path` for updates, GET /healthz for load balancers."""
    # One client sending a wrong secret in a loop must not fill the log: the first refusal
    # is logged, then at most one line a minute, with how many there were.
    refusals = LogThrottle(60.0)

    async def receive(request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), secret.encode()):
            if count := refusals.hit():
                log.warning(
                    "webhook request refused: wrong or missing secret token (%d since the last"
                    " such line; this line is logged at most once a minute)",
                    count,
                )
            return web.Response(status=403, text="forbidden")
        if (request.content_length or 0) > MAX_UPDATE_BYTES:
            return web.Response(status=413, text="too large")
        update = parse_update(await request.read(), app.bot)
        if update is None:
            return web.Response(status=400, text="not an update")
        # Durable before Telegram hears 200; a redelivered update is acknowledged, not redone.
        bot = app.bot
        if isinstance(bot, DurableBot) and bot.inbox is not None:
            try:
                accepted = await bot.inbox.accept([update])
            except (StorageUnavailable, WriterClosed):
                # Telegram delivers it again later; meanwhile the user hears why it waits.
                await bot.inbox.refused([update])
                return web.Response(status=503, text="storage unavailable")
            if not accepted:
                return web.Response(text="ok")
            update = accepted[0]
            if bot.deliver is not None:
                await bot.deliver(update)
                return web.Response(text="ok")
        await app.update_queue.put(update)
        return web.Response(text="ok")

    async def healthz(request: web.Request) -> web.Response:
        healthy = app.running and app.bot_data.services is not None
        bot = app.bot
        if healthy and isinstance(bot, DurableBot) and bot.inbox and not bot.inbox.healthy:
            # Updates can't be stored: the bot takes no messages until storage works again.
            return web.json_response({"ok": False, "storage": "failing"}, status=503)
        return web.json_response({"ok": healthy}, status=200 if healthy else 503)

    server = web.Application(client_max_size=MAX_UPDATE_BYTES)
    server.router.add_post(path, receive)
    server.router.add_get("/healthz", healthz)
    return server


@asynccontextmanager
async def serving(
    app: ParleyApp, settings: Settings, allowed_updates: list[str]
) -> AsyncIterator[int]:
    """Run the bot in webhook mode (same lifecycle as run_polling); yields the bound port."""
    assert settings.webhook_url is not None
    secret = (
        settings.webhook_secret.get_secret_value()
        if settings.webhook_secret
        else secrets.token_urlsafe(32)
    )
    path = urlsplit(settings.webhook_url).path or "/"
    await initialize(app)
    runner: web.AppRunner | None = None
    try:
        if app.post_init:
            await app.post_init(app)
        runner = web.AppRunner(make_server(app, path, secret), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.webhook_listen, settings.webhook_port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                "webhook_listen",
                f"cannot listen on {settings.webhook_listen}:{settings.webhook_port}"
                f" ({os.strerror(exc.errno) if exc.errno else exc}): check WEBHOOK_LISTEN and"
                " WEBHOOK_PORT",
            ) from exc
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            await app.bot.set_webhook(
                settings.webhook_url, secret_token=secret, allowed_updates=allowed_updates
            )
        except TelegramError as exc:
            if isinstance(exc, InvalidToken) or unreachable(exc):
                raise  # said as at any other call
            raise StartupError(
                "webhook_refused",
                f"Telegram refused the webhook {settings.webhook_url}"
                f" ({redact(exc.message, settings)}): check WEBHOOK_URL",
            ) from exc
        await app.start()
        log.info("webhook mode: listening on %s:%s%s", settings.webhook_listen, port, path)
        log_started(app, settings)
        try:
            yield port
        finally:
            await runner.cleanup()
            runner = None
            await app.stop()
    finally:
        if runner is not None:
            await runner.cleanup()
        if app.running:
            await app.stop()
        # Also when the start failed after post_init: it cancels what post_init started.
        if app.post_stop:
            await app.post_stop(app)
        await app.shutdown()
        if app.post_shutdown:
            await app.post_shutdown(app)


async def serve(app: ParleyApp, settings: Settings, allowed_updates: list[str]) -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    handle_stop_signals(stop, settings.shutdown_grace)
    async with serving(app, settings, allowed_updates):
        await stop.wait()
        # Replies in flight finish (within the grace period); the rest wait in the inbox.
        drain_updates(app, settings.shutdown_grace)


def run(
    app: ParleyApp,
    settings: Settings,
    allowed_updates: list[str],
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, on `loop` (a new asyncio loop if None)."""
    with asyncio.Runner(loop_factory=(lambda: loop) if loop is not None else None) as runner:
        runner.run(serve(app, settings, allowed_updates))
