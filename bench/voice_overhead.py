"""Benchmark the bot's own overhead for a voice turn, model time excluded.

    python bench/voice_overhead.py [--voices N] [--chats C] [--voice-kb K] [--json]

The bot runs as a real `python -m bot` subprocess; the stand-in Telegram and OpenAI
servers (tests/stubs, spec validation off) run in a second process started from this
file (`--standins`), so the bot's CPU is measured alone and every timestamp comes from the
stand-ins' one clock. Both stand-ins answer at once: the transcription returns
"t<N> how are you doing today?" and the model echoes it.

A voice turn, as the bot handles it: the update, getFile, the file download, the
transcription request (multipart upload of the OGG bytes), the quote of what it heard
(sendMessage), the model turn, the answer (sendMessage), the log. Figures, per voice note,
paced one at a time (no queueing), for each conversation backend:

  overhead   (answer received) - (update injected) - (transcription request as the
             stand-in saw it) - (model call as the stand-in saw it)
  to quote   (quote received) - (update injected) - (transcription request)
  cpu        the bot's user+system CPU over the paced voice notes / voice notes
  text       the same overhead and CPU for text messages on the same bot, for comparison

Only 127.0.0.1 is used; every wait has a timeout; both subprocesses are always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402
    PY,
    Bot,
    Control,
    _clean_env,
    _terminate,
    log,
    machine,
    new_chats,
    pct,
    proc_cpu,
)

TRANSCRIPT_WORDS = "how are you doing today?"
VOICE_TOKEN = re.compile(rb"TOKEN:(t\d+);")


# -- the stand-ins (run in their own process with --standins) ----------------------------------


def _standins_classes() -> tuple[type, type, type]:
    """The voice-aware stand-ins, built on bench/standins.py's (imported only in that process)."""
    from aiohttp import web

    from bench.standins import BenchOpenAI, BenchTelegram, Record
    from bench.standins import Control as BenchControl
    from tests.stubs.openai_server import Transcript
    from tests.stubs.telegram_server import Call, _error

    class VoiceTelegram(BenchTelegram):
        """Voice notes as well as text; the quote and the answer are timed apart."""

        voice_bytes = 16 * 1024
        quotes: dict[str, float]

        def push_bulk(self, messages: list[dict[str, Any]]) -> list[str]:
            texts = [m for m in messages if not m.get("voice")]
            if texts:
                return super().push_bulk(texts)
            now = time.monotonic()
            tokens = []
            for m in messages:
                chat_id = int(m["chat_id"])
                token = f"t{next(self._tokens)}"
                chat = self.chats.get(chat_id) or self.chat(chat_id)
                message_id = self.next_message_id(chat_id)
                # An OGG page header, the token the transcript will carry, then filler.
                head = b"OggS\x00\x02" + bytes(20) + f"TOKEN:{token};".encode()
                data = head + bytes(max(0, self.voice_bytes - len(head)))
                file_id = f"voice-{token}"
                self.add_file(file_id, data, f"voice/{token}.oga")
                message = {
                    "message_id": message_id,
                    "date": int(time.time()),
                    "chat": chat,
                    "from": {
                        "id": chat_id,
                        "is_bot": False,
                        "first_name": "User",
                        "language_code": "en",
                    },
                    "voice": {
                        "file_id": file_id,
                        "file_unique_id": f"u{file_id}",
                        "duration": 5,
                        "mime_type": "audio/ogg",
                        "file_size": len(data),
                    },
                }
                self._updates.append({"update_id": next(self._update_ids), "message": message})
                self.rec.records[token] = Record(chat_id, message_id, now)
                self.rec.by_message[(chat_id, message_id)] = token
                tokens.append(token)
            asyncio.get_running_loop().create_task(self._notify())
            return tokens

        async def _handle_method(self, request: web.Request) -> web.Response:
            if request.match_info["token"] != self.token:
                return _error(401, "Unauthorized")
            at = time.monotonic()
            method = request.match_info["method"]
            params, form_encoded = await self._read_params(request)
            rec = self.rec
            rec.methods[method] = rec.methods.get(method, 0) + 1
            response = await self._answer(Call(method, params, at), form_encoded)
            if method == "sendMessage" and response.status == 200:
                text = str(params.get("text", ""))
                token = rec.token_of(text)
                r = rec.records.get(token) if token else None
                if r is not None and text.startswith("echo: ") and r.sent is None:
                    r.sent = at
                    rec.replies += 1
                    r.sent_seq = rec.replies
                elif r is not None and token is not None and token not in self.quotes:
                    self.quotes[token] = at  # what the bot heard, before the answer
                else:
                    rec.other_sends += 1
            await self._notify()
            return response

        def reset(self) -> None:
            super().reset()
            self.quotes.clear()

    class VoiceOpenAI(BenchOpenAI):
        """Transcribes at once: the transcript carries the voice note's token."""

        heard: dict[str, tuple[float, float]]

        def _next_transcript(self, call: Any) -> Transcript:
            found = VOICE_TOKEN.search(call.data[:200])
            token = found.group(1).decode() if found else "t0"
            return Transcript(f"{token} {TRANSCRIPT_WORDS}")

        async def _transcribe(self, body: Any, data: bytes, *args: Any) -> web.Response:
            response = await super()._transcribe(body, data, *args)
            call = next(c for c in reversed(self.transcriptions) if c.data is data)
            self.transcriptions.remove(call)  # the stub's log would grow for ever
            found = VOICE_TOKEN.search(data[:200])
            if found and call.finished is not None:
                self.heard[found.group(1).decode()] = (call.started, call.finished)
            self.requests.clear()
            return response

        def reset(self) -> None:
            super().reset()
            self.heard.clear()
            self.transcriptions.clear()

    class VoiceControl(BenchControl):
        def routes(self, app: web.Application) -> None:
            super().routes(app)
            app.router.add_get("/_control/voice", self.voice)

        async def voice(self, request: web.Request) -> web.Response:
            heard: dict[str, tuple[float, float]] = self.oai.heard
            quotes: dict[str, float] = self.tg.quotes
            return web.json_response(
                {
                    t: {"heard": heard.get(t), "quoted": quotes.get(t)}
                    for t in set(heard) | set(quotes)
                }
            )

    return VoiceTelegram, VoiceOpenAI, VoiceControl


async def serve_standins(port_file: str, voice_kb: int) -> None:
    from bench.standins import TOKEN, Recorder, run_control

    VoiceTelegram, VoiceOpenAI, VoiceControl = _standins_classes()  # noqa: N806
    rec = Recorder()
    tg = VoiceTelegram(TOKEN, rec)
    tg.quotes = {}
    tg.voice_bytes = voice_kb * 1024
    oai = VoiceOpenAI(rec)
    oai.heard = {}
    await run_control(tg, oai, VoiceControl(tg, oai, rec), port_file)


# -- the driver ---------------------------------------------------------------------------------


def start_standins(workdir: Path, voice_kb: int) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    port_file = workdir / "standins.json"
    errors = open(workdir / "standins.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "bench.voice_overhead",
            "--standins",
            str(port_file),
            "--voice-kb",
            str(voice_kb),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=errors,
        env=_clean_env(),
    )
    deadline = time.monotonic() + 20
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _terminate(proc)
            raise RuntimeError(f"stand-ins did not start; see {workdir / 'standins.log'}")
        time.sleep(0.05)
    return proc, json.loads(port_file.read_text())


def paced(control: Control, messages: list[dict[str, Any]]) -> list[str]:
    res = control.call("/_control/paced", {"messages": messages, "wave": 1, "timeout": 240}, 250)
    if res["timed_out"]:
        raise RuntimeError("paced run timed out")
    return res["tokens"]


def measure(control: Control, bot: Bot, n: int, chats: int, voice: bool) -> dict[str, Any]:
    ids = new_chats(chats)
    kind = {"voice": True} if voice else {"text": TRANSCRIPT_WORDS}
    messages = [{"chat_id": ids[i % chats], **kind} for i in range(n)]
    cpu0 = proc_cpu(bot.pid)
    tokens = paced(control, messages)
    cpu = proc_cpu(bot.pid) - cpu0
    recs = control.call("/_control/results", timeout=60)["records"]
    heard = control.call("/_control/voice", timeout=60) if voice else {}
    overhead, to_quote, total = [], [], []
    for token in tokens:
        r = recs.get(token)
        if r is None or r["sent"] is None or r["model_finished"] is None:
            continue
        transcription = 0.0
        if voice:
            v = heard.get(token) or {}
            if not v.get("heard") or not v.get("quoted"):
                continue
            started, finished = v["heard"]
            transcription = finished - started
            to_quote.append((v["quoted"] - r["injected"] - transcription) * 1000)
        model = r["model_finished"] - r["model_started"]
        overhead.append((r["sent"] - r["injected"] - transcription - model) * 1000)
        total.append((r["sent"] - r["injected"]) * 1000)
    return {
        "kind": "voice" if voice else "text",
        "messages": n,
        "measured": len(overhead),
        "p50_ms": pct(overhead, 0.5),
        "p99_ms": pct(overhead, 0.99),
        "to_quote_p50_ms": pct(to_quote, 0.5),
        "to_quote_p99_ms": pct(to_quote, 0.99),
        "end_to_end_p50_ms": pct(total, 0.5),
        "cpu_ms_per_msg": cpu * 1000 / max(1, len(overhead)),
    }


def run(voices: int, chats: int, voice_kb: int) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="parley-voice-bench-") as tmp:
        workdir = Path(tmp)
        standins, info = start_standins(workdir, voice_kb)
        control = Control(info["control"])
        bots: list[Bot] = []
        try:
            for backend in ("openai", "local"):
                bot = Bot(workdir, info, backend, CONVERSATION_BACKEND=backend)
                bots.append(bot)
                bot.start(control)
                control.call("/_control/config", {"latency": 0.0, "answer_words": 0})
                # Warm-up: imports, connections, the first conversations.
                paced(control, [{"chat_id": c, "voice": True} for c in new_chats(10)] * 2)
                paced(control, [{"chat_id": c, "text": "hello"} for c in new_chats(10)])
                for voice in (True, False):
                    r = measure(control, bot, voices, chats, voice) | {"backend": backend}
                    results.append(r)
                    log(
                        f"{backend} {r['kind']}: overhead p50 {r['p50_ms']:.2f} ms, p99 "
                        f"{r['p99_ms']:.2f} ms, CPU {r['cpu_ms_per_msg']:.2f} ms/turn "
                        f"({r['measured']}/{r['messages']})"
                    )
                bot.stop()
        except BaseException:
            for b in bots:
                if tail := b.log_tail():
                    log(f"bot {b.name} log tail:\n{tail}")
            raise
        finally:
            for b in bots:
                b.stop()
            _terminate(standins)
    return results


def report(results: list[dict[str, Any]], voice_kb: int) -> str:
    m = machine()
    lines = [
        "# Parley voice-turn overhead (model and transcription time excluded)",
        f"{m['cpu']}, {m['cores']} cores, Python {m['python']}; voice notes of {voice_kb} KB, "
        "paced one at a time",
        "",
        "| backend | input | turns | overhead p50 | p99 | to quote p50 | p99 | CPU/turn |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        quote = (
            f"{r['to_quote_p50_ms']:.2f} ms | {r['to_quote_p99_ms']:.2f} ms"
            if r["kind"] == "voice"
            else "— | —"
        )
        lines.append(
            f"| {r['backend']} | {r['kind']} | {r['measured']} | {r['p50_ms']:.2f} ms "
            f"| {r['p99_ms']:.2f} ms | {quote} | {r['cpu_ms_per_msg']:.2f} ms |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="The bot's own overhead per voice turn.")
    parser.add_argument("--voices", type=int, default=300, help="voice notes per backend")
    parser.add_argument("--chats", type=int, default=50, help="chats they rotate over")
    parser.add_argument("--voice-kb", type=int, default=16, help="size of each voice note")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--standins", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.standins:
        asyncio.run(serve_standins(args.standins, args.voice_kb))
        return 0
    results = run(args.voices, args.chats, args.voice_kb)
    print(report(results, args.voice_kb))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
