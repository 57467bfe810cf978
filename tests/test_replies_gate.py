"""Under load, progress (drafts, "typing...") gives way to replies: ProgressGate."""

from __future__ import annotations

import asyncio
import time

from telegram.ext import ExtBot

from bot.domain import ChatKey
from bot.services.replies import ProgressGate, ReplyStreamer
from bot.telegram_http import AiohttpRequest
from tests.conftest import TOKEN, SettingsFactory, eventually, running
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import Call, FakeTelegram


def most_at_once(calls: list[Call]) -> int:
    """The most calls the stand-in was holding at one moment."""
    edges = sorted(
        [(c.at, 1) for c in calls] + [(c.answered_at or c.at, -1) for c in calls],
        key=lambda e: (e[0], e[1]),  # an answer at the same instant ends before a new call
    )
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


async def test_progress_calls_beyond_the_limit_are_skipped_and_every_reply_comes(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    tg.latency["sendMessageDraft"] = 0.6  # Telegram slow to take drafts
    chats = range(100, 106)
    for _ in chats:
        oai.enqueue(Reply("A slow answer, long enough to stream.", delay=0.7, chunk_words=1))
    async with running(make_settings(progress_max_in_flight=2)) as app:
        for chat in chats:
            tg.push_message(chat, "hello")
        for chat in chats:
            assert await tg.wait_sent(chat) == ["A slow answer, long enough to stream."]
        gate = app.bot_data.services.chat.gate  # type: ignore[union-attr]
    drafts = tg.calls_of("sendMessageDraft")
    assert drafts and most_at_once(drafts) <= 2  # six chats, never more than two at once
    assert gate.refusals > 0 and gate.in_flight == 0


async def test_a_lagging_event_loop_sheds_progress_until_it_catches_up() -> None:
    gate = ProgressGate(max_in_flight=16, max_lag=0.05, tick=0.01)
    watcher = asyncio.create_task(gate.watch_lag())
    try:
        await asyncio.sleep(0.05)
        assert gate.admit()
        time.sleep(0.2)  # noqa: ASYNC251 - on purpose: a handler hogging the loop
        await eventually(lambda: gate.lag > 0.05)
        assert not gate.admit() and gate.refusals == 1
        await eventually(lambda: gate.lag <= 0.05)  # the next tick is on time again
        assert gate.admit()
    finally:
        watcher.cancel()


async def test_a_lag_limit_of_zero_never_sheds() -> None:
    gate = ProgressGate(max_in_flight=1, max_lag=0)
    gate.lag = 10.0
    assert gate.admit()


async def test_a_draft_its_reply_left_on_the_wire_counts_until_telegram_answers_it(
    tg: FakeTelegram,
) -> None:
    """The streamer stops waiting for a draft once the reply is ready, but the request
    goes on: until Telegram answers it, it still takes one of the gate's places."""
    tg.chat(100)
    tg.latency["sendMessageDraft"] = 1.0
    gate = ProgressGate(max_in_flight=1, max_lag=0)
    request = AiohttpRequest(connection_pool_size=4, pool_timeout=30.0)
    async with ExtBot(TOKEN, base_url=f"{tg.url}/bot", request=request) as bot:
        streamer = ReplyStreamer(
            bot, ChatKey(100), private=True, draft_id=1, reply_to=None, interval=0.05, gate=gate
        )
        async with streamer:
            await streamer.on_delta("The first words")
            await eventually(lambda: bool(tg.calls_of("sendMessageDraft")))  # held 1 s
            reply = asyncio.create_task(streamer.send("The first words, and the rest."))
            await eventually(lambda: gate.in_flight == 0, timeout=5)
            [draft] = tg.calls_of("sendMessageDraft")
            assert draft.answered_at is not None  # the place was given back only after that
            await reply
    assert tg.sent_texts(100) == ["The first words, and the rest."]


async def test_typing_in_a_group_is_gated_too(tg: FakeTelegram) -> None:
    tg.chat(-100, "group")
    gate = ProgressGate(max_in_flight=0, max_lag=0)  # 0: no progress at all
    request = AiohttpRequest(connection_pool_size=4, pool_timeout=30.0)
    async with ExtBot(TOKEN, base_url=f"{tg.url}/bot", request=request) as bot:
        streamer = ReplyStreamer(
            bot, ChatKey(-100), private=False, draft_id=1, reply_to=None, interval=0.05, gate=gate
        )
        async with streamer:
            await eventually(lambda: gate.refusals > 0)  # the typing loop asked, and was refused
            await streamer.send("An answer without a typing action.")
    assert tg.calls_of("sendChatAction") == []
    assert tg.sent_texts(-100) == ["An answer without a typing action."]
