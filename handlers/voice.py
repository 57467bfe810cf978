"""Voice notes, audio files and video notes: transcribed, then answered in the chat's thread."""

from __future__ import annotations

from telegram import Update
from telegram.ext import MessageHandler, filters

from bot.addressing import Addressed, strip_mention
from bot.concurrency import chat_key_of
from bot.context import CustomContext, ParleyApp
from bot.services.chat import Incoming


async def on_voice(update: Update, context: CustomContext) -> None:
    """Answer a recording with what the bot heard and the model's reply to it."""
    message = update.effective_message
    key = chat_key_of(update)
    if message is None or key is None:
        return
    user = update.effective_user
    await context.services.voice.answer(
        context.bot,
        Incoming(
            key=key,
            chat_type=message.chat.type,
            user_id=user.id if user else None,
            message_id=message.message_id,
            text=strip_mention(message.caption or "", context.bot.username),
            lang=user.language_code if user else None,
            kind="voice",
        ),
        message,
    )


def register(app: ParleyApp, group_trigger: str) -> None:
    app.add_handler(
        MessageHandler(
            filters.UpdateType.MESSAGE
            & (filters.VOICE | filters.AUDIO | filters.VIDEO_NOTE)
            & Addressed(group_trigger),
            on_voice,
        )
    )
