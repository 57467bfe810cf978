"""Stand-in Telegram + OpenAI servers for the overhead benchmark, in a process of their own.

    python -m bench.standins [--port-file PATH]

Runs `FakeTelegram` and `FakeOpenAI` from tests/stubs (spec validation off: it costs CPU
that is not the bot's, and the stand-ins are validated by the test suite) plus a small
control API, and prints one JSON line with the URLs on stdout (and writes it to
--port-file). The driver (bench/run.py) injects updates and reads timings through the
control API; every timestamp is `time.monotonic()` of *this* process, so the bot's CPU
and the stand-ins' CPU never mix and all intervals come from one clock.

Control API (JSON):
  POST /_control/push     {"messages": [{"chat_id": 1, "text": "..."}]} -> {"tokens": [...]}
                          queues every message at once, then wakes the long poll once.
                          Each message gets a token "t<N>" put first in its text; the
                          default model answer echoes it ("echo: t<N> ..."), which is how
                          a reply is matched to its message.
  POST /_control/paced    {"messages": [...], "wave": 1, "timeout": 60}
                          pushes `wave` messages, waits until all are answered, repeats.
  GET  /_control/wait?replies=N&timeout=S   waits until N replies (sendMessage 200) are in.
  GET  /_control/ready?timeout=S            waits for the bot's first long poll.
  GET  /_control/results  per token: chat_id, message_id, injected, model_started,
                          model_finished, first_delta, first_draft, sent; plus counters.
  POST /_control/config   {"latency": 1.0, "answer_words": 0, "chunk_words": 1,
                           "chunk_delay": 0.0}
  POST /_control/reset    forget the recorded timings, chats, conversations, calls.
  GET  /_control/cpu      this process's CPU seconds (user+system).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.stubs.openai_server import API_KEY, FakeOpenAI, ModelCall, Reply  # noqa: E402
from tests.stubs.telegram_server import Call, FakeTelegram, _error  # noqa: E402

TOKEN = "123456789:AAFakeTokenForParleyBench-abcdefghijkl"
TOKEN_RE = re.compile(r"\b(t\d+)\b")
FILLER = (
    "the quick brown fox jumps over the lazy dog while a patient assistant explains "
    "how asynchronous programs share one event loop between many chats"
).split()


class Record:
    __slots__ = (
        "chat_id",
        "message_id",
        "injected",
        "model_started",
        "model_finished",
        "first_delta",
        "first_draft",
        "sent",
        "sent_seq",
    )

    def __init__(self, chat_id: int, message_id: int, injected: float) -> None:
        self.chat_id = chat_id
        self.message_id = message_id
        self.injected = injected
        self.model_started: float | None = None
        self.model_finished: float | None = None
        self.first_delta: float | None = None
        self.first_draft: float | None = None
        self.sent: float | None = None
        self.sent_seq: int | None = None  # global order of arrival of the reply

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class Recorder:
    """Timings per message token, shared by both stand-ins."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.records: dict[str, Record] = {}
        self.by_message: dict[tuple[int, int], str] = {}
        self.replies = 0
        self.drafts = 0
        self.other_sends = 0  # sendMessage with no known token (errors, commands)
        self.methods: dict[str, int] = {}

    def token_of(self, text: str) -> str | None:
        m = TOKEN_RE.search(text or "")
        return m.group(1) if m else None


class BenchTelegram(FakeTelegram):
    """FakeTelegram without the per-call log (it would grow for ever) and with timings."""

    def __init__(self, token: str, rec: Recorder) -> None:
        super().__init__(token, None)
        self.rec = rec
        self._tokens = itertools.count(1)
        self.first_poll = asyncio.Event()

    def push_bulk(self, messages: list[dict[str, Any]]) -> list[str]:
        now = time.monotonic()
        tokens = []
        for m in messages:
            chat_id = int(m["chat_id"])
            token = f"t{next(self._tokens)}"
            text = f"{token} {m.get('text') or 'hello there'}"
            chat = self.chats.get(chat_id) or self.chat(chat_id, m.get("chat_type", "private"))
            message_id = self.next_message_id(chat_id)
            message = {
                "message_id": message_id,
                "date": int(time.time()),
                "chat": chat,
                "from": {
                    "id": chat_id if chat_id > 0 else 1001,
                    "is_bot": False,
                    "first_name": "User",
                    "language_code": "en",
                },
                "text": text,
            }
            self._updates.append({"update_id": next(self._update_ids), "message": message})
            self.rec.records[token] = Record(chat_id, message_id, now)
            self.rec.by_message[(chat_id, message_id)] = token
            tokens.append(token)
        asyncio.get_running_loop().create_task(self._notify())
        return tokens

    async def _get_updates(self, params: dict[str, Any]) -> web.Response:
        if float(params.get("timeout") or 0) > 0:
            self.first_poll.set()
        offset = int(params.get("offset") or 0)
        if offset and self._updates and self._updates[0]["update_id"] < offset:
            # Confirmed updates are forgotten (cheaper than the stub's full rebuild).
            i = 0
            while i < len(self._updates) and self._updates[i]["update_id"] < offset:
                i += 1
            del self._updates[:i]
            params = {**params, "offset": 0}
        return await super()._get_updates(params)

    async def _handle_method(self, request: web.Request) -> web.Response:
        """The stub's own answers (`_answer`), minus its call log, plus the timings."""
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        at = time.monotonic()
        method = request.match_info["method"]
        params, form_encoded = await self._read_params(request)
        rec = self.rec
        rec.methods[method] = rec.methods.get(method, 0) + 1
        response = await self._answer(Call(method, params, at), form_encoded)
        if method == "sendMessage":
            token = rec.token_of(str(params.get("text", "")))
            r = rec.records.get(token) if token else None
            if response.status == 200 and r is not None and r.sent is None:
                r.sent = at
                rec.replies += 1
                r.sent_seq = rec.replies
            else:
                rec.other_sends += 1
        elif method == "sendMessageDraft" and response.status == 200:
            if str(params.get("text", "")).strip():
                key = (int(params["chat_id"]), int(params["draft_id"]))
                token = rec.by_message.get(key)
                r = rec.records.get(token) if token else None
                if r is not None and r.first_draft is None:
                    r.first_draft = at
                    rec.drafts += 1
        await self._notify()
        return response

    def reset(self) -> None:
        self.chats.clear()
        self._message_ids.clear()
        self._updates.clear()
        for name in ("messages", "files", "calls"):  # whatever the stub keeps per message
            value = getattr(self, name, None)
            if isinstance(value, (dict, list)):
                value.clear()


class BenchOpenAI(FakeOpenAI):
    """FakeOpenAI with a configurable answer (long, chunked, paced) and per-token timings."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__(None, API_KEY)
        self.rec = rec
        self.answer_words = 0
        self.chunk_words = 1
        self.chunk_delay = 0.0

    def _record(self) -> None:  # the stub's request log would grow for ever
        self.requests.clear()
        self.calls.clear()

    def _next_reply(self, call: ModelCall) -> tuple[Reply, str]:
        text = f"echo: {call.last_user_text}"
        if self.answer_words:
            words = [FILLER[i % len(FILLER)] for i in range(self.answer_words)]
            text += " " + " ".join(words)
        return Reply(chunk_words=self.chunk_words, chunk_delay=self.chunk_delay), text

    async def _model_call(self, call: ModelCall) -> tuple[Reply, str]:
        self._record()
        token = self.rec.token_of(call.last_user_text)
        r = self.rec.records.get(token) if token else None
        if r is not None:
            r.model_started = call.started
        return await super()._model_call(call)

    def _done(self, call: ModelCall) -> None:
        super()._done(call)
        token = self.rec.token_of(call.last_user_text)
        r = self.rec.records.get(token) if token else None
        if r is not None:
            r.model_finished = call.finished

    def _delta_sent(self, text: str, n: int) -> None:
        """The time of each answer's first delta, for the streaming figure."""
        if n == 0:
            token = self.rec.token_of(text)
            r = self.rec.records.get(token) if token else None
            if r is not None:
                r.first_delta = time.monotonic()

    def reset(self) -> None:
        self.conversations.clear()
        self.in_flight.clear()
        self.calls.clear()
        self.requests.clear()
        self.classify_calls.clear()


class Control:
    def __init__(self, tg: BenchTelegram, oai: BenchOpenAI, rec: Recorder) -> None:
        self.tg, self.oai, self.rec = tg, oai, rec
        self.stop = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/_control/push", self.push)
        r.add_post("/_control/paced", self.paced)
        r.add_get("/_control/wait", self.wait)
        r.add_get("/_control/ready", self.ready)
        r.add_get("/_control/results", self.results)
        r.add_post("/_control/config", self.config)
        r.add_post("/_control/reset", self.reset)
        r.add_get("/_control/cpu", self.cpu)
        r.add_post("/_control/shutdown", self.shutdown)

    async def _wait_replies(self, target: int, timeout: float) -> bool:
        try:
            async with self.tg._changed:
                await asyncio.wait_for(
                    self.tg._changed.wait_for(lambda: self.rec.replies >= target), timeout
                )
            return True
        except TimeoutError:
            return False

    async def push(self, request: web.Request) -> web.Response:
        body = await request.json()
        tokens = self.tg.push_bulk(body["messages"])
        return web.json_response({"tokens": tokens, "at": time.monotonic()})

    async def paced(self, request: web.Request) -> web.Response:
        body = await request.json()
        messages = body["messages"]
        wave = max(1, int(body.get("wave", 1)))
        deadline = time.monotonic() + float(body.get("timeout", 60))
        gap = float(body.get("gap", 0))
        tokens: list[str] = []
        for i in range(0, len(messages), wave):
            target = self.rec.replies + len(messages[i : i + wave])
            tokens += self.tg.push_bulk(messages[i : i + wave])
            if not await self._wait_replies(target, max(0.0, deadline - time.monotonic())):
                return web.json_response({"tokens": tokens, "timed_out": True})
            if gap:
                await asyncio.sleep(gap)
        return web.json_response({"tokens": tokens, "timed_out": False})

    async def wait(self, request: web.Request) -> web.Response:
        target = int(request.query["replies"])
        ok = await self._wait_replies(target, float(request.query.get("timeout", 30)))
        return web.json_response({"ok": ok, "replies": self.rec.replies})

    async def ready(self, request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(
                self.tg.first_poll.wait(), float(request.query.get("timeout", 30))
            )
            return web.json_response({"ok": True})
        except TimeoutError:
            return web.json_response({"ok": False})

    async def results(self, request: web.Request) -> web.Response:
        rec = self.rec
        return web.json_response(
            {
                "records": {t: r.as_dict() for t, r in rec.records.items()},
                "replies": rec.replies,
                "drafts": rec.drafts,
                "other_sends": rec.other_sends,
                "methods": rec.methods,
                "pending_updates": len(self.tg._updates),
                "now": time.monotonic(),
            }
        )

    async def config(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "latency" in body:
            self.oai.latency = float(body["latency"])
        for name in ("answer_words", "chunk_words"):
            if name in body:
                setattr(self.oai, name, int(body[name]))
        if "chunk_delay" in body:
            self.oai.chunk_delay = float(body["chunk_delay"])
        return web.json_response({"ok": True})

    async def reset(self, request: web.Request) -> web.Response:
        self.rec.reset()
        self.tg.reset()
        self.tg.first_poll.clear()
        self.oai.reset()
        return web.json_response({"ok": True})

    async def cpu(self, request: web.Request) -> web.Response:
        t = os.times()
        return web.json_response({"cpu": t.user + t.system})

    async def shutdown(self, request: web.Request) -> web.Response:
        self.stop.set()
        return web.json_response({"ok": True})


async def serve(port_file: str | None) -> None:
    rec = Recorder()
    tg = BenchTelegram(TOKEN, rec)
    oai = BenchOpenAI(rec)
    await run_control(tg, oai, Control(tg, oai, rec), port_file)


async def run_control(
    tg: BenchTelegram, oai: BenchOpenAI, control: Control, port_file: str | None
) -> None:
    """Start the stand-ins and their control server, publish their URLs (stdout, and
    `port_file` if given, written atomically), and serve until SIGTERM/SIGINT or /stop."""
    tg_url = await tg.start()
    oai_url = await oai.start()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    control.routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    info = {
        "telegram": tg_url,
        "openai": oai_url,
        "control": f"http://127.0.0.1:{port}",
        "token": TOKEN,
        "api_key": API_KEY,
        "pid": os.getpid(),
    }
    line = json.dumps(info)
    if port_file:
        tmp = Path(port_file + ".tmp")
        tmp.write_text(line)
        tmp.replace(port_file)
    print(line, flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, control.stop.set)
    try:
        await control.stop.wait()
    finally:
        await tg.stop()
        await oai.stop()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", help="write the JSON with the URLs here too")
    args = parser.parse_args()
    asyncio.run(serve(args.port_file))


if __name__ == "__main__":
    main()
