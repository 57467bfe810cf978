"""Voice notes, audio files and video notes: transcribed, shown to the user, answered as text.

A recording is checked against the limits from what Telegram declares (duration, file size,
format) before anything is downloaded, so a refusal costs nothing. It is then downloaded,
sent as it is (Telegram's OGG/Opus included: the transcription API reads it) to the
configured endpoint's ``/audio/transcriptions``, and the transcript goes into the chat's
thread as the user's words: the reply quotes what the bot heard, then answers it, and
follow-ups see the transcript like any text. An empty transcript is said so, never asked
about.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
from dataclasses import dataclass, replace
from datetime import timedelta

import openai
from openai import AsyncOpenAI
from telegram import Bot, Message, MessageEntity
from telegram.constants import ChatAction
from telegram.error import TelegramError

from bot.errors import ModelError, ParleyError, classify_model_error
from bot.services.chat import ChatService, Incoming
from bot.services.formatting import TEXT_LIMIT, Formatted, plain_parts, utf16_len
from bot.services.photos import MemoryBudget
from bot.services.replies import send_parts, send_text
from bot.texts import t

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# The formats /audio/transcriptions reads, by file extension (the API takes the format
# from the file name).
FORMATS = frozenset({"flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav", "webm"})
# Extensions for MIME types Telegram reports, for files whose name says nothing usable.
MIME_FORMATS = {
    "audio/ogg": "ogg",
    "audio/opus": "ogg",
    "audio/x-opus+ogg": "ogg",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/mpga": "mpga",
    "audio/mp4": "m4a",
    "audio/m4a": "m4a",
    "audio/x-m4a": "m4a",
    "audio/aac": "m4a",  # what Telegram's clients label .m4a music with
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
    "audio/webm": "webm",
    "video/webm": "webm",
    "video/mp4": "mp4",
}
FORMAT_MIME = {
    "ogg": "audio/ogg",
    "mp3": "audio/mpeg",
    "mpga": "audio/mpeg",
    "mpeg": "audio/mpeg",
    "m4a": "audio/mp4",
    "mp4": "video/mp4",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "webm": "audio/webm",
}

# Bytes of recordings held at once across all chats, each counted HELD_COPIES times from
# before its download until its transcript is back: the downloaded bytearray, its bytes,
# and the multipart request body. Voice notes are small (a minute of Opus is ~100 KB), so
# this only bites when several chats send long audio files at once.
HELD_BYTES = 96 * MIB
HELD_COPIES = 3

# The shown transcript is collapsed (an expandable block quote) past this many UTF-16
# code units or lines: Telegram shows about three lines of a collapsed quote.
COLLAPSE_AFTER_CHARS = 300
COLLAPSE_AFTER_LINES = 3


@dataclass(frozen=True, slots=True)
class Recording:
    """A recording to transcribe, as Telegram declares it (nothing downloaded yet)."""

    file_id: str
    file_size: int | None
    seconds: float
    filename: str  # its extension names the format for the transcription API
    mime_type: str


class RecordingRejected(ParleyError):
    """A recording the bot won't transcribe; ``voice.<kind>`` is the explanation to show."""


def _seconds(duration: int | float | timedelta | None) -> float:
    """A Telegram duration (seconds, or a timedelta with PTB_TIMEDELTA) in seconds."""
    if duration is None:
        return 0.0
    return duration.total_seconds() if isinstance(duration, timedelta) else float(duration)


def _format_of(file_name: str | None, mime_type: str | None) -> str | None:
    """The transcription format of a file: from its name's extension, else its MIME type."""
    ext = posixpath.splitext((file_name or "").lower())[1].lstrip(".")
    if ext == "oga" or ext == "opus":
        ext = "ogg"
    if ext in FORMATS:
        return ext
    return MIME_FORMATS.get((mime_type or "").split(";", 1)[0].strip().lower())


def recording_of(message: Message) -> Recording:
    """The voice note, audio file (or audio sent as a file) or video note of `message`;
    RecordingRejected if unusable."""
    if message.voice is not None:
        voice = message.voice
        # Voice notes are OGG/Opus; Telegram also accepts MP3 and M4A ones (sendVoice).
        fmt = MIME_FORMATS.get((voice.mime_type or "").lower()) or "ogg"
        seconds = _seconds(voice.duration)
        return Recording(voice.file_id, voice.file_size, seconds, f"voice.{fmt}", FORMAT_MIME[fmt])
    if message.video_note is not None:
        note = message.video_note
        return Recording(
            note.file_id, note.file_size, _seconds(note.duration), "video_note.mp4", "video/mp4"
        )
    audio = message.audio
    if audio is None:
        # A recording sent as a file (a WAV or FLAC, say, which Telegram's apps send as
        # documents): no duration declared, so only its size is checked before the download.
        document = message.document
        if document is None:
            raise RecordingRejected("unsupported_format", "no recording in the message")
        found = _format_of(document.file_name, document.mime_type)
        if found is None:
            raise RecordingRejected(
                "unsupported_format", f"{document.mime_type} {document.file_name}"
            )
        return Recording(
            document.file_id, document.file_size, 0.0, f"audio.{found}", FORMAT_MIME[found]
        )
    found = _format_of(audio.file_name, audio.mime_type)
    if found is None:
        raise RecordingRejected("unsupported_format", f"{audio.mime_type} {audio.file_name}")
    return Recording(
        audio.file_id,
        audio.file_size,
        _seconds(audio.duration),
        f"audio.{found}",
        FORMAT_MIME[found],
    )


def quote_parts(label: str, transcript: str) -> list[Formatted]:
    """What the bot heard, as `label` then the transcript in a block quote (collapsed when
    long), split into as many messages as it needs."""
    head = f"{label}\n"
    pieces = plain_parts(transcript, TEXT_LIMIT - utf16_len(head))
    long = (
        utf16_len(transcript) > COLLAPSE_AFTER_CHARS
        or transcript.count("\n") >= COLLAPSE_AFTER_LINES
    )
    kind = MessageEntity.EXPANDABLE_BLOCKQUOTE if long else MessageEntity.BLOCKQUOTE
    parts: list[Formatted] = []
    for i, piece in enumerate(p for p in pieces if p.text):
        prefix = head if i == 0 else ""
        quote = MessageEntity(kind, utf16_len(prefix), utf16_len(piece.text))
        parts.append(Formatted(prefix + piece.text, (quote,)))
    return parts


# What a failed transcription tells the user, by ModelError kind (others: voice.failed). A
# refused key is the chat's, and a missing TRANSCRIBE_MODEL (no such model or endpoint on
# this server) has its own alert: the admins are alerted, and the user told whether they were.
_FAILURE_KEYS = {
    "rate_limited": "error.rate_limited",
    "bad_request": "voice.unreadable",
}


class Transcriber:
    """Checks, downloads and transcribes recordings through an OpenAI-compatible API."""

    def __init__(
        self, client: AsyncOpenAI, model: str, *, max_bytes: int, max_seconds: int
    ) -> None:
        self.client = client
        self.model = model
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds

    @property
    def limit_mb(self) -> int:
        return round(self.max_bytes / MIB)

    def check(self, recording: Recording) -> None:
        """Refuse, from what Telegram declares, a recording over the limits."""
        if recording.seconds > self.max_seconds:
            raise RecordingRejected("too_long", f"{recording.seconds:g} s")
        if recording.file_size is not None and recording.file_size > self.max_bytes:
            raise RecordingRejected("too_large", f"{recording.file_size} bytes")

    async def download(self, bot: Bot, recording: Recording) -> bytes:
        """The recording's bytes, never past the size limit."""
        try:
            tg_file = await bot.get_file(recording.file_id)
            if tg_file.file_size is not None and tg_file.file_size > self.max_bytes:
                raise RecordingRejected("too_large", f"{tg_file.file_size} bytes")
            buf = await tg_file.download_as_bytearray()
        except TelegramError as exc:
            # Past 20 MB, getFile answers "file is too big" (a size Telegram didn't declare).
            if "too big" in str(exc).lower():
                raise RecordingRejected("too_large", "Telegram: file is too big") from exc
            log.warning("recording download failed: %s", type(exc).__name__)
            raise RecordingRejected("download_failed", type(exc).__name__) from exc
        if len(buf) > self.max_bytes:
            raise RecordingRejected("too_large", f"{len(buf)} bytes downloaded")
        if not buf:
            raise RecordingRejected("empty_file")
        data = bytes(buf)
        del buf
        return data

    async def transcribe(self, recording: Recording, data: bytes) -> str:
        """The recording's transcript (may be empty: nothing was said)."""
        try:
            result = await self.client.audio.transcriptions.create(
                model=self.model, file=(recording.filename, data, recording.mime_type)
            )
        except openai.OpenAIError as exc:
            raise classify_model_error(exc) from exc
        return result.text.strip()


class VoiceService:
    """Turns a voice note, audio file or video note into a text turn of the chat's thread."""

    def __init__(
        self, chat: ChatService, transcriber: Transcriber, *, held_bytes: int = HELD_BYTES
    ) -> None:
        self.chat = chat
        self.transcriber = transcriber
        self.held = MemoryBudget(max(held_bytes, HELD_COPIES * transcriber.max_bytes))

    async def answer(self, bot: Bot, msg: Incoming, message: Message) -> None:
        """Transcribe the recording of `message`, show what was heard, answer it.

        `msg` carries the chat, the user and the caption (as its text, possibly empty).
        """
        if await self.chat.already_answered(msg) or await self.chat.refuse_over_limit(bot, msg):
            return
        try:
            recording = recording_of(message)
            self.transcriber.check(recording)  # before anything is downloaded
            transcript = await self._transcript(bot, msg, recording)
        except RecordingRejected as exc:
            log.info("recording refused in chat %s: %s (%s)", msg.key, exc.kind, exc.detail)
            await self._tell(bot, msg, self._explain(exc, msg.lang))
            return
        except ModelError as exc:
            log.warning("transcription failed in chat %s: %s (%s)", msg.key, exc.kind, exc.detail)
            if exc.kind == "auth":
                key = await self.chat.error_key(bot, exc.kind, self.transcriber.model)
            elif exc.kind == "not_found":
                told = await self._alert_unavailable(bot)
                key = "voice.unavailable" if told else "voice.unavailable_untold"
            else:
                key = _FAILURE_KEYS.get(exc.kind, "voice.failed")
            await self._tell(bot, msg, t(key, lang=msg.lang))
            return
        if not transcript:
            await self._tell(bot, msg, t("voice.no_speech", lang=msg.lang))
            return
        try:
            await send_parts(
                bot,
                msg.key,
                quote_parts(t("voice.heard", lang=msg.lang), transcript),
                reply_to=None if msg.private else msg.message_id,
            )
        except TelegramError as exc:  # the answer still comes
            log.warning("could not show a transcript in chat %s: %s", msg.key, type(exc).__name__)
        text = f"{msg.text}\n\n{transcript}" if msg.text.strip() else transcript
        await self.chat.answer(bot, replace(msg, text=text, kind="voice"))

    async def _transcript(self, bot: Bot, msg: Incoming, recording: Recording) -> str:
        size = recording.file_size or self.transcriber.max_bytes
        async with self.held.hold(HELD_COPIES * size) as held:
            # "typing..." goes out alongside the download, not before it; skipped when the
            # bot sheds progress calls (see ProgressGate).
            typing = asyncio.create_task(self._typing(bot, msg)) if self.chat.gate.admit() else None
            try:
                data = await self.transcriber.download(bot, recording)
                held.shrink(HELD_COPIES * len(data))
                transcript = await self.transcriber.transcribe(recording, data)
            except BaseException:
                if typing is not None:
                    typing.cancel()
                raise
            if typing is not None:
                await typing  # before the quote: a late "typing..." would outlive it
            return transcript

    async def _alert_unavailable(self, bot: Bot) -> bool:
        """Tell the admins the server has no TRANSCRIBE_MODEL (once an hour); whether they know."""
        alerts = self.chat.alerts
        if alerts is None:
            return False
        model = self.transcriber.model
        try:
            return await alerts.report(
                bot, "transcribe_not_found", f"transcribe_not_found:{model}", model=model
            )
        except Exception:
            log.exception("could not alert the admins about the transcription model")
            return False

    @staticmethod
    async def _typing(bot: Bot, msg: Incoming) -> None:
        try:
            await bot.send_chat_action(
                msg.key.chat_id, ChatAction.TYPING, message_thread_id=msg.key.topic_id or None
            )
        except TelegramError:
            pass  # only a progress hint

    def _explain(self, exc: RecordingRejected, lang: str | None) -> str:
        return t(
            f"voice.{exc.kind}",
            lang=lang,
            seconds=self.transcriber.max_seconds,
            limit=self.transcriber.limit_mb,
        )

    async def _tell(self, bot: Bot, msg: Incoming, text: str) -> None:
        try:
            await send_text(bot, msg.key, text, reply_to=None if msg.private else msg.message_id)
        except TelegramError as exc:
            log.error("could not answer a recording in chat %s: %s", msg.key, type(exc).__name__)
