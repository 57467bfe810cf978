"""A round-robin reverse proxy: the load balancer in front of several bot replicas.

    python -m tests.stubs.proxy --backend http://127.0.0.1:8001 [--backend ...] [--port-file F]

POSTs (any path) and GET /healthz go to the backends in turn. A backend that refuses the
connection (a replica killed or not started yet) is skipped for the next one, as a load
balancer's passive health check would; the request is still unsent then, so trying
another cannot deliver it twice. A backend that fails after the request went out gets a
502, not a retry elsewhere: whether it stored the update is unknown, and the sender
(Telegram, or a test playing it) retries, as Telegram does. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

# Headers that describe one hop's connection, not the request (RFC 9110, 7.6.1), and the
# ones the client sets again for the next hop.
HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
BACKEND_TIMEOUT = 60.0  # seconds a backend may take to answer one request


class RoundRobinProxy:
    """Forwards to `backends` (base URLs) in turn; start() binds it to 127.0.0.1."""

    def __init__(self, backends: list[str], *, timeout: float = BACKEND_TIMEOUT) -> None:
        if not backends:
            raise ValueError("a proxy needs at least one backend")
        self.backends = [b.rstrip("/") for b in backends]
        self.timeout = timeout
        self.forwarded: Counter[str] = Counter()  # answered requests, per backend
        self.refused: Counter[str] = Counter()  # connections refused, per backend
        self.failed: Counter[str] = Counter()  # failures after sending (502s), per backend
        self.unavailable = 0  # requests no backend took
        self._turn = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> str:
        # No connection limit: a burst of webhooks must not queue in the proxy.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/healthz", self._forward)
        app.router.add_post("/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        first = next(self._turn)
        for i in range(len(self.backends)):
            backend = self.backends[(first + i) % len(self.backends)]
            try:
                async with self._session.request(
                    request.method,
                    backend + request.rel_url.raw_path_qs,
                    data=body,
                    headers=headers,
                ) as answer:
                    payload = await answer.read()
                    self.forwarded[backend] += 1
                    return web.Response(
                        status=answer.status,
                        body=payload,
                        headers={
                            k: v
                            for k, v in answer.headers.items()
                            if k.lower() not in HOP_HEADERS and k.lower() != "content-encoding"
                        },
                    )
            except aiohttp.ClientConnectorError:
                self.refused[backend] += 1  # nothing was sent: the next backend may take it
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failed[backend] += 1
                return web.Response(status=502, text=f"backend failed: {type(exc).__name__}")
        self.unavailable += 1
        return web.Response(status=502, text="no backend available")


async def _serve(backends: list[str], port: int, port_file: str | None) -> None:
    proxy = RoundRobinProxy(backends)
    url = await proxy.start(port)
    _publish(json.dumps({"url": url}), port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await proxy.stop()


def _publish(line: str, port_file: str | None) -> None:
    """Print the URL line, and write it to `port_file` atomically (a reader never sees half)."""
    if port_file:
        tmp = Path(port_file + ".tmp")
        tmp.write_text(line)
        tmp.replace(port_file)
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", action="append", required=True, help="a backend's base URL")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    parser.add_argument("--port-file", help="also write the JSON with the URL here")
    args = parser.parse_args()
    asyncio.run(_serve(args.backend, args.port, args.port_file))


if __name__ == "__main__":
    main()
