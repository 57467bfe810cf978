"""Every answer is bounded: in length (an output cap, and a bound on what the bot reads should
a server ignore it) and in time (a deadline for the whole answer, however the stream trickles).
Issue 17, "Answers without bounds".
"""

from __future__ import annotations

from typing import Any

import pytest

from bot.context import ParleyApp
from bot.services.chat import ChatService
from bot.services.conversations import CHARS_PER_TOKEN
from bot.services.dataset import DatasetOptions
from bot.settings import Settings
from bot.texts import t
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import FakeTelegram

BACKENDS = ["openai", "local"]
CUT = t("answer.cut")
CAP_FIELD = {"openai": "max_output_tokens", "local": "max_tokens"}


def _chat(app: ParleyApp, settings: Settings) -> ChatService:
    """The app's chat service, holding the settings' bounds (MAX_ANSWER_TOKENS, ANSWER_DEADLINE)."""
    services = app.bot_data.services
    assert services is not None
    chat = services.chat
    chat.max_answer_tokens = settings.max_answer_tokens
    chat.answer_deadline = settings.answer_deadline
    return chat


async def _turns(app: ParleyApp) -> list[tuple[Any, ...]]:
    await settled(app)
    store = app.bot_data.services.store  # type: ignore[union-attr]
    return await store.fetch_all(
        "SELECT t.status, t.error_kind, (SELECT content FROM messages m WHERE m.turn_id = t.id"
        " AND m.role = 'assistant') FROM turns t ORDER BY t.id"
    )


def _answer_calls(oai: FakeOpenAI) -> list[dict[str, Any]]:
    return [c.body for c in oai.calls]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_cap_is_sent_and_an_answer_cut_there_is_delivered_with_a_note(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, backend: str
) -> None:
    settings = make_settings(conversation_backend=backend)
    assert settings.max_answer_tokens == 4096  # the default
    async with running(settings) as app:
        _chat(app, settings)
        oai.enqueue(Reply("the first half of a long answer", end="incomplete"))
        tg.push_message(100, "tell me everything")
        [text] = await tg.wait_sent(100, 1)
        assert text == f"the first half of a long answer\n\n{CUT}"
        tg.push_message(100, "and briefly?")
        assert (await tg.wait_sent(100, 2))[1] == "echo: and briefly?"
        turns = await _turns(app)
        # A cut answer never teaches a model to stop halfway: it stays out of datasets.
        report = await app.bot_data.services.finetune.build(DatasetOptions())  # type: ignore[union-attr]
        assert report.dropped["cut_off"] == 1
    assert [b[CAP_FIELD[backend]] for b in _answer_calls(oai)] == [4096, 4096]
    # The note is not part of the answer the thread keeps; the turn says it was cut.
    assert turns == [
        ("ok", "length", "the first half of a long answer"),
        ("ok", None, "echo: and briefly?"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_server_that_ignores_the_cap_is_read_only_up_to_a_bound(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, backend: str
) -> None:
    settings = make_settings(conversation_backend=backend, max_answer_tokens=16)
    bound = 16 * CHARS_PER_TOKEN
    async with running(settings) as app:
        _chat(app, settings)
        oai.enqueue(Reply("word " * 20_000, chunk_words=50))  # 100 KB, as if there were no cap
        tg.push_message(100, "go on forever")
        [text] = await tg.wait_sent(100, 1)
        tg.push_message(100, "next")
        assert (await tg.wait_sent(100, 2))[1] == "echo: next"
        [(status, kind, answer), second] = await _turns(app)
    assert text.endswith(CUT) and len(text) <= bound + len(CUT) + 2
    assert (status, kind) == ("ok", "length")
    assert answer == ("word " * 20_000)[:bound].strip()
    assert second == ("ok", None, "echo: next")
    # One message, not the twenty-five the whole answer would have taken.
    assert len([c for c in tg.calls_of("sendMessage") if c.params["chat_id"] == "100"]) == 2


async def test_the_local_backend_names_the_cap_as_the_server_wants_it(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    """OpenAI's reasoning models refuse `max_tokens` and name `max_completion_tokens`."""
    oai.refused_cap_fields = {"max_tokens"}
    settings = make_settings(conversation_backend="local")
    async with running(settings) as app:
        _chat(app, settings)
        for n, text in enumerate(("one", "two"), 1):
            tg.push_message(100, text)
            assert (await tg.wait_sent(100, n))[-1] == f"echo: {text}"
    asked = [body for method, path, body in oai.requests if path == "/chat/completions"]
    assert [[k for k in ("max_tokens", "max_completion_tokens") if k in b] for b in asked] == [
        ["max_tokens"],  # refused
        ["max_completion_tokens"],
        ["max_completion_tokens"],  # remembered
    ]


async def test_a_cap_over_the_servers_context_is_dropped_and_the_bound_still_holds(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    """vLLM refuses a request whose prompt plus cap exceed the model's context length."""
    oai.context_length = 1000
    settings = make_settings(conversation_backend="local", max_answer_tokens=64)
    async with running(settings) as app:
        _chat(app, settings)
        tg.push_message(100, "short")
        assert await tg.wait_sent(100, 1) == ["echo: short"]  # 64 fits
        oai.enqueue(Reply("word " * 1000))
        tg.push_message(100, "x" * 4000)  # ~1,000 tokens: with the cap, over the context
        [_, text] = await tg.wait_sent(100, 2)
        assert text.endswith(CUT) and len(text) <= 64 * CHARS_PER_TOKEN + len(CUT) + 2
    asked = [body for method, path, body in oai.requests if path == "/chat/completions"]
    assert ["max_tokens" in b for b in asked] == [True, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_trickling_stream_meets_the_deadline_and_the_chat_moves_on(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, backend: str
) -> None:
    # A keep-alive byte every 0.2 s: no read ever waits OPENAI_TIMEOUT (5 s) for data.
    settings = make_settings(conversation_backend=backend, answer_deadline=1.0)
    async with running(settings) as app:
        _chat(app, settings)
        oai.enqueue(Reply("a few words and then nothing", drip=0.2))
        tg.push_message(100, "first")
        tg.push_message(100, "second")  # queued behind the stalled answer, in the same chat
        assert await tg.wait_sent(100, 2) == [t("error.timeout"), "echo: second"]
        turns = await _turns(app)
    # What came before the deadline is not sent as an answer: the turn failed.
    assert turns == [("failed", "timeout", None), ("ok", None, "echo: second")]
