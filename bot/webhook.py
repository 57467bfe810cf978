"""Webhook mode: an aiohttp server that takes Telegram's updates, plus /healthz.

Every request must carry the secret token given to setWebhook (compared in constant time);
anything else is refused before its body is read.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit

from aiohttp import web
from telegram import Update

from bot.context import ParleyApp
from bot.durability import DurableBot
from bot.settings import Settings

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_UPDATE_BYTES = 1024 * 1024  # Telegram's updates are far smaller


def make_server(app: ParleyApp, path: str, secret: str) -> web.Application:
    """The web app: POST `path` for updates, GET /healthz for load balancers."""

    async def receive(request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), secret.encode()):
            log.warning("webhook request refused: wrong or missing secret token")
            return web.Response(status=403, text="forbidden")
        if (request.content_length or 0) > MAX_UPDATE_BYTES:
            return web.Response(status=413, text="too large")
        try:
            data = json.loads(await request.read())
            update = Update.de_json(data, app.bot)
        except (ValueError, TypeError, KeyError):
            return web.Response(status=400, text="not an update")
        if update is None:
            return web.Response(status=400, text="not an update")
        # Durable before Telegram hears 200; a redelivered update is acknowledged, not redone.
        bot = app.bot
        if isinstance(bot, DurableBot) and bot.inbox is not None:
            if not await bot.inbox.accept([update]):
                return web.Response(text="ok")
        await app.update_queue.put(update)
        return web.Response(text="ok")

    async def healthz(request: web.Request) -> web.Response:
        healthy = app.running and app.bot_data.services is not None
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
    await app.initialize()
    runner: web.AppRunner | None = None
    try:
        if app.post_init:
            await app.post_init(app)
        runner = web.AppRunner(make_server(app, path, secret), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.webhook_listen, settings.webhook_port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        await app.bot.set_webhook(
            settings.webhook_url, secret_token=secret, allowed_updates=allowed_updates
        )
        await app.start()
        log.info("webhook mode: listening on %s:%s%s", settings.webhook_listen, port, path)
        try:
            yield port
        finally:
            await runner.cleanup()
            runner = None
            await app.stop()
            if app.post_stop:
                await app.post_stop(app)
    finally:
        if runner is not None:
            await runner.cleanup()
        await app.shutdown()
        if app.post_shutdown:
            await app.post_shutdown(app)


def run(
    app: ParleyApp,
    settings: Settings,
    allowed_updates: list[str],
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, on `loop` (a new asyncio loop if None)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        async with serving(app, settings, allowed_updates):
            await stop.wait()

    with asyncio.Runner(loop_factory=(lambda: loop) if loop is not None else None) as runner:
        runner.run(main())
