"""The fine-tuning dataset builder, on real databases (SQLite and PostgreSQL) written through
the store's API."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bot.domain import DOCUMENT_CUT, ChatKey, StoredImage, Thread, TurnRecord, utcnow
from bot.services import dataset
from bot.services.dataset import (
    DatasetOptions,
    DatasetReport,
    build_dataset,
    fast_estimate_tokens,
    redact,
    validate_example,
)
from bot.services.tokens import estimate_tokens
from storage.dataset import DatasetSource
from storage.pg.db import PgStore
from tests.pg import AnyStore, open_either

START = datetime(2026, 1, 1, tzinfo=UTC)
SYSTEM = "Be nice."
ONE = DatasetOptions(min_examples=1, validation_fraction=0)  # no problems, no split


class Log:
    """Writes turns through the real Store API with increasing start times."""

    def __init__(self, store: AnyStore) -> None:
        self.store = store
        self.clock = 0
        self.reply_id = 1000

    async def thread(self, chat_id: int = 1, topic_id: int = 0) -> Thread:
        await self.store.threads.close(ChatKey(chat_id, topic_id))
        return await self.store.threads.create(ChatKey(chat_id, topic_id), "openai")

    async def turn(
        self,
        thread: Thread | None,
        user: str,
        answer: str | None = "ok",
        *,
        user_id: int = 7,
        status: str = "ok",
        instructions: str = SYSTEM,
        chat_id: int | None = None,
        user_sentiment: str | None = None,
        images: Sequence[StoredImage] = (),
        at: datetime | None = None,
    ) -> tuple[int, int]:
        """Record a turn; returns (turn id, Telegram message id of its reply)."""
        self.clock += 1
        self.reply_id += 1
        started = (at or START + timedelta(minutes=self.clock)).isoformat(timespec="milliseconds")
        key = thread.key if thread else ChatKey(chat_id or 1)
        turn_id = await self.store.threads.record_turn(
            TurnRecord(
                thread_id=thread.id if thread else None,
                key=key,
                chat_type="private",
                user_id=user_id,
                user_message_id=self.clock,
                user_text=user,
                model="m",
                instructions=instructions,
                started_at=started,
                status=status,
                error_kind="timeout" if status == "failed" else None,
                assistant_text=answer if status == "ok" else None,
                reply_message_ids=[self.reply_id] if status == "ok" else [],
                images=images,
                user_sentiment=(user_sentiment, 0.9, "lexicon") if user_sentiment else None,
            )
        )
        return turn_id, self.reply_id

    async def opt_out(self, user_id: int) -> None:
        """Opt a user out of datasets (as /forget does, without forgetting them)."""
        sql = "INSERT INTO opted_out_users (user_id, created_at) VALUES (?, ?)"
        params = (user_id, utcnow())
        store = self.store
        if isinstance(store, PgStore):
            async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as conn:
                await conn.execute(sql.replace("?", "%s"), params)
        else:
            await store.write(lambda conn: conn.execute(sql, params))

    def build(
        self, out: Path, options: DatasetOptions = ONE, model: str = "gpt-4.1-mini-2025-04-14"
    ) -> DatasetReport:
        return build_dataset(self.store.dataset, out, options, base_model=model)


@pytest.fixture(params=["sqlite", "postgres"])
async def log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Log]:
    """A log in a store of either kind, on a database of its own."""
    async with open_either(request.param, tmp_path) as store:
        yield Log(store)


def read(path: Path | None) -> list[dict[str, Any]]:
    assert path is not None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def examples(report: DatasetReport) -> list[dict[str, Any]]:
    rows = read(report.train_path)
    if report.validation_path is not None:
        rows += read(report.validation_path)
    return rows


def texts(example: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(m["role"], m["content"]) for m in example["messages"]]


# -- examples and windows -------------------------------------------------------------------


async def test_a_simple_thread_becomes_one_example_in_order(log: Log, tmp_path: Path) -> None:
    thread = await log.thread()
    await log.turn(thread, "hello", "hi there")
    await log.turn(thread, "how are you?", "fine, thanks")
    report = await asyncio.to_thread(log.build, tmp_path / "out")  # how the bot calls it
    assert report.ok and report.examples == report.train_examples == 1
    assert report.validation_path is None
    [example] = read(report.train_path)
    assert texts(example) == [
        ("system", SYSTEM),
        ("user", "hello"),
        ("assistant", "hi there"),
        ("user", "how are you?"),
        ("assistant", "fine, thanks"),
    ]
    parts = (SYSTEM, "hello", "hi there", "how are you?", "fine, thanks")
    expected = sum(estimate_tokens(t) for t in parts)
    assert report.tokens == expected
    assert report.estimated_cost_usd == pytest.approx(expected * 3 * 5.00 / 1e6, abs=1e-4)
    assert not report.dropped


async def test_windows_split_by_token_limit_and_too_long_turns_are_dropped(
    log: Log, tmp_path: Path
) -> None:
    thread = await log.thread()
    system_tokens = estimate_tokens(SYSTEM)
    for n in range(3):  # each turn: 2 * (4 + 10) = 28 tokens
        await log.turn(thread, f"{n}" * 40, f"{n}a" * 20)
    await log.turn(thread, "x" * 4000, "too long")  # alone it exceeds the limit
    await log.turn(thread, "after", "the long one")
    limit = system_tokens + 56
    options = DatasetOptions(min_examples=1, validation_fraction=0, max_tokens_per_example=limit)
    report = log.build(tmp_path / "out", options)
    got = [len(e["messages"]) for e in read(report.train_path)]
    assert got == [5, 3, 3]  # two turns fit, then the third alone, then the turn after the long one
    assert report.dropped == Counter({"too_long": 1})
    for example in read(report.train_path):
        assert validate_example(example, options.max_tokens_per_example) is None


async def test_a_window_never_mixes_instructions(log: Log, tmp_path: Path) -> None:
    thread = await log.thread()
    await log.turn(thread, "one", "1", instructions="Old rules.")
    await log.turn(thread, "two", "2", instructions="New rules.")
    await log.turn(thread, "three", "3", instructions="New rules.")
    report = log.build(tmp_path / "out")
    assert [texts(e) for e in read(report.train_path)] == [
        [("system", "Old rules."), ("user", "one"), ("assistant", "1")],
        [
            ("system", "New rules."),
            ("user", "two"),
            ("assistant", "2"),
            ("user", "three"),
            ("assistant", "3"),
        ],
    ]


async def test_a_failed_turn_splits_the_thread(log: Log, tmp_path: Path) -> None:
    thread = await log.thread()
    await log.turn(thread, "before", "answer one")
    await log.turn(thread, "this failed", status="failed")
    await log.turn(thread, "after", "answer two")
    report = log.build(tmp_path / "out")
    assert [texts(e)[1:] for e in read(report.train_path)] == [
        [("user", "before"), ("assistant", "answer one")],
        [("user", "after"), ("assistant", "answer two")],
    ]
    assert report.dropped == Counter({"failed": 1})


async def test_turns_of_opted_out_users_are_left_out(log: Log, tmp_path: Path) -> None:
    thread = await log.thread(chat_id=-100)
    await log.turn(thread, "from alice", "hi alice", user_id=1)
    await log.turn(thread, "from bob, who opted out", "hi bob", user_id=2)
    await log.turn(thread, "alice again", "hi again", user_id=1)
    await log.opt_out(2)
    report = log.build(tmp_path / "out")
    dump = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8")
    assert "bob" not in dump
    assert report.examples == 2 and report.dropped == Counter({"opted_out": 1})


async def test_a_turn_with_negative_reactions_is_left_out(log: Log, tmp_path: Path) -> None:
    thread = await log.thread()
    _, disliked = await log.turn(thread, "q1", "bad answer")
    _, mixed = await log.turn(thread, "q2", "debated answer")
    _, liked = await log.turn(thread, "q3", "good answer")
    assert await log.store.stats.set_reactions(1, disliked, 5, [("👎", -1)])
    assert await log.store.stats.set_reactions(1, mixed, 5, [("👎", -1)])
    assert await log.store.stats.set_reactions(1, mixed, 6, [("👍", 1)])  # sums to 0: kept
    assert await log.store.stats.set_reactions(1, liked, 5, [("👍", 1)])
    report = log.build(tmp_path / "out")
    [example] = read(report.train_path)
    assert [c for r, c in texts(example) if r == "assistant"] == ["debated answer", "good answer"]
    assert report.dropped == Counter({"negative_reaction": 1})


async def test_an_answer_followed_by_a_negative_message_is_left_out(
    log: Log, tmp_path: Path
) -> None:
    thread = await log.thread()
    await log.turn(thread, "q1", "fine answer")
    await log.turn(thread, "q2", "wrong answer")
    await log.turn(thread, "that is wrong, you are useless", "sorry", user_sentiment="negative")
    other = await log.thread(chat_id=2)  # a negative first message of another thread: no effect
    await log.turn(other, "this is awful", "let me help", user_sentiment="negative")
    report = log.build(tmp_path / "out")
    got = [[c for r, c in texts(e) if r == "assistant"] for e in read(report.train_path)]
    assert got == [["fine answer"], ["sorry"], ["let me help"]]
    assert report.dropped == Counter({"negative_followup": 1})


async def test_identical_examples_are_dropped(log: Log, tmp_path: Path) -> None:
    for chat in (1, 2, 3):
        thread = await log.thread(chat_id=chat)
        await log.turn(thread, "/start", "Hello! I am Parley.")
    report = log.build(tmp_path / "out")
    assert report.examples == 1 and report.dropped == Counter({"duplicate": 2})


async def test_a_turn_without_a_thread_is_its_own_example(log: Log, tmp_path: Path) -> None:
    await log.turn(None, "no thread one", "a1")
    await log.turn(None, "no thread two", "a2")
    report = log.build(tmp_path / "out")
    assert report.examples == 2


async def test_turns_are_read_threadless_first_then_by_conversation_and_turn(
    log: Log, tmp_path: Path
) -> None:
    first, second = await log.thread(chat_id=1), await log.thread(chat_id=2)
    await log.turn(second, "second thread, one", "s1")
    await log.turn(None, "no thread, one", "n1", chat_id=3)
    await log.turn(first, "first thread, one", "f1")
    await log.turn(second, "second thread, two", "s2")
    await log.turn(None, "no thread, two", "n2", chat_id=3)
    with log.store.dataset.snapshot() as snapshot:
        read_in_order = [(t.user_text, t.assistant_text) for t in snapshot.turns(None, None)]
    assert read_in_order == [
        ("no thread, one", "n1"),
        ("no thread, two", "n2"),
        ("first thread, one", "f1"),
        ("second thread, one", "s1"),
        ("second thread, two", "s2"),
    ]
    # The examples come out in that order too.
    report = log.build(tmp_path / "out")
    assert [texts(e)[1][1] for e in read(report.train_path)] == [
        "no thread, one",
        "no thread, two",
        "first thread, one",
        "second thread, one",
    ]


async def test_a_snapshot_reads_the_log_as_it_was_when_it_began(log: Log) -> None:
    thread = await log.thread()
    await log.turn(thread, "before", "answered before")
    with log.store.dataset.snapshot() as snapshot:
        assert snapshot.conversation_count(None, None) == 1  # its first read: it begins
        other = await log.thread(chat_id=2)
        await log.turn(thread, "during", "answered during")
        await log.turn(other, "elsewhere", "answered elsewhere")
        await log.opt_out(7)
        assert [t.user_text for t in snapshot.turns(None, None)] == ["before"]
        assert snapshot.conversation_count(None, None) == 1
        assert snapshot.opted_out_users() == set()
    with log.store.dataset.snapshot() as snapshot:
        assert [t.user_text for t in snapshot.turns(None, None)] == [
            "before",
            "during",
            "elsewhere",
        ]
        assert snapshot.opted_out_users() == {7}


# -- redaction ------------------------------------------------------------------------------


async def test_personal_data_is_redacted_and_counted(log: Log, tmp_path: Path) -> None:
    thread = await log.thread()
    await log.turn(
        thread,
        "I am jane.doe+bot@mail.example.org, call +1 (555) 123-4567, card 4111 1111 1111 1111",
        "Noted. Order 1234 5678 9012 3456 ships in 2026.",
    )
    report = log.build(tmp_path / "out")
    [example] = read(report.train_path)
    assert texts(example)[1:] == [
        ("user", "I am [email], call [phone], card [card]"),
        ("assistant", "Noted. Order 1234 5678 9012 3456 ships in 2026."),  # fails Luhn: kept
    ]
    assert report.redactions == Counter({"email": 1, "phone": 1, "card": 1})


@pytest.mark.parametrize(
    ("text", "expected", "counts"),
    [
        ("mail a.b@example.com now", "mail [email] now", {"email": 1}),
        ("+44 20 7946 0958", "[phone]", {"phone": 1}),
        ("call 555-1234.", "call [phone].", {"phone": 1}),
        ("8 (916) 123-45-67", "[phone]", {"phone": 1}),
        ("+79161234567", "[phone]", {"phone": 1}),
        ("89161234567", "[phone]", {"phone": 1}),
        ("555.123.4567", "[phone]", {"phone": 1}),
        ("4111-1111-1111-1111", "[card]", {"card": 1}),
        ("5500 0000 0000 0004 and 378282246310005", "[card] and [card]", {"card": 2}),
        ("1234567812345678", "1234567812345678", {}),  # 16 digits, fails Luhn
        ("in 2026", "in 2026", {}),
        ("1999-2005", "1999-2005", {}),
        ("on 2026-01-15 or 15.01.2026", "on 2026-01-15 or 15.01.2026", {}),
        ("ip 192.168.100.200", "ip 192.168.100.200", {}),
        ("costs 1 000 000 or 12.500.000", "costs 1 000 000 or 12.500.000", {}),
        ("order 1234567, room 42, v1.2.3", "order 1234567, room 42, v1.2.3", {}),
        ("token abc1234567890def", "token abc1234567890def", {}),
    ],
)
def test_redact(text: str, expected: str, counts: dict[str, int]) -> None:
    assert redact(text) == (expected, Counter(counts))


def test_fast_token_estimate_equals_estimate_tokens() -> None:
    rng = random.Random(3)
    alphabet = "abc XYZ 123 .,!\n\tпривет 日本 😀 é\x7f\x80"
    samples = ["", "a", "abcd", "abcde", "привет", "😀" * 3]
    samples += ["".join(rng.choices(alphabet, k=rng.randint(0, 200))) for _ in range(300)]
    for text in samples:
        assert fast_estimate_tokens(text) == estimate_tokens(text), text


ANSWER = {"role": "assistant", "content": "y"}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages)}


# -- photos ---------------------------------------------------------------------------------


async def test_photo_turns_are_left_out_by_default_and_vision_examples_with_the_option(
    log: Log, tmp_path: Path
) -> None:
    image = StoredImage("ab" * 32, "image/jpeg", 600, 400, b"\xff\xd8fake-jpeg\xff\xd9")
    thread = await log.thread()
    await log.turn(thread, "hello", "hi")
    await log.turn(thread, "what is in this photo?", "a cat", images=[image])
    await log.turn(thread, "thanks", "you're welcome")

    plain = log.build(tmp_path / "plain")
    assert plain.dropped == Counter({"photo_turn": 1}) and plain.examples == 2
    assert "a cat" not in (tmp_path / "plain" / "train.jsonl").read_text(encoding="utf-8")

    options = DatasetOptions(min_examples=1, validation_fraction=0, include_photos=True)
    vision = log.build(tmp_path / "vision", options)
    [example] = read(vision.train_path)
    assert not vision.dropped
    user = example["messages"][3]
    assert user["role"] == "user"
    url = "data:image/jpeg;base64," + base64.b64encode(image.data).decode()
    assert user["content"] == [
        {"type": "text", "text": "what is in this photo?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    photo_turn = estimate_tokens("what is in this photo?") + estimate_tokens("a cat")
    photo_turn += 85 + 170 * 2 * 1  # a 600x400 image: 2x1 tiles
    # One example instead of two: one system message fewer.
    assert vision.tokens == plain.tokens + photo_turn - estimate_tokens(SYSTEM)
    assert validate_example(example, 65_536) is None


# -- filters, problems, split, files ---------------------------------------------------------


async def test_since_and_chat_filters(log: Log, tmp_path: Path) -> None:
    one, two = await log.thread(chat_id=1), await log.thread(chat_id=2)
    await log.turn(one, "old", "old answer", at=START)
    await log.turn(one, "new", "new answer", at=START + timedelta(days=2))
    await log.turn(two, "other chat", "other answer", at=START + timedelta(days=2))

    def users(options: DatasetOptions) -> list[str]:
        report = log.build(tmp_path / "out", options)
        return [c for e in examples(report) for r, c in texts(e) if r == "user"]

    assert users(ONE) == ["old", "new", "other chat"]
    assert users(replace(ONE, since="2026-01-02")) == ["new", "other chat"]
    assert users(replace(ONE, chat_id=1)) == ["old", "new"]
    since_z = (START + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")  # inclusive, any format
    assert users(replace(ONE, since=since_z, chat_id=2)) == ["other chat"]


async def test_too_few_examples_is_a_problem_but_files_are_written(
    log: Log, tmp_path: Path
) -> None:
    for n in range(7):
        await log.turn(None, f"question {n}", f"answer {n}")
    report = log.build(tmp_path / "out", DatasetOptions(), model="some-unknown-model")
    assert not report.ok
    assert (report.problems, report.examples, report.needed) == (["too_few"], 7, 10)
    assert (report.train_examples, report.validation_examples) == (6, 1)
    assert report.estimated_cost_usd is None  # unknown base model


async def test_no_examples_writes_nothing(log: Log, tmp_path: Path) -> None:
    report = log.build(tmp_path / "out", DatasetOptions())
    assert (report.problems, report.examples, report.needed) == (["too_few"], 0, 10)
    assert report.train_path is None and list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("example", "rule"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages"),
        (chat({"role": "tool", "content": "x"}, ANSWER), "role"),
        (chat(user("  "), ANSWER), "empty_content"),
        (chat({"role": "user"}, ANSWER), "empty_content"),
        (chat(user(5), ANSWER), "content_type"),
        (chat({"role": "system", "content": "s"}, user("x")), "no_assistant"),
        (chat(user("x" * 400), ANSWER), "too_long"),
        (chat(user([{"type": "image_url", "image_url": {"url": "ftp://x"}}]), ANSWER), "image_url"),
        (chat(user([{"type": "audio"}]), ANSWER), "content_type"),
        (
            chat(user("x"), {"role": "assistant", "content": [{"type": "text", "text": "y"}]}),
            "content_type",
        ),
    ],
)
def test_validate_example_rules(example: dict[str, Any], rule: str) -> None:
    assert validate_example(example, max_tokens=100) == rule


def test_validate_example_accepts_valid_examples() -> None:
    assert validate_example(chat(user("x"), ANSWER), 100) is None
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    vision = chat(user([{"type": "text", "text": "see"}, image]), ANSWER)
    assert validate_example(vision, 65_536) is None
    assert validate_example(vision, 1000) == "too_long"  # an image of unknown size: 1,445 tokens


async def test_split_is_deterministic_with_a_validation_file(log: Log, tmp_path: Path) -> None:
    for n in range(30):
        await log.turn(None, f"question number {n}", f"answer number {n}")
    options = DatasetOptions(validation_fraction=0.2)
    first = log.build(tmp_path / "a", options)
    second = log.build(tmp_path / "b", options)
    assert first.ok and (first.train_examples, first.validation_examples) == (24, 6)
    assert (second.train_examples, second.validation_examples) == (24, 6)
    for name in ("train.jsonl", "validation.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = {json.dumps(e) for e in read(first.train_path)}
    validation = {json.dumps(e) for e in read(first.validation_path)}
    assert len(train | validation) == 30 and not train & validation


async def test_validation_never_takes_training_below_the_minimum(log: Log, tmp_path: Path) -> None:
    for n in range(10):
        await log.turn(None, f"q{n}", f"a{n}")
    report = log.build(tmp_path / "out", DatasetOptions(validation_fraction=0.1))
    assert report.ok and (report.train_examples, report.validation_examples) == (10, 0)
    await log.turn(None, "q10", "a10")
    report = log.build(tmp_path / "out", DatasetOptions(validation_fraction=0.1))
    assert (report.train_examples, report.validation_examples) == (10, 1)


async def test_files_are_replaced_atomically_and_reruns_overwrite(
    log: Log, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    for n in range(12):
        await log.turn(None, f"q{n}", f"a{n}")
    first = log.build(out, DatasetOptions(validation_fraction=0.1))
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl", "validation.jsonl"]
    assert first.train_examples + first.validation_examples == 12
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def explode(*_args: Any, **_kwargs: Any) -> str | None:
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as patch:  # a failure midway leaves the old files and no temps
        patch.setattr(dataset, "validate_example", explode)
        with pytest.raises(RuntimeError):
            log.build(out, DatasetOptions(validation_fraction=0.1))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    for n in range(12, 15):
        await log.turn(None, f"q{n}", f"a{n}")
    second = log.build(out, DatasetOptions(validation_fraction=0))
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]  # stale validation removed
    assert second.train_examples == 15 and len(read(second.train_path)) == 15
    line = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert "\n" not in line and json.loads(line)["messages"][0]["role"] == "system"


async def test_non_ascii_is_written_as_is(log: Log, tmp_path: Path) -> None:
    await log.turn(None, "привет", "здравствуйте 😀")
    report = log.build(tmp_path / "out")
    assert report.train_path is not None
    assert "здравствуйте 😀" in report.train_path.read_text(encoding="utf-8")


def test_invalid_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        options = replace(ONE, validation_fraction=1.5)
        build_dataset(DatasetSource(tmp_path / "db"), tmp_path, options, base_model="x")


# -- web-search citations and documents -----------------------------------------------------

CITED = "https://www.insee.fr/fr/statistiques/1893198"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Paris ([insee.fr]({CITED}?utm_source=openai)).", f"Paris ([insee.fr]({CITED}))."),
        (f"{CITED}?utm_source=openai. Next", f"{CITED}. Next"),
        (f"{CITED}?id=3&utm_source=openai&b=2#part", f"{CITED}?id=3&b=2#part"),
        (f"{CITED}?utm_source=openai&utm_medium=chat", CITED),
        (
            "[Paris](https://en.wikipedia.org/wiki/Paris_(city)?utm_source=openai)",
            "[Paris](https://en.wikipedia.org/wiki/Paris_(city))",
        ),
        # Not a URL's query: kept as written.
        ("what? utm_source is a parameter", "what? utm_source is a parameter"),
        ("Really?utm_source", "Really?utm_source"),
        (f"{CITED}?q=utm_source", f"{CITED}?q=utm_source"),
        (f"{CITED}?id=3", f"{CITED}?id=3"),
    ],
)
def test_tracking_parameters_are_taken_out_of_urls(text: str, expected: str) -> None:
    assert dataset.strip_tracking(text) == expected


async def test_web_search_citations_lose_their_tracking_parameter(log: Log, tmp_path: Path) -> None:
    thread = await log.thread()
    await log.turn(
        thread,
        f"is {CITED}?utm_campaign=x the source?",
        f"About 2.1 million ([insee.fr]({CITED}?utm_source=openai)).",
    )
    [example] = examples(log.build(tmp_path / "out"))
    assert texts(example)[1:] == [
        ("user", f"is {CITED} the source?"),
        ("assistant", f"About 2.1 million ([insee.fr]({CITED}))."),
    ]


async def test_a_turn_excluded_when_logged_is_left_out_with_its_reason(
    log: Log, tmp_path: Path
) -> None:
    """A document turn whose model read the whole PDF, of which the log keeps only part."""
    thread = await log.thread()
    await log.turn(thread, "hello", "hi")
    cut = TurnRecord(
        thread_id=thread.id,
        key=thread.key,
        chat_type="private",
        user_id=7,
        user_message_id=99,
        user_text="[report.pdf, 40 pages: pages 1-3 of 40]\n\nSummarise",
        model="m",
        instructions=SYSTEM,
        started_at=(START + timedelta(hours=1)).isoformat(timespec="milliseconds"),
        assistant_text="Page 37 says revenue grew.",
        input_kind="document",
        excluded=DOCUMENT_CUT,
    )
    await log.store.threads.record_turn(cut)
    report = log.build(tmp_path / "out")
    assert report.dropped == Counter({DOCUMENT_CUT: 1})
    [example] = examples(report)
    assert "revenue" not in json.dumps(example)
