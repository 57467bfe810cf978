"""Several bot processes serving one bot behind a load balancer, sharing one PostgreSQL (#16).

Real processes, a real database, webhooks through a round-robin proxy, as in production:
every message answered exactly once and in order per chat while a replica is killed and
started again; a /model switch made through one replica used by the others; the
fine-tuning job poller carried on by another replica when the one running it dies.

Each test also runs against ONE process on SQLite, in webhook mode: the same harness and
checks, and the single-process behaviour the replicas must not lose.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.settings import ConfigError, load_settings
from bot.texts import t
from storage.db import Store
from storage.interface import Store as AnyStore
from tests.conftest import TOKEN
from tests.pg import fresh_schema
from tests.replicas import (
    WEBHOOK_PATH,
    Replicas,
    Updates,
    all_answered,
    check_answers,
)
from tests.stubs.openai_server import API_KEY, FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram

ADMIN = 42
MODEL_BEFORE = "gpt-5.4-mini"
MODEL_AFTER = "gpt-4.1-mini"  # both are in the stand-in's model list
REPLICAS = 3


def _postgres_refused() -> str | None:
    """Why the bot can't take a PostgreSQL DATABASE_URL yet, or None when it can."""
    try:
        load_settings(
            _env_file=None,
            telegram_bot_token=TOKEN,
            openai_api_key=API_KEY,
            database_url="postgresql://postgres@127.0.0.1:5432/test",
        )
    except ConfigError as exc:
        return str(exc)
    return None


@dataclass
class Deployment:
    """Where the replicas keep their state, and how many there are."""

    kind: str  # "sqlite" | "postgres"
    url: str
    replicas: int

    @asynccontextmanager
    async def store(self) -> AsyncIterator[AnyStore]:
        """The replicas' database, opened through the storage API."""
        store: AnyStore
        if self.kind == "sqlite":
            store = await Store.open(Path(self.url.removeprefix("sqlite:///")))
        else:
            from storage.pg.db import PgStore

            store = await PgStore.open(self.url)
        try:
            yield store
        finally:
            await store.close()


@pytest.fixture(
    params=[
        pytest.param(("sqlite", 1), id="sqlite-1-process"),
        pytest.param(("postgres", REPLICAS), id=f"postgres-{REPLICAS}-replicas"),
    ]
)
async def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Deployment]:
    kind, count = request.param
    if kind == "sqlite":
        yield Deployment(kind, f"sqlite:///{tmp_path / 'parley.sqlite3'}", count)
        return
    if (why := _postgres_refused()) is not None:
        pytest.skip(f"replica mode is not there yet: the bot refuses a PostgreSQL URL ({why})")
    async with fresh_schema() as url:
        yield Deployment(kind, url, count)


def _models_of(oai: FakeOpenAI, text: str) -> list[str]:
    """The model of every model call whose newest user text is `text`."""
    return [c.model for c in oai.calls if c.last_user_text == text]


# -- every message once, in order, through a kill ------------------------------------------

CHATS = 30
PER_CHAT = 5
BEFORE_KILL = 3  # messages each user sends before the kill; the rest come while it is dead
KILL_AT = 0.4  # share of all messages answered when a replica is killed
KILLED_FOR = 1.0  # seconds it stays dead before it is started again


async def test_every_message_is_answered_once_and_in_order_while_a_replica_is_killed(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, deployment: Deployment
) -> None:
    oai.latency = 0.1  # answers take a while: the kill catches some in flight
    expected = {20_000 + c: [f"c{c} m{i}" for i in range(PER_CHAT)] for c in range(CHATS)}
    total = CHATS * PER_CHAT
    rng = random.Random(16)
    updates = Updates(tg)
    async with Replicas(tg, oai, tmp_path, deployment.url, deployment.replicas) as rs:
        killed = asyncio.Event()

        async def user(chat: int, texts: list[str]) -> None:
            """One user: each message sent once the previous one was acknowledged."""
            for i, text in enumerate(texts):
                if i == BEFORE_KILL:
                    await killed.wait()
                await rs.sender.send(updates.text(chat, text))
                await asyncio.sleep(rng.uniform(0.0, 0.2))

        def answered() -> int:
            return sum(len(tg.sent_texts(chat)) for chat in expected)

        users = asyncio.gather(*(user(c, texts) for c, texts in expected.items()))
        try:
            await rs.until(lambda: answered() >= total * KILL_AT, 60, "answers before the kill")
            victim = rs.replicas[-1]
            killed_at = [await victim.kill()]
            assert answered() < CHATS * BEFORE_KILL  # some were still being handled
            killed.set()
            # The others take every webhook meanwhile; with one process, the sender
            # redelivers until it is back, as Telegram does.
            await asyncio.sleep(KILLED_FOR)
            await victim.start()
            await asyncio.wait_for(asyncio.shield(users), 120)
        finally:
            users.cancel()
            await asyncio.gather(users, return_exceptions=True)
        assert rs.sender.failures == []
        assert rs.proxy.refused[victim.url] > 0  # webhooks came while it was dead
        # The killed replica's chats resume once its leases expire (with one process: at
        # its restart).
        await rs.until(lambda: all_answered(tg, expected), 90, "every message answered")
        async with deployment.store() as store:
            # What the killed one was handling is replayed, maybe answered again: wait.
            await rs.until(_nothing_pending(store), 60, "the inbox emptied")
        await asyncio.sleep(1.0)  # anything still to come would be a second copy
        report = check_answers(tg, expected, killed_at)
        assert report.ok, f"{report}\n{rs.logs()}"
        assert report.answered == total
        # At most one replica works on a chat at a time: its model calls never overlap.
        assert oai.max_in_flight_per_conversation == 1
        if deployment.replicas > 1:
            assert all(n > 0 for n in rs.spread().values()), rs.spread()
        assert await rs.stop_all() == [0] * deployment.replicas, rs.logs()
    async with deployment.store() as store:
        assert await store.inbox.pending() == []


def _nothing_pending(store: AnyStore) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await store.inbox.pending() == []

    return check


# -- /model through one replica, used by all -------------------------------------------------


async def test_a_model_switch_through_one_replica_is_used_by_every_replica(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, deployment: Deployment
) -> None:
    updates = Updates(tg)
    async with Replicas(
        tg, oai, tmp_path, deployment.url, deployment.replicas, OPENAI_MODEL=MODEL_BEFORE
    ) as rs:
        await rs.sender.send(updates.text(30_000, "before the switch"))
        await rs.until(lambda: bool(tg.sent_texts(30_000)), 30, "the first answer")
        assert _models_of(oai, "before the switch") == [MODEL_BEFORE]

        await rs.sender.send(updates.text(ADMIN, f"/model {MODEL_AFTER}", user_id=ADMIN))
        switched = t("model.switched", model=MODEL_AFTER)
        await rs.until(lambda: switched in tg.sent_texts(ADMIN), 30, "the switch confirmed")

        # Each replica in turn handles a new chat's message alone (the others stopped with
        # SIGSTOP), so every one of them, not only the one that switched, must answer
        # with the new model: each reads it from the database before each update.
        for i, replica in enumerate(rs.replicas):
            chat, text = 30_001 + i, f"after the switch, on {replica.name}"
            others = [r for r in rs.replicas if r is not replica]
            for other in others:
                other.pause()
            try:
                await rs.sender.send(updates.text(chat, text), url=replica.url + WEBHOOK_PATH)
                await rs.until(_answered_in(tg, chat), 30, f"{replica.name} answers")
            finally:
                for other in others:
                    other.resume()
            assert tg.sent_texts(chat) == [f"echo: {text}"]
            assert _models_of(oai, text) == [MODEL_AFTER], replica.name


# -- the job poller moves to a live replica -------------------------------------------------

# The stand-in moves a job one step per look; a plan ending in "running" twice keeps it
# running until the test puts "succeeded" back at the end.
HOLD = ["validating_files", "queued", "running", "running"]
FINISH = ["validating_files", "queued", "running", "succeeded"]
POLL_INTERVAL = 0.2
WINDOW = 2.0  # seconds over which the polls are counted


async def test_the_job_poller_moves_to_a_live_replica_and_the_admin_is_told_once(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, deployment: Deployment
) -> None:
    updates = Updates(tg)
    async with Replicas(
        tg, oai, tmp_path, deployment.url, deployment.replicas, JOB_POLL_INTERVAL=str(POLL_INTERVAL)
    ) as rs:
        # Two-turn conversations to train on (one example each).
        seeded = {40_000 + c: [f"seed {c}: hello", f"seed {c}: tell me more"] for c in range(12)}

        async def talk(chat: int, texts: list[str]) -> None:
            for text in texts:
                await rs.sender.send(updates.text(chat, text))

        await asyncio.wait_for(asyncio.gather(*(talk(c, ts) for c, ts in seeded.items())), 60)
        await rs.until(lambda: all_answered(tg, seeded), 60, "the seeded chats answered")

        oai.job_plan = HOLD
        await rs.sender.send(updates.text(ADMIN, "/train", user_id=ADMIN))
        await rs.until(lambda: _button(tg, "ft:start:") is not None, 60, "the /train summary")
        message_id, data = _button(tg, "ft:start:") or (0, "")
        await rs.sender.send(updates.callback(ADMIN, ADMIN, message_id, data))
        await rs.until(
            lambda: _running(oai) is not None,
            60,
            "the job running",
            lambda: (tg.texts(ADMIN), {j: v["status"] for j, v in oai.jobs.items()}),
        )
        job_id = _running(oai) or ""

        def polls() -> int:
            return sum(
                1
                for method, path, _ in oai.requests
                if method == "GET" and path == f"/fine_tuning/jobs/{job_id}"
            )

        # One replica follows the job at a time: a round at most every poll interval. (Each
        # replica polling on its own would make about `replicas` times as many.)
        seen = polls()
        await asyncio.sleep(WINDOW)
        assert 1 <= polls() - seen <= WINDOW / POLL_INTERVAL + 2

        # Whichever replica follows the job, it is killed in its turn: another one must
        # take the job over (right away, while the killed one is down, when there is one).
        for replica in rs.replicas:
            await replica.kill()
            if any(r.alive for r in rs.replicas):
                seen = polls()
                await rs.until(
                    _at_least(polls, seen + 2),
                    30,
                    f"the job followed with {replica.name} dead",
                )
            await replica.start()
            seen = polls()
            await rs.until(
                _at_least(polls, seen + 2),
                30,
                f"the job followed after {replica.name} restarted",
            )

        oai.job_plan = FINISH
        await rs.until(lambda: oai.jobs[job_id]["status"] == "succeeded", 30, "the job finished")
        notice = t("job.succeeded", job_id=job_id, model=oai.jobs[job_id]["fine_tuned_model"])
        await rs.until(
            lambda: any(s.startswith(notice) for s in tg.sent_texts(ADMIN)), 30, "the notice"
        )
        await asyncio.sleep(1.0)  # five poll intervals: a second notice would be here by now
        told = [s for s in tg.sent_texts(ADMIN) if s.startswith(notice)]
        assert len(told) == 1, told


def _answered_in(tg: FakeTelegram, chat: int) -> Callable[[], bool]:
    return lambda: bool(tg.sent_texts(chat))


def _at_least(count: Callable[[], int], n: int) -> Callable[[], bool]:
    return lambda: count() >= n


def _button(tg: FakeTelegram, prefix: str) -> tuple[int, str] | None:
    """(message id, callback data) of the admin's newest button whose data starts so."""
    found = [(mid, data) for mid, _, data in tg.buttons(ADMIN) if data.startswith(prefix)]
    return found[-1] if found else None


def _running(oai: FakeOpenAI) -> str | None:
    """The id of the one fine-tuning job, once the stand-in has it running."""
    jobs = list(oai.jobs.values())
    return jobs[0]["id"] if len(jobs) == 1 and jobs[0]["status"] == "running" else None
