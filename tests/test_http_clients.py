"""The HTTP layers under PTB and the OpenAI SDK: a bounded Bot API pool, sharded model pools."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import httpx2
import pytest
from aiohttp import web
from telegram import Message
from telegram.error import TimedOut

from bot.openai_http import ShardedTransport, openai_http_client
from bot.services.replies import _with_retries
from bot.telegram_http import BoundedHTTPXRequest, SlotTimeout
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
async def bounded(pool: int, timeout: float) -> AsyncIterator[BoundedHTTPXRequest]:
    request = BoundedHTTPXRequest(connection_pool_size=pool, pool_timeout=timeout)
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
    """httpcore 1.0.9 loses a connection for good when a request is cancelled while it
    connects (encode/httpcore#1093); cancelled callers must not cost the pool anything."""
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


class Body(httpx2.AsyncByteStream):
    """A response body read from the network as a real transport's is (not preloaded)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


class RecordingTransport(httpx2.AsyncBaseTransport):
    def __init__(self, name: str) -> None:
        self.name = name
        self.paths: list[str] = []
        self.closed = False

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.paths.append(request.url.path)
        return httpx2.Response(200, stream=Body(json.dumps({"pool": self.name}).encode()))

    async def aclose(self) -> None:
        self.closed = True


async def test_model_requests_fill_one_pool_before_the_next_and_all_pools_are_closed() -> None:
    pools = [RecordingTransport(name) for name in "abc"]
    async with httpx2.AsyncClient(transport=ShardedTransport(pools, per_pool=2)) as client:
        # One at a time: always the first pool, whose connection stays warm.
        quiet = [(await client.get(f"http://127.0.0.1/q{n}")).json()["pool"] for n in range(4)]
        async with contextlib.AsyncExitStack() as streams:  # five answers still streaming
            busy = [
                await streams.enter_async_context(client.stream("GET", f"http://127.0.0.1/s{n}"))
                for n in range(5)
            ]
            burst = [(await r.aread()).decode() for r in busy]
        after = (await client.get("http://127.0.0.1/after")).json()["pool"]
    assert quiet == ["a"] * 4
    assert [json.loads(b)["pool"] for b in burst] == ["a", "a", "b", "b", "c"]
    assert after == "a"  # closed streams gave their places back
    assert all(p.closed for p in pools)


async def test_with_a_proxy_configured_the_sdk_default_client_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(openai_http_client(), httpx2.AsyncClient)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert openai_http_client() is None  # httpx then reads the proxy variables itself


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
