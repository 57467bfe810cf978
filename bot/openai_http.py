"""The HTTP client under the OpenAI SDK: requests spread over several connection pools."""

from __future__ import annotations

import itertools
import urllib.request
from collections.abc import Sequence

import httpx2
from openai import DefaultAsyncHttpxClient

SHARDS = 32
LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=64)


class ShardedTransport(httpx2.AsyncBaseTransport):
    """Hands requests round-robin to several transports, each with its own connection pool.

    A streamed answer holds its HTTP/1.1 connection for as long as the model writes, so a
    burst of chats means as many open connections. httpcore's pool looks at every one of
    its connections each time a request starts or ends; with 1,000 streams in one pool that
    was the largest single cost of bench/run.py's 1,000-chat burst (py-spy). Split over
    shards, each pool holds a fraction of the connections and that work shrinks with it.
    """

    def __init__(self, pools: Sequence[httpx2.AsyncBaseTransport]) -> None:
        if not pools:
            raise ValueError("at least one pool is needed")
        self._pools = list(pools)
        self._next = itertools.cycle(self._pools)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return await next(self._next).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


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
    return DefaultAsyncHttpxClient(transport=ShardedTransport(pools))
