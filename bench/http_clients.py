"""CPU per HTTP call for the clients the bot could use: why it runs aiohttp under both SDKs.

    python bench/http_clients.py [--calls N] [--concurrency C]

A stand-in server in its own process answers a Bot API call (a small JSON body) and a
streamed model answer (12 server-sent events, as the Responses API sends them). This
process makes N calls, C at a time, with each client and reports the CPU it spent per call
(time.process_time, so the server's CPU is not counted) and the wall time:

* Bot API: PTB's HTTPXRequest (httpx + httpcore) against bot.telegram_http.AiohttpRequest.
* model: the OpenAI SDK's default client (httpx2 + httpcore2) against its aiohttp client
  (openai.DefaultAioHttpClient, the `openai[aiohttp]` extra).

uvloop runs both sides where installed, as in the bot. No assertions: numbers are for reading.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MESSAGE = {"message_id": 1, "date": 0, "chat": {"id": 1, "type": "private"}, "text": "hi"}
DELTA = {"type": "response.output_text.delta", "item_id": "m", "output_index": 0}
EVENTS = [
    {"type": "response.created", "response": {"id": "r", "status": "in_progress"}},
    *({**DELTA, "content_index": 0, "delta": f"word{i} "} for i in range(10)),
    {"type": "response.completed", "response": {"id": "r", "status": "completed"}},
]


def serve(port: int) -> None:
    from aiohttp import web

    answer = json.dumps({"ok": True, "result": MESSAGE}).encode()

    async def bot_api(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    async def responses(request: web.Request) -> web.StreamResponse:
        await request.read()
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        for event in EVENTS:
            await stream.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
        await stream.write_eof()
        return stream

    app = web.Application()
    app.router.add_post("/bot{token}/{method}", bot_api)
    app.router.add_post("/v1/responses", responses)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=_loop())


def _loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def measure(call: Callable[[], Awaitable[None]], n: int, c: int) -> tuple[float, float]:
    """(CPU ms per call, wall seconds) for n calls, c at a time, after one warm-up call."""
    await call()
    slots = asyncio.Semaphore(c)

    async def one() -> None:
        async with slots:
            await call()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one() for _ in range(n)))
    return (time.process_time() - cpu) / n * 1e3, time.perf_counter() - wall


async def bot_api(kind: str, base: str, n: int, c: int) -> tuple[float, float]:
    from telegram.request import HTTPXRequest, RequestData
    from telegram.request._requestparameter import RequestParameter

    from bot.telegram_http import AiohttpRequest

    request = (
        HTTPXRequest(connection_pool_size=32, pool_timeout=30)
        if kind == "httpx"
        else AiohttpRequest(connection_pool_size=32, pool_timeout=30)
    )
    await request.initialize()
    params = [
        RequestParameter.from_input("chat_id", 1),
        RequestParameter.from_input("text", "a reply of a few words " * 10),
    ]

    async def call() -> None:
        await request.post(f"{base}/botTOKEN/sendMessage", RequestData(params))

    try:
        return await measure(call, n, c)
    finally:
        await request.shutdown()


async def model(kind: str, base: str, n: int, c: int) -> tuple[float, float]:
    import openai

    http = openai.DefaultAsyncHttpxClient() if kind == "httpx" else openai.DefaultAioHttpClient()
    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=f"{base}/v1", http_client=http)
    body = {"model": "m", "input": "hi", "stream": True}

    async def call() -> None:
        stream = await client.post(
            "/responses",
            body=body,
            cast_to=object,
            stream=True,
            stream_cls=openai.AsyncStream[object],
        )
        async for _ in stream:
            pass

    try:
        return await measure(call, n, c)
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
            f" Python {platform.python_version()}; {args.calls} calls, {args.concurrency} at a time"
        )
        print("| call | client | CPU per call | wall |\n|---|---|---|---|")
        for what, run in (("Bot API sendMessage", bot_api), ("streamed model answer", model)):
            for kind in ("httpx", "aiohttp"):
                with asyncio.Runner(loop_factory=_loop) as runner:
                    cpu, wall = runner.run(run(kind, base, args.calls, args.concurrency))
                print(f"| {what} | {kind} | {cpu:.2f} ms | {wall:.2f} s |")
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
