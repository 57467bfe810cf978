"""The HTTP client for Bot API calls: PTB's HTTPXRequest, with requests let in a few at a time."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import TYPE_CHECKING, cast

from telegram.error import NetworkError
from telegram.request import BaseRequest, HTTPXRequest, RequestData

if TYPE_CHECKING:
    from telegram._utils.types import ODVInput  # PTB's own annotation for these arguments


class SlotTimeout(NetworkError):
    """No slot came free within the pool timeout: the request was not sent (safe to retry)."""


class Dispatch:
    """Learns whether a Bot API call made under `watch()` got as far as being sent."""

    def __init__(self) -> None:
        self.request: asyncio.Future[tuple[int, bytes]] | None = None  # set once it is sent


_dispatch: ContextVar[Dispatch | None] = ContextVar("parley_dispatch", default=None)


def watch() -> Dispatch:
    """Watch the calls made from now on in this context (use in a task's own context)."""
    dispatch = Dispatch()
    _dispatch.set(dispatch)
    return dispatch


class BoundedHTTPXRequest(HTTPXRequest):
    """PTB's HTTPXRequest with two guards for httpcore 1.x, the pool under PTB's httpx.

    - At most `connection_pool_size` requests enter httpx at once; the rest wait on an
      asyncio semaphore, whose waiters cost nothing. httpcore redoes its pool bookkeeping
      on every request and response, in time that grows with the square of the open
      connections and with the queued requests: with a pool of 256 and a burst of 300
      chats that was a third of the bot's CPU (py-spy, bench/run.py's burst). The pool
      timeout applies to the wait for a slot; running out of it raises `SlotTimeout`, a
      `NetworkError` that says nothing was sent, so senders may retry it.
    - A request that entered httpx is never cancelled: its caller may stop waiting (a
      draft overtaken by the final reply, a shutdown), but the request runs to its end in
      the background. A request cancelled while httpcore 1.0.9 sets up its connection
      leaves that connection in the pool forever (encode/httpcore#1093, open; httpx gets
      no more releases), and once every slot is lost that way, every Bot API call fails
      with a pool timeout. bench/run.py's long replies hit it within a minute.
    """

    def __init__(self, connection_pool_size: int, pool_timeout: float | None) -> None:
        super().__init__(connection_pool_size=connection_pool_size, pool_timeout=pool_timeout)
        self._slots = asyncio.Semaphore(connection_pool_size)
        self._slot_timeout = pool_timeout
        self._orphans: set[asyncio.Task[tuple[int, bytes]]] = set()

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
            raise SlotTimeout("no free connection in time; the request was not sent") from exc
        try:
            request = asyncio.ensure_future(
                super().do_request(
                    url,
                    method,
                    request_data,
                    read_timeout,
                    write_timeout,
                    connect_timeout,
                    pool_timeout,
                )
            )
        except BaseException:
            self._slots.release()
            raise
        request.add_done_callback(lambda _: self._slots.release())
        if (dispatch := _dispatch.get()) is not None:
            dispatch.request = request
        try:
            return await asyncio.shield(request)
        except asyncio.CancelledError:
            if not request.done():  # the caller gave up; the request finishes on its own
                self._orphans.add(request)
                request.add_done_callback(self._forget)
            raise

    async def shutdown(self) -> None:
        if self._orphans:  # let requests already sent finish (each has its own timeouts)
            await asyncio.wait(set(self._orphans))
        await super().shutdown()

    def _forget(self, request: asyncio.Task[tuple[int, bytes]]) -> None:
        self._orphans.discard(request)
        if not request.cancelled():
            request.exception()  # retrieved: nobody waits for it any more
