"""The local backend: history kept in SQLite, replayed through Chat Completions, trimmed."""

from __future__ import annotations

from tests.conftest import SettingsFactory, running
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import FakeTelegram


async def test_local_history_is_replayed_and_survives_restart(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings(conversation_backend="local")
    async with running(settings):
        tg.push_message(100, "My name is Ada.")
        await tg.wait_sent(100, 1)
    async with running(settings):
        tg.push_message(100, "What is my name?")
        await tg.wait_sent(100, 2)
    first, second = oai.calls
    assert first.api == second.api == "chat"
    assert oai.conversations == {}  # nothing server-side
    assert second.body["stream"] is True
    assert second.body["messages"][0] == {
        "role": "system",
        "content": settings.assistant_instructions,
    }
    assert second.transcript == [
        ("user", "My name is Ada."),
        ("assistant", "echo: My name is Ada."),
        ("user", "What is my name?"),
    ]
    assert tg.sent_texts(100)[1] == "echo: What is my name?"


async def test_history_is_trimmed_oldest_first_keeping_instructions(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    # ~600 estimated tokens per exchange against a 1,500-token budget (instructions ~40).
    settings = make_settings(conversation_backend="local", local_history_tokens=1500)
    async with running(settings):
        for i in range(6):
            oai.enqueue("a" * 1200)
            tg.push_message(100, f"question {i} " + "q" * 1200)
            await tg.wait_sent(100, i + 1)
        tg.push_message(100, "last question")
        await tg.wait_sent(100, 7)
    last = oai.calls[-1]
    assert last.body["messages"][0]["role"] == "system"
    users = [t for r, t in last.transcript if r == "user"]
    assert users[-1] == "last question"
    # Only the newest exchanges fit; each kept user message still has its answer.
    assert [u.split()[1] for u in users[:-1]] == ["4", "5"]
    roles = [r for r, _ in last.transcript]
    assert roles == ["user", "assistant", "user", "assistant", "user"]


async def test_failed_turns_stay_out_of_the_history(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(conversation_backend="local")):
        oai.enqueue(Reply(status=500))
        tg.push_message(100, "this one fails")
        await tg.wait_sent(100, 1)
        tg.push_message(100, "second try")
        await tg.wait_sent(100, 2)
    assert oai.calls[-1].transcript == [("user", "second try")]
