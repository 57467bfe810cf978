"""A real PostgreSQL for the tests that run against both databases.

Each test gets a schema of its own in the server's database (`PARLEY_TEST_PG`, by default
postgresql://postgres@127.0.0.1:5432/test, trust auth), dropped afterwards: tests never see
each other's rows and can run against a database other things use. Under CI=true the server
must be there (CI starts one); elsewhere these tests skip, saying why.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from storage.db import Store
from storage.pg.db import PgStore

AnyStore = Store | PgStore

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def server_url() -> str:
    return os.environ.get("PARLEY_TEST_PG", DEFAULT_URL)


def _reachable(url: str) -> str | None:
    """None if the server answers, else why not."""
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


_why_not: list[str | None] = []


def require_postgres() -> str:
    """The server's URL; skips the test (fails it under CI=true) if it can't be reached."""
    url = server_url()
    if not _why_not:
        _why_not.append(_reachable(url))
    problem = _why_not[0]
    if problem is not None:
        reason = f"PostgreSQL not reachable at {url}: {problem}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI must run it)", pytrace=False)
        pytest.skip(reason)
    return url


def with_schema(url: str, schema: str) -> str:
    """`url` with every connection's search_path set to `schema`."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[str]:
    """A database URL whose connections work in a new, empty schema (dropped afterwards)."""
    url = require_postgres()
    schema = f"t_{secrets.token_hex(6)}"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(url, schema)
    finally:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_server() -> Iterator[str]:
    yield require_postgres()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh schema's URL (see the module's docstring)."""
    async with fresh_schema() as url:
        yield url


@asynccontextmanager
async def open_either(kind: str, folder: Path) -> AsyncIterator[AnyStore]:
    """An open store of `kind` ("sqlite": a file in `folder`; "postgres": a fresh schema)."""
    if kind == "sqlite":
        opened: AnyStore = await Store.open(folder / "db.sqlite3")
        try:
            yield opened
        finally:
            await opened.close()
        return
    async with fresh_schema() as url:
        opened = await PgStore.open(url)
        try:
            yield opened
        finally:
            await opened.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AnyStore]:
    """An open store of either kind, on a database of its own: storage-facing tests run
    against both."""
    async with open_either(request.param, tmp_path) as opened:
        yield opened
