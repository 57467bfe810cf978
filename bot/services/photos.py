"""Photos and image documents: pick the file, download it, prepare it, answer in the thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from telegram import Bot, Message
from telegram.constants import ChatAction
from telegram.error import TelegramError

from bot.services.chat import ChatService, Incoming
from bot.services.images import ImageLimits, ImageRejected, PreparedImage, prepare_image
from bot.services.replies import send_text
from bot.texts import t
from storage.db import ChatKey, StoredImage

log = logging.getLogger(__name__)

IMAGE_MIME_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})


@dataclass(frozen=True, slots=True)
class FileRef:
    file_id: str
    size: int | None


class PhotoRejected(Exception):
    """An image the bot won't process; `key` names the user-facing explanation."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def is_image_document(message: Message) -> bool:
    doc = message.document
    return doc is not None and (doc.mime_type or "").startswith("image/")


class PhotoService:
    """Turns photo messages (one, or an album) into one vision turn of the chat's thread."""

    def __init__(self, chat: ChatService, limits: ImageLimits, *, concurrency: int = 2) -> None:
        self.chat = chat
        self.limits = limits
        # Preparing a large image takes up to ~200 MB (WebP) and a core: bound it.
        self._prepare_slots = asyncio.Semaphore(concurrency)

    @property
    def limit_mb(self) -> int:
        return self.limits.max_bytes // (1024 * 1024)

    def pick(self, message: Message) -> FileRef:
        """The file to fetch: the largest photo size within the limit, or the image document."""
        if message.photo:
            fitting = [
                p
                for p in message.photo
                if p.file_size is None or p.file_size <= self.limits.max_bytes
            ]
            if not fitting:
                raise PhotoRejected("image.too_large")
            best = max(fitting, key=lambda p: p.width * p.height)
            return FileRef(best.file_id, best.file_size)
        doc = message.document
        if doc is None:
            raise PhotoRejected("image.not_an_image")
        if (doc.mime_type or "") not in IMAGE_MIME_TYPES:
            raise PhotoRejected("image.unsupported_format")
        if doc.file_size is not None and doc.file_size > self.limits.max_bytes:
            raise PhotoRejected("image.too_large")
        return FileRef(doc.file_id, doc.file_size)

    async def fetch(self, bot: Bot, ref: FileRef) -> PreparedImage:
        """Download one image (never past the size limit) and prepare it off the event loop."""
        try:
            tg_file = await bot.get_file(ref.file_id)
            if tg_file.file_size is not None and tg_file.file_size > self.limits.max_bytes:
                raise PhotoRejected("image.too_large")
            data = bytes(await tg_file.download_as_bytearray())
        except TelegramError as exc:
            log.warning("image download failed: %s", type(exc).__name__)
            raise PhotoRejected("image.download_failed") from exc
        async with self._prepare_slots:
            try:
                return await asyncio.to_thread(prepare_image, data, self.limits)
            except ImageRejected as exc:
                log.info("image refused: %s (%s)", exc.reason, exc.detail)
                raise PhotoRejected(f"image.{exc.reason}") from exc

    async def answer(
        self,
        bot: Bot,
        key: ChatKey,
        chat_type: str,
        user_id: int | None,
        messages: Sequence[Message],
        lang: str | None = None,
    ) -> None:
        """Prepare every image of the message(s) and ask the vision model about them."""
        first = messages[0]
        # Checked before anything is downloaded: a refused photo costs nothing.
        probe = Incoming(key, chat_type, user_id, first.message_id, text="", lang=lang)
        if await self.chat.already_answered(probe) or await self.chat.refuse_over_limit(bot, probe):
            return
        if not (await self.chat.profiles.for_chat(key)).vision:
            await send_text(
                bot,
                key,
                t("assistant.no_vision", lang=lang),
                reply_to=None if chat_type == "private" else first.message_id,
            )
            return
        try:
            await bot.send_chat_action(
                key.chat_id, ChatAction.UPLOAD_PHOTO, message_thread_id=key.topic_id or None
            )
        except TelegramError:
            pass  # only a progress hint
        results = await asyncio.gather(
            *(self._one(bot, m) for m in messages), return_exceptions=True
        )
        images = [r for r in results if isinstance(r, PreparedImage)]
        refusals = [r for r in results if isinstance(r, PhotoRejected)]
        unexpected = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, PhotoRejected)
        ]
        if unexpected:
            raise unexpected[0]
        reply_to = None if chat_type == "private" else first.message_id
        if refusals:
            text = t(refusals[0].key, lang=lang, limit=self.limit_mb)
            if images:
                text = t("image.some_skipped", lang=lang, count=len(refusals), reason=text)
            await send_text(bot, key, text, reply_to=reply_to)
        if not images:
            return
        caption = next((m.caption for m in messages if m.caption and m.caption.strip()), None)
        question = caption or t("describe_many" if len(images) > 1 else "describe", lang=lang)
        await self.chat.answer(
            bot,
            Incoming(
                key=key,
                chat_type=chat_type,
                user_id=user_id,
                message_id=first.message_id,
                text=question,
                images=[
                    StoredImage(i.sha256, i.mime_type, i.width, i.height, i.data) for i in images
                ],
                lang=lang,
            ),
        )

    async def _one(self, bot: Bot, message: Message) -> PreparedImage:
        return await self.fetch(bot, self.pick(message))
