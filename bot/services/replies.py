"""Delivering a reply to Telegram: streamed drafts or a typing action, then the final messages."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any

from telegram import Bot, Message, MessageEntity, ReplyParameters
from telegram.constants import ChatAction
from telegram.error import BadRequest, EndPointNotFound, NetworkError, TelegramError, TimedOut

from bot.domain import ChatKey
from bot.services.formatting import (
    TEXT_LIMIT,
    Formatted,
    MarkdownTail,
    escape_rich,
    link_list,
    needs_rich,
    plain_parts,
    render_parts,
    rich_fits,
    rich_link_list,
    to_rich,
    utf16_len,
)
from bot.telegram_http import Dispatch, watch
from bot.texts import t

log = logging.getLogger(__name__)

TYPING_EVERY = 4.0  # a chat action shows for ~5 s
PLACEHOLDER_AFTER = 0.5  # seconds without a token before the "Thinking..." draft
# The placeholder as a rich draft: a RichBlockThinking (its HTML tag; drafts only).
THINKING = "<tg-thinking>{text}</tg-thinking>"


class ProgressGate:
    """Sheds progress calls (drafts, "typing...") when the bot or Telegram's pipe is full.

    Progress is a nicety; the reply is what the user waits for. A progress call is skipped
    when `max_in_flight` of them are already under way (queued in the rate limiter or for
    a connection, or on the wire), or when the event loop runs more than `max_lag` seconds
    behind (`watch_lag` measures it; 0 turns that test off). Replies then get the Bot API
    budget and the CPU: in bench/run.py's 1,000-chat burst the bot spent 15% less CPU, and
    at Telegram's 30 calls a second the replies were out in 34.4 s rather than 37.1 s (the
    floor is 34.3 s). A skipped draft costs nothing: the next one carries the newer text.
    """

    def __init__(self, max_in_flight: int = 16, max_lag: float = 0.1, tick: float = 0.05) -> None:
        self.max_in_flight = max_in_flight
        self.max_lag = max_lag
        self.tick = tick
        self.in_flight = 0
        self.lag = 0.0
        self.refusals = 0  # admit() said no (a draft refused again on its next try counts again)

    def admit(self) -> bool:
        lagging = self.max_lag > 0 and self.lag > self.max_lag
        if self.in_flight < self.max_in_flight and not lagging:
            return True
        self.refusals += 1
        return False

    def track(self, call: asyncio.Task[object], dispatch: Dispatch) -> None:
        """Count `call` as under way until it is over, and so is its request if it was sent
        (a call cancelled by its streamer leaves a sent request to finish on its own)."""
        self.in_flight += 1

        def done(_call: asyncio.Task[object]) -> None:
            sent = dispatch.request
            if sent is not None and not sent.done():
                sent.add_done_callback(self._release)
            else:
                self._release()

        call.add_done_callback(done)

    def _release(self, _: object = None) -> None:
        self.in_flight -= 1

    async def watch_lag(self) -> None:
        """Measure how late the event loop wakes a sleeper, every `tick` (a background task)."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.tick)
            self.lag = max(0.0, loop.time() - start - self.tick)


class RichMessages:
    """Whether answers may go out as rich messages (Bot API 10.1), remembered per process.

    An answer with what entities can't show (a table, a formula) is sent with
    `sendRichMessage`, and streamed with `sendRichMessageDraft`; python-telegram-bot 22
    predates both, so they go through `Bot.do_api_request`. When Telegram refuses one, that
    answer goes out with entities. A 400 may be about that answer's Markdown alone, so only
    `streak` refusals in a row (no rich message taken between them) turn rich messages off;
    a 404 (a Bot API server older than 10.1) does at once. Off, all answers use entities
    for the next `pause` seconds, so not every answer pays a failed call first; after it,
    the next answer that needs one tries again (the server may have been upgraded).
    """

    def __init__(self, enabled: bool = True, pause: float = 3600.0, streak: int = 3) -> None:
        self.enabled = enabled
        self.pause = pause
        self.streak = streak
        self.refusals = 0
        self._in_a_row = 0
        self._off_until = 0.0
        self._thinking_off_until = 0.0

    def allowed(self) -> bool:
        return self.enabled and time.monotonic() >= self._off_until

    def thinking_allowed(self) -> bool:
        """Whether the "Thinking..." placeholder may be a rich draft's thinking block."""
        return self.allowed() and time.monotonic() >= self._thinking_off_until

    def thinking_refused(self, exc: TelegramError) -> None:
        """Telegram refused a thinking block. A 404 (no rich messages at all) counts as any
        refusal; a 400 turns only thinking blocks off for the pause: tables stay rich."""
        if isinstance(exc, EndPointNotFound):
            self.refused("sendRichMessageDraft", exc)
            return
        self.refusals += 1
        self._thinking_off_until = time.monotonic() + self.pause
        log.warning(
            "Telegram refused a thinking block (%s); placeholders are plain for the next %.0f s",
            exc.message,
            self.pause,
        )

    def accepted(self) -> None:
        self._in_a_row = 0

    def refused(self, method: str, exc: TelegramError) -> None:
        self.refusals += 1
        self._in_a_row += 1
        if not isinstance(exc, EndPointNotFound) and self._in_a_row < self.streak:
            log.warning("Telegram refused %s (%s); this answer uses entities", method, exc.message)
            return
        self._in_a_row = 0
        self._off_until = time.monotonic() + self.pause
        log.warning(
            "Telegram refused %s (%s); answers use entities for the next %.0f s",
            method,
            exc.message,
            self.pause,
        )


@dataclass(frozen=True, slots=True)
class Links:
    """Links shown under an answer (a web search's sources): a heading, (title, url) pairs."""

    heading: str
    items: Sequence[tuple[str, str]]


RICH_REFUSALS = (BadRequest, EndPointNotFound)


class ReplyStreamer:
    """Shows progress while the model writes, then sends the final reply.

    In private chats the partial answer streams as a `sendMessageDraft` (throttled); in other
    chats a `typing` action is kept up. Telegram calls run in a background task, so the model
    stream is never held up by Telegram's latency.
    """

    def __init__(
        self,
        bot: Bot,
        key: ChatKey,
        *,
        private: bool,
        draft_id: int,
        reply_to: int | None,
        interval: float,
        gate: ProgressGate | None = None,
        rich: RichMessages | None = None,
        lang: str | None = None,
    ) -> None:
        self._bot = bot
        self._gate = gate
        self._rich = rich
        self._lang = lang
        self._rich_drafts = False  # the answer needed a rich draft: the rest follow suit
        self._rich_refused = False  # Telegram refused this answer's rich draft: entities now
        self._key = key
        self._private = private
        self._draft_id = draft_id or 1  # must be non-zero
        self._reply_to = reply_to
        self._interval = interval
        # Only the end of the answer is kept for drafts: a draft's cost stays the same
        # however long the answer grows.
        self._tail = MarkdownTail()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._call: asyncio.Task[object] | None = None  # the progress call under way
        self._dispatch: Dispatch | None = None  # whether it was sent

    @property
    def _topic(self) -> int | None:
        return self._key.topic_id or None

    async def __aenter__(self) -> ReplyStreamer:
        loop = self._draft_loop() if self._private else self._typing_loop()
        self._task = asyncio.create_task(loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def on_delta(self, delta: str) -> None:
        """Take a piece of the model's answer (cheap; never waits on Telegram)."""
        self._tail.append(delta)
        self._changed.set()

    async def _stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        call, self._call = self._call, None
        if call is not None:
            # A progress call still queued (rate limiter, pool) is dropped: it was never
            # sent. One that went out is let arrive before the reply, never after it (where
            # a draft or "typing..." would linger on screen); its outcome no longer matters.
            call.cancel()
            await asyncio.wait([call])
            if not call.cancelled():
                call.exception()
            sent = self._dispatch.request if self._dispatch is not None else None
            if sent is not None:
                await asyncio.wait([sent])

    def _admit(self) -> bool:
        """Whether a progress call may go out now (see ProgressGate)."""
        return self._gate is None or self._gate.admit()

    async def _telegram(self, call: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Make a progress call; stopping the streamer drops it if unsent, else waits for it."""
        context = contextvars.copy_context()
        self._dispatch = context.run(watch)
        self._call = asyncio.create_task(call(), context=context)
        if self._gate is not None:
            self._gate.track(self._call, self._dispatch)
        await asyncio.shield(self._call)
        self._call = None

    def _rich_draft(self, markdown: str) -> Callable[[], Coroutine[Any, Any, object]]:
        api_kwargs: dict[str, Any] = {
            "chat_id": self._key.chat_id,
            "draft_id": self._draft_id,
            "rich_message": {"markdown": markdown},
        }
        if self._topic is not None:
            api_kwargs["message_thread_id"] = self._topic
        return partial(self._bot.do_api_request, "sendRichMessageDraft", api_kwargs=api_kwargs)

    def _rich_ok(self) -> bool:
        rich = self._rich
        return rich is not None and not self._rich_refused and rich.allowed()

    async def _try_rich_draft(self, view: str) -> bool:
        """Show `view` as a rich draft if it needs one and Telegram takes it; whether it did."""
        if not self._rich_ok():
            return False
        if not self._rich_drafts and not needs_rich(view):
            return False
        markdown = to_rich(view)
        if not rich_fits(markdown):
            return False
        self._rich_drafts = True
        return await self._send_rich_draft(markdown)

    async def _placeholder(self) -> None:
        """The "Thinking..." placeholder: a rich draft's thinking block while rich messages
        are allowed, else (or if Telegram refuses it) an empty draft, Telegram's own. The
        drafts that replace it are rich or not as the answer needs, like any others."""
        rich = self._rich
        if rich is not None and self._rich_ok() and rich.thinking_allowed():
            text = escape_rich(t("draft.thinking", lang=self._lang))
            try:
                await self._telegram(self._rich_draft(THINKING.format(text=text)))
            except RICH_REFUSALS as exc:
                rich.thinking_refused(exc)
            else:
                return
        await self._telegram(self._draft(""))

    async def _send_rich_draft(self, markdown: str) -> bool:
        """Send a rich draft; False (and no more rich drafts) if Telegram refuses it."""
        rich = self._rich
        assert rich is not None
        try:
            await self._telegram(self._rich_draft(markdown))
        except RICH_REFUSALS as exc:
            self._rich_refused = True
            rich.refused("sendRichMessageDraft", exc)
            return False
        return True

    def _draft(
        self, text: str, entities: list[MessageEntity] | None = None
    ) -> Callable[[], Coroutine[Any, Any, object]]:
        return partial(
            self._bot.send_message_draft,
            self._key.chat_id,
            self._draft_id,
            text=text,
            entities=entities,
            message_thread_id=self._topic,
        )

    async def _draft_loop(self) -> None:
        try:
            # Telegram's "Thinking..." placeholder (an empty draft), only if the model is slow
            # to start: a fast answer's first words are a better first sign of life.
            # asyncio.timeout, not wait_for: on 3.11, wait_for can swallow a cancel that
            # lands as the event fires, and this loop would then never stop.
            try:
                async with asyncio.timeout(PLACEHOLDER_AFTER):
                    await self._changed.wait()
            except TimeoutError:
                if self._admit():
                    await self._placeholder()
            while not self._stopping:
                await self._changed.wait()
                if not self._admit():  # shed: try again later, with whatever is new by then
                    await asyncio.sleep(self._interval)
                    continue
                self._changed.clear()
                # The draft shows the part being written, formatted as the final one will be
                # (rendered from the answer's last few thousand characters, not all of it).
                view = self._tail.view()
                if not await self._try_rich_draft(view):
                    parts = render_parts(view)
                    if not parts:
                        continue
                    await self._telegram(self._draft(parts[-1].text, list(parts[-1].entities)))
                await asyncio.sleep(self._interval)
        except TelegramError as exc:
            # Drafts are a nicety: if Telegram refuses them, the final message still comes.
            log.info("draft streaming stopped for chat %s: %s", self._key, type(exc).__name__)

    async def _typing_loop(self) -> None:
        while not self._stopping:
            try:
                if self._admit():
                    await self._telegram(
                        partial(
                            self._bot.send_chat_action,
                            self._key.chat_id,
                            ChatAction.TYPING,
                            message_thread_id=self._topic,
                        )
                    )
            except TelegramError as exc:
                log.debug("typing action failed for chat %s: %s", self._key, type(exc).__name__)
            await asyncio.sleep(TYPING_EVERY)

    async def send(
        self, markdown: str, footer: str | None = None, links: Links | None = None
    ) -> list[int]:
        """Stop the progress display and send the model's Markdown, then `links` and
        `footer` (plain text) under it; the ids of the messages sent.

        An answer with a table or a formula goes as one rich message while Telegram takes
        them (see RichMessages); any other, or one refused, as messages with entities.
        """
        await self._stop()
        rich = self._rich
        wanted = self._rich_drafts or needs_rich(markdown)
        if rich is not None and wanted and not self._rich_refused and rich.allowed():
            document = rich_answer(markdown, footer, links)
            if document is not None:
                try:
                    sent = await send_rich(self._bot, self._key, document, self._reply_to)
                except RICH_REFUSALS as exc:
                    rich.refused("sendRichMessage", exc)
                else:
                    rich.accepted()
                    return [sent]
        parts = render_parts(markdown) or plain_parts(markdown)
        if links is not None and (listed := link_list(links.heading, links.items)):
            parts = with_footer(parts, listed)
        parts = with_footer(parts, footer)
        return await send_parts(self._bot, self._key, parts, reply_to=self._reply_to)


def rich_answer(markdown: str, footer: str | None, links: Links | None) -> str | None:
    """The answer, its links and `footer` as one rich message's Markdown; None if that is
    over a rich message's limits."""
    pieces = [to_rich(markdown)]
    if links is not None and (listed := rich_link_list(links.heading, links.items)):
        pieces.append(listed)
    if footer:
        pieces.append(escape_rich(footer))
    document = "\n\n".join(pieces)
    return document if rich_fits(document) else None


def with_footer(parts: list[Formatted], footer: str | Formatted | None) -> list[Formatted]:
    """Put `footer` (plain, or with entities) under the last part, or in a part of its own
    if it doesn't fit there."""
    if not footer:
        return parts
    if isinstance(footer, str):
        footer = Formatted(footer, ())
    last = parts[-1]
    shift = utf16_len(last.text) + 2
    if shift + utf16_len(footer.text) > TEXT_LIMIT:
        return [*parts, footer]
    moved = tuple(
        MessageEntity(e.type, e.offset + shift, e.length, url=e.url, language=e.language)
        for e in footer.entities
    )
    return [*parts[:-1], Formatted(f"{last.text}\n\n{footer.text}", (*last.entities, *moved))]


async def send_rich(bot: Bot, key: ChatKey, markdown: str, reply_to: int | None) -> int:
    """Send `markdown` as one rich message (sendRichMessage, through PTB's raw request);
    its id. Telegram's refusal is raised (BadRequest, or EndPointNotFound before 10.1)."""
    api_kwargs: dict[str, Any] = {"chat_id": key.chat_id, "rich_message": {"markdown": markdown}}
    if key.topic_id:
        api_kwargs["message_thread_id"] = key.topic_id
    if reply_to is not None:
        api_kwargs["reply_parameters"] = ReplyParameters(
            message_id=reply_to, allow_sending_without_reply=True
        )
    message = await _with_retries(
        bot.do_api_request, "sendRichMessage", api_kwargs=api_kwargs, return_type=Message
    )
    return int(message.message_id)


async def send_parts(
    bot: Bot, key: ChatKey, parts: Sequence[Formatted], *, reply_to: int | None
) -> list[int]:
    """Send parts in order; the first replies to the user's message where that helps.

    Should Telegram still refuse a part's entities, that part goes again as plain text:
    a reply is never lost to formatting.
    """
    ids: list[int] = []
    for i, part in enumerate(parts):
        reply = (
            ReplyParameters(message_id=reply_to, allow_sending_without_reply=True)
            if reply_to is not None and i == 0
            else None
        )
        thread = key.topic_id or None
        try:
            message = await _with_retries(
                bot.send_message,
                key.chat_id,
                part.text,
                entities=list(part.entities) or None,
                message_thread_id=thread,
                reply_parameters=reply,
            )
        except BadRequest as exc:
            if not part.entities:
                raise
            log.warning("Telegram refused a formatted part (%s); sending it plain", exc.message)
            message = await _with_retries(
                bot.send_message,
                key.chat_id,
                part.text,
                message_thread_id=thread,
                reply_parameters=reply,
            )
        ids.append(message.message_id)
    return ids


SEND_RETRIES = (0.5, 1.0, 2.0)  # seconds before each retry of a transient failure


async def _with_retries(
    send: Callable[..., Awaitable[Message]], *args: Any, **kwargs: Any
) -> Message:
    """Retry Telegram's transient failures (502s, dropped connections, no free connection).

    429s are retried by the rate limiter; a timeout is not retried, as the message may
    have gone through, and a reply sent twice is worse than one reported late.
    """
    for delay in SEND_RETRIES:
        try:
            return await send(*args, **kwargs)
        except (BadRequest, TimedOut):
            raise
        except NetworkError as exc:
            log.warning("Telegram send failed (%s); retrying in %.1f s", exc.message, delay)
            await asyncio.sleep(delay)
    return await send(*args, **kwargs)


async def send_text(bot: Bot, key: ChatKey, text: str, *, reply_to: int | None) -> list[int]:
    """Send the bot's own words (never parsed as Markdown), split if long."""
    return await send_parts(bot, key, plain_parts(text) or [Formatted(text, ())], reply_to=reply_to)
