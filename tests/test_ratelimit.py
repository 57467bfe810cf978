"""Telegram's rate limits shared by replicas: GCRA buckets in PostgreSQL (storage/pg/rates.py)
and the PTB rate limiter over them (bot/ratelimit.py).

Replicas are separate PgStore instances (pools) on one schema. Times are only bounded from
below: a request's callback runs no earlier than its slot, however loaded the machine, so
"the k-th callback ran at least (k - burst) intervals after the first request asked" holds
always, while an upper bound (or the gap between two neighbours, one of which may have run
late) would not.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from telegram.error import RetryAfter

from bot.errors import WriterClosed
from bot.ratelimit import Bucket, LocalBuckets, RateBuckets, SharedRateLimiter
from storage.pg.db import PgStore
from tests.pg import fresh_schema, pg_url  # noqa: F401  (pg_url: the fixture)

EPS = 0.002  # seconds: clock granularity between the server's slot and the client's sleep


@pytest.fixture(autouse=True)
def _timedelta_periods(monkeypatch: pytest.MonkeyPatch) -> None:
    """As bot/app.py sets it: PTB's time periods as timedeltas (RetryAfter warns otherwise)."""
    monkeypatch.setenv("PTB_TIMEDELTA", "1")


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[list[PgStore]]:  # noqa: F811
    """Three bot processes' stores on one database."""
    stores: list[PgStore] = []
    try:
        for _ in range(3):
            stores.append(await PgStore.open(pg_url, max_size=4))
        yield stores
    finally:
        for store in stores:
            await store.close()


@pytest.fixture(params=["postgres", "local"])
async def two_views(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RateBuckets, ...]]:
    """The same buckets seen by two users: two replicas' stores, or one process's memory."""
    if request.param == "local":
        local = LocalBuckets()
        yield local, local
        return
    async with fresh_schema() as url:
        first = await PgStore.open(url, max_size=4)
        try:
            second = await PgStore.open(url, max_size=4)
            try:
                yield first.rates, second.rates
            finally:
                await second.close()
        finally:
            await first.close()


class Sent:
    """The callbacks run through the limiters: when each ran (monotonic), for which chat."""

    def __init__(self) -> None:
        self.times: dict[object, list[float]] = {}

    def callback(self, chat_id: object) -> Any:
        async def send() -> bool:
            self.times.setdefault(chat_id, []).append(time.monotonic())
            return True

        return send

    def all(self) -> list[float]:
        return sorted(t for ts in self.times.values() for t in ts)


async def send(
    limiter: SharedRateLimiter, callback: Any, data: dict[str, Any], retries: int | None = None
) -> Any:
    return await limiter.process_request(callback, (), {}, "sendMessage", data, retries)


def assert_spaced(times: Sequence[float], start: float, interval: float, burst: int) -> None:
    """No more than `burst` callbacks, then one per interval, since `start`."""
    ordered = sorted(times)
    early = [
        (k, round(t - start, 4))
        for k, t in enumerate(ordered, start=1)
        if t - start < (k - burst) * interval - EPS
    ]
    assert early == [], f"ran before their slots (k, seconds after start): {early}"


async def bucket_keys(store: PgStore) -> set[str]:
    return {row[0] for row in await store.fetch_all("SELECT key FROM rate_buckets")}


# -- the buckets ---------------------------------------------------------------------------


async def test_reservations_from_two_users_get_distinct_slots_one_interval_apart(
    two_views: tuple[RateBuckets, RateBuckets],
) -> None:
    # An interval far longer than the test: every slot is in the queue, none in the past.
    interval, burst, n = 10.0, 3, 24
    first, second = two_views
    started = time.monotonic()
    waits = await asyncio.gather(
        *((first if i % 2 else second).reserve("all", interval, burst) for i in range(n))
    )
    elapsed = time.monotonic() - started
    # The k-th reservation waits (k - burst) intervals from the first one, less the time
    # that passed since then.
    for k, wait in enumerate(sorted(waits), start=1):
        slot = max(k - burst, 0) * interval
        assert slot - elapsed - EPS <= wait <= slot + EPS, (k, wait)


async def test_a_drained_bucket_lets_the_burst_go_at_once(
    two_views: tuple[RateBuckets, RateBuckets],
) -> None:
    first, second = two_views
    await first.reserve("k", 0.001, 1)
    await asyncio.sleep(0.01)  # drained: as if never used
    waits = [await (first, second)[i % 2].reserve("k", 5.0, 3) for i in range(4)]
    assert waits[:3] == [0, 0, 0]
    assert 5.0 - 1.0 < waits[3] <= 5.0 + EPS


async def test_the_second_bucket_is_reserved_only_when_the_first_lets_the_request_go(
    two_views: tuple[RateBuckets, RateBuckets],
) -> None:
    first, second = two_views
    group: Bucket = ("group", 10.0, 1)
    overall: Bucket = ("all", 10.0, 1)
    # A free group slot: the overall one is taken in the same call.
    assert await first.reserve_then(group, overall) == (0, True)
    # The group is busy now: the overall bucket is left alone...
    wait, both = await second.reserve_then(group, overall)
    assert not both and 10.0 - 1.0 < wait <= 10.0 + EPS
    # ... so it holds one reservation, not two: the next waits one interval.
    wait = await first.reserve(*overall)
    assert 10.0 - 1.0 < wait <= 10.0 + EPS
    # A busy overall bucket behind a free group: its wait is what comes back.
    wait, both = await second.reserve_then(("other group", 10.0, 1), overall)
    assert both and 20.0 - 1.0 < wait <= 20.0 + EPS


async def test_a_hold_stops_a_bucket_then_lets_it_go_one_at_a_time(
    two_views: tuple[RateBuckets, RateBuckets],
) -> None:
    first, second = two_views
    started = time.monotonic()
    await first.hold("all", 3.0, 1.0, 5)
    waits = [await second.reserve("all", 1.0, 5) for _ in range(2)]
    elapsed = time.monotonic() - started
    # The burst of 5 is gone: the first request waits out the hold, the next one more.
    assert 3.0 - elapsed - EPS <= waits[0] <= 3.0 + EPS
    assert 4.0 - elapsed - EPS <= waits[1] <= 4.0 + EPS
    # A hold shorter than the queue already there changes nothing.
    await second.hold("all", 0.5, 1.0, 5)
    assert 5.0 - 1.0 < await first.reserve("all", 1.0, 5) <= 5.0 + EPS


async def test_pruning_forgets_drained_buckets_only(
    two_views: tuple[RateBuckets, RateBuckets],
) -> None:
    first, second = two_views
    await first.reserve("drained", 0.001, 1)
    await first.reserve("queued", 60.0, 1)
    await asyncio.sleep(0.01)
    assert await second.prune() == 1
    assert await second.prune() == 0
    # "queued" kept its slot: the next request waits for it.
    assert await second.reserve("queued", 60.0, 1) > 50.0
    assert await second.reserve("drained", 60.0, 1) == 0


async def test_the_store_speaks_in_bot_errors_once_closed(replicas: list[PgStore]) -> None:
    store = replicas[0]
    await store.close()
    with pytest.raises(WriterClosed):
        await store.rates.reserve("all", 1.0, 1)


# -- the limiter ---------------------------------------------------------------------------


async def test_replicas_together_keep_to_the_overall_rate(replicas: list[PgStore]) -> None:
    rate, burst, n = 50.0, 5, 60
    limiters = [
        SharedRateLimiter(store.rates, overall_max_rate=rate, overall_burst=burst)
        for store in replicas
    ]
    sent = Sent()
    start = time.monotonic()
    results = await asyncio.gather(
        *(
            send(limiters[i % 3], sent.callback(1000 + i), {"chat_id": 1000 + i, "text": "hi"})
            for i in range(n)
        )
    )
    assert results == [True] * n
    times = sent.all()
    assert len(times) == n
    # One replica alone would have let its third of them go three times as fast.
    assert_spaced(times, start, 1 / rate, burst)
    assert times[-1] - start >= (n - burst) / rate - EPS
    # Private chats have no bucket of their own.
    assert await bucket_keys(replicas[0]) == {"tg:all"}


async def test_each_group_keeps_to_its_own_rate_across_replicas(replicas: list[PgStore]) -> None:
    group_rate, group_burst, overall_rate, overall_burst = 10.0, 2, 100.0, 10
    limiters = [
        SharedRateLimiter(
            store.rates,
            overall_max_rate=overall_rate,
            overall_burst=overall_burst,
            group_max_rate=group_rate,
            group_time_period=1.0,
            group_burst=group_burst,
        )
        for store in replicas
    ]
    sent = Sent()
    chats = [-100, -200, 7]  # two groups and a private chat
    per_chat = 10
    start = time.monotonic()
    await asyncio.gather(
        *(
            send(limiters[i % 3], sent.callback(chat), {"chat_id": chat, "text": "hi"})
            for i in range(per_chat)
            for chat in chats
        )
    )
    for group in (-100, -200):
        assert len(sent.times[group]) == per_chat
        assert_spaced(sent.times[group], start, 1 / group_rate, group_burst)
    assert_spaced(sent.all(), start, 1 / overall_rate, overall_burst)
    # One bucket per group, shared by the replicas, and the bot's; none for the private chat.
    assert await bucket_keys(replicas[0]) == {"tg:all", "tg:chat:-100", "tg:chat:-200"}


async def test_which_requests_count_as_aioratelimiter_decides(replicas: list[PgStore]) -> None:
    limiter = SharedRateLimiter(replicas[0].rates, overall_max_rate=1000, group_max_rate=1000)
    sent = Sent()
    # No chat (getMe, answerCallbackQuery...): not limited at all.
    await send(limiter, sent.callback(None), {"callback_query_id": "1"})
    assert await bucket_keys(replicas[0]) == set()
    # A group's id as a string is the same group; an @username is a supergroup or channel;
    # a positive id as a string is a private chat.
    for chat_id in ("-100", -100, "@channel", "42"):
        await send(limiter, sent.callback(chat_id), {"chat_id": chat_id})
    assert await bucket_keys(replicas[0]) == {"tg:all", "tg:chat:-100", "tg:chat:@channel"}
    # A paid broadcast counts against the paid rate only.
    before = await replicas[0].fetch_all("SELECT key, tat FROM rate_buckets ORDER BY key")
    await send(limiter, sent.callback(-300), {"chat_id": -300, "allow_paid_broadcast": True})
    after = await replicas[0].fetch_all("SELECT key, tat FROM rate_buckets ORDER BY key")
    assert [row for row in after if row[0] != "tg:paid"] == before
    assert "tg:paid" in {row[0] for row in after}
    assert len(sent.all()) == 6


async def test_a_limit_of_zero_is_off(replicas: list[PgStore]) -> None:
    limiter = SharedRateLimiter(replicas[0].rates, overall_max_rate=0, group_max_rate=0)
    sent = Sent()
    await asyncio.gather(*(send(limiter, sent.callback(-5), {"chat_id": -5}) for _ in range(5)))
    assert len(sent.all()) == 5
    assert await bucket_keys(replicas[0]) == set()


class Flooded:
    """A callback Telegram answers with RetryAfter `times` times, then lets through."""

    def __init__(self, times: int, retry_after: float) -> None:
        self.left = times
        self.retry_after = retry_after
        self.calls: list[float] = []
        self.refused = asyncio.Event()

    async def __call__(self) -> bool:
        self.calls.append(time.monotonic())
        if self.left:
            self.left -= 1
            self.refused.set()
            raise RetryAfter(dtm.timedelta(seconds=self.retry_after))
        return True


async def test_a_retry_after_is_waited_out_and_retried_up_to_max_retries(
    replicas: list[PgStore], caplog: pytest.LogCaptureFixture
) -> None:
    limiter = SharedRateLimiter(replicas[0].rates, overall_max_rate=1000, max_retries=2)
    flooded = Flooded(times=2, retry_after=0.2)
    assert await send(limiter, flooded, {"chat_id": 1}) is True
    assert len(flooded.calls) == 3
    gaps = [b - a for a, b in zip(flooded.calls, flooded.calls[1:], strict=False)]
    assert all(gap >= 0.2 + 0.1 - EPS for gap in gaps), gaps

    # One more refusal than retries: the last RetryAfter reaches the caller.
    flooded = Flooded(times=3, retry_after=0.05)
    with caplog.at_level(logging.ERROR, logger="bot.ratelimit"), pytest.raises(RetryAfter):
        await send(limiter, flooded, {"chat_id": 1})
    assert len(flooded.calls) == 3
    assert "after 2 retries" in caplog.text

    # The request's own rate_limit_args overrides max_retries, as in AIORateLimiter.
    flooded = Flooded(times=3, retry_after=0.05)
    assert await send(limiter, flooded, {"chat_id": 1}, retries=3) is True
    assert len(flooded.calls) == 4
    no_retries = SharedRateLimiter(replicas[0].rates, overall_max_rate=1000)
    flooded = Flooded(times=1, retry_after=0.05)
    with pytest.raises(RetryAfter):
        await send(no_retries, flooded, {"chat_id": 1})
    assert len(flooded.calls) == 1


class Watched:
    """Shared buckets that say when a hold has landed."""

    def __init__(self, inner: RateBuckets) -> None:
        self.inner = inner
        self.held = asyncio.Event()

    async def reserve(self, key: str, interval: float, burst: float) -> float:
        return await self.inner.reserve(key, interval, burst)

    async def reserve_then(self, first: Bucket, then: Bucket) -> tuple[float, bool]:
        return await self.inner.reserve_then(first, then)

    async def hold(self, key: str, seconds: float, interval: float, burst: float) -> None:
        await self.inner.hold(key, seconds, interval, burst)
        self.held.set()

    async def prune(self) -> int:
        return await self.inner.prune()


async def test_a_retry_after_holds_this_process_and_the_other_replicas(
    replicas: list[PgStore],
) -> None:
    watched = Watched(replicas[0].rates)
    limiters = [
        SharedRateLimiter(buckets, overall_max_rate=1000, max_retries=1)
        for buckets in (watched, replicas[1].rates)
    ]
    flooded = Flooded(times=1, retry_after=0.3)
    retried = asyncio.create_task(send(limiters[0], flooded, {"chat_id": 1}))
    await asyncio.wait_for(flooded.refused.wait(), 10)
    refused_at = flooded.calls[0]
    await asyncio.wait_for(watched.held.wait(), 10)
    sent = Sent()
    # Requests asked for after the refusal, in the same process and in another replica.
    await asyncio.gather(
        send(limiters[0], sent.callback("same"), {"chat_id": 2}),
        send(limiters[1], sent.callback("other"), {"chat_id": 3}),
        send(limiters[0], sent.callback("no chat"), {"callback_query_id": "1"}),
    )
    assert await retried is True
    for name in ("same", "other", "no chat"):
        assert sent.times[name][0] >= refused_at + 0.3 + 0.1 - EPS, name


async def test_without_the_database_each_process_limits_itself(
    replicas: list[PgStore], caplog: pytest.LogCaptureFixture
) -> None:
    rate, burst, n = 50.0, 3, 20
    limiter = SharedRateLimiter(replicas[0].rates, overall_max_rate=rate, overall_burst=burst)
    await replicas[0].close()
    sent = Sent()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bot.ratelimit"):
        await asyncio.gather(*(send(limiter, sent.callback(i), {"chat_id": i}) for i in range(n)))
    assert len(sent.all()) == n
    assert_spaced(sent.all(), start, 1 / rate, burst)
    warnings = [r for r in caplog.records if "shared rate limits unavailable" in r.message]
    assert len(warnings) == 1  # said once, not once a request

    # Attached to a store that works, it shares again.
    limiter.attach(replicas[1].rates)
    await send(limiter, sent.callback(-9), {"chat_id": -9})
    assert await bucket_keys(replicas[1]) == {"tg:all", "tg:chat:-9"}
    assert "shared rate limits available again" in caplog.text
