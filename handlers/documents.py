"""Documents (PDFs, text and source files): read and answered in the chat's thread."""

from __future__ import annotations

from telegram import Update
from telegram.ext import MessageHandler, filters

from bot.addressing import Addressed
from bot.concurrency import chat_key_of
from bot.context import CustomContext, ParleyApp
from bot.services.albums import Albums


async def on_document(update: Update, context: CustomContext) -> None:
    """Answer a document, or an album of them, as one turn; the caption is the question."""
    message = update.effective_message
    key = chat_key_of(update)
    if message is None or key is None:
        return
    services = context.services
    user = update.effective_user
    await services.documents.answer(
        context.bot,
        key,
        message.chat.type,
        user.id if user else None,
        services.albums.take(message),
        user.language_code if user else None,
    )


def register(app: ParleyApp, group_trigger: str, albums: Albums | None = None) -> None:
    # Image documents are the photo handler's (registered before this one); audio sent as a
    # file is the voice handler's (transcribed).
    app.add_handler(
        MessageHandler(
            filters.UpdateType.MESSAGE
            & filters.Document.ALL
            & ~filters.Document.IMAGE
            & ~filters.Document.AUDIO
            & Addressed(group_trigger, albums),
            on_document,
        )
    )
