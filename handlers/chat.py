"""Text messages: answered by the model inside the chat's thread."""

from __future__ import annotations

from telegram import Update
from telegram.ext import MessageHandler, filters

from bot.addressing import Addressed, strip_mention
from bot.concurrency import chat_key_of
from bot.context import CustomContext, ParleyApp
from bot.services.chat import Incoming
from bot.texts import tr


async def on_text(update: Update, context: CustomContext) -> None:
    """Answer a text message with the model's streamed reply."""
    message = update.effective_message
    key = chat_key_of(update)
    if message is None or key is None or message.text is None:
        return
    if not message.text.strip():
        await message.reply_text(tr(update, "empty_text"))
        return
    await context.services.chat.answer(
        context.bot,
        Incoming(
            key=key,
            chat_type=message.chat.type,
            user_id=update.effective_user.id if update.effective_user else None,
            message_id=message.message_id,
            text=strip_mention(message.text, context.bot.username),
            lang=update.effective_user.language_code if update.effective_user else None,
        ),
    )


def register(app: ParleyApp, group_trigger: str) -> None:
    app.add_handler(
        MessageHandler(
            filters.UpdateType.MESSAGE & filters.TEXT & ~filters.COMMAND & Addressed(group_trigger),
            on_text,
        )
    )
