"""Photos and image documents: pick the file, download it, prepare it, answer in the thread.

Memory for image work is bounded by what the bot decides, not by what users send. An album
waits for its last part as Telegram messages (file ids), nothing downloaded. When it is
answered, its images go through four process-wide budgets, always taken in this order and
each given back without waiting on a later one, so they cannot deadlock:

* ``pending``: the prepared images of the photo messages being prepared, reserved for the
  whole message before its first download at the most a prepared image can take (a
  ``max_side`` square at 1 B/px), until its turn starts.
* ``held``: the bytes of one downloaded file, reserved before the download (twice the size
  Telegram declares, for the copies a download makes on its way in) until the image is
  prepared. ``downloads`` bounds how many are fetched at once.
* ``decoding``: one image's estimated preparation cost (``ImageInfo.decode_bytes``, from its
  headers, before any decoding), reserved until the worker thread is done with it, at most
  ``concurrency`` at a time. An image that alone costs more than
  ``ImageLimits.max_decode_bytes`` is refused with a reason.
* ``turns``: the prepared images of the turns talking to the model, ``TURN_COPIES`` times
  their size (the bytes, their data URLs, the request body), until the answer is sent.

All are FIFO, so one chat's big album cannot starve another chat's photo for ever.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import sys
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from telegram import Bot, Message
from telegram.constants import ChatAction
from telegram.error import TelegramError

from bot.domain import ChatKey, StoredImage
from bot.services.chat import ChatService, Incoming
from bot.services.images import (
    ImageLimits,
    ImageRejected,
    PreparedImage,
    inspect_image,
    prepare_image,
)
from bot.services.replies import send_text
from bot.texts import t

log = logging.getLogger(__name__)

IMAGE_MIME_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})

MIB = 1024 * 1024
# Downloaded bytes held at once across all chats (raised to fit one file of the largest size
# the bot downloads, with its copies): a few big photos, enough to keep both decoding
# slots busy, while the rest of ten chats' albums wait as file ids.
HELD_BYTES = 48 * MIB
DOWNLOADS = 4  # files fetched from Telegram at once
# Bytes per byte of file a download holds at its peak: aiohttp joins the body's chunks,
# PTB copies it into a bytearray, and that becomes the bytes the image is prepared from.
DOWNLOAD_COPIES = 2
# Prepared images waiting for the rest of their message to be prepared, reserved at the
# most a 2048-pixel image can take: an album and a half at once.
PENDING_BYTES = 64 * MIB
# Prepared images in turns being answered, counted TURN_COPIES times: the image, its
# base64 data URL (4/3), the JSON request text and its encoded bytes (4/3 each), and the
# copy written to the log. Several albums of ordinary photos at once; a turn of ten
# noise-filled ones (the worst case for JPEG) runs alone.
TURN_BYTES = 64 * MIB
TURN_COPIES = 6

_T = TypeVar("_T")

# What the budgets count must be what the process holds, but glibc's malloc keeps freed
# memory: after a large block is freed it raises its mmap threshold (up to 32 MB), so later
# image-sized blocks (Pillow's 16 MB blocks, downloaded files, request bodies) come from
# the heaps, where holes keep pages resident, in one arena per worker thread. With blocks
# of MMAP_THRESHOLD and more always mmapped, and so returned to the kernel when freed, the
# peak RSS of tests/test_image_memory.py's albums fell by a quarter to a third;
# malloc_trim after each image added nothing to that. Set once, process-wide, by the
# photo service.
MMAP_THRESHOLD = 1 * MIB
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_memory_promptly() -> bool:
    """Have glibc mmap blocks of MMAP_THRESHOLD and more, so freeing one returns it to the
    kernel at once (this also stops glibc raising the threshold). True if it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)


async def _collect_turn_garbage() -> None:
    """Free what a finished turn left in reference cycles before its bytes are given back.

    The OpenAI SDK's stream and its iterator refer to each other, so the response, and
    through it the request (ten images are tens of MB of base64 JSON), live until the
    cyclic GC next runs, which may be many turns later (big bytes objects don't count
    towards its thresholds): without this, ten chats' albums in tests/test_image_memory.py
    peaked at twice the RSS. A young-generation collection (under a millisecond) finds
    them; their finalizers close the stream's generator in a task, hence the yield.
    """
    gc.collect(1)
    await asyncio.sleep(0)


class MemoryBudget:
    """A FIFO semaphore counted in bytes, and optionally in holders.

    Waiters are served in arrival order, so a large request is not starved by small ones.
    A request larger than the whole budget waits until it is empty and then runs alone.
    """

    def __init__(self, total: int, *, slots: int = 0) -> None:
        if total < 1 or slots < 0:
            raise ValueError("MemoryBudget needs total >= 1 and slots >= 0")
        self.total = total
        self.slots = slots  # 0: any number of holders
        self.used = 0
        self.holders = 0
        self.peak = 0  # the most bytes ever held at once (for tests and benchmarks)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def hold(self, nbytes: int) -> Hold:
        """``async with budget.hold(n) as h``: wait for `n` bytes, give them back on exit."""
        return Hold(self, min(max(0, nbytes), self.total))

    def _fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.total and (not self.slots or self.holders < self.slots)

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        self.holders += 1
        self.peak = max(self.peak, self.used)

    async def _acquire(self, nbytes: int) -> None:
        if not self._waiters and self._fits(nbytes):
            self._take(nbytes)
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (nbytes, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give_back(nbytes, holder=True)  # granted as we were cancelled
            else:
                self._waiters.remove(entry)
                self._wake()  # the head may have been us, blocking smaller ones behind
            raise

    def _give_back(self, nbytes: int, *, holder: bool) -> None:
        self.used -= nbytes
        if holder:
            self.holders -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            nbytes, waiter = self._waiters.popleft()
            self._take(nbytes)
            waiter.set_result(None)


class Hold:
    """Bytes held in a MemoryBudget. Work handed to a thread with ``run`` keeps them held
    until the thread is done, even if the awaiting task is cancelled first."""

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes
        self._held = False
        self._threads = 0
        self._exited = False

    async def __aenter__(self) -> Hold:
        await self.budget._acquire(self.nbytes)
        self._held = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exited = True
        if not self._threads:
            self._release()

    def shrink(self, nbytes: int) -> None:
        """Give back all but `nbytes` (once the real size is known)."""
        nbytes = max(0, nbytes)
        if self._held and nbytes < self.nbytes:
            freed, self.nbytes = self.nbytes - nbytes, nbytes
            self.budget._give_back(freed, holder=False)

    async def run(self, fn: Callable[..., _T], *args: object) -> _T:
        """``asyncio.to_thread(fn, *args)``, the bytes held until the thread returns."""
        loop = asyncio.get_running_loop()
        self._threads += 1

        def work() -> _T:
            try:
                return fn(*args)
            finally:
                try:
                    loop.call_soon_threadsafe(self._thread_done)
                except RuntimeError:  # the loop is closed: nothing is waiting any more
                    pass

        return await asyncio.to_thread(work)

    def _thread_done(self) -> None:
        self._threads -= 1
        if self._exited and not self._threads:
            self._release()

    def release(self) -> None:
        """Give the bytes back now rather than on exit (only when no thread has them)."""
        if not self._threads:
            self._release()

    def _release(self) -> None:
        if self._held:
            self._held = False
            self.budget._give_back(self.nbytes, holder=True)


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

    def __init__(
        self,
        chat: ChatService,
        limits: ImageLimits,
        *,
        concurrency: int = 2,
        decode_bytes: int | None = None,
        held_bytes: int = HELD_BYTES,
        downloads: int = DOWNLOADS,
        pending_bytes: int = PENDING_BYTES,
        turn_bytes: int = TURN_BYTES,
    ) -> None:
        self.chat = chat
        self.limits = limits
        return_freed_memory_promptly()
        # Preparing an image takes a core and up to limits.max_decode_bytes: by default one
        # image that expensive at a time, or two cheaper ones.
        self.decoding = MemoryBudget(
            max(decode_bytes or 0, limits.max_decode_bytes), slots=concurrency
        )
        self.held = MemoryBudget(max(held_bytes, DOWNLOAD_COPIES * limits.max_bytes))
        self._downloads = asyncio.Semaphore(downloads)
        # JPEG at quality 85 stays under ~0.8 B/px even for noise; WebP at 85 likewise.
        self.output_bound = limits.max_side * limits.max_side
        self.pending = MemoryBudget(max(pending_bytes, self.output_bound))
        self.turns = MemoryBudget(turn_bytes)

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
        """Download one image (never past the size limit) and prepare it off the event loop.

        The file's bytes are held in ``held`` from before the download until it is
        prepared; its estimated decoding cost in ``decoding`` while a thread works on it.
        """
        size = ref.size if ref.size is not None else self.limits.max_bytes
        async with self.held.hold(DOWNLOAD_COPIES * size) as held:
            async with self._downloads:
                data = await self._download(bot, ref, held)
            held.shrink(len(data))
            try:
                info = await held.run(inspect_image, data, self.limits)
                async with self.decoding.hold(info.decode_bytes) as decoding:
                    return await decoding.run(prepare_image, data, self.limits, info)
            except ImageRejected as exc:
                log.info("image refused: %s (%s)", exc.reason, exc.detail)
                raise PhotoRejected(f"image.{exc.reason}") from exc

    async def _download(self, bot: Bot, ref: FileRef, held: Hold) -> bytes:
        try:
            tg_file = await bot.get_file(ref.file_id)
            if tg_file.file_size is not None:
                if tg_file.file_size > self.limits.max_bytes:
                    raise PhotoRejected("image.too_large")
                held.shrink(DOWNLOAD_COPIES * tg_file.file_size)
            buf = await tg_file.download_as_bytearray()
        except TelegramError as exc:
            log.warning("image download failed: %s", type(exc).__name__)
            raise PhotoRejected("image.download_failed") from exc
        if len(buf) > self.limits.max_bytes:
            raise PhotoRejected("image.too_large")
        data = bytes(buf)
        del buf
        return data

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
            # The bot is about to write about the photo, not send one: "typing…".
            await bot.send_chat_action(
                key.chat_id, ChatAction.TYPING, message_thread_id=key.topic_id or None
            )
        except TelegramError:
            pass  # only a progress hint
        async with AsyncExitStack() as stack:
            pending = await stack.enter_async_context(
                self.pending.hold(len(messages) * self.output_bound)
            )
            results = await asyncio.gather(
                *(self._one(bot, m) for m in messages), return_exceptions=True
            )
            images = [r for r in results if isinstance(r, PreparedImage)]
            refusals = [r for r in results if isinstance(r, PhotoRejected)]
            unexpected = [
                r
                for r in results
                if isinstance(r, BaseException) and not isinstance(r, PhotoRejected)
            ]
            if unexpected:
                raise unexpected[0]
            size = sum(len(i.data) for i in images)
            await stack.enter_async_context(self.turns.hold(TURN_COPIES * size))
            pending.release()  # the images are the turn's now
            try:
                await self._reply(bot, key, chat_type, user_id, messages, lang, images, refusals)
            finally:
                await _collect_turn_garbage()

    async def _reply(
        self,
        bot: Bot,
        key: ChatKey,
        chat_type: str,
        user_id: int | None,
        messages: Sequence[Message],
        lang: str | None,
        images: list[PreparedImage],
        refusals: list[PhotoRejected],
    ) -> None:
        first = messages[0]
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
