"""Parley's error taxonomy: each failure a user can meet has a kind and a short message key."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx2
import openai


class ParleyError(Exception):
    """An expected failure with a user-facing message key (see bot/texts.py)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


class WriterClosed(Exception):
    """Storage was closed: no more writes are taken."""


class StorageUnavailable(Exception):
    """Storage can't take this write now (disk full, I/O error); nothing was written.

    Raised by the store (whichever database is behind it); callers outside storage/ catch
    these two from here and never import a storage module for them.
    """


class ModelError(ParleyError):
    """The model could not produce an answer (rate limit, outage, timeout, refusal...)."""


def classify_model_error(exc: BaseException, *, streaming: bool = False) -> ModelError:
    """Map an exception from the OpenAI client to a ModelError with a stable kind.

    `streaming` says text had already arrived: a connection error then means the answer was
    cut off on the way, not that the service could not be reached.
    """
    if isinstance(exc, ModelError):
        return exc
    kind = "unknown"
    if isinstance(exc, openai.RateLimitError):
        kind = "rate_limited"
    elif isinstance(
        exc, openai.APITimeoutError | httpx2.TimeoutException | asyncio.TimeoutError | TimeoutError
    ) and not _connection_failure(exc):
        kind = "timeout"
    elif isinstance(exc, openai.APIConnectionError | httpx2.TransportError) and streaming:
        kind = "interrupted"
    elif isinstance(exc, openai.APIConnectionError):
        kind = "unreachable"
    elif isinstance(exc, httpx2.TransportError):
        # Raised mid-stream, after the SDK handed us the response: the answer was cut off.
        kind = "interrupted"
    elif isinstance(exc, openai.InternalServerError):
        kind = "server_error"
    elif isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        kind = "auth"
    elif isinstance(exc, openai.NotFoundError):
        kind = "not_found"
    elif isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        kind = "bad_request"
    elif isinstance(exc, openai.APIStatusError):
        kind = "server_error" if exc.status_code >= 500 else "bad_request"
    # The detail is for logs only: class name and status, never the response body.
    status = getattr(exc, "status_code", None)
    return ModelError(kind, f"{type(exc).__name__}{f' {status}' if status else ''}")


def _connection_failure(exc: BaseException) -> bool:
    """Whether a "timeout" was really a failed or dropped connection.

    The SDK's aiohttp adapter (openai[aiohttp]) reports every aiohttp connection error,
    a refused connection or a server hanging up included, as a connect timeout; the
    aiohttp exception underneath tells which it was.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, aiohttp.ClientError):
            return not isinstance(cause, TimeoutError)
        cause = cause.__cause__
    return False
