"""The HTTP layers under PTB and the OpenAI SDK: aiohttp under both, a bounded Bot API pool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import openai
import pytest
from aiohttp import web
from telegram import Message
from telegram.error import NetworkError, TimedOut

from bot.app import make_openai_client
from bot.errors import classify_model_error
from bot.services.replies import _with_retries
from bot.settings import Settings
from bot.telegram_http import AiohttpRequest, SlotTimeout
from tests.conftest import eventually, local_http


class HeldServer:
    """A local HTTP server whose answers wait for `release`; it counts requests in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self.served = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        self.served += 1
        return web.json_response({"ok": True, "result": True})


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldServer, str]]:
    server = HeldServer()
    app = web.Application()
    app.router.add_post("/{tail:.*}", server.handle)
    async with local_http(app) as url:
        yield server, f"{url}/botTOKEN/sendMessage"
        server.release.set()


@asynccontextmanager
async def bounded(pool: int, timeout: float) -> AsyncIterator[AiohttpRequest]:
    request = AiohttpRequest(connection_pool_size=pool, pool_timeout=timeout)
    await request.initialize()
    try:
        yield request
    finally:
        await request.shutdown()


async def test_bot_api_requests_beyond_the_pool_wait_their_turn_and_all_arrive(
    held: tuple[HeldServer, str],
) -> None:
    server, url = held
    async with bounded(2, 30.0) as request:
        calls = [asyncio.create_task(request.do_request(url, "POST")) for _ in range(7)]
        await eventually(lambda: server.in_flight == 2)  # the first two reach the server...
        assert server.served == 0 and not any(c.done() for c in calls)
        server.release.set()  # ...and the rest follow as slots free up
        async with asyncio.timeout(10):  # a slot never given back would hang here
            results = await asyncio.gather(*calls)
    assert [code for code, _ in results] == [200] * 7 and server.served == 7
    assert server.max_in_flight == 2


async def test_a_bot_api_request_that_waits_past_the_pool_timeout_is_a_timeout(
    held: tuple[HeldServer, str],
) -> None:
    server, url = held
    async with bounded(1, 0.2) as request:
        first = asyncio.create_task(request.do_request(url, "POST"))
        await eventually(lambda: server.in_flight == 1)
        with pytest.raises(SlotTimeout) as raised:  # nothing was sent: a NetworkError that
            await request.do_request(url, "POST")
        assert not isinstance(raised.value, TimedOut)  # senders may retry, unlike TimedOut
        server.release.set()
        assert (await first)[0] == 200


async def test_bot_api_calls_cancelled_at_any_moment_never_use_up_the_pool() -> None:
    """A caller that stops waiting (a draft overtaken by its reply) never costs the pool a
    slot, whatever stage its request was at (httpcore 1.0.9 lost one for good when cancelled
    while connecting, encode/httpcore#1093: the reason the bot no longer uses it)."""
    rng = random.Random(1)

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(rng.choice([0, 0, 0.001, 0.003]))
        return web.json_response({"ok": True, "result": True})

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    async with local_http(app) as base, bounded(4, 1.0) as request:
        url = f"{base}/botTOKEN/x"
        for _ in range(400):  # a draft overtaken by its reply, a shutdown...
            call = asyncio.create_task(request.do_request(url, "POST"))
            for _ in range(rng.randint(0, 12)):  # ...at every stage of a request
                await asyncio.sleep(0)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
        assert (await request.do_request(url, "POST"))[0] == 200


class Proxy:
    """A plain HTTP proxy stand-in: answers every request itself and records its target."""

    def __init__(self, answer: bytes, content_type: str) -> None:
        self.answer, self.content_type = answer, content_type
        self.targets: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.targets.append(str(request.url))  # absolute-form: the origin's URL, not ours
        return web.Response(body=self.answer, content_type=self.content_type)


@asynccontextmanager
async def proxied(monkeypatch: pytest.MonkeyPatch, answer: object) -> AsyncIterator[Proxy]:
    """A proxy stand-in answering `answer` (JSON), set as HTTP_PROXY with no NO_PROXY."""
    proxy = Proxy(json.dumps(answer).encode(), "application/json")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    async with local_http(app) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        yield proxy


def model_client(base_url: str, **settings: Any) -> openai.AsyncOpenAI:
    """The bot's own OpenAI client (bot.app.make_openai_client) for `base_url`."""
    return make_openai_client(
        Settings(
            _env_file=None,
            telegram_bot_token="1:x",
            openai_api_key="sk-test",
            openai_base_url=base_url,
            **settings,
        )
    )


async def test_bot_api_calls_honour_the_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    async with proxied(monkeypatch, {"ok": True, "result": True}) as proxy:
        async with bounded(2, 1.0) as request:
            code, _ = await request.do_request("http://telegram.invalid/botTOKEN/getMe", "POST")
        monkeypatch.setenv("NO_PROXY", "telegram.invalid")
        async with bounded(2, 1.0) as request:  # straight to a host that doesn't exist
            with pytest.raises(NetworkError):
                await request.do_request("http://telegram.invalid/botTOKEN/getMe", "POST")
    assert code == 200
    assert proxy.targets == ["http://telegram.invalid/botTOKEN/getMe"]


async def test_model_calls_honour_the_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    models = {
        "object": "list",
        "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}],
    }
    async with proxied(monkeypatch, models) as proxy:
        async with model_client("http://openai.invalid/v1") as client:
            page = await client.models.list()
    assert [m.id for m in page.data] == ["m"]
    assert proxy.targets == ["http://openai.invalid/v1/models"]


async def test_a_bot_api_call_with_no_answer_in_time_is_a_timeout_and_frees_its_slot(
    held: tuple[HeldServer, str],
) -> None:
    server, url = held
    async with bounded(1, 5.0) as request:
        with pytest.raises(TimedOut):  # it may have gone through: callers don't retry it
            await request.do_request(url, "POST", read_timeout=0.2)
        server.release.set()
        assert (await request.do_request(url, "POST"))[0] == 200


async def test_a_bot_api_call_that_cannot_connect_is_a_network_error_without_the_token() -> None:
    async with local_http(web.Application()) as base:
        pass  # the port is free again: nothing listens there now
    async with bounded(1, 1.0) as request:
        with pytest.raises(NetworkError) as raised:
            await request.do_request(f"{base}/bot123:SECRET/getMe", "POST")
    assert not isinstance(raised.value, TimedOut)
    assert "SECRET" not in str(raised.value)


async def test_a_reply_is_retried_after_a_slot_timeout_but_not_after_a_read_timeout() -> None:
    sent: list[str] = []

    async def send(text: str, fail: list[Exception]) -> Message:
        if fail:
            raise fail.pop(0)
        sent.append(text)
        return cast(Message, object())

    await _with_retries(send, "hello", [SlotTimeout("no slot")])
    assert sent == ["hello"]
    with pytest.raises(TimedOut):  # it may have gone through: never sent twice
        await _with_retries(send, "again", [TimedOut()])
    assert sent == ["hello"]


async def test_a_slow_but_steady_file_download_is_not_cut_off() -> None:
    """The read timeout bounds each wait for bytes, as with httpx, not the whole download."""

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 10 * 100
        await response.prepare(request)
        for _ in range(10):  # 2.25 s in all, each piece well within the 1 s read timeout
            await response.write(b"x" * 100)
            await asyncio.sleep(0.25)
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", trickle)
    async with local_http(app) as base:
        # Connect + write + read = 1.4 s: less than the whole download takes.
        request = AiohttpRequest(2, 1.0, connect_timeout=0.2, read_timeout=1.0, write_timeout=0.2)
        await request.initialize()
        try:
            data = await request.retrieve(f"{base}/file/botTOKEN/photos/a.jpg")
        finally:
            await request.shutdown()
    assert data == b"x" * 1000


async def test_a_redirect_is_not_followed() -> None:
    """A redirected POST would be re-sent as a bare GET, its fields lost (PTB's httpx
    doesn't follow redirects either); Telegram never redirects a Bot API call."""
    seen: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append(request.method)
        raise web.HTTPFound(str(request.url))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    async with local_http(app) as base, bounded(2, 1.0) as request:
        code, _ = await request.do_request(f"{base}/botTOKEN/sendMessage", "POST")
    assert (code, seen) == (302, ["POST"])


async def test_a_long_poll_cut_off_by_its_caller_does_not_hold_up_shutdown(
    held: tuple[HeldServer, str],
) -> None:
    server, url = held
    request = AiohttpRequest(connection_pool_size=1, pool_timeout=1.0, finish_sent=False)
    await request.initialize()
    poll = asyncio.create_task(request.do_request(url, "POST", read_timeout=30.0))
    await eventually(lambda: server.in_flight == 1)
    poll.cancel()
    await asyncio.wait([poll])  # as PTB's updater waits for its polling task
    async with asyncio.timeout(5):  # with finish_sent=True this would wait for the answer
        await request.shutdown()
    assert poll.cancelled() and server.served == 0


@pytest.mark.parametrize("fault", ["refused", "hang-up", "silence"])
async def test_model_connection_failures_and_timeouts_are_told_apart(fault: str) -> None:
    """The SDK's aiohttp adapter calls every connection error a connect timeout."""

    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    async def silence(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)  # past the client's 0.5 s
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang_up if fault == "hang-up" else silence)
    async with local_http(app) as base:
        if fault == "refused":
            async with local_http(web.Application()) as closed:
                pass  # nothing listens there any more
            base = closed
        async with model_client(f"{base}/v1", openai_timeout=0.5, openai_max_retries=0) as client:
            with pytest.raises(openai.APIConnectionError) as raised:
                await client.models.list()
    expected = "timeout" if fault == "silence" else "unreachable"
    assert classify_model_error(raised.value).kind == expected
    assert classify_model_error(raised.value, streaming=True).kind == (
        "timeout" if fault == "silence" else "interrupted"
    )
