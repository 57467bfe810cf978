"""A full disk: the bot refuses new messages (saying so), backs off, recovers by itself.

The database lives on a small tmpfs the test mounts and fills up, so SQLite meets a real
ENOSPC. Mounting needs root (as on our machines and in CI); elsewhere these tests are
skipped with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from bot.app import ALLOWED_UPDATES, build_application
from bot.errors import StorageUnavailable
from bot.texts import catalog
from bot.webhook import SECRET_HEADER, serving
from storage.db import Store
from storage.writer import RESERVE_BYTES
from tests.conftest import TOKEN, SettingsFactory, eventually, settled
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import FakeTelegram, private_text_update
from tests.test_poison import spawn

EN = catalog("en")
DISK_MB = 12


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs of its own, unmounted afterwards."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"could not mount a tmpfs: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte; the file to delete to free it again."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as out:
        for chunk in (1 << 20, 1 << 16, 1 << 12):
            with contextlib.suppress(OSError):
                while True:
                    out.write(bytes(chunk))
    return filler


def free(filler: Path) -> None:
    filler.unlink()


async def test_the_writer_refuses_new_work_keeps_records_and_recovers(disk: Path) -> None:
    store = await Store.open(disk / "db.sqlite3")
    try:
        assert (disk / "db.sqlite3-reserve").stat().st_size == RESERVE_BYTES
        await store.inbox.accept([(1, "{}")])
        filler = fill(disk)
        with pytest.raises(StorageUnavailable):  # nearly full: no new work...
            await store.inbox.accept([(2, "{}")])
        assert not store.writable
        with pytest.raises(StorageUnavailable):  # ...and at once while it stays so
            await store.inbox.accept([(3, "{}")])
        # ...but the record of work in progress lands (the reserve makes room for it).
        await store.settings.set("answer", "x" * 20_000)
        await store.inbox.done([1])
        assert not (disk / "db.sqlite3-reserve").exists()
        free(filler)
        await eventually(lambda: store.writable, timeout=20)  # by itself, no write needed
        assert (disk / "db.sqlite3-reserve").stat().st_size == RESERVE_BYTES
        assert await store.inbox.accept([(2, "{}")]) == {2}
        assert await store.settings.get("answer") == "x" * 20_000
    finally:
        await store.close()


async def test_polling_backs_off_tells_users_once_recovers_and_stops_in_time(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, disk: Path
) -> None:
    for chat in (100, 200, 300):
        tg.chat(chat)
    env = {"DATABASE_URL": f"sqlite:///{disk}/parley.sqlite3", "SHUTDOWN_GRACE": "8"}
    proc = await spawn(tg, oai, tmp_path, **env)
    try:
        tg.push_message(100, "before")
        assert await tg.wait_sent(100, 1, timeout=60) == ["echo: before"]
        filler = fill(disk)
        for chat in (100, 200, 300):
            tg.push_message(chat, f"while full {chat}")
        for chat in (200, 300):
            assert await tg.wait_sent(chat, 1, timeout=30) == [EN["error.unavailable"]]
        polls = len(tg.calls_of("getUpdates"))
        tg.push_message(100, "again while full")
        await asyncio.sleep(8)  # the bot keeps trying while storage fails
        polls = len(tg.calls_of("getUpdates")) - polls
        # Backing off from 0.5 s, doubling: a handful of polls, not hundreds a second.
        assert polls <= 8, polls
        assert tg.sent_texts(100) == ["echo: before", EN["error.unavailable"]]  # told once
        free(filler)
        # Space is back: every message waiting at Telegram is taken in and answered.
        for chat in (200, 300):
            assert (await tg.wait_sent(chat, 2, timeout=30))[-1] == f"echo: while full {chat}"
        assert (await tg.wait_sent(100, 4, timeout=30))[2:] == [
            "echo: while full 100",
            "echo: again while full",
        ]
        # Full again, then SIGTERM: the bot exits within its grace period, and cleanly.
        filler = fill(disk)
        tg.push_message(200, "at the end")
        await tg.wait_sent(200, 3, timeout=30)
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert time.monotonic() - stopping < 8  # SHUTDOWN_GRACE
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = (tmp_path / "bot.log").read_text()
    assert log.count("storage is failing") == 2 and log.count("storage works again") == 1
    assert "Traceback" not in log and TOKEN not in log
    assert len(log) < 10_000, log  # one line per change of state, not one per try


async def test_a_delivered_answer_is_recorded_on_a_full_disk_and_never_sent_again(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, disk: Path
) -> None:
    tg.chat(100)
    env = {"DATABASE_URL": f"sqlite:///{disk}/parley.sqlite3"}
    hold = asyncio.Event()
    oai.enqueue(Reply("a long answer " * 200, hold=hold))
    proc = await spawn(tg, oai, tmp_path, **env)
    try:
        tg.push_message(100, "question")
        await eventually(lambda: len(oai.calls) == 1, timeout=60)
        filler = fill(disk)  # the disk fills up while the model writes
        hold.set()
        await tg.wait_sent(100, 1, timeout=30)
        await asyncio.sleep(0.5)  # the turn is recorded after the reply
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        # A restart, the disk still full: the message is not answered again.
        proc = await spawn(tg, oai, tmp_path, **env)
        await eventually(lambda: "Application started" in _log(tmp_path, 2), timeout=60)
        await asyncio.sleep(1)  # time to replay anything left, were there anything
        free(filler)
        await eventually(lambda: "storage works again" in _log(tmp_path, 2), timeout=30)
        tg.push_message(100, "next")
        await tg.wait_sent(100, 2, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert tg.sent_texts(100) == ["a long answer " * 199 + "a long answer", "echo: next"]
    assert len(oai.calls) == 2
    with sqlite3.connect(disk / "parley.sqlite3") as db:
        assert db.execute("SELECT status FROM turns ORDER BY id").fetchall() == [("ok",), ("ok",)]
    assert "Traceback" not in _log(tmp_path)


def _log(cwd: Path, starts: int = 1) -> str:
    """The bot's log; '' until it shows `starts` starts."""
    text = (cwd / "bot.log").read_text()
    return text if text.count("event loop:") >= starts else ""


async def test_webhook_is_unhealthy_while_updates_cant_be_stored(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, disk: Path
) -> None:
    settings = make_settings(
        webhook_url="https://bot.example.org/hook",
        webhook_listen="127.0.0.1",
        webhook_port=0,
        webhook_secret="s3cret",
        database_url=f"sqlite:///{disk}/parley.sqlite3",
    )
    tg.chat(100)
    app = build_application(settings)
    async with serving(app, settings, ALLOWED_UPDATES) as port, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{port}"
        headers = {SECRET_HEADER: "s3cret"}
        update = private_text_update(1, 100, 1, "while full")
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200 and await r.json() == {"ok": True}
        filler = fill(disk)
        for _ in range(3):  # Telegram delivers it again and again; the user hears once
            async with http.post(f"{base}/hook", json=update, headers=headers) as r:
                assert r.status == 503
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 503 and await r.json() == {"ok": False, "storage": "failing"}
        assert tg.sent_texts(100) == [EN["error.unavailable"]]
        free(filler)

        async def healthy() -> bool:
            async with http.get(f"{base}/healthz") as r:
                return r.status == 200

        await eventually(healthy, timeout=20)
        async with http.post(f"{base}/hook", json=update, headers=headers) as r:
            assert r.status == 200
        assert (await tg.wait_sent(100, 2))[-1] == "echo: while full"
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        rows = await store.fetch_all("SELECT update_id, payload FROM inbox")
        assert [(u, json.loads(p)["message"]["text"]) for u, p in rows] == [(1, "while full")]
