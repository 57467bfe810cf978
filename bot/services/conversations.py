"""Conversation backends: where a chat's thread lives and how one turn runs against it.

`OpenAIConversations` keeps the thread server-side (Conversations + Responses APIs);
`LocalHistory` keeps it in SQLite and replays it through Chat Completions, for
OpenAI-compatible servers (Ollama, vLLM, llama.cpp, LM Studio) that lack Conversations.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import openai
from openai import AsyncOpenAI
from openai.types.chat import (
    ChatCompletionContentPartParam,
    ChatCompletionMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.responses import (
    EasyInputMessageParam,
    ResponseInputFileParam,
    ResponseInputImageParam,
    ResponseInputItemParam,
    ResponseInputMessageContentListParam,
)

from bot.domain import ChatKey, HistoryMessage, Thread, utf8_safe
from bot.errors import ModelError, classify_model_error
from bot.services.tokens import estimate_tokens
from storage.interface import ThreadStore

log = logging.getLogger(__name__)

OnDelta = Callable[[str], Awaitable[None]]

# A conversation may be created with at most 20 items (Conversations API).
MAX_SEED_ITEMS = 20

# What the bot reads of one answer, whatever the server makes of the token cap: characters
# per token of the cap. A token is about four characters of text; twice that leaves room
# for any real answer and still bounds one from a server that ignores the cap.
CHARS_PER_TOKEN = 8

# ReplyResult.cut when the answer stopped at the length cap (the model's or the bot's own).
CUT_LENGTH = "length"


@dataclass(frozen=True, slots=True)
class InputFile:
    """A document for the model. `data` (a PDF) goes as a file to a backend that takes
    files (Responses `input_file`); `text`, its text form (a header naming it, its text
    within the budget, a note of what was cut), goes everywhere else. No `data`: text only.
    `partial`: the text form holds less than `data` shows a model (pages past the budget, or
    a scan's page images), so a turn that sent `data` is kept in the log only in part."""

    filename: str
    mime_type: str
    data: bytes
    text: str
    partial: bool = False


@dataclass(frozen=True, slots=True)
class UserContent:
    """What the user sent in one turn: text, plus prepared images as data URLs, plus files."""

    text: str
    image_urls: Sequence[str] = field(default_factory=tuple)
    files: Sequence[InputFile] = field(default_factory=tuple)

    @property
    def full_text(self) -> str:
        """The turn as text alone: the files' text forms, then the user's words. What a
        backend without file inputs sends, and what the log keeps."""
        return "\n\n".join([*(f.text for f in self.files), self.text])


@dataclass(slots=True)
class ReplyResult:
    text: str
    model: str
    response_id: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: int = 0
    # Why the answer stopped before its end, if it did: CUT_LENGTH (the output cap, or the
    # bot's own bound on what it reads), or the server's reason (e.g. "content_filter").
    cut: str | None = None
    # The web pages the answer cites (a web search's url_citation annotations), each once.
    sources: tuple[Source, ...] = ()


@dataclass(frozen=True, slots=True)
class Source:
    """A web page an answer cites."""

    url: str
    title: str


class ConversationBackend(Protocol):
    """Get or create a chat's thread, run a turn on it, start over."""

    name: str
    takes_files: bool  # sends an InputFile's data as a file (else its text form)

    async def open_thread(self, key: ChatKey) -> Thread: ...

    async def run_turn(
        self,
        thread: Thread,
        content: UserContent,
        *,
        model: str,
        instructions: str,
        on_delta: OnDelta,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: Sequence[str] = (),
    ) -> ReplyResult: ...

    async def reset(self, key: ChatKey) -> None: ...


class OpenAIConversations:
    """Threads as OpenAI conversations; each turn is a streamed `responses.create`."""

    name = "openai"
    takes_files = True

    def __init__(
        self, client: AsyncOpenAI, threads: ThreadStore, seed_tokens: int = 12_000
    ) -> None:
        self._client = client
        self._threads = threads
        self._seed_tokens = seed_tokens

    async def open_thread(self, key: ChatKey) -> Thread:
        current = await self._threads.current(key)
        if current is not None and current.backend == self.name:
            if current.conversation_id is not None:
                return current
            # Its server-side copy was dropped (/forget in a group): rebuilt from the log.
            conversation_id = await self._create(key, await self._seed_items(current))
            await self._threads.set_conversation(current.id, conversation_id)
            return Thread(current.id, key, self.name, conversation_id)
        # A chat coming from a model served elsewhere carries its thread on: the new
        # conversation starts with the log's latest exchanges.
        items = await self._seed_items(current) if current is not None else []
        conversation_id = await self._create(key, items)
        return await self._threads.create(key, self.name, conversation_id, continues=current)

    async def _create(self, key: ChatKey, items: list[ResponseInputItemParam]) -> str:
        try:
            conversation = await self._client.conversations.create(
                metadata={"telegram_chat_id": str(key.chat_id), "topic_id": str(key.topic_id)},
                items=items,
            )
        except openai.OpenAIError as exc:
            raise classify_model_error(exc) from exc
        return conversation.id

    async def _seed_items(self, thread: Thread) -> list[ResponseInputItemParam]:
        """The log's latest exchanges (text only), as a new conversation's first items."""
        history = await self._threads.history(thread.id, self._seed_tokens, estimate_tokens)
        items: list[ResponseInputItemParam] = []
        for message in history[-MAX_SEED_ITEMS:]:
            role: Literal["user", "assistant"] = "user" if message.role == "user" else "assistant"
            items.append({"type": "message", "role": role, "content": message.content})
        return items

    async def run_turn(
        self,
        thread: Thread,
        content: UserContent,
        *,
        model: str,
        instructions: str,
        on_delta: OnDelta,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: Sequence[str] = (),
    ) -> ReplyResult:
        request_input: str | list[ResponseInputItemParam]
        # A file's bytes go as base64 inside the JSON request: tens of megabytes of encoding
        # for a large PDF, done in a thread (below) rather than on the event loop.
        with_files = any(f.data for f in content.files)
        if with_files:
            request_input = []  # filled in by _encode_with_files
        elif content.image_urls or content.files:
            message: EasyInputMessageParam = {
                "type": "message",
                "role": "user",
                "content": _input_parts(content),
            }
            request_input = [message]
        else:
            # A plain string is the same user message to the API, and the SDK transforms it
            # ~0.7 ms faster than the item list (bench/run.py's profile).
            request_input = content.text
        body: dict[str, Any] = {
            "model": model,
            "conversation": thread.conversation_id,
            "instructions": instructions,
            "input": request_input,
            "stream": True,
        }
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body["max_output_tokens"] = max_tokens
        if tools:
            # Built-in tools (web search): the model calls them on the server side, and the
            # answer's text cites what it found (url_citation annotations).
            body["tools"] = [{"type": tool} for tool in tools]
        wire: dict[str, Any] | bytes = body
        if with_files:
            wire = await asyncio.to_thread(_encode_with_files, body, content)
        started = time.perf_counter()
        answer = _Answer(on_delta, max_tokens)
        created: Mapping[str, Any] = {}
        try:
            stream = await raw_stream(self._client, "/responses", wire)
            async with stream:
                async for event in stream:
                    kind = event.get("type")
                    if kind == "response.output_text.delta":
                        if not await answer.add(event.get("delta")):
                            return answer.result(created, model, started)  # read enough
                    elif kind == "response.output_text.annotation.added":
                        answer.cite(event.get("annotation"))
                    elif kind == "response.created":
                        created = _mapping(event.get("response"))  # its id, should we stop early
                    elif kind == "response.completed" or (
                        kind == "response.incomplete" and answer.chunks
                    ):
                        # An incomplete response (output cap hit) still delivers what it wrote.
                        response = _mapping(event.get("response"))
                        if kind == "response.incomplete":
                            answer.cut = _incomplete_reason(response)
                        return answer.result(response, model, started)
                    elif kind in ("response.failed", "response.incomplete"):
                        raise ModelError(_failed_kind(_mapping(event.get("response"))), kind)
                    elif kind == "error":
                        code = event.get("code")
                        raise ModelError(_error_event_kind(code), f"error event {code}")
        except ModelError:
            raise
        except Exception as exc:
            raise classify_model_error(exc, streaming=bool(answer.chunks)) from exc
        raise ModelError("interrupted", "stream ended without response.completed")

    async def reset(self, key: ChatKey) -> None:
        # The old conversation stays on the server: the dialogue log still refers to it.
        await self._threads.close(key)


class LocalHistory:
    """Threads kept in SQLite; each turn sends the trimmed history through Chat Completions."""

    name = "local"
    takes_files = False

    def __init__(self, client: AsyncOpenAI, threads: ThreadStore, history_tokens: int) -> None:
        self._client = client
        self._threads = threads
        self._budget = history_tokens
        # How the output cap is sent: `max_tokens` is what vLLM, Ollama, llama.cpp and LM
        # Studio all read; OpenAI's own reasoning models want `max_completion_tokens`.
        self._cap_field = "max_tokens"

    async def open_thread(self, key: ChatKey) -> Thread:
        current = await self._threads.current(key)
        if current is not None and current.backend == self.name:
            return current
        # Coming from a server-side conversation: the new thread replays the old one's log.
        return await self._threads.create(key, self.name, continues=current)

    async def build_messages(
        self, thread: Thread, content: UserContent, instructions: str
    ) -> list[ChatCompletionMessageParam]:
        """Instructions, then as much recent history as fits the budget, then the new message."""
        text = content.full_text  # files go as their text forms
        user = _user_message(text, content.image_urls)
        # The instructions and the new message are always sent; history gets what is left.
        left = self._budget - estimate_tokens(instructions) - estimate_tokens(text)
        history = await self._threads.history(thread.id, max(left, 0), estimate_tokens)
        return [{"role": "system", "content": instructions}, *map(_chat_message, history), user]

    async def run_turn(
        self,
        thread: Thread,
        content: UserContent,
        *,
        model: str,
        instructions: str,
        on_delta: OnDelta,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: Sequence[str] = (),
    ) -> ReplyResult:
        if tools:  # profiles with tools are refused at start on this backend (profiles.py)
            raise ModelError("bad_request", f"tools {list(tools)} need the OpenAI backend")
        messages = await self.build_messages(thread, content, instructions)
        started = time.perf_counter()
        answer = _Answer(on_delta, max_tokens)
        response_id: str | None = None
        usage: Mapping[str, Any] = {}
        finish_reason: str | None = None
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if temperature is not None:
            body["temperature"] = temperature
        try:
            stream = await self._open(body, max_tokens)
            async with stream:
                async for chunk in stream:
                    response_id = _str(chunk.get("id")) or response_id
                    usage = _mapping(chunk.get("usage")) or usage
                    for choice in map(_mapping, chunk.get("choices") or ()):
                        finish_reason = _str(choice.get("finish_reason")) or finish_reason
                        if not await answer.add(_mapping(choice.get("delta")).get("content")):
                            finish_reason = "length"  # read enough
                            break
                    if answer.cut:
                        break
        except ModelError:
            raise
        except Exception as exc:
            raise classify_model_error(exc, streaming=bool(answer.chunks)) from exc
        if finish_reason is None:
            raise ModelError("interrupted", "stream ended without finish_reason")
        if finish_reason in ("length", "content_filter") and answer.cut is None:
            answer.cut = CUT_LENGTH if finish_reason == "length" else finish_reason
        response = {"id": response_id, "usage": _chat_usage(usage)}
        return answer.result(response, model, started)

    async def _open(self, body: dict[str, Any], max_tokens: int | None) -> JsonEvents:
        """Start the stream, with the output cap in a field the server takes.

        A server that refuses the cap's field is asked again: with OpenAI's other name for
        it if the refusal names that one (remembered for later turns), else without a cap
        (vLLM refuses a request whose prompt plus cap exceed the model's context). The
        bot's own bound on what it reads holds either way.
        """
        if max_tokens is None:
            return await raw_stream(self._client, "/chat/completions", body)
        field_name: str | None = self._cap_field
        swapped = False
        while True:
            attempt = {**body, field_name: max_tokens} if field_name else body
            try:
                stream = await raw_stream(self._client, "/chat/completions", attempt)
            except openai.BadRequestError as exc:
                if field_name is None or not _about_cap(exc, field_name):
                    raise
                log.info("the model server refused %s (%s); asking again", field_name, exc.code)
                other = _CAP_FIELDS[field_name]
                if not swapped and other in exc.message:  # "use max_completion_tokens instead"
                    field_name, swapped = other, True
                else:
                    field_name = None
                continue
            if field_name is not None:
                self._cap_field = field_name
            return stream

    async def reset(self, key: ChatKey) -> None:
        await self._threads.close(key)


def _input_parts(content: UserContent) -> ResponseInputMessageContentListParam:
    """A Responses user message's parts: files with data as `input_file`s (a base64 data
    URL and the name), then the text (with the text forms of the other files), then images."""
    as_files = [f for f in content.files if f.data]
    text = UserContent(content.text, files=[f for f in content.files if not f.data]).full_text
    return [
        *(
            ResponseInputFileParam(
                type="input_file", filename=f.filename, file_data=data_url(f.mime_type, f.data)
            )
            for f in as_files
        ),
        {"type": "input_text", "text": text},
        *(
            ResponseInputImageParam(type="input_image", image_url=url, detail="auto")
            for url in content.image_urls
        ),
    ]


def _user_message(text: str, image_urls: Sequence[str]) -> ChatCompletionUserMessageParam:
    if not image_urls:
        return {"role": "user", "content": text}
    parts: list[ChatCompletionContentPartParam] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return {"role": "user", "content": parts}


def _chat_message(message: HistoryMessage) -> ChatCompletionMessageParam:
    if message.role == "user":
        return _user_message(
            message.content, [data_url(i.mime_type, i.data) for i in message.images]
        )
    return {"role": "assistant", "content": message.content}


def data_url(mime_type: str, data: bytes) -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}"


def _encode_with_files(body: dict[str, Any], content: UserContent) -> bytes:
    """`body` as the JSON request, its input the user message with `content`'s files."""
    message = {"type": "message", "role": "user", "content": _input_parts(content)}
    return json.dumps(
        {**body, "input": [message]}, ensure_ascii=False, separators=(",", ":")
    ).encode("utf-8")


async def raw_stream(client: AsyncOpenAI, path: str, body: dict[str, Any] | bytes) -> JsonEvents:
    """POST a streaming request; its server-sent events as plain JSON objects.

    The SDK's typed call (`responses.create(stream=True)`) builds a pydantic model for every
    event, full `Response` snapshots included: about half of the bot's CPU per message in
    bench/run.py's profile. `client.post` with `cast_to=object` keeps everything else the
    SDK does (auth, retries, status errors as exceptions, `error` events raised, connection
    cleanup) and hands over the decoded JSON as it is. `body` must already be the wire form
    (or be its JSON, encoded).
    """
    if isinstance(body, bytes):
        stream = await client.post(
            path, content=body, cast_to=object, stream=True, stream_cls=openai.AsyncStream[object]
        )
    else:
        stream = await client.post(
            path, body=body, cast_to=object, stream=True, stream_cls=openai.AsyncStream[object]
        )
    return JsonEvents(stream)


class JsonEvents:
    """An `AsyncStream[object]` seen as a stream of JSON objects (anything else is skipped)."""

    def __init__(self, stream: openai.AsyncStream[object]) -> None:
        self._stream = stream

    async def __aenter__(self) -> JsonEvents:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stream.close()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        async for item in self._stream:
            if isinstance(item, dict):
                yield item


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Answer:
    """An answer as it streams in: passed on to `on_delta`, kept, and bounded.

    With a token cap, no more than CHARS_PER_TOKEN characters per token are taken, whatever
    the server sends: past that the answer is cut (`cut`) and the stream should be left.
    """

    __slots__ = ("chunks", "cut", "limit", "on_delta", "size", "sources")

    def __init__(self, on_delta: OnDelta, max_tokens: int | None) -> None:
        self.on_delta = on_delta
        self.limit = max_tokens * CHARS_PER_TOKEN if max_tokens is not None else None
        self.chunks: list[str] = []
        self.size = 0
        self.cut: str | None = None
        self.sources: dict[str, Source] = {}  # by URL, in the order first cited

    def cite(self, annotation: object) -> None:
        """Keep a url_citation annotation's page (any other annotation is ignored)."""
        note = _mapping(annotation)
        url = _str(note.get("url"))
        if note.get("type") == "url_citation" and url and url not in self.sources:
            self.sources[url] = Source(url, utf8_safe(_str(note.get("title")) or ""))

    async def add(self, piece: object) -> bool:
        """Take one delta (anything but text is ignored); False once no more may be read."""
        if not isinstance(piece, str) or not piece:
            return True
        if self.limit is not None and self.size + len(piece) > self.limit:
            piece = piece[: self.limit - self.size]
            self.cut = CUT_LENGTH
        if piece:
            self.chunks.append(piece)
            self.size += len(piece)
            await self.on_delta(utf8_safe(piece))
        return self.cut is None

    def result(self, response: Mapping[str, Any], model: str, started: float) -> ReplyResult:
        """The turn's result; `response` holds the id, model and usage (Responses' names)."""
        usage = _mapping(response.get("usage"))
        for note in _annotations(response):  # the full list, should an event have been missed
            self.cite(note)
        return ReplyResult(
            # Text UTF-8 can't carry (a lone surrogate) would lose the turn: cleaned here.
            text=utf8_safe("".join(self.chunks) or _output_text(response)),
            model=_str(response.get("model")) or model,
            response_id=_str(response.get("id")),
            input_tokens=_int(usage.get("input_tokens")),
            output_tokens=_int(usage.get("output_tokens")),
            latency_ms=int((time.perf_counter() - started) * 1000),
            cut=self.cut,
            sources=tuple(self.sources.values()),
        )


def _chat_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Chat Completions' usage under the Responses API's names."""
    return {
        "input_tokens": usage.get("prompt_tokens"),
        "output_tokens": usage.get("completion_tokens"),
    }


def _incomplete_reason(response: Mapping[str, Any]) -> str:
    reason = _mapping(response.get("incomplete_details")).get("reason")
    if reason in (None, "max_output_tokens"):
        return CUT_LENGTH
    return str(reason)


_CAP_FIELDS = {"max_tokens": "max_completion_tokens", "max_completion_tokens": "max_tokens"}


def _about_cap(exc: openai.BadRequestError, field_name: str) -> bool:
    """Whether a 400 is about the output cap (its field, or prompt + cap over the context)."""
    if exc.param == field_name:
        return True
    message = exc.message.lower()
    return field_name in message or "context length" in message


def _output_text(response: Mapping[str, Any]) -> str:
    """The response's text, as the SDK's `Response.output_text` joins it."""
    return "".join(
        part.get("text", "")
        for item in response.get("output") or ()
        if _mapping(item).get("type") == "message"
        for part in map(_mapping, item.get("content") or ())
        if part.get("type") == "output_text" and isinstance(part.get("text"), str)
    )


def _annotations(response: Mapping[str, Any]) -> list[object]:
    """The annotations on the response's output text (its citations)."""
    return [
        note
        for item in response.get("output") or ()
        if _mapping(item).get("type") == "message"
        for part in map(_mapping, item.get("content") or ())
        if part.get("type") == "output_text"
        for note in part.get("annotations") or ()
    ]


def _failed_kind(response: Mapping[str, Any]) -> str:
    code = _mapping(response.get("error")).get("code")
    if code is None and response.get("status") == "incomplete":
        return "bad_request"
    return _error_event_kind(code)


def _error_event_kind(code: object) -> str:
    if code in ("rate_limit_exceeded",):
        return "rate_limited"
    if code in ("server_error", "vector_store_timeout"):
        return "server_error"
    return "bad_request" if code else "server_error"
