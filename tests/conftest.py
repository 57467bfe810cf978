"""Shared fixtures: the stand-in servers, settings that point at them, and a running bot."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.app import ALLOWED_UPDATES, build_application
from bot.context import ParleyApp
from bot.settings import Settings
from tests.pg import store  # noqa: F401  (the fixture: a store of either database)
from tests.stubs.openai_server import API_KEY, FakeOpenAI
from tests.stubs.spec_source import Located, SpecsRefused, SpecsUnavailable, session_specs
from tests.stubs.specs import OpenAISpec, TelegramSpec, require_shared_dir
from tests.stubs.telegram_server import FakeTelegram

TOKEN = "123456789:AAFakeTokenForParleyTests-abcdefghijk"


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection outside 127.0.0.1 fails the test (PTB's OfflineRequest idea)."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if (
            isinstance(host, str)
            and host not in ("127.0.0.1", "::1", "localhost")
            and "/" not in host
        ):
            raise AssertionError(f"test tried to reach the internet: {host}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def shared() -> Path:
    """The folder holding specs/ (see tests/stubs/spec_source.py for where it comes from)."""
    return require_shared_dir()


def _needs_specs(item: pytest.Item) -> bool:
    return "shared" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after -k/-m have deselected what this session won't run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Locate (on a user's machine: fetch once) the API specs if any selected test needs them.

    A wrong PARLEY_SHARED_DIR, CI without the specs, or a fetched file failing its sha256
    stop the session here, once, with the reason.
    """
    if not any(_needs_specs(item) for item in items):
        return
    found = session_specs()
    if isinstance(found, SpecsRefused):
        pytest.exit(str(found), returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str]:
    """One line under the header: where the specs came from, or why tests needing them skip."""
    if not any(_needs_specs(item) for item in items):
        return []
    found = session_specs()
    if isinstance(found, SpecsUnavailable):
        return [f"{found} ({sum(map(_needs_specs, items))} of {len(items)} tests)"]
    return [found.origin] if isinstance(found, Located) else []


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Offline, every test that needs the specs skips here, from this one line, so pytest's
    summary folds them into a single line instead of one per test."""
    if _needs_specs(item) and isinstance(reason := session_specs(), SpecsUnavailable):
        pytest.skip(str(reason))


@pytest.fixture
async def tg(shared: Path) -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram(TOKEN, TelegramSpec.load(shared / "specs" / "telegram-bot-api.json"))
    await server.start()
    yield server
    await server.stop()
    assert server.violations == [], f"the bot broke the Telegram Bot API spec: {server.violations}"


@pytest.fixture
async def oai(shared: Path) -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(OpenAISpec.load(shared / "specs" / "openai-openapi.json"))
    await server.start()
    yield server
    await server.stop()
    assert server.violations == [], f"the bot broke the OpenAI API spec: {server.violations}"


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path, tg: FakeTelegram, oai: FakeOpenAI) -> SettingsFactory:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "telegram_bot_token": TOKEN,
            "telegram_api_url": tg.url,
            "openai_api_key": API_KEY,
            "openai_base_url": oai.url,
            "openai_max_retries": 0,
            "openai_timeout": 5.0,
            "database_url": f"sqlite:///{tmp_path / 'parley.sqlite3'}",
            "draft_interval": 0.05,
            # Tests share one event loop with the stand-ins; a busy moment must not drop the
            # drafts they check. The gate has tests of its own (test_replies_gate.py).
            "progress_shed_lag": 0,
            "telegram_max_rate": 0,
            "telegram_group_rate": 0,
            "admin_user_ids": "42",
            # Chat tests check exact texts; the sentiment tests turn tagging on.
            "sentiment_backend": "off",
            # The stand-in's URL counts as a self-hosted Bot API server (50 MB): use Telegram's.
            "image_max_mb": 20,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[ParleyApp]:
    """Run the real Application with long polling against the stand-in servers."""
    app = build_application(settings)
    # The same sequence as Application.run_polling, hooks included.
    await app.initialize()
    try:
        if app.post_init:
            await app.post_init(app)
        assert app.updater is not None
        await app.updater.start_polling(poll_interval=0, timeout=5, allowed_updates=ALLOWED_UPDATES)
        await app.start()
        try:
            yield app
        finally:
            await app.updater.stop()
            await app.stop()
            if app.post_stop:
                await app.post_stop(app)
    finally:
        await app.shutdown()
        if app.post_shutdown:
            await app.post_shutdown(app)


@pytest.fixture
async def bot(make_settings: SettingsFactory) -> AsyncIterator[ParleyApp]:
    async with running(make_settings()) as app:
        yield app


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll `predicate` (sync or async) until it holds, for state no stand-in announces."""
    import asyncio
    import inspect

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def settled(app: ParleyApp) -> None:
    """Wait until the app has no update in progress (its turns are logged by then)."""
    await eventually(
        lambda: app.update_queue.empty() and app._update_processor.active_lanes == 0  # type: ignore[attr-defined]
    )


@asynccontextmanager
async def local_http(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app on 127.0.0.1, on any free port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
