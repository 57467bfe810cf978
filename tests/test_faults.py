"""Faults at a steady rate: every message still ends with a reply or a clear error."""

from __future__ import annotations

import random

import pytest

from bot.texts import catalog
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram

CHATS, PER_CHAT = 10, 10


@pytest.mark.parametrize("backend", ["openai", "local"])
async def test_model_faults_at_ten_percent_leave_no_message_unanswered(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, backend: str
) -> None:
    oai.fault_rate, oai.fault_delay = 0.10, 1.5
    errors = {v for k, v in catalog("en").items() if k.startswith("error.")}
    async with running(make_settings(conversation_backend=backend, openai_timeout=0.5)) as app:
        for chat in range(1, CHATS + 1):
            tg.chat(chat)
            for i in range(PER_CHAT):
                tg.push_message(chat, f"c{chat} m{i}")
        for chat in range(1, CHATS + 1):
            await tg.wait_sent(chat, PER_CHAT, timeout=60)
        await settled(app)
        assert len(oai.faults_injected) >= 5  # the faults really happened (seeded)
        for chat in range(1, CHATS + 1):
            sent = tg.sent_texts(chat)
            assert len(sent) == PER_CHAT  # one reply or one error per message, no more
            for i, text in enumerate(sent):
                assert text == f"echo: c{chat} m{i}" or text in errors, text
        # Afterwards every thread still works.
        oai.fault_rate = 0.0
        for chat in range(1, CHATS + 1):
            tg.push_message(chat, "still there?")
        for chat in range(1, CHATS + 1):
            assert (await tg.wait_sent(chat, PER_CHAT + 1))[-1] == "echo: still there?"


async def test_telegram_429s_and_502s_are_retried_and_nothing_is_lost(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    tg.send_fault_rate = 0.15
    tg.rng = random.Random(3)  # a seed whose draws include both a 429 and a 502
    async with running(make_settings()):
        for chat in range(1, 6):
            tg.chat(chat)
            for i in range(5):
                tg.push_message(chat, f"c{chat} m{i}")
        for chat in range(1, 6):
            sent = await tg.wait_sent(chat, 5, timeout=60)
            assert sent == [f"echo: c{chat} m{i}" for i in range(5)]
    failed = [c for c in tg.calls_of("sendMessage") if c.status != 200]
    assert {c.status for c in failed} >= {429, 502}  # both kinds were injected and survived
