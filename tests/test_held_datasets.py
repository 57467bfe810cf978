"""Datasets /train holds until "start", shared by replicas over one PostgreSQL (issue #16).

Each replica here is a FineTuner of its own: its own datasets folder, its own PgStore on the
same schema, and its own SQLite for the log it builds from and the jobs it records (what is
shared here is only where held datasets wait). Jobs start through the real OpenAI client
against the stand-in server, which keeps every uploaded file's bytes.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from openai import AsyncOpenAI, DefaultAioHttpClient

from bot.domain import ChatKey, JobRecord, TurnRecord
from bot.services.dataset import DatasetOptions, DatasetReport
from bot.services.finetune import FineTuner, describe
from bot.services.held import (
    Held,
    HeldDatasets,
    MemoryHeldDatasets,
    StoredHeldDatasets,
    remove_copies,
)
from bot.services.trainer import OpenAITrainer, Trainer, TrainerError
from storage.db import Store
from storage.pg.db import PgStore
from tests.pg import fresh_schema, pg_url  # noqa: F401
from tests.stubs.openai_server import API_KEY, FakeOpenAI

ADMIN = 42
MODEL = "gpt-4.1-mini-2025-04-14"
START = datetime(2026, 1, 1, tzinfo=UTC)
OPTIONS = DatasetOptions(since="2026-01-01T00:00:00+00:00", min_examples=5)
PATHS = ("train_path", "validation_path", "test_path")


@dataclass
class Replica:
    tuner: FineTuner
    log: Store  # the log it builds from, and the jobs it records
    pg: PgStore
    datasets: Path


@asynccontextmanager
async def replica(root: Path, url: str, trainer: Trainer) -> AsyncIterator[Replica]:
    await asyncio.to_thread(root.mkdir, parents=True)
    log = await Store.open(root / "log.sqlite3")
    pg = await PgStore.open(url, max_size=4)
    datasets = root / "datasets"
    tuner = FineTuner(
        log.jobs,
        trainer,
        dataset=log.dataset,
        datasets_dir=datasets,
        base_model=MODEL,
        suffix="parley",
        epochs=1,
        held=StoredHeldDatasets(pg.held, datasets),
    )
    try:
        yield Replica(tuner, log, pg, datasets)
    finally:
        await pg.close()
        await log.close()


@pytest.fixture
async def trainer(oai: FakeOpenAI) -> AsyncIterator[Trainer]:
    client = AsyncOpenAI(
        api_key=API_KEY, base_url=oai.url, max_retries=0, http_client=DefaultAioHttpClient()
    )
    try:
        yield OpenAITrainer(client, epochs=1)
    finally:
        await client.close()


@pytest.fixture
async def two(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
    trainer: Trainer,
) -> AsyncIterator[tuple[Replica, Replica]]:
    """Replicas A and B; A's log has conversations enough for a dataset with a test split."""
    async with (
        replica(tmp_path / "a", pg_url, trainer) as a,
        replica(tmp_path / "b", pg_url, trainer) as b,
    ):
        await _seed(a.log, 14)
        a.tuner.test_split = (0.2, 10, 1)
        yield a, b


async def _seed(store: Store, conversations: int) -> None:
    """Two-turn conversations, one example each; the first gives away an email address."""
    minute = 0
    for n in range(conversations):
        key = ChatKey(1000 + n)
        thread = await store.threads.create(key, "openai")
        for text in (f"hello from {n}", f"tell me more about topic {n}"):
            minute += 1
            if n == 0 and minute == 1:
                text += ", write to ada@example.com"
            await store.threads.record_turn(
                TurnRecord(
                    thread_id=thread.id,
                    key=key,
                    chat_type="private",
                    user_id=key.chat_id,
                    user_message_id=minute,
                    user_text=text,
                    model="m",
                    instructions="Be nice.",
                    started_at=(START + timedelta(minutes=minute)).isoformat(),
                    assistant_text=f"answer {minute}",
                    reply_message_ids=[10_000 + minute],
                )
            )
        await store.threads.close(key)


def _contents(report: DatasetReport) -> dict[str, bytes]:
    return {
        attr: path.read_bytes() for attr in PATHS if (path := getattr(report, attr)) is not None
    }


def _read(path: Path | None) -> bytes:
    assert path is not None
    return path.read_bytes()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _keep_tests(kept: dict[str, bytes]) -> Callable[[JobRecord, Path], Awaitable[int]]:
    async def keep(job: JobRecord, path: Path) -> int:
        kept[job.job_id] = await asyncio.to_thread(path.read_bytes)
        return 1

    return keep


# -- replicas ---------------------------------------------------------------------------------


async def test_a_dataset_one_replica_held_another_starts_with_the_same_files(
    two: tuple[Replica, Replica], oai: FakeOpenAI
) -> None:
    a, b = two
    report = await a.tuner.build(OPTIONS)
    assert report.ok and report.validation_path and report.test_path
    assert report.redactions["email"] == 1
    built = _contents(report)
    token = await a.tuner.hold(report, OPTIONS, ADMIN)
    kept: dict[str, bytes] = {}
    b.tuner.keep_test_split = _keep_tests(kept)
    assert _files(b.datasets) == []  # nothing of it on B's disk

    job = await b.tuner.start(token, ADMIN)

    assert oai.files[job.training_file or ""]["data"] == built["train_path"]
    assert oai.files[job.validation_file or ""]["data"] == built["validation_path"]
    assert kept == {job.job_id: built["test_path"]}  # the evaluation kept the test split
    assert (job.train_examples, job.validation_examples, job.tokens) == (
        report.train_examples,
        report.validation_examples,
        report.tokens,
    )
    assert job.description == describe(OPTIONS, report)
    assert (job.dataset_since, job.dataset_chat_id) == (OPTIONS.since, None)
    assert [j.job_id for j in await b.log.jobs.recent()] == [job.job_id]
    # B's copies went once the job started; A's own files stay where A built them.
    assert _files(b.datasets) == []
    assert _contents(report) == built
    # Started: no replica can start it again.
    for tuner in (a.tuner, b.tuner):
        with pytest.raises(KeyError):
            await tuner.start(token, ADMIN)
    assert len(oai.jobs) == 1


async def test_two_replicas_pressing_start_at_once_start_one_job(
    two: tuple[Replica, Replica], oai: FakeOpenAI
) -> None:
    a, b = two
    report = await a.tuner.build(OPTIONS)
    token = await a.tuner.hold(report, OPTIONS, ADMIN)

    results = await asyncio.gather(
        a.tuner.start(token, ADMIN), b.tuner.start(token, ADMIN), return_exceptions=True
    )

    started = [r for r in results if isinstance(r, JobRecord)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(started) == 1 and len(refused) == 1
    assert isinstance(refused[0], KeyError)  # the handler's "expired" path
    assert list(oai.jobs) == [started[0].job_id]
    assert _files(b.datasets) == []


async def test_a_start_the_trainer_refuses_leaves_the_dataset_startable(
    two: tuple[Replica, Replica], oai: FakeOpenAI
) -> None:
    a, b = two
    report = await a.tuner.build(OPTIONS)
    built = _contents(report)
    token = await a.tuner.hold(report, OPTIONS, ADMIN)
    oai.fine_tuning_forbidden = True

    with pytest.raises(TrainerError) as refused:
        await b.tuner.start(token, ADMIN)

    assert refused.value.kind == "permission" and oai.jobs == {}
    assert _files(b.datasets) == []  # put back in the store, not left on B's disk
    oai.fine_tuning_forbidden = False
    # B put back what it took from its own copies: the retry uploads the same bytes.
    job = await b.tuner.start(token, ADMIN)
    assert oai.files[job.training_file or ""]["data"] == built["train_path"]
    assert oai.files[job.validation_file or ""]["data"] == built["validation_path"]
    assert list(oai.jobs) == [job.job_id]


async def test_forgetting_on_one_replica_lets_every_held_dataset_go(
    two: tuple[Replica, Replica], oai: FakeOpenAI
) -> None:
    a, b = two
    report = await a.tuner.build(OPTIONS)
    tokens = [await a.tuner.hold(report, OPTIONS, ADMIN) for _ in range(2)]
    assert await a.pg.fetch_all("SELECT count(*) FROM held_dataset_files") == [(6,)]

    await b.tuner.forget_datasets()

    for tuner in (a.tuner, b.tuner):
        for token in tokens:
            with pytest.raises(KeyError):
                await tuner.start(token, ADMIN)
    # The files' contents (they may hold the forgotten words) are gone from the database.
    assert await a.pg.fetch_all("SELECT count(*) FROM held_datasets") == [(0,)]
    assert await a.pg.fetch_all("SELECT count(*) FROM held_dataset_files") == [(0,)]
    assert oai.files == {} and oai.jobs == {}


async def test_cancel_on_one_replica_drops_it_for_the_other(
    two: tuple[Replica, Replica], oai: FakeOpenAI
) -> None:
    a, b = two
    report = await a.tuner.build(OPTIONS)
    token = await a.tuner.hold(report, OPTIONS, ADMIN)

    assert await b.tuner.drop(token) is True

    assert await a.tuner.drop(token) is False
    with pytest.raises(KeyError):
        await a.tuner.start(token, ADMIN)
    assert oai.jobs == {}


# -- the store's part: concurrency, expiry, the limit ----------------------------------------


async def test_of_many_takes_at_once_from_two_stores_exactly_one_gets_each_dataset() -> None:
    async with fresh_schema() as url:
        one, other = await PgStore.open(url, max_size=4), await PgStore.open(url, max_size=4)
        try:
            tokens = [f"t{n}" for n in range(6)]
            for token in tokens:
                await one.held.hold(
                    token, ADMIN, {"n": token}, {"train": token.encode() * 1000}, ttl=60, limit=20
                )
            takes = [
                store.held.take(token, ttl=60)
                for token in tokens
                for store in (one, other, one, other)
            ]
            results = await asyncio.gather(*takes)
            got = [r for r in results if r is not None]
            assert sorted(held["n"] for _, held, _, _ in got) == tokens
            assert all(files == {"train": held["n"].encode() * 1000} for _, held, files, _ in got)
            assert await one.fetch_all("SELECT count(*) FROM held_dataset_files") == [(0,)]
        finally:
            await one.close()
            await other.close()


async def test_expiry_is_by_age_and_a_put_back_dataset_keeps_its_age(
    pg_url: str,  # noqa: F811
) -> None:
    store = await PgStore.open(pg_url, max_size=2)
    try:
        part = store.held
        await part.hold("t", ADMIN, {"a": 1}, {"train": b"x"}, ttl=60, limit=20)
        taken = await part.take("t", ttl=60)
        assert taken is not None and taken[:3] == (ADMIN, {"a": 1}, {"train": b"x"})
        assert 0 <= taken[3] < 60

        await part.put_back("t", ADMIN, {"a": 1}, {"train": b"x"}, age=100)
        assert await part.take("t", ttl=99) is None  # expired: and gone with it
        assert await part.drop("t") is False

        await part.put_back("t", ADMIN, {"a": 1}, {"train": b"x"}, age=100)
        again = await part.take("t", ttl=3600)
        assert again is not None and 100 <= again[3] < 3600
        # Holding lets the expired ones go (by the server's clock).
        await part.put_back("old", ADMIN, {}, {"train": b"y"}, age=100)
        await part.hold("new", ADMIN, {}, {"train": b"z"}, ttl=50, limit=20)
        assert await store.fetch_all("SELECT token FROM held_datasets") == [("new",)]
    finally:
        await store.close()


# -- both kinds of HeldDatasets --------------------------------------------------------------

Factory = Callable[..., HeldDatasets]


@pytest.fixture(params=["memory", "postgres"])
async def kind(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Makes HeldDatasets of one kind; the stored kind copies files into `tmp_path/replica`."""
    if request.param == "memory":
        yield lambda **limits: MemoryHeldDatasets(**limits)
        return
    async with fresh_schema() as url:
        store = await PgStore.open(url, max_size=2)
        try:
            yield lambda **limits: StoredHeldDatasets(store.held, tmp_path / "replica", **limits)
        finally:
            await store.close()


def _held(root: Path, n: int = 0) -> Held:
    """A held dataset whose files are in `root/built-n`."""
    folder = root / f"built-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_bytes(f'{{"n": {n}}}\n'.encode() * 50)
    (folder / "test.jsonl").write_text('{"context": []}\n')
    report = DatasetReport(
        examples=50,
        train_examples=50,
        tokens=1234,
        dropped=Counter({"duplicate": 2, "invalid:role": 1}),
        redactions=Counter({"phone": 3}),
        train_path=folder / "train.jsonl",
        estimated_cost_usd=0.25,
        test_items=1,
        test_path=folder / "test.jsonl",
    )
    return Held(report, DatasetOptions(chat_id=-100, include_photos=True), ADMIN + n)


def _without_paths(report: DatasetReport) -> DatasetReport:
    return replace(report, train_path=None, validation_path=None, test_path=None)


async def test_a_held_dataset_comes_back_whole_once(kind: Factory, tmp_path: Path) -> None:
    held = kind()
    original = _held(tmp_path / "builder")
    await held.hold("t", original)

    back = await held.take("t")

    assert back is not None and await held.take("t") is None
    assert _without_paths(back.report) == _without_paths(original.report)
    assert isinstance(back.report.dropped, Counter) and back.report.dropped["duplicate"] == 2
    assert (back.options, back.admin_id) == (original.options, original.admin_id)
    assert back.report.validation_path is None
    assert back.report.train_path and back.report.test_path
    assert _read(back.report.train_path) == _read(original.report.train_path)
    assert _read(back.report.test_path) == _read(original.report.test_path)
    assert set(back.copied) <= {back.report.train_path, back.report.test_path}
    remove_copies(back.copied)
    assert _files(tmp_path / "replica") == []
    assert _contents(original.report)  # the builder's files are untouched


async def test_a_dropped_cleared_or_expired_dataset_is_gone(kind: Factory, tmp_path: Path) -> None:
    held = kind()
    for n, token in enumerate(("dropped", "cleared-1", "cleared-2")):
        await held.hold(token, _held(tmp_path, n))
    assert await held.drop("dropped") is True and await held.drop("dropped") is False
    assert await held.take("dropped") is None
    assert await held.clear() == 2
    assert await held.take("cleared-1") is None and await held.take("cleared-2") is None

    expiring = kind(ttl=0)
    await expiring.hold("t", _held(tmp_path))
    assert await expiring.take("t") is None


async def test_holding_beyond_the_limit_lets_the_oldest_go(kind: Factory, tmp_path: Path) -> None:
    held = kind(limit=3)
    for n in range(4):
        await held.hold(f"t{n}", _held(tmp_path, n))
    assert await held.take("t0") is None
    for n in (1, 2, 3):
        back = await held.take(f"t{n}")
        assert back is not None and back.admin_id == ADMIN + n


async def test_a_put_back_dataset_waits_only_the_rest_of_its_time(
    kind: Factory, tmp_path: Path
) -> None:
    held = kind(ttl=50)
    await held.hold("t", _held(tmp_path))
    back = await held.take("t")
    assert back is not None and back.age < 50
    await held.put_back("t", back)
    again = await held.take("t")
    assert again is not None and again.age >= back.age
    again.age = 60  # as if it had been taken late and the trainer then refused it
    await held.put_back("t", again)
    assert await held.take("t") is None


async def test_the_building_replica_takes_its_own_files_without_copying(tmp_path: Path) -> None:
    async with fresh_schema() as url:
        store = await PgStore.open(url, max_size=2)
        try:
            held = StoredHeldDatasets(store.held, tmp_path / "builder")
            original = _held(tmp_path / "builder")
            await held.hold("t", original)
            back = await held.take("t")
            assert back is not None and back.copied == ()
            assert back.report.train_path == original.report.train_path
            assert back.report.test_path == original.report.test_path
        finally:
            await store.close()


async def test_a_file_of_the_same_name_but_other_contents_is_never_overwritten(
    tmp_path: Path,
) -> None:
    async with fresh_schema() as url:
        store = await PgStore.open(url, max_size=2)
        try:
            held = StoredHeldDatasets(store.held, tmp_path / "replica")
            original = _held(tmp_path / "builder")
            mine = tmp_path / "replica" / "built-0" / "train.jsonl"
            mine.parent.mkdir(parents=True)
            mine.write_bytes(b"this replica's own file\n")
            await held.hold("t", original)
            back = await held.take("t")
            assert back is not None and back.report.train_path != mine
            assert _read(back.report.train_path) == _read(original.report.train_path)
            remove_copies(back.copied)
            assert _files(tmp_path / "replica") == [mine]
            assert mine.read_bytes() == b"this replica's own file\n"
        finally:
            await store.close()


async def test_a_replica_that_cannot_write_the_files_leaves_the_dataset_held(
    tmp_path: Path,
) -> None:
    async with fresh_schema() as url:
        store = await PgStore.open(url, max_size=2)
        try:
            blocked = tmp_path / "not-a-folder"
            blocked.write_text("a file where the datasets folder should be")
            original = _held(tmp_path / "builder")
            await StoredHeldDatasets(store.held, tmp_path / "builder").hold("t", original)

            with pytest.raises(OSError):
                await StoredHeldDatasets(store.held, blocked).take("t")

            back = await StoredHeldDatasets(store.held, tmp_path / "replica").take("t")
            assert back is not None and back.admin_id == original.admin_id
            assert _read(back.report.train_path) == _read(original.report.train_path)
        finally:
            await store.close()
