"""The HTTP client for Bot API calls: aiohttp under PTB, with requests let in a few at a time."""

from __future__ import annotations

import asyncio
import urllib.request
from contextvars import ContextVar
from functools import lru_cache
from typing import TYPE_CHECKING, cast

import aiohttp
from telegram.error import NetworkError, TimedOut
from telegram.request import BaseRequest, RequestData
from yarl import URL

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


class AiohttpRequest(BaseRequest):
    """PTB's request backend over aiohttp, with a bounded pool and calls that finish once sent.

    - aiohttp instead of PTB's HTTPXRequest: a Bot API call costs about 0.2 ms of CPU
      against 1.7 ms through httpx and httpcore (bench/http_clients.py). A reply is three
      or more calls, and CPU is what bounds a burst of chats.
    - At most `connection_pool_size` requests are under way at once; the rest wait on an
      asyncio semaphore. Running out of the pool timeout while waiting raises
      `SlotTimeout`, a `NetworkError` that says nothing was sent, so senders may retry it
      (PTB's `TimedOut` means "may have gone through" and is never retried).
    - With `finish_sent` (the default), a request that got its slot is never cut off: its
      caller may stop waiting (a draft overtaken by the final reply, a shutdown), but the
      request runs to its end in the background and `shutdown()` waits for it. A call
      cut off halfway may still reach Telegram, later than what the caller sends next;
      `watch()` lets a caller learn that a call was sent and wait for it instead. Long
      polls (`getUpdates`) are built with `finish_sent=False`: they may be cut off at once.
    """

    def __init__(
        self,
        connection_pool_size: int,
        pool_timeout: float | None,
        *,
        connect_timeout: float | None = 5.0,
        read_timeout: float | None = 5.0,
        write_timeout: float | None = 5.0,
        media_write_timeout: float | None = 20.0,
        finish_sent: bool = True,
    ) -> None:
        self._size = connection_pool_size
        self._slots = asyncio.Semaphore(connection_pool_size)
        self._pool_timeout = pool_timeout
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._media_write_timeout = media_write_timeout
        self._finish_sent = finish_sent
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str], str | None] = {}
        self._orphans: set[asyncio.Future[tuple[int, bytes]]] = set()

    @property
    def read_timeout(self) -> float | None:
        return self._read_timeout

    async def initialize(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._size),
                # No trust_env: with it aiohttp looks for ~/.netrc in a worker thread on every
                # request (a seventh of the bot's CPU in a burst, py-spy). Proxies: _proxy().
                headers={"User-Agent": self.USER_AGENT},
            )

    async def shutdown(self) -> None:
        while self._orphans:  # let requests already sent finish (each has its own timeouts)
            await asyncio.wait(set(self._orphans))
        if self._session is not None:
            await self._session.close()

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
        session = self._session
        if session is None or session.closed:
            raise RuntimeError("this AiohttpRequest is not initialized")
        target = URL(url)
        files = request_data is not None and request_data.contains_files
        timeouts = (
            _given(connect_timeout, self._connect_timeout),
            _given(write_timeout, self._media_write_timeout if files else self._write_timeout),
            _given(read_timeout, self._read_timeout),
        )
        try:
            async with asyncio.timeout(_given(pool_timeout, self._pool_timeout)):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise SlotTimeout("no free connection in time; the request was not sent") from exc
        try:
            request = asyncio.ensure_future(
                _send(session, method, target, self._proxy(target), _body(request_data), timeouts)
            )
        except BaseException:
            self._slots.release()
            raise
        request.add_done_callback(lambda _: self._slots.release())
        if not self._finish_sent:
            return await request  # cancelling this cancels the request
        if (dispatch := _dispatch.get()) is not None:
            dispatch.request = request
        try:
            return await asyncio.shield(request)
        except asyncio.CancelledError:
            if not request.done():  # the caller gave up; the request finishes on its own
                self._orphans.add(request)
                request.add_done_callback(self._forget)
            raise

    def _proxy(self, url: URL) -> str | None:
        """The proxy for `url` from HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as httpx reads them,
        looked up once per host (the bot talks to one)."""
        key = (url.scheme, url.host or "")
        if key not in self._proxies:
            proxies = urllib.request.getproxies()
            bypass = bool(key[1]) and urllib.request.proxy_bypass(key[1])
            self._proxies[key] = None if bypass else proxies.get(key[0], proxies.get("all"))
        return self._proxies[key]

    def _forget(self, request: asyncio.Future[tuple[int, bytes]]) -> None:
        self._orphans.discard(request)
        if not request.cancelled():
            request.exception()  # retrieved: nobody waits for it any more


def _given(value: ODVInput[float], default: float | None) -> float | None:
    return default if value is BaseRequest.DEFAULT_NONE else cast("float | None", value)


def _body(request_data: RequestData | None) -> aiohttp.FormData | dict[str, str] | None:
    """The form PTB's HTTPXRequest sends: urlencoded fields, or multipart with the files."""
    if request_data is None:
        return None
    fields = request_data.json_parameters
    if not request_data.contains_files:
        return fields or None
    form = aiohttp.FormData(fields)
    for name, (filename, content, mimetype) in request_data.multipart_data.items():
        form.add_field(name, content, filename=filename, content_type=mimetype)
    return form


@lru_cache(maxsize=64)
def _timeout(
    connect: float | None, write: float | None, read: float | None, upload: bool
) -> aiohttp.ClientTimeout:
    """PTB's timeouts in aiohttp's terms (cached: building a ClientTimeout, a frozen attrs
    class, was 3% of the bot's CPU in a burst).

    `connect` bounds getting a connection, DNS included; `read` bounds each wait for
    response bytes, as httpx's read timeout does, so a slow but steady download finishes.
    aiohttp has no write timeout, and no read runs while a body is sent: an upload gets
    connect + write + read for the whole call, so a stalled one cannot hang.
    """
    total = None
    if upload and connect is not None and write is not None and read is not None:
        total = connect + write + read
    return aiohttp.ClientTimeout(total=total, connect=connect, sock_connect=connect, sock_read=read)


async def _send(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    proxy: str | None,
    body: aiohttp.FormData | dict[str, str] | None,
    timeouts: tuple[float | None, float | None, float | None],
) -> tuple[int, bytes]:
    timeout = _timeout(*timeouts, upload=isinstance(body, aiohttp.FormData))
    try:
        # No redirects, as with PTB's httpx: a redirected POST would arrive as a bare GET.
        async with session.request(
            method, url, data=body, timeout=timeout, proxy=proxy, allow_redirects=False
        ) as response:
            return response.status, await response.read()
    except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
        raise TimedOut(f"aiohttp: {type(exc).__name__}") from exc
    except aiohttp.ClientError as exc:
        raise NetworkError(f"aiohttp.{type(exc).__name__}: {exc}") from exc
