"""Delivering a reply to Telegram: streamed drafts or a typing action, then the final messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from types import TracebackType

from telegram import Bot, ReplyParameters
from telegram.constants import ChatAction, MessageLimit
from telegram.error import TelegramError

from storage.db import ChatKey

log = logging.getLogger(__name__)

TEXT_LIMIT: int = MessageLimit.MAX_TEXT_LENGTH  # 4096
TYPING_EVERY = 4.0  # a chat action shows for ~5 s


def utf16_len(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units (an emoji outside the BMP counts 2)."""
    return len(text.encode("utf-16-le")) // 2


def _fit(text: str, limit: int) -> int:
    """The largest number of characters of `text` whose UTF-16 length is at most `limit`."""
    if len(text) <= limit and utf16_len(text) <= limit:
        return len(text)
    units = 0
    for i, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > limit:
            return i
    return len(text)


def split_text(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """Split a reply into Telegram-sized parts at paragraph, line or word boundaries.

    A boundary is used only if it keeps at least half of the part, so a long paragraph is
    not cut into slivers; a hard cut happens only when a part has no space at all.
    """
    parts: list[str] = []
    rest = text.strip()
    while rest:
        end = _fit(rest, limit)
        if end >= len(rest):
            parts.append(rest)
            break
        window = rest[:end]
        cut = -1
        for separator in ("\n\n", "\n", " "):
            pos = window.rfind(separator)
            if pos >= end // 2 or (separator == " " and pos > 0):
                cut = pos
                break
        if cut <= 0:
            cut = end
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    return [p for p in parts if p]


def draft_preview(text: str, limit: int = TEXT_LIMIT) -> str:
    """What a draft can show of a growing reply: the last part, as the final split will."""
    if utf16_len(text) <= limit:
        return text
    return split_text(text, limit)[-1]


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
    ) -> None:
        self._bot = bot
        self._key = key
        self._private = private
        self._draft_id = draft_id or 1  # must be non-zero
        self._reply_to = reply_to
        self._interval = interval
        self._chunks: list[str] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.first_draft_at: float | None = None  # monotonic time of the first text draft

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
        self._chunks.append(delta)
        self._changed.set()

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _draft_loop(self) -> None:
        try:
            # An empty draft shows Telegram's "Thinking..." placeholder straight away.
            await self._bot.send_message_draft(
                self._key.chat_id, self._draft_id, text="", message_thread_id=self._topic
            )
            while True:
                await self._changed.wait()
                self._changed.clear()
                text = draft_preview("".join(self._chunks))
                if not text.strip():
                    continue
                await self._bot.send_message_draft(
                    self._key.chat_id, self._draft_id, text=text, message_thread_id=self._topic
                )
                if self.first_draft_at is None:
                    self.first_draft_at = time.monotonic()
                await asyncio.sleep(self._interval)
        except TelegramError as exc:
            # Drafts are a nicety: if Telegram refuses them, the final message still comes.
            log.info("draft streaming stopped for chat %s: %s", self._key, type(exc).__name__)

    async def _typing_loop(self) -> None:
        while True:
            try:
                await self._bot.send_chat_action(
                    self._key.chat_id, ChatAction.TYPING, message_thread_id=self._topic
                )
            except TelegramError as exc:
                log.debug("typing action failed for chat %s: %s", self._key, type(exc).__name__)
            await asyncio.sleep(TYPING_EVERY)

    async def send(self, text: str, footer: str | None = None) -> list[int]:
        """Stop the progress display and send `text` (+ `footer`) as messages; their ids."""
        await self._stop()
        return await send_parts(
            self._bot,
            self._key,
            with_footer(split_text(text) or [text], footer),
            reply_to=self._reply_to,
        )


def with_footer(parts: list[str], footer: str | None) -> list[str]:
    """Put `footer` under the last part, or in a part of its own if that one is full."""
    if not footer:
        return parts
    if utf16_len(parts[-1]) + 2 + utf16_len(footer) <= TEXT_LIMIT:
        return [*parts[:-1], f"{parts[-1]}\n\n{footer}"]
    return [*parts, footer]


async def send_parts(
    bot: Bot, key: ChatKey, parts: Sequence[str], *, reply_to: int | None
) -> list[int]:
    """Send parts in order; the first replies to the user's message where that helps."""
    ids: list[int] = []
    for i, part in enumerate(parts):
        reply = (
            ReplyParameters(message_id=reply_to, allow_sending_without_reply=True)
            if reply_to is not None and i == 0
            else None
        )
        message = await bot.send_message(
            key.chat_id, part, message_thread_id=key.topic_id or None, reply_parameters=reply
        )
        ids.append(message.message_id)
    return ids
