"""The core path, end to end: Telegram update in, streamed model answer out, turn logged."""

from __future__ import annotations

import asyncio
import json

import pytest
from telegram.ext import ExtBot

from bot.context import ParleyApp
from bot.domain import ChatKey
from bot.services.replies import ReplyStreamer
from bot.telegram_http import AiohttpRequest
from bot.texts import t
from tests.conftest import TOKEN, SettingsFactory, eventually, running, settled
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import FakeTelegram


async def test_private_message_streams_a_draft_then_sends_the_answer(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    oai.enqueue(Reply("Paris is the capital of France.", delay=0.7))  # slow to start
    tg.push_message(100, "What is the capital of France?")
    assert await tg.wait_sent(100) == ["Paris is the capital of France."]

    # A slow start shows the "Thinking..." placeholder first: a rich draft's thinking block.
    [thinking] = tg.calls_of("sendRichMessageDraft")
    markdown = json.loads(thinking.params["rich_message"])["markdown"]
    assert markdown == f"<tg-thinking>{t('draft.thinking')}</tg-thinking>"
    drafts = [c.params for c in tg.calls_of("sendMessageDraft")]
    assert any(d["text"].startswith("Paris") for d in drafts)
    assert all(d["draft_id"] == thinking.params["draft_id"] for d in drafts)
    assert thinking.at <= min(c.at for c in tg.calls_of("sendMessageDraft"))
    final = tg.calls_of("sendMessage")[-1]
    assert max(c.at for c in tg.calls_of("sendMessageDraft")) <= final.at

    [call] = oai.calls
    assert call.api == "responses" and call.conversation in oai.conversations
    assert call.body["input"] == "What is the capital of France?"
    assert call.body["stream"] is True and call.body["model"] == "gpt-5.4-mini"
    assert call.instructions and "Parley" in call.instructions
    assert call.last_user_text == "What is the capital of France?"
    assert tg.allowed_updates == ["message", "message_reaction", "callback_query"]


async def test_a_draft_still_on_its_way_lands_before_the_reply(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    """Telegram slow to take a draft: the reply waits for it rather than being overtaken."""
    tg.latency["sendMessageDraft"] = 0.5
    oai.enqueue(Reply("A quick answer in a handful of words.", chunk_words=2))
    tg.push_message(100, "hi")
    assert await tg.wait_sent(100) == ["A quick answer in a handful of words."]
    final = tg.calls_of("sendMessage")[-1]
    drafts = tg.calls_of("sendMessageDraft")
    assert drafts, "the answer streamed, so a draft was started"
    assert all(d.answered_at is not None and d.answered_at <= final.at for d in drafts)


async def test_a_draft_still_waiting_for_a_connection_is_dropped_not_sent_after_the_reply(
    tg: FakeTelegram,
) -> None:
    tg.chat(100)
    tg.latency["sendChatAction"] = 1.0
    request = AiohttpRequest(connection_pool_size=1, pool_timeout=30.0)
    async with ExtBot(TOKEN, base_url=f"{tg.url}/bot", request=request) as bot:
        busy = asyncio.create_task(bot.send_chat_action(100, "typing"))  # the only connection
        await eventually(lambda: bool(tg.calls_of("sendChatAction")))  # arrived, held
        streamer = ReplyStreamer(
            bot, ChatKey(100), private=True, draft_id=1, reply_to=None, interval=0.05
        )
        async with streamer:
            await streamer.on_delta("The first words")
            await eventually(lambda: streamer._call is not None)  # a draft waits for a slot
            await streamer.send("The first words, and the rest.")
        await busy
    assert tg.calls_of("sendMessageDraft") == []  # never sent, so it can't land after the reply
    assert tg.sent_texts(100) == ["The first words, and the rest."]


async def test_turn_is_logged_with_ids_usage_and_timestamps(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    oai.enqueue("Hello there!")
    sent = tg.push_message(100, "hi", user_id=100)
    await tg.wait_sent(100)
    await settled(bot)
    store = bot.bot_data.services.store  # type: ignore[union-attr]
    [turn] = await store.fetch_all(
        "SELECT chat_id, user_id, user_message_id, status, model, response_id, input_tokens,"
        " output_tokens, latency_ms, started_at, finished_at, chat_type FROM turns"
    )
    assert turn[:5] == (100, 100, sent["message_id"], "ok", "gpt-5.4-mini")
    assert turn[5].startswith("resp_") and turn[6] > 0 and turn[7] > 0 and turn[8] >= 0
    assert turn[9].endswith("+00:00") and turn[9] <= turn[10] and turn[11] == "private"
    messages = await store.fetch_all("SELECT role, content FROM messages ORDER BY id")
    assert messages == [("user", "hi"), ("assistant", "Hello there!")]
    reply_ids = await store.fetch_all("SELECT message_id FROM reply_messages")
    sent_ids = [c for c in tg.calls_of("sendMessage")]
    assert len(reply_ids) == 1 == len(sent_ids)


async def test_thread_survives_a_restart(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings()
    async with running(settings):
        tg.push_message(100, "My name is Ada.")
        await tg.wait_sent(100, 1)
    async with running(settings):
        tg.push_message(100, "What is my name?")
        await tg.wait_sent(100, 2)
    first, second = oai.calls
    assert first.conversation == second.conversation
    assert len(oai.conversations) == 1
    # The model saw the first exchange when answering the second question.
    assert second.transcript == [
        ("user", "My name is Ada."),
        ("assistant", "echo: My name is Ada."),
        ("user", "What is my name?"),
    ]


async def test_reset_starts_a_new_thread(tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp) -> None:
    tg.push_message(100, "one")
    await tg.wait_sent(100, 1)
    tg.push_message(100, "/reset")
    await tg.wait_sent(100, 2)
    assert "new conversation" in tg.sent_texts(100)[1]
    tg.push_message(100, "two")
    await tg.wait_sent(100, 3)
    first, second = oai.calls
    assert first.conversation != second.conversation
    assert second.transcript == [("user", "two")]


@pytest.mark.parametrize("command", ["/start", "/help"])
async def test_start_and_help_list_the_commands(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp, command: str
) -> None:
    tg.push_message(100, command)
    [text] = await tg.wait_sent(100)
    assert "/reset" in text and "/help" in text
    assert oai.calls == []
