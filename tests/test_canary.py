"""After the switch: a canary sends a stable share of the chats to a candidate; /stats
compares the two from the log; /promote and /rollback end it, for good."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.context import ParleyApp
from bot.domain import ChatKey, TurnRecord, utcnow
from bot.services.canary import bucket
from bot.services.intervals import more_needed, separated, wilson
from bot.texts import t
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.specs import OpenAISpec
from tests.stubs.telegram_server import FakeTelegram
from tests.test_photos import jpeg

ADMIN = 42
CURRENT, CANDIDATE = "gpt-5.4-mini", "gpt-4.1-mini"
CHATS = range(2000, 2024)


# -- the arithmetic -------------------------------------------------------------------------


def test_the_bucket_of_a_chat_depends_on_the_chat_and_the_salt_only() -> None:
    key = ChatKey(2001)
    assert bucket(key, "s") == bucket(ChatKey(2001), "s")
    assert 0 <= bucket(key, "s") < 100
    assert bucket(ChatKey(2001, 5), "s") != bucket(key, "s")  # a forum topic is its own
    shares = [bucket(ChatKey(c), "salt") < 30 for c in range(10_000)]
    assert 0.28 < sum(shares) / len(shares) < 0.32  # about the share asked for


def test_a_difference_is_called_only_when_the_intervals_separate() -> None:
    a, b = wilson(50, 100), wilson(60, 100)  # 0.404-0.596 and 0.502-0.691: they overlap
    assert not separated(a, b)
    more = more_needed(a, b)
    assert more is not None and 300 < more < 800
    # With about that much more data, and the same shares, they do separate.
    k = (200 + 2 * more) / 200
    assert separated(wilson(50 * k, round(100 * k)), wilson(60 * k, round(100 * k)))
    assert separated(wilson(10, 100), wilson(60, 100))
    assert more_needed(wilson(10, 100), wilson(10, 100)) is None  # no difference seen
    assert more_needed(wilson(0, 0), wilson(3, 10)) is None  # no data


# -- the bot ---------------------------------------------------------------------------------


async def _admin(tg: FakeTelegram, text: str) -> str:
    tg.chat(ADMIN)
    count = len(tg.sent_texts(ADMIN))
    tg.push_message(ADMIN, text, user_id=ADMIN)
    return (await tg.wait_sent(ADMIN, count + 1))[count]


async def _round(tg: FakeTelegram, oai: FakeOpenAI, app: ParleyApp, word: str) -> dict[int, str]:
    """Every chat says something; the model that answered each one."""
    for chat in CHATS:
        tg.chat(chat)
        count = len(tg.sent_texts(chat))
        tg.push_message(chat, f"{word} from {chat}", user_id=chat)
        await tg.wait_sent(chat, count + 1)
    await settled(app)
    return {
        chat: next(c.model for c in oai.calls if c.last_user_text == f"{word} from {chat}")
        for chat in CHATS
    }


def _services(app: ParleyApp) -> Any:
    assert app.bot_data.services is not None
    return app.bot_data.services


async def test_a_chat_keeps_its_model_through_the_canary_and_a_restart(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings()
    async with running(settings) as app:
        said = await _admin(tg, f"/canary {CANDIDATE} 50")
        assert said.startswith(f"🐤 50% of the chats now talk to {CANDIDATE}")
        salt = _services(app).canary.state.salt
        first = await _round(tg, oai, app, "one")
        second = await _round(tg, oai, app, "two")
        rows = await _services(app).store.fetch_all(
            "SELECT chat_id, requested_model FROM turns WHERE chat_id >= 2000"
        )
    assert first == second
    assert first == {c: CANDIDATE if bucket(ChatKey(c), salt) < 50 else CURRENT for c in CHATS}
    assert 0 < list(first.values()).count(CANDIDATE) < len(CHATS)
    assert {(c, m) for c, m in rows} == {(c, m) for c, m in first.items()}
    async with running(settings) as app:
        assert _services(app).canary.state.salt == salt
        assert await _round(tg, oai, app, "three") == first
        said = await _admin(tg, "/canary")
        assert said.startswith(f"🐤 Canary: 50% of the chats on {CANDIDATE} since ")
        # A larger share keeps the chats it had and adds others, as they begin a conversation:
        # one under way keeps its model.
        await _admin(tg, f"/canary {CANDIDATE} 80")
        assert await _round(tg, oai, app, "four") == first
        await _reset(tg, CHATS)
        wider = await _round(tg, oai, app, "five")
    assert all(wider[c] == CANDIDATE for c in CHATS if first[c] == CANDIDATE)
    assert wider == {c: CANDIDATE if bucket(ChatKey(c), salt) < 80 else CURRENT for c in CHATS}


async def _reset(tg: FakeTelegram, chats: Any) -> None:
    """/reset in each chat: its next message begins a new conversation."""
    for chat in chats:
        count = len(tg.sent_texts(chat))
        tg.push_message(chat, "/reset", user_id=chat)
        await tg.wait_sent(chat, count + 1)


async def test_a_conversation_under_way_never_changes_model_while_the_canary_runs(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings()
    async with running(settings) as app:
        assert set((await _round(tg, oai, app, "before")).values()) == {CURRENT}
        await _admin(tg, f"/canary {CANDIDATE} 50")
        salt = _services(app).canary.state.salt
        half = {c: CANDIDATE if bucket(ChatKey(c), salt) < 50 else CURRENT for c in CHATS}
        assert 0 < list(half.values()).count(CANDIDATE) < len(CHATS)
        # The conversations begun before the canary go on with the model they began with.
        assert set((await _round(tg, oai, app, "during")).values()) == {CURRENT}
        # A new conversation is the canary's to assign, and keeps what it got.
        await _reset(tg, CHATS)
        assert await _round(tg, oai, app, "new") == half
        # A smaller share leaves the conversations under way on the candidate...
        await _admin(tg, f"/canary {CANDIDATE} 20")
        assert await _round(tg, oai, app, "smaller") == half
    async with running(settings) as app:
        assert await _round(tg, oai, app, "restarted") == half
        # ... and the conversations beginning now go by the new share.
        await _reset(tg, CHATS)
        fifth = {c: CANDIDATE if bucket(ChatKey(c), salt) < 20 else CURRENT for c in CHATS}
        assert await _round(tg, oai, app, "fewer") == fifth
    # Each conversation went on in its own thread: its model saw what came before in it.
    for chat in CHATS:
        during = _call(oai, f"during from {chat}")
        assert during.model == CURRENT and ("user", f"before from {chat}") in during.transcript
        smaller = _call(oai, f"smaller from {chat}")
        assert smaller.model == half[chat] and ("user", f"new from {chat}") in smaller.transcript
        assert ("user", f"during from {chat}") not in smaller.transcript  # /reset came between


def _call(oai: FakeOpenAI, text: str) -> Any:
    return next(c for c in oai.calls if c.last_user_text == text)


async def test_rollback_ends_the_canary_for_good(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings()
    async with running(settings) as app:
        await _admin(tg, f"/canary {CANDIDATE} 100")
        assert set((await _round(tg, oai, app, "one")).values()) == {CANDIDATE}
        said = await _admin(tg, "/rollback")
        assert said == f"Canary ended: every chat is back on {CURRENT}."
        assert set((await _round(tg, oai, app, "two")).values()) == {CURRENT}
    async with running(settings) as app:
        assert set((await _round(tg, oai, app, "three")).values()) == {CURRENT}
        assert await _admin(tg, "/canary") == (
            "No canary is running. Start one with /canary MODEL PERCENT."
        )
        assert await _admin(tg, "/rollback") == (
            "No canary is running. Start one with /canary MODEL PERCENT."
        )


async def test_promote_makes_the_candidate_everyones_model_for_good(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings()
    async with running(settings) as app:
        await _admin(tg, f"/canary {CANDIDATE} 30")
        assert await _admin(tg, "/promote") == (
            f"{CANDIDATE} is now everyone's model; the canary is over."
        )
        assert _services(app).models.current == CANDIDATE
    async with running(settings) as app:
        assert _services(app).models.current == CANDIDATE
        assert _services(app).canary.state is None
        assert set((await _round(tg, oai, app, "after")).values()) == {CANDIDATE}


@pytest.fixture
async def serve(shared: Path) -> AsyncIterator[FakeOpenAI]:
    """The serving endpoint (vLLM) a self-hosted candidate is served on, played by a stand-in."""
    server = FakeOpenAI(OpenAISpec.load(shared / "specs" / "openai-openapi.json"), "serve-key")
    await server.start()
    yield server
    await server.stop()
    assert server.violations == []


async def _say(tg: FakeTelegram, chat: int, text: str) -> None:
    tg.chat(chat)
    count = len(tg.sent_texts(chat))
    tg.push_message(chat, text, user_id=chat)
    await tg.wait_sent(chat, count + 1)


async def test_a_self_hosted_candidate_keeps_its_conversations_through_photos(
    tg: FakeTelegram, oai: FakeOpenAI, serve: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    served = "ft:parley:served"
    serve.fine_tuned_models.append(served)
    settings = make_settings(serve_base_url=serve.url, serve_api_key="serve-key")
    old, new = 2100, 2101
    async with running(settings) as app:
        await _say(tg, old, "I began before the canary.")
        await _admin(tg, f"/canary {served} 100")
        await _say(tg, old, "Still here.")
        await _say(tg, new, "My name is Ada.")
        # A photo goes to the vision model on the chat endpoint, and the thread with it...
        tg.push_photo(new, jpeg(64, 48), caption="What colour is this?")
        await tg.wait_sent(new, 2)
        await _say(tg, new, "What is my name?")
        await settled(app)
    # The conversation under way stayed on the model in use, at OpenAI.
    still = _call(oai, "Still here.")
    assert still.model == CURRENT and ("user", "I began before the canary.") in still.transcript
    assert not any("before the canary" in c.last_user_text for c in serve.calls)
    # The new one is the candidate's, on the serving endpoint, before and after the photo,
    # with its whole history (the photo's turn included) replayed from the log.
    assert [c.model for c in serve.calls] == [served, served]
    assert serve.calls[-1].transcript == [
        ("user", "My name is Ada."),
        ("assistant", "echo: My name is Ada."),
        ("user", "What colour is this?"),
        ("assistant", "echo: What colour is this?"),
        ("user", "What is my name?"),
    ]
    assert _call(oai, "What colour is this?").model == CURRENT  # no vision model set


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        ("/canary no-such-model 10", "There is no model called no-such-model here."),
        (f"/canary {CANDIDATE} 0", "PERCENT must be a number above 0 and at most 100."),
        (f"/canary {CANDIDATE} 101", "PERCENT must be a number above 0 and at most 100."),
        (f"/canary {CANDIDATE} half", "PERCENT must be a number above 0 and at most 100."),
        (f"/canary {CANDIDATE} 1e309", "PERCENT must be a number above 0 and at most 100."),
        (f"/canary {CANDIDATE} -5", "PERCENT must be a number above 0 and at most 100."),
        (f"/canary {CANDIDATE} nan", "PERCENT must be a number above 0 and at most 100."),
        (f"/canary {CANDIDATE} inf", "PERCENT must be a number above 0 and at most 100."),
        ("/canary <b>x</b> 10", "There is no model called <b>x</b> here."),
        (f"/canary {CURRENT} 10", f"{CURRENT} is already the model in use."),
        ("/canary one", "Usage: /canary MODEL PERCENT sends that share of the chats to MODEL;"),
        ("/promote", "No canary is running. Start one with /canary MODEL PERCENT."),
    ],
)
async def test_bad_canary_commands_get_a_short_answer_and_change_nothing(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, command: str, answer: str
) -> None:
    async with running(make_settings()) as app:
        assert (await _admin(tg, command)).startswith(answer)
        assert _services(app).canary.state is None
        assert await _services(app).store.settings.get("canary") is None


async def test_only_an_admin_in_their_own_private_chat_runs_the_canary_and_eval_commands(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    commands = [f"/canary {CANDIDATE} 100", "/promote", "/rollback", "/eval ftjob-1 5"]
    async with running(make_settings()) as app:
        await _admin(tg, f"/canary {CANDIDATE} 10")
        state = _services(app).canary.state
        for chat, chat_type, user, refusal in (
            (100, "private", 100, t("admin_only")),
            (-700, "supergroup", ADMIN, t("admin.private_only")),
        ):
            tg.chat(chat, chat_type)
            for n, command in enumerate(commands, 1):
                tg.push_message(chat, command, user_id=user, chat_type=chat_type)
                assert (await tg.wait_sent(chat, n))[-1] == refusal, (chat, command)
        await settled(app)
        assert _services(app).canary.state == state  # neither changed nor ended
        assert _services(app).models.current == CURRENT
        assert await _services(app).store.fetch_all("SELECT 1 FROM eval_runs") == []


async def _log(
    app: ParleyApp, model: str, n: int, *, failed: int, latency: int, positive: int
) -> None:
    """`n` turns answered by `model` since the canary started (the first `failed` failed;
    replies alternate latency ± 100 ms; the first `positive` replies got a 👍)."""
    store = _services(app).store
    chat = 3000 if model == CURRENT else 4000
    for i in range(n):
        ok = i >= failed
        await store.threads.record_turn(
            TurnRecord(
                thread_id=None,
                key=ChatKey(chat + i),
                chat_type="private",
                user_id=chat + i,
                user_message_id=1,
                user_text="hello",
                model=model,
                requested_model=model,
                instructions="Be nice.",
                started_at=utcnow(),
                status="ok" if ok else "failed",
                assistant_text="hi" if ok else None,
                latency_ms=latency + (100 if i % 2 else -100) if ok else None,
                input_tokens=50 if ok else None,
                output_tokens=10 if ok else None,
                reply_message_ids=(7,) if ok else (),
            )
        )
        if ok and i - failed < positive:
            await store.stats.set_reactions(chat + i, 7, chat + i, [("👍", 1)])


async def test_stats_compare_both_models_and_call_only_separated_differences(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()) as app:
        await _admin(tg, f"/canary {CANDIDATE} 50")
        # Errors 1% against 20%, latency 1000 against 1050 ms (± 100): both tell. Positive
        # reactions 10% against 12%: not yet. Negative reactions: none on either side.
        await _log(app, CURRENT, 300, failed=3, latency=1000, positive=30)
        await _log(app, CANDIDATE, 300, failed=60, latency=1050, positive=29)
        sent = len(tg.texts(ADMIN))
        tg.chat(ADMIN)
        tg.push_message(ADMIN, "/stats", user_id=ADMIN)
        await tg.wait_for(lambda: any("🐤 Canary since" in t for t in tg.texts(ADMIN)[sent:]))
        await tg.wait_for(lambda: bool(tg.calls_of("sendPhoto")))
        report = next(t for t in tg.texts(ADMIN)[sent:] if "🐤 Canary since" in t)
    lines = dict(line.split(": ", 1) for line in report.splitlines()[1:])
    assert lines["Errors"].startswith("1% [0%–3%] n=300 / 20% [16%–25%] n=300")
    assert lines["Errors"].endswith(": the candidate's is higher")
    assert lines["Latency, ms"].startswith("1,000 [989–1,012] n=297 / 1,050 [1,037–1,063] n=240")
    assert lines["Latency, ms"].endswith(": the candidate's is higher")
    assert lines["Tokens per reply"].endswith(": no difference seen so far")
    assert "Replies with a positive reaction" in lines
    positive = lines["Replies with a positive reaction"]
    assert positive.startswith("10% [7%–14%] n=297 / 12% [9%–17%] n=240")
    assert "not enough data yet, about" in positive and "more replies needed" in positive
    assert lines["Replies with a negative reaction"].endswith(": no difference seen so far")
    assert lines["Negative follow-ups"].endswith(": no data yet")  # no sentiment tags here
    caption = tg.calls_of("sendPhoto")[-1].params["caption"]
    assert caption == "The canary's figures for both models, with 95% intervals"
