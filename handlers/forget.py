"""/forget: anyone can have their logged messages deleted and be kept out of training data."""

from __future__ import annotations

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.ext import CallbackQueryHandler, CommandHandler

from bot.context import CustomContext, ParleyApp
from bot.services.conversations import forget_chat
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
    services = context.services
    count = await services.store.forget_user(user.id)
    # The private chat's threads also live on OpenAI's side (a private chat's id is the
    # user's id); in groups they hold other people's messages too, so they stay.
    await forget_chat(services.openai, services.store, user.id)
    await edit_or_send(query, tr(update, "forget.done", count=count))


def register(app: ParleyApp) -> None:
    app.add_handler(CommandHandler("forget", forget))
    app.add_handler(CallbackQueryHandler(confirm, pattern=r"^forget:(yes|no):-?\d+$"))
