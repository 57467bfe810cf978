"""Everything the bot can't handle yet gets a short explanation instead of silence."""

from __future__ import annotations

from telegram import Update
from telegram.ext import CallbackQueryHandler, MessageHandler, filters

from bot.context import CustomContext, ParleyApp
from bot.texts import tr


async def unsupported(update: Update, context: CustomContext) -> None:
    """Explain that this kind of message (sticker, voice, unknown command...) isn't handled."""
    if update.effective_message:
        await update.effective_message.reply_text(tr(update, "unsupported"))


async def unknown_button(update: Update, context: CustomContext) -> None:
    """Answer a button press no handler took (stale or forged data), so it stops spinning."""
    if update.callback_query is not None:
        await update.callback_query.answer(tr(update, "button.unknown"))


def register(app: ParleyApp) -> None:
    # Registered last in the default group, so it only sees what no other handler took.
    # Private chats only: in groups, answering every sticker would be noise. Service
    # messages (members joining, pins...) are not addressed to the bot at all.
    app.add_handler(
        MessageHandler(
            filters.UpdateType.MESSAGE & filters.ChatType.PRIVATE & ~filters.StatusUpdate.ALL,
            unsupported,
        )
    )
    # Any button: Telegram shows a spinner until the press is answered.
    app.add_handler(CallbackQueryHandler(unknown_button))
