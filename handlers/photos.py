"""Photos, image documents and albums: described by the vision model in the chat's thread."""

from __future__ import annotations

from telegram import Update
from telegram.ext import MessageHandler, filters

from bot.addressing import Addressed
from bot.concurrency import chat_key_of
from bot.context import CustomContext, ParleyApp
from bot.services.albums import Albums


async def on_photo(update: Update, context: CustomContext) -> None:
    """Answer a photo, an image document or a whole album as one turn."""
    message = update.effective_message
    key = chat_key_of(update)
    if message is None or key is None:
        return
    services = context.services
    await services.photos.answer(
        context.bot,
        key,
        message.chat.type,
        update.effective_user.id if update.effective_user else None,
        services.albums.take(message),
        update.effective_user.language_code if update.effective_user else None,
    )


def register(app: ParleyApp, group_trigger: str, albums: Albums | None = None) -> None:
    app.add_handler(
        MessageHandler(
            filters.UpdateType.MESSAGE
            & (filters.PHOTO | filters.Document.IMAGE)
            & Addressed(group_trigger, albums),
            on_photo,
        )
    )
