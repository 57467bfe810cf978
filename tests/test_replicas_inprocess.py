"""Two replicas in one test process: two real Applications in webhook mode sharing one real
PostgreSQL (a fresh schema), each update posted to either. The multi-process version, with a
proxy, SIGKILL and restarts, is tests/test_replicas.py; this one checks the mechanics fast."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from telegram.ext import ExtBot

from bot.app import ALLOWED_UPDATES, build_application
from bot.domain import JobRecord, utcnow
from bot.services.alerts import AdminAlerts
from bot.services.finetune import FineTuner
from bot.services.trainer import JobInfo
from bot.startup import StartupError
from bot.webhook import SECRET_HEADER, serving
from storage.pg.db import PgStore
from storage.pg.locks import PgLocks
from tests.conftest import TOKEN, SettingsFactory, eventually, running
from tests.pg import pg_url  # noqa: F401  (the fixture)
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram, private_text_update

SECRET = "replica-secret"


@asynccontextmanager
async def replicas(
    make_settings: SettingsFactory, url: str, count: int, **overrides: Any
) -> AsyncIterator[list[str]]:
    """`count` replicas serving; yields each one's webhook URL."""
    settings = make_settings(
        database_url=url,
        webhook_url="https://bot.example.org/hook",
        webhook_listen="127.0.0.1",
        webhook_port=0,
        webhook_secret=SECRET,
        **overrides,
    )
    async with AsyncExitStack() as stack:
        urls = []
        for _ in range(count):
            port = await stack.enter_async_context(
                serving(build_application(settings), settings, ALLOWED_UPDATES)
            )
            urls.append(f"http://127.0.0.1:{port}/hook")
        yield urls


async def post(http: aiohttp.ClientSession, url: str, update: dict[str, Any]) -> None:
    async with http.post(url, json=update, headers={SECRET_HEADER: SECRET}) as response:
        assert response.status == 200, await response.text()


async def test_each_chat_is_answered_once_and_in_order_whichever_replica_gets_its_messages(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    pg_url: str,  # noqa: F811
) -> None:
    chats, per_chat = 6, 4
    for chat in range(chats):
        tg.chat(1000 + chat)
    oai.latency = 0.05  # answers take a while: later messages queue behind earlier ones
    ids = itertools.count(1)
    async with replicas(make_settings, pg_url, 2) as urls, aiohttp.ClientSession() as http:

        async def send_chat(chat: int) -> None:
            for n in range(per_chat):
                # Consecutive messages of one chat reach different replicas.
                update = private_text_update(next(ids), 1000 + chat, n + 1, f"c{chat} m{n}")
                await post(http, urls[(chat + n) % 2], update)

        await asyncio.gather(*(send_chat(c) for c in range(chats)))
        for chat in range(chats):
            await tg.wait_sent(1000 + chat, per_chat, timeout=30)
        await asyncio.sleep(0.3)  # anything doubled would show up by now
    for chat in range(chats):
        assert tg.sent_texts(1000 + chat) == [f"echo: c{chat} m{n}" for n in range(per_chat)]


async def test_a_model_switch_on_one_replica_holds_for_the_next_message_on_another(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    pg_url: str,  # noqa: F811
) -> None:
    tg.chat(42)  # the admin's private chat
    tg.chat(7)
    async with replicas(make_settings, pg_url, 2) as urls, aiohttp.ClientSession() as http:
        await post(http, urls[0], private_text_update(1, 7, 1, "before"))
        await tg.wait_sent(7, 1)
        before = oai.calls[-1].model
        command = private_text_update(2, 42, 1, "/model gpt-5.4-nano")
        command["message"]["entities"] = [{"type": "bot_command", "offset": 0, "length": 6}]
        await post(http, urls[0], command)
        await tg.wait_sent(42, 1)
        await post(http, urls[1], private_text_update(3, 7, 2, "after"))
        await tg.wait_sent(7, 2)
    assert before != "gpt-5.4-nano"
    assert "gpt-5.4-nano" in tg.sent_texts(42)[0]  # switched
    assert oai.calls[-1].model == "gpt-5.4-nano"


async def test_a_stopped_replica_gives_its_chats_up_and_the_other_answers_what_waits(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    pg_url: str,  # noqa: F811
) -> None:
    tg.chat(9)
    oai.latency = 0.3
    async with replicas(make_settings, pg_url, 1) as first, aiohttp.ClientSession() as http:
        async with replicas(make_settings, pg_url, 1) as second:
            for n in range(3):  # all to the second replica, which is then stopped
                await post(http, second[0], private_text_update(n + 1, 9, n + 1, f"m{n}"))
        # Stopped while answering: what it had not started waits in the inbox, and the first
        # replica takes the chat over at its next look.
        await tg.wait_sent(9, 3, timeout=30)
        await post(http, first[0], private_text_update(10, 9, 10, "last"))
        await tg.wait_sent(9, 4, timeout=30)
    texts = tg.sent_texts(9)
    assert texts == [f"echo: m{n}" for n in range(3)] + ["echo: last"]


async def test_an_album_whose_parts_reach_different_replicas_is_answered_as_one(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    pg_url: str,  # noqa: F811
) -> None:
    tg.chat(100)
    oai.enqueue("Both list cities.")
    async with (
        replicas(make_settings, pg_url, 2, album_wait=0.3) as urls,
        aiohttp.ClientSession() as http,
    ):
        parts = [
            tg.push_document(100, b"city\nLisbon\n", "a.csv", "text/csv", media_group_id="g1"),
            tg.push_document(
                100, b"# Porto\n", "c.md", "text/markdown", media_group_id="g1", caption="Compare"
            ),
        ]
        for n, part in enumerate(parts):  # as Telegram would send them (the stand-in queued)
            await post(http, urls[n % 2], {"update_id": 500 + n, "message": part})
        assert await tg.wait_sent(100, 1, timeout=30) == ["Both list cities."]
        await asyncio.sleep(0.5)  # a part answered on its own would show up by now
    [call] = oai.calls
    assert "Lisbon" in call.last_user_text and "Porto" in call.last_user_text
    assert tg.sent_texts(100) == ["Both list cities."]


async def test_a_second_process_polling_the_same_database_is_refused_with_a_reason(
    tg: FakeTelegram,
    make_settings: SettingsFactory,
    pg_url: str,  # noqa: F811
) -> None:
    settings = make_settings(database_url=pg_url)
    tg.chat(100)
    async with running(settings):
        tg.push_message(100, "hello")  # long polling with PostgreSQL works from one process
        assert await tg.wait_sent(100, 1) == ["echo: hello"]
        second = build_application(settings)
        await second.initialize()
        try:
            assert second.post_init is not None
            with pytest.raises(StartupError, match="already polling") as refused:
                await second.post_init(second)
            assert "WEBHOOK_URL" in str(refused.value)
        finally:
            if second.post_stop:
                await second.post_stop(second)
            await second.shutdown()
            if second.post_shutdown:
                await second.post_shutdown(second)


async def test_jobs_are_followed_by_one_replica_and_another_takes_over_when_it_goes(
    pg_url: str,  # noqa: F811
) -> None:
    first, second = PgLocks(pg_url), PgLocks(pg_url)
    try:
        assert await first.acquire("jobs")
        assert await first.acquire("jobs")  # kept, not taken twice
        assert not await second.acquire("jobs")
        await first.close()  # the process goes (its connection with it)
        assert await second.acquire("jobs")
        assert not await first.acquire("jobs")
    finally:
        await first.close()
        await second.close()


async def test_telegrams_rate_limit_holds_for_the_bot_not_for_each_replica(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    pg_url: str,  # noqa: F811
) -> None:
    rate, chats = 10, 24  # 10 requests a second overall, for the test to be quick
    for chat in range(chats):
        tg.chat(2000 + chat)
    async with (
        replicas(make_settings, pg_url, 2, telegram_max_rate=rate, draft_interval=5.0) as urls,
        aiohttp.ClientSession() as http,
    ):
        # Every chat at once, half through each replica: each alone would send its share at
        # once (a burst of `rate`), together twice the bot's rate.
        await asyncio.gather(
            *(
                post(http, urls[c % 2], private_text_update(c + 1, 2000 + c, 1, f"m{c}"))
                for c in range(chats)
            )
        )
        for chat in range(chats):
            await tg.wait_sent(2000 + chat, 1, timeout=30)
    limited = sorted(c.at for c in tg.calls if "chat_id" in c.params)
    assert len(limited) >= chats
    # GCRA: the k-th request (from 0) goes no sooner than (k - burst + 1) intervals after the
    # first; the burst is the rate's one second. Lower bounds only: a slow machine is slower.
    for k, at in enumerate(limited):
        assert at - limited[0] >= (k - rate + 1) / rate - 0.02, (k, at - limited[0])


async def test_admins_are_alerted_once_an_hour_about_a_problem_whichever_replica_meets_it(
    tg: FakeTelegram,
    pg_url: str,  # noqa: F811
) -> None:
    tg.chat(42)
    now = [datetime(2026, 12, 6, 12, 0, tzinfo=UTC)]
    first, second = await PgStore.open(pg_url), await PgStore.open(pg_url)
    try:
        alerts = [
            AdminAlerts(store.settings, frozenset({42}), clock=lambda: now[0])
            for store in (first, second)
        ]
        async with ExtBot(TOKEN, base_url=f"{tg.url}/bot") as bot:
            assert await alerts[0].report(bot, "auth", "chat:auth", model="m")
            assert await alerts[1].report(bot, "auth", "chat:auth", model="m")
            assert len(tg.sent_texts(42)) == 1  # the second replica knew the admins knew
            now[0] += timedelta(minutes=61)
            assert await alerts[1].report(bot, "auth", "chat:auth", model="m")
            assert await alerts[0].report(bot, "auth", "chat:auth", model="m")
            assert len(tg.sent_texts(42)) == 2  # once more an hour later, by either
    finally:
        await first.close()
        await second.close()


async def test_a_poller_that_lost_its_lead_mid_round_does_not_tell_the_admin_again(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    name = f"replica-{secrets.token_hex(3)}"
    a, b = await PgStore.open(f"{pg_url}&application_name={name}"), await PgStore.open(pg_url)
    now = utcnow()
    job = JobRecord("ftjob-1", "openai", "m", None, None, 10, 0, 100, 42, "d", "running", now, now)
    await a.jobs.add(job)
    await a.jobs.mark_notified("ftjob-1", "running")
    slow = asyncio.Event()
    told: list[str] = []

    class Trainer:  # only what the poller asks of one
        name = "openai"

        def __init__(self, slow: bool) -> None:
            self.slow = slow

        async def get(self, job_id: str) -> JobInfo:
            if self.slow:
                await slow.wait()  # this round, the trainer's API is slow to answer
            return JobInfo(job_id, "succeeded", "m", 0, fine_tuned_model="ft:m")

    def tuner(store: PgStore, slowly: bool) -> FineTuner:
        return FineTuner(
            store.jobs,
            Trainer(slowly),  # type: ignore[arg-type]
            dataset=store.dataset,
            datasets_dir=tmp_path,
            base_model="m",
            suffix="s",
            epochs=1,
        )

    def notify(who: str) -> Callable[[JobRecord, JobInfo], Awaitable[None]]:
        async def tell(job: JobRecord, info: JobInfo) -> None:
            told.append(f"{who}:{info.status}")

        return tell

    try:
        assert await a.locks.acquire("jobs")  # A leads, and starts a round
        a_round = asyncio.create_task(tuner(a, True).poll_once(notify("A")))
        await asyncio.sleep(0.3)  # mid-round, waiting on the trainer
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
            await admin.execute(  # A's sessions die (a failover, a network cut): its lock too
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (name,),
            )
        b_polls = asyncio.create_task(
            tuner(b, False).run(notify("B"), 0.2, partial(b.locks.acquire, "jobs"))
        )
        await eventually(lambda: told == ["B:succeeded"])  # B leads now, and tells
        slow.set()  # A's round goes on to its end: the notice is taken, A stays quiet
        await asyncio.wait_for(a_round, 30)
        b_polls.cancel()
        await asyncio.gather(b_polls, return_exceptions=True)
    finally:
        await a.close()
        await b.close()
    assert told == ["B:succeeded"]
