"""Chats run concurrently; one chat's messages are answered strictly in order."""

from __future__ import annotations

import asyncio

from bot.context import ParleyApp
from tests.conftest import eventually
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import FakeTelegram


async def test_a_slow_chat_does_not_delay_another(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    # The slow answer is held until the quick chat has its reply: no clock involved.
    slow = Reply("slow answer", hold=asyncio.Event())
    oai.enqueue(slow)
    tg.push_message(100, "slow question")
    await eventually(lambda: len(oai.calls) == 1)
    tg.push_message(200, "quick question")
    assert await tg.wait_sent(200, 1) == ["echo: quick question"]
    assert tg.sent_texts(100) == []  # the slow one is still being written
    assert slow.hold is not None
    slow.hold.set()
    assert await tg.wait_sent(100, 1) == ["slow answer"]


async def test_messages_in_one_chat_are_answered_in_order_one_at_a_time(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    # Earlier messages get slower answers: without per-chat ordering they would overtake.
    oai.enqueue(*(Reply(delay=0.3 - 0.05 * i) for i in range(5)))
    for i in range(5):
        tg.push_message(100, f"m{i}")
    texts = await tg.wait_sent(100, 5)
    assert texts == [f"echo: m{i}" for i in range(5)]
    assert oai.max_in_flight_per_conversation == 1
    starts = [c.started for c in oai.calls]
    ends = [c.finished for c in oai.calls]
    assert all(end is not None and end <= nxt for end, nxt in zip(ends, starts[1:], strict=False))


async def test_many_chats_are_served_at_once(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    # Every answer is held until all 40 model calls are in flight: handled one by one,
    # the second call could never start and this would time out.
    gate = asyncio.Event()
    oai.enqueue(*(Reply(hold=gate) for _ in range(40)))
    for chat in range(300, 340):
        tg.push_message(chat, f"hello from {chat}")
    await eventually(lambda: len(oai.calls) == 40)
    assert tg.calls_of("sendMessage") == []
    gate.set()
    await tg.wait_for(lambda: len(tg.calls_of("sendMessage")) == 40)
    for chat in range(300, 340):
        assert tg.sent_texts(chat) == [f"echo: hello from {chat}"]
    processor = bot._update_processor  # type: ignore[attr-defined]
    await eventually(lambda: processor.active_lanes == 0)  # idle chats keep no per-chat state
