"""Sentiment end to end: tags on replies, the model analyzer and its fallback, reactions, /stats."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest

from tests.conftest import SettingsFactory, eventually, running, settled
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import FakeTelegram


async def _rows(app, sql: str) -> list[tuple]:  # type: ignore[no-untyped-def]
    await settled(app)
    return await app.bot_data.services.store.fetch_all(sql)


@pytest.mark.parametrize("backend", ["openai", "local"])
async def test_reply_is_tagged_and_the_tag_stays_out_of_the_thread(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    backend: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if backend == "local":
        oai.responses_api = False  # as llama.cpp's or vLLM's server: Chat Completions only
    settings = make_settings(
        conversation_backend=backend, sentiment_backend="model", sentiment_model="gpt-5.4-nano"
    )
    async with running(settings) as app:
        oai.enqueue("Great question, glad you asked!")
        tg.push_message(100, "I hate waiting in lines")
        [text] = await tg.wait_sent(100, 1)
        assert text == "Great question, glad you asked!\n\n🙂 positive"
        rows = await _rows(
            app,
            "SELECT role, sentiment_label, sentiment_score, sentiment_source"
            " FROM messages ORDER BY id",
        )
        assert rows == [
            ("user", "negative", -0.8, "model"),
            ("assistant", "positive", 0.8, "model"),
        ]
        # The classifier used its own cheap model and a strict JSON schema with an enum,
        # through the API the conversation backend speaks.
        body = oai.classify_calls[0]
        if backend == "local":
            # A local server may have one slot, which a second request would take from the
            # answer's stream: the user's message is judged after the answer there.
            judged = [b["messages"][-1]["content"] for b in oai.classify_calls]
            assert judged == ["Great question, glad you asked!", "I hate waiting in lines"]
            body = oai.classify_calls[1]
        assert body["model"] == "gpt-5.4-nano"
        if backend == "openai":
            assert body["store"] is False
            fmt = body["text"]["format"]
        else:
            fmt = body["response_format"]["json_schema"]
            assert body["response_format"]["type"] == "json_schema" and fmt["strict"] is True
            assert body["messages"][-1] == {"role": "user", "content": "I hate waiting in lines"}
        assert fmt["schema"]["properties"]["label"]["enum"] == ["positive", "neutral", "negative"]
        paths = {path for _, path, _ in oai.requests}
        assert ("/responses" in paths) == (backend == "openai")
        # Next turn: what the model is shown of the previous answer has no tag.
        tg.push_message(100, "and then?")
        await tg.wait_sent(100, 2)
    assert ("assistant", "Great question, glad you asked!") in oai.calls[-1].transcript
    assert not any("🙂" in text for _, text in oai.calls[-1].transcript)
    assert len(oai.classify_calls) == 4  # two messages each turn, one request each
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("status", [400, 422, 500])
async def test_a_local_server_refusing_structured_output_is_asked_once_then_the_lexicon_tags(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    # 400 as vLLM or LM Studio, 422 as a FastAPI server, 500 as llama-cpp-python's server.
    oai.responses_api = False
    oai.refused_formats = {"json_schema", "json_object"}
    oai.refusal_status = status
    settings = make_settings(conversation_backend="local", sentiment_backend="model")
    async with running(settings) as app:
        # The reply is judged first (the user's message after the answer, on a local server):
        # both forms are refused there, and the user's message isn't asked about at all.
        oai.enqueue("This is a terrible, awful outcome.")
        tg.push_message(100, "how did it go?")
        assert (await tg.wait_sent(100, 1))[0].endswith("🙁 negative")
        await settled(app)
        asked = len(oai.classify_calls)
        oai.enqueue("Thanks, that is wonderful news!", "Still wonderful, thanks!")
        tg.push_message(100, "and now?")
        tg.push_message(100, "and later?")
        texts = await tg.wait_sent(100, 3)
        rows = await _rows(app, "SELECT DISTINCT sentiment_source FROM messages")
    assert texts[1].endswith("🙂 positive") and texts[2].endswith("🙂 positive")
    assert rows == [("lexicon",)]
    # Each form of structured output was asked for once, then never again.
    formats = [body["response_format"]["type"] for body in oai.classify_calls]
    assert formats == ["json_schema", "json_object"] and asked == 2
    assert all(path != "/responses" for _, path, _ in oai.requests)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "from now on" in warnings[0].getMessage()


async def test_a_server_taking_only_json_object_with_a_schema_tags_through_it(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # llama-cpp-python's server: no Responses API; response_format "json_schema" is a 500,
    # "json_object" with a "schema" is turned into a grammar.
    oai.responses_api = False
    oai.refused_formats = {"json_schema"}
    oai.refusal_status = 500
    settings = make_settings(conversation_backend="local", sentiment_backend="model")
    async with running(settings) as app:
        for n, answer in enumerate(["Glad it worked, thanks!", "Sorry, that is bad news."], 1):
            oai.enqueue(answer)
            tg.push_message(100, f"question {n}")
            await tg.wait_sent(100, n)
            await settled(app)
        rows = await _rows(
            app,
            "SELECT sentiment_label, sentiment_source FROM messages"
            " WHERE role = 'assistant' ORDER BY id",
        )
    assert rows == [("positive", "model"), ("negative", "model")]
    formats = [body["response_format"]["type"] for body in oai.classify_calls]
    assert formats[0] == "json_schema" and formats[1:] == ["json_object"] * 4
    assert oai.classify_calls[-1]["response_format"]["schema"]["required"] == ["label", "score"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "failure",
    [
        Reply(status=500),
        Reply('{"label": "ecstatic"}'),
        Reply("not json"),
        # Held until the end: had the bot waited for it, the reply would never come.
        Reply('{"label":"positive","score":1}', hold=asyncio.Event()),
    ],
    ids=["500", "bad-label", "not-json", "slow"],
)
@pytest.mark.parametrize("backend", ["openai", "local"])
async def test_model_analyzer_falls_back_to_the_lexicon(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    failure: Reply,
    backend: str,
) -> None:
    settings = make_settings(
        sentiment_backend="model", sentiment_timeout=0.3, conversation_backend=backend
    )
    async with running(settings) as app:
        # A fresh hold for each run: the parameters are shared by both backends.
        failure = dataclasses.replace(failure, hold=failure.hold and asyncio.Event())
        # The reply's check fails, the user's message is fine; the next turn's are asked
        # again. (On a local server the user's message is judged after the reply.)
        script = [Reply(), failure] if backend == "openai" else [failure, Reply()]
        oai.classify_script.extend(script)
        oai.enqueue("This is a terrible, awful outcome.", "Thanks, wonderful!")
        tg.push_message(100, "how did it go?")
        [text] = await tg.wait_sent(100, 1)
        assert text.endswith("🙁 negative")  # VADER reads "terrible, awful" as negative
        tg.push_message(100, "and now?")
        await tg.wait_sent(100, 2)
        rows = await _rows(app, "SELECT sentiment_source FROM messages WHERE role = 'assistant'")
        assert rows == [("lexicon",), ("model",)]  # a passing failure is not remembered
        if failure.hold is not None:
            failure.hold.set()


async def test_lexicon_backend_never_calls_the_model_for_tags(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(sentiment_backend="lexicon")):
        oai.enqueue("Thanks, that is wonderful news!")
        tg.push_message(100, "hi")
        assert (await tg.wait_sent(100, 1))[0].endswith("🙂 positive")
    assert oai.classify_calls == []


async def test_long_reply_carries_the_tag_on_its_last_part(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(sentiment_backend="lexicon")):
        oai.enqueue(
            Reply(("word " * 700).strip() + "\n\n" + ("more " * 700).strip(), chunk_words=100)
        )
        tg.push_message(100, "long please")
        await tg.wait_for(lambda: any("neutral" in t for t in tg.sent_texts(100)))
    parts = tg.sent_texts(100)
    assert len(parts) == 2 and parts[-1].endswith("\n\n😐 neutral") and "😐" not in parts[0]


def _reaction(chat: dict, message_id: int, user_id: int, old: list[str], new: list[str]) -> dict:  # type: ignore[type-arg]
    return {
        "message_reaction": {
            "chat": chat,
            "message_id": message_id,
            "date": int(time.time()),
            "user": {"id": user_id, "is_bot": False, "first_name": "U"},
            "old_reaction": [{"type": "emoji", "emoji": e} for e in old],
            "new_reaction": [{"type": "emoji", "emoji": e} for e in new],
        }
    }


async def test_reactions_on_replies_are_stored_and_replaced(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()) as app:
        store = app.bot_data.services.store  # type: ignore[union-attr]
        user_msg = tg.push_message(100, "hi")
        await tg.wait_sent(100, 1)
        [(reply_id,)] = await _rows(app, "SELECT message_id FROM reply_messages")
        chat = tg.chats[100]
        tg.push_update(_reaction(chat, reply_id, 100, [], ["👍", "🤔"]))
        tg.push_update(_reaction(chat, user_msg["message_id"], 100, [], ["👎"]))  # not a reply
        sql = "SELECT emoji, polarity FROM reactions ORDER BY emoji"
        await eventually(lambda: _has(store, sql, [("👍", 1), ("🤔", 0)]))
        await settled(app)
        assert await store.fetch_all(sql) == [("👍", 1), ("🤔", 0)]  # the 👎 was ignored
        tg.push_update(_reaction(chat, reply_id, 100, ["👍", "🤔"], ["💩"]))
        await eventually(lambda: _has(store, sql, [("💩", -1)]))


async def _has(store, sql: str, expected: list[tuple]) -> bool:  # type: ignore[no-untyped-def]
    return await store.fetch_all(sql) == expected


async def test_stats_is_refused_to_non_admins_and_shows_report_and_chart_to_admins(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(sentiment_backend="lexicon", admin_user_ids="42")):
        for i in range(5):
            oai.enqueue("Thanks, this is great!" if i % 2 else "Sorry, that failed badly.")
            tg.push_message(100, f"question {i}")
        await tg.wait_sent(100, 5)
        tg.push_message(100, "/stats")
        [*_, refusal] = await tg.wait_sent(100, 6)
        assert "only for the bot's admins" in refusal and "positive" not in refusal
        tg.chat(42)
        tg.push_message(42, "/stats", user_id=42)
        [report] = await tg.wait_sent(42, 1)
        await tg.wait_for(lambda: bool(tg.calls_of("sendPhoto")))
    assert "Bot replies:" in report and "User messages:" in report
    assert "🙂 positive: 2 (40%)" in report and "🙁 negative: 3 (60%)" in report
    # Token usage per user and chat, from the logged turns (the stand-in reports usage).
    assert "Tokens used: " in report and "Top users (7 days): User100 (100): " in report
    assert "Top chats (7 days): User100 (100): " in report  # a private chat is its user
    [photo_call] = tg.calls_of("sendPhoto")
    assert photo_call.params["chat_id"] == "42"  # only the admin got the chart


def test_chart_is_a_png_with_one_bar_per_role() -> None:
    import io

    from PIL import Image

    from bot.services.feedback import Stats, render_chart

    counts = {"positive": 6, "neutral": 3, "negative": 1}
    stats = Stats(
        {"assistant": counts, "user": counts},
        {"assistant": counts, "user": counts},
        {1: 0, 0: 0, -1: 0},
        {1: 0, 0: 0, -1: 0},
    )
    image = Image.open(io.BytesIO(render_chart(stats)))
    assert image.format == "PNG" and image.size == (720, 300)
    # The positive share (60%) is drawn in green at the start of the first bar.
    assert image.convert("RGB").getpixel((200, 98)) == (76, 175, 80)


@pytest.mark.parametrize("backend", ["openai", "local"])
async def test_photo_replies_are_tagged_too(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, backend: str
) -> None:
    from tests.test_photos import jpeg

    async with running(
        make_settings(conversation_backend=backend, sentiment_backend="model")
    ) as app:
        oai.enqueue("A wonderful sunny beach, great for a holiday.")
        tg.push_photo(100, jpeg(300, 200, "yellow"), caption="where is this?")
        [text] = await tg.wait_sent(100, 1)
        assert text == "A wonderful sunny beach, great for a holiday.\n\n🙂 positive"
        rows = await _rows(app, "SELECT sentiment_label FROM messages WHERE role = 'assistant'")
    assert rows == [("positive",)]
