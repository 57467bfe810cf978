"""Users first: background model work (the evaluation) gives way to users' turns.

A model server has a fixed number of slots (one, for llama.cpp's default), and the bot a
single event loop: an evaluation replaying hundreds of conversations must not sit in
front of someone waiting for an answer. Users' turns are counted while they run, and they
count against the background's budget: background calls run only while users' turns and
background calls together stay under the limit, so users' turns take the slots first and
are never held back themselves. Should users keep every slot busy for `patience` seconds,
background calls go on one at a time, so the work still ends on a busy bot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class UserTurns:
    """How many users' turns are in flight, and a way to hear when that changes."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._change = asyncio.Event()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Count a user's turn as in flight while the block runs."""
        self.in_flight += 1
        self.changed()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.changed()

    def changed(self) -> None:
        """Wake everyone waiting for a change (a turn, or a background call, came or went)."""
        change, self._change = self._change, asyncio.Event()
        change.set()

    async def wait_change(self, at_most: float | None) -> None:
        """Wait for the next change, at most `at_most` seconds (None: as long as it takes)."""
        change = self._change
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most):
                await change.wait()


class Background:
    """Slots for background model calls: users' turns plus these stay under `limit`."""

    def __init__(self, users: UserTurns, limit: int, patience: float) -> None:
        self.users = users
        self.limit = limit
        self.patience = patience
        self.in_flight = 0
        self.max_in_flight = 0
        self.deferred = 0  # calls that had to wait for room
        self._due: float | None = None  # when waiting calls may go on alone

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for one background model call."""
        loop = asyncio.get_running_loop()
        waited = False
        while True:
            now = loop.time()
            if self.in_flight + self.users.in_flight < self.limit:
                self._due = None  # there was room: patience starts over next time
                break
            if self._due is None:
                self._due = now + self.patience
            if self.in_flight == 0 and now >= self._due:
                break  # users have kept every slot for `patience`: one call goes anyway
            waited = True
            await self.users.wait_change(self._due - now if now < self._due else None)
        self.deferred += waited
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.users.changed()
