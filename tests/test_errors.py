"""Failures: model errors get a short friendly reply, the thread stays usable; 429s retried."""

from __future__ import annotations

import pytest

from bot.context import ParleyApp
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import FakeTelegram


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(status=429), "too many requests"),
        (Reply(status=500), "had a problem"),
        (Reply(status=503), "had a problem"),
        (Reply("a long answer that is cut off halfway", cut_after=3), "cut off"),
        (Reply("too slow", delay=3.0), "took too long"),
    ],
    ids=["429", "500", "503", "stream-cut", "timeout"],
)
@pytest.mark.parametrize("backend", ["openai", "local"])
async def test_model_failure_gives_a_friendly_reply_and_the_next_message_works(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    backend: str,
    reply: Reply,
    expected: str,
) -> None:
    async with running(make_settings(conversation_backend=backend, openai_timeout=1.0)) as app:
        oai.enqueue(reply)
        tg.push_message(100, "first")
        [error] = await tg.wait_sent(100, 1)
        assert expected in error.lower()
        assert "Error" not in error and "Traceback" not in error and "http" not in error
        tg.push_message(100, "second")
        texts = await tg.wait_sent(100, 2)
        assert texts[1] == "echo: second"
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        rows = await store.fetch_all("SELECT status, error_kind FROM turns ORDER BY id")
    assert rows[0][0] == "failed" and rows[0][1] is not None and rows[1] == ("ok", None)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply("half an answer", end="incomplete"), "half an answer"),
        (Reply("", end="incomplete"), "couldn't handle"),
        (Reply("some words", end="failed", code="rate_limit_exceeded"), "too many requests"),
        (Reply("some words", end="failed", code="server_error"), "had a problem"),
        (Reply("some words", end="error", code="server_error"), "had a problem"),
        (Reply("some words", end="error", code="invalid_prompt"), "couldn't handle"),
    ],
    ids=["incomplete", "incomplete-empty", "failed-429", "failed-500", "error-500", "error-400"],
)
async def test_how_a_responses_stream_ends_decides_the_reply(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, reply: Reply, expected: str
) -> None:
    """The Responses stream is parsed by the bot itself: every documented ending is handled."""
    async with running(make_settings()) as app:
        oai.enqueue(reply)
        tg.push_message(100, "first")
        [text] = await tg.wait_sent(100, 1)
        assert expected in text.lower()
        tg.push_message(100, "second")
        assert (await tg.wait_sent(100, 2))[1] == "echo: second"
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        [(status, answer)] = await store.fetch_all(
            "SELECT status, (SELECT content FROM messages m WHERE m.turn_id = t.id"
            " AND role = 'assistant') FROM turns t ORDER BY id LIMIT 1"
        )
    delivered = reply.end == "incomplete" and reply.text
    assert (status, answer) == (("ok", reply.text) if delivered else ("failed", None))


async def test_model_rate_limit_is_retried_by_the_client_when_configured(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(openai_max_retries=2)):
        oai.enqueue(Reply(status=429), Reply("after the retry"))
        tg.push_message(100, "hi")
        assert await tg.wait_sent(100, 1) == ["after the retry"]


async def test_empty_model_answer_is_explained(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    oai.enqueue(Reply("   "))
    tg.push_message(100, "say nothing")
    [text] = await tg.wait_sent(100, 1)
    assert "empty answer" in text


async def test_telegram_429_is_retried_and_nothing_is_lost(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    tg.fail_next("sendMessage", 429, retry_after=1)
    tg.push_message(100, "hello")
    assert await tg.wait_sent(100, 1, timeout=10) == ["echo: hello"]
    attempts = tg.calls_of("sendMessage")
    assert len(attempts) == 2 and attempts[1].at - attempts[0].at >= 0.9


async def test_unsupported_message_types_are_explained(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    tg.push_message(
        100,
        extra={
            "sticker": {
                "file_id": "s1",
                "file_unique_id": "us1",
                "type": "regular",
                "width": 512,
                "height": 512,
                "is_animated": False,
                "is_video": False,
            }
        },
    )
    # (Voice notes are transcribed now: tests/test_voice.py.)
    tg.push_message(100, extra={"location": {"latitude": 51.5, "longitude": -0.12}})
    texts = await tg.wait_sent(100, 2)
    assert all("can't read that kind of message" in t for t in texts)
    assert oai.calls == []


async def test_unknown_command_is_explained_not_sent_to_the_model(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    tg.push_message(100, "/frobnicate now")
    [text] = await tg.wait_sent(100, 1)
    assert "can't" in text and oai.calls == []


async def test_secrets_never_reach_the_logs(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    import io
    import logging

    from bot.logs import setup_logging

    settings = make_settings(log_level="DEBUG")
    token = settings.telegram_bot_token.get_secret_value()
    key = settings.openai_api_key.get_secret_value()  # type: ignore[union-attr]
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("DEBUG", [token, key], stream=out)
    try:
        async with running(settings):
            oai.enqueue(Reply(status=500))
            tg.push_message(100, "a private thought")
            await tg.wait_sent(100, 1)
            logging.getLogger("test").info("token is %s", token)  # a careless log line
            try:
                raise RuntimeError(f"boom with {key}")
            except RuntimeError:
                logging.getLogger("test").exception("failure")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    text = out.getvalue()
    assert "Application started" in text  # PTB's DEBUG/INFO logging was captured
    assert token not in text and key not in text
    assert token.split(":")[1] not in text
    assert text.count("[REDACTED]") >= 2
