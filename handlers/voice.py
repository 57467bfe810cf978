"""Voice notes, audio files and video notes: transcribed, then answered in the chat's thread."""

from __future__ import annotations

from telegram import Update
from telegram.ext import MessageHandler, filters

from bot.addressing import Addressed, strip_mention
from bot.concurrency import chat_key_of
from bot.context import CustomContext, ParleyApp
from bot.services.albums import Albums
from bot.services.chat import Incoming


async def on_voice(update: Update, context: CustomContext) -> None:
    """Answer a recording with what the bot heard and the model's reply to it; audio files
    sent together (an album) are answered one after the other, each as a turn of its own."""
    message = update.effective_message
    key = chat_key_of(update)
    if message is None or key is None:
        return
    user = update.effective_user
    for part in context.services.albums.take(message):
        await context.services.voice.answer(
            context.bot,
            Incoming(
                key=key,
                chat_type=part.chat.type,
                user_id=user.id if user else None,
                message_id=part.message_id,
                text=strip_mention(part.caption or "", context.bot.username),
                lang=user.language_code if user else None,
                kind="voice",
            ),
            part,
        )


def register(app: ParleyApp, group_trigger: str, albums: Albums | None = None) -> None:
    app.add_handler(
        MessageHandler(
            filters.UpdateType.MESSAGE
            # Audio sent as a file (a WAV, say) too: the documents handler leaves it here.
            & (filters.VOICE | filters.AUDIO | filters.VIDEO_NOTE | filters.Document.AUDIO)
            & Addressed(group_trigger, albums),
            on_voice,
        )
    )
