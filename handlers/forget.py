"""/forget: anyone can have their logged messages deleted and be kept out of training data."""

from __future__ import annotations

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.ext import CallbackQueryHandler, CommandHandler

from bot.context import CustomContext, ParleyApp
from bot.texts import tr
from handlers.common import edit_or_send


async def forget(update: Update, context: CustomContext) -> None:
    """Ask for confirmation before deleting the user's logged messages."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None:
        return
    keyboard = InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(
                    tr(update, "forget.yes"), callback_data=f"forget:yes:{user.id}"
                ),
                InlineKeyboardButton(tr(update, "forget.no"), callback_data=f"forget:no:{user.id}"),
            ]
        ]
    )
    await message.reply_text(tr(update, "forget.confirm"), reply_markup=keyboard)


async def confirm(update: Update, context: CustomContext) -> None:
    """The confirmation button: only the user who asked can press it."""
    query, user = update.callback_query, update.effective_user
    if query is None or query.data is None or user is None:
        return
    _, answer, owner = query.data.split(":", 2)
    if owner != str(user.id):
        await query.answer(tr(update, "forget.not_yours"), show_alert=True)
        return
    await query.answer()
    if answer != "yes":
        await edit_or_send(query, tr(update, "forget.kept"))
        return
    report = await context.services.forgetting.forget(user.id)
    text = tr(update, "forget.done", count=report.messages)
    if report.conversations_left:
        text += "\n\n" + tr(update, "forget.copies_left", count=report.conversations_left)
    await edit_or_send(query, text)


def register(app: ParleyApp) -> None:
    app.add_handler(CommandHandler("forget", forget))
    app.add_handler(CallbackQueryHandler(confirm, pattern=r"^forget:(yes|no):-?\d+$"))
