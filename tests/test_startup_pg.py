"""The first hour on PostgreSQL: `check` and a start that can't use the database say so in
one line, and a password in DATABASE_URL is never shown."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg

from storage.pg.db import PgStore
from storage.pg.migrations import PG_MIGRATIONS
from tests.pg import pg_url  # noqa: F401  (the fixture)
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram
from tests.test_startup import _check_env, _failed_start, _the_line
from tests.test_webhook_check import _run_check

PASSWORD = "hunter2-db-secret"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_check_reads_the_schema_of_a_postgresql_database_without_changing_it(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    env = _check_env(tg, oai, DATABASE_URL=pg_url)
    code, out = await _run_check(env, tmp_path)
    assert code == 0, out
    assert "✓ Database: postgresql://127.0.0.1:5432/test is empty; the bot creates" in out
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
        )
        assert await cur.fetchone() == (0,)  # check created nothing
    store = await PgStore.open(pg_url)
    await store.close()
    code, out = await _run_check(env, tmp_path)
    latest = max(m.version for m in PG_MIGRATIONS)
    assert code == 0 and f"✓ Database: postgresql://127.0.0.1:5432/test (schema {latest})" in out


async def test_check_refuses_a_postgresql_database_holding_other_tables(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE notes (text TEXT)")
    code, out = await _run_check(_check_env(tg, oai, DATABASE_URL=pg_url), tmp_path)
    assert code == 1 and "holds tables that are not Parley's" in out, out


async def test_an_unreachable_postgresql_server_is_one_line_and_hides_the_password(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    port = _closed_port()
    url = f"postgresql://parley:{PASSWORD}@127.0.0.1:{port}/parley"
    code, out = await _run_check(_check_env(tg, oai, DATABASE_URL=url), tmp_path)
    assert code == 1 and f"cannot connect to postgresql://127.0.0.1:{port}/parley" in out
    assert PASSWORD not in out
    code, err = await _failed_start(tg, oai, tmp_path, DATABASE_URL=url)
    line = _the_line(err)
    assert code == 1 and "cannot use the database postgresql://127.0.0.1:" in line
    assert "check DATABASE_URL" in line and PASSWORD not in err
