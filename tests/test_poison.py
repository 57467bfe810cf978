"""Poison: an update that crashes the bot is set aside; text UTF-8 can't carry is cleaned.

The crash test runs the real process and kills it with SIGKILL each time it handles the
poison update, as the kernel's OOM killer would: after MAX_UPDATE_ATTEMPTS tries the
update is quarantined with its reason, its user is told once, and later messages are
answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from bot.concurrency import Isolation
from bot.domain import utf8_safe
from bot.texts import catalog
from tests.conftest import TOKEN, SettingsFactory, eventually, running, settled
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import FakeTelegram
from tests.test_cli import spawn_bot

EN = catalog("en")


def _log(cwd: Path) -> int:
    return os.open(cwd / "bot.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


async def spawn(
    tg: FakeTelegram, oai: FakeOpenAI, cwd: Path, **env: str
) -> asyncio.subprocess.Process:
    """`python -m bot` against the stand-ins; its output appended to cwd/bot.log."""
    out = _log(cwd)
    try:
        return await spawn_bot(
            tg,
            oai,
            cwd,
            output_fd=out,
            SENTIMENT_BACKEND="off",
            TELEGRAM_MAX_RATE="0",
            TELEGRAM_GROUP_RATE="0",
            **env,
        )
    finally:
        os.close(out)


async def test_an_update_that_kills_the_bot_each_time_is_set_aside_and_the_bot_moves_on(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    tg.chat(100)
    tg.chat(200)
    never = asyncio.Event()  # the poison's answer never comes: the bot dies first
    oai.enqueue(*(Reply(hold=never) for _ in range(3)))
    tg.push_message(100, "the poison")
    try:
        for run in range(1, 4):
            proc = await spawn(tg, oai, tmp_path)
            # Handling reached the model: the attempt is on record. Now the "OOM kill".
            await eventually(lambda run=run: len(oai.calls) == run, timeout=60)
            proc.kill()
            await proc.wait()
        assert [c.last_user_text for c in oai.calls] == ["the poison"] * 3
        proc = await spawn(tg, oai, tmp_path)
        try:
            # The fourth start sets it aside and tells its user, then the bot moves on.
            assert await tg.wait_sent(100, 1, timeout=60) == [EN["error.set_aside"]]
            tg.push_message(100, "still there?")
            tg.push_message(200, "and me?")
            assert await tg.wait_sent(100, 2, timeout=30) == [
                EN["error.set_aside"],
                "echo: still there?",
            ]
            assert await tg.wait_sent(200, 1, timeout=30) == ["echo: and me?"]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        never.set()
    assert len(oai.calls) == 5  # the poison three times, then the two later messages
    with sqlite3.connect(tmp_path / "data" / "parley.sqlite3") as db:
        rows = db.execute(
            "SELECT attempts, quarantined_at IS NOT NULL, reason FROM inbox"
            " WHERE payload LIKE '%the poison%'"
        ).fetchall()
        pending = db.execute("SELECT COUNT(*) FROM inbox WHERE done_at IS NULL").fetchone()
    assert rows == [(3, 1, "handling started 3 times and never finished")]
    assert pending == (0,)
    log = (tmp_path / "bot.log").read_text()
    assert log.count("set aside: its handling started 3 times") == 1
    assert "Traceback" not in log and TOKEN not in log


async def test_a_lone_surrogate_in_a_message_is_stored_cleaned_and_answered(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    tg.chat(100)
    async with running(make_settings()) as app:
        # Telegram's JSON can carry "\ud800" (half a pair); json.loads makes it a lone
        # surrogate that SQLite, the Bot API and the model's API would all refuse.
        tg.push_message(100, "broken \ud800 text")
        tg.push_message(100, "a pair \ud83d\ude00 survives")
        assert await tg.wait_sent(100, 2) == [
            "echo: broken \ufffd text",
            "echo: a pair \U0001f600 survives",
        ]
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        payloads = [json.loads(p) for (p,) in await store.fetch_all("SELECT payload FROM inbox")]
        assert payloads[0]["message"]["text"] == "broken \ufffd text"
        assert await store.inbox.pending() == []
        logged = await store.fetch_all(
            "SELECT content FROM messages WHERE role = 'user' ORDER BY id"
        )
        assert logged == [("broken \ufffd text",), ("a pair \U0001f600 survives",)]
    assert oai.calls[0].last_user_text == "broken \ufffd text"


@pytest.mark.parametrize("backend", ["openai", "local"])
async def test_a_lone_surrogate_in_the_models_answer_is_delivered_cleaned_and_logged(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, backend: str
) -> None:
    tg.chat(100)
    oai.enqueue(Reply("half \udc00 a pair"))
    async with running(make_settings(conversation_backend=backend)) as app:
        tg.push_message(100, "say something odd")
        assert await tg.wait_sent(100, 1) == ["half \ufffd a pair"]
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        turns = await store.fetch_all(
            "SELECT t.status, m.content FROM turns t JOIN messages m ON m.turn_id = t.id"
            " WHERE m.role = 'assistant'"
        )
        assert turns == [("ok", "half \ufffd a pair")]
        drafts = [c.params["text"] for c in tg.calls_of("sendMessageDraft")]
        assert all(utf8_safe(d) == d for d in drafts)
        # The thread goes on: the next answer sees a clean history.
        tg.push_message(100, "next")
        assert (await tg.wait_sent(100, 2))[-1] == "echo: next"


async def test_a_button_no_handler_knows_is_answered(
    tg: FakeTelegram, oai: FakeOpenAI, bot: object
) -> None:
    tg.chat(100)
    tg.push_message(100, "hello")
    await tg.wait_sent(100, 1)
    [(chat, mid)] = [k for k in tg.messages if k[0] == 100]
    tg.push_callback(100, chat, mid, "no-such-button:1")
    await tg.wait_for(lambda: bool(tg.calls_of("answerCallbackQuery")))
    [answer] = tg.calls_of("answerCallbackQuery")
    assert answer.status == 200 and answer.params.get("text") == EN["button.unknown"]
    assert tg.sent_texts(100) == ["echo: hello"]  # an answer to the press, nothing else


async def test_sigterm_cuts_off_a_hung_reply_and_leaves_queued_messages_for_the_next_start(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    tg.chat(100)
    tg.chat(200)
    never = asyncio.Event()
    oai.enqueue(Reply(hold=never))  # chat 100's answer hangs until the stop cuts it off
    queued = [f"m{i}" for i in range(10)]
    proc = await spawn(tg, oai, tmp_path, SHUTDOWN_GRACE="3")
    try:
        tg.push_message(100, "hangs")
        await eventually(lambda: len(oai.calls) == 1, timeout=60)
        oai.latency = 0.3
        for text in queued:
            tg.push_message(200, text)
        await tg.wait_sent(200, 1, timeout=30)
        stopping = asyncio.get_running_loop().time()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert asyncio.get_running_loop().time() - stopping < 3  # SHUTDOWN_GRACE
        answered = len(tg.sent_texts(200))
        assert answered < len(queued)  # the rest were left for the next start
        oai.latency = 0
        proc = await spawn(tg, oai, tmp_path)
        assert await tg.wait_sent(100, 1, timeout=60) == ["echo: hangs"]
        sent = await tg.wait_sent(200, len(queued), timeout=30)
        assert sent == [f"echo: {t}" for t in queued]  # in order, each once
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        never.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Traceback" not in (tmp_path / "bot.log").read_text()


async def test_suspects_run_alone_the_least_tried_first_and_then_the_rest_together() -> None:
    isolation = Isolation()
    running: set[str] = set()
    seen: list[tuple[str, frozenset[str]]] = []  # who started, and who else was running
    release = asyncio.Event()

    async def run(name: str, tried: int) -> None:
        async with isolation.alone(tried) if tried else isolation.together():
            seen.append((name, frozenset(running)))
            running.add(name)
            await release.wait()
            await asyncio.sleep(0)
            running.discard(name)

    first = [asyncio.create_task(run(n, 0)) for n in ("a", "b")]
    await asyncio.sleep(0)
    later = [
        asyncio.create_task(run(name, tried))
        for name, tried in (("twice", 2), ("once", 1), ("c", 0), ("once more", 1))
    ]
    await asyncio.sleep(0)
    assert [name for name, _ in seen] == ["a", "b"]  # the suspects wait for them
    release.set()
    await asyncio.gather(*first, *later)
    assert [name for name, _ in seen] == ["a", "b", "once", "once more", "twice", "c"]
    for name, others in seen[2:5]:
        assert others == frozenset(), name  # each suspect ran alone
