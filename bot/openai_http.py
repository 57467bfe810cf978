"""The HTTP client under the OpenAI SDK: requests spread over several connection pools."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from typing import cast

import httpx2
from openai import DefaultAsyncHttpxClient

SHARDS = 32
PER_POOL = 16  # requests under way in one pool before the next pool is used
LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=64)


class ShardedTransport(httpx2.AsyncBaseTransport):
    """Spreads requests over several transports, each with its own connection pool.

    A streamed answer holds its HTTP/1.1 connection for as long as the model writes, so a
    burst of chats means as many open connections. httpcore's pool looks at every one of
    its connections each time a request starts or ends; with 1,000 streams in one pool that
    was the largest single cost of bench/run.py's 1,000-chat burst (py-spy). Here a request
    goes to the first pool with fewer than `per_pool` requests under way (the least busy if
    all are full), so a quiet bot reuses the first pool's warm connections and a burst
    fills the pools one after another, each with a fraction of the connections.
    """

    def __init__(self, pools: Sequence[httpx2.AsyncBaseTransport], per_pool: int) -> None:
        if not pools:
            raise ValueError("at least one pool is needed")
        self._pools = list(pools)
        self._busy = [0] * len(self._pools)
        self._per_pool = per_pool

    def _pick(self) -> int:
        for i, busy in enumerate(self._busy):
            if busy < self._per_pool:
                return i
        return min(range(len(self._busy)), key=self._busy.__getitem__)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        i = self._pick()
        self._busy[i] += 1
        try:
            response = await self._pools[i].handle_async_request(request)
        except BaseException:
            self._busy[i] -= 1
            raise
        response.stream = _Counted(response.stream, lambda: self._done(i))
        return response

    def _done(self, i: int) -> None:
        self._busy[i] -= 1

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class _Counted(httpx2.AsyncByteStream):
    """A response body that reports, once, when it is closed (the request is over)."""

    def __init__(self, stream: object, on_close: Callable[[], None]) -> None:
        self._stream = stream
        self._on_close: Callable[[], None] | None = on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in cast(httpx2.AsyncByteStream, self._stream):
            yield chunk

    async def aclose(self) -> None:
        try:
            await cast(httpx2.AsyncByteStream, self._stream).aclose()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


def _share(total: int | None, shards: int) -> int | None:
    return None if total is None else max(1, -(-total // shards))


def openai_http_client(
    shards: int = SHARDS, limits: httpx2.Limits = LIMITS
) -> httpx2.AsyncClient | None:
    """The SDK's default client (timeouts, redirects) over `shards` pools sharing `limits`.

    None when proxy variables are set: httpx only reads them for a client without a
    transport of its own, so the SDK's default client is the right one then.
    """
    if urllib.request.getproxies():
        return None
    per_shard = httpx2.Limits(
        max_connections=_share(limits.max_connections, shards),
        max_keepalive_connections=_share(limits.max_keepalive_connections, shards),
        keepalive_expiry=limits.keepalive_expiry,
    )
    tls = httpx2.create_ssl_context()  # one for all: each costs a CA store load and memory
    pools = [httpx2.AsyncHTTPTransport(verify=tls, limits=per_shard) for _ in range(shards)]
    return DefaultAsyncHttpxClient(transport=ShardedTransport(pools, per_pool=PER_POOL))
