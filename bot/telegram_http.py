"""The HTTP client for Bot API calls: PTB's HTTPXRequest, with requests let in a few at a time."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from telegram.error import TimedOut
from telegram.request import BaseRequest, HTTPXRequest, RequestData

if TYPE_CHECKING:
    from telegram._utils.types import ODVInput  # PTB's own annotation for these arguments


class BoundedHTTPXRequest(HTTPXRequest):
    """HTTPXRequest that lets at most `connection_pool_size` requests into httpx at once.

    httpcore 1.x (under PTB's httpx) redoes its pool bookkeeping on every request and
    response, in time that grows with the square of the open connections and with the
    queued requests: with a pool of 256 and a burst of 300 chats that was a third of the
    bot's CPU (py-spy, bench/run.py's burst). A small pool behind an asyncio semaphore,
    whose waiters cost nothing to keep, does the same work for a fraction. The pool timeout
    still applies, to the wait for a slot.
    """

    def __init__(self, connection_pool_size: int, pool_timeout: float | None) -> None:
        super().__init__(connection_pool_size=connection_pool_size, pool_timeout=pool_timeout)
        self._slots = asyncio.Semaphore(connection_pool_size)
        self._slot_timeout = pool_timeout

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        write_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        connect_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        pool_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        wait = (
            self._slot_timeout
            if pool_timeout is BaseRequest.DEFAULT_NONE
            else cast("float | None", pool_timeout)
        )
        try:
            async with asyncio.timeout(wait):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise TimedOut("Pool timeout: all connections in the pool are occupied") from exc
        try:
            return await super().do_request(
                url,
                method,
                request_data,
                read_timeout,
                write_timeout,
                connect_timeout,
                pool_timeout,
            )
        finally:
            self._slots.release()
