"""PostgreSQL going away and coming back (a TCP relay between the store and the server is
cut): new updates are refused at once, records of work done wait and land, and everything
recovers by itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from bot.errors import StorageUnavailable
from storage.pg.db import PgStore
from tests.pg import pg_url  # noqa: F401  (the fixture)
from tests.stubs.tcp_relay import Relay


@pytest.fixture
async def relay(pg_url: str) -> AsyncIterator[tuple[Relay, str]]:  # noqa: F811
    parts = urlsplit(pg_url)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    await relay.start()
    netloc = (
        f"{parts.username}@127.0.0.1:{relay.port}" if parts.username else f"127.0.0.1:{relay.port}"
    )
    yield relay, urlunsplit(parts._replace(netloc=netloc))
    await relay.stop()


async def test_while_the_database_is_away_updates_are_refused_and_records_wait_then_land(
    relay: tuple[Relay, str],
) -> None:
    server, url = relay
    store = await PgStore.open(url)
    try:
        assert await store.inbox.accept([(1, "{}")]) == {1}
        await server.cut()
        # Refused, not waited for: the webhook answers 503 and Telegram delivers it later.
        with pytest.raises(StorageUnavailable):
            await store.inbox.accept([(2, "{}")])
        assert not store.writable
        # The record of something done (an update handled) waits for the database...
        done = asyncio.create_task(store.inbox.done([1]))
        await asyncio.sleep(1.0)
        assert not done.done()
        # ... and lands once it is back; new updates are taken again.
        await server.restore()
        await asyncio.wait_for(done, 30)
        assert store.writable
        assert await store.inbox.accept([(2, "{}")]) == {2}
        assert await store.inbox.pending() == [(2, "{}")]
    finally:
        await store.close()
