"""The allow-lists: checked before any other handler, so refused updates cost nothing."""

from __future__ import annotations

import logging

from telegram import Update
from telegram.ext import ApplicationHandlerStop, TypeHandler

from bot.addressing import mentions_bot, replies_to_bot
from bot.context import CustomContext, ParleyApp
from bot.texts import tr

log = logging.getLogger(__name__)


async def gate(update: Update, context: CustomContext) -> None:
    """Stop updates from users and chats the allow-lists don't cover, with a short refusal."""
    user, chat = update.effective_user, update.effective_chat
    if context.services.settings.may_use(user.id if user else None, chat.id if chat else None):
        return
    log.info("refused user %s in chat %s", user.id if user else None, chat.id if chat else None)
    message = update.message
    if update.callback_query is not None:
        await update.callback_query.answer(tr(update, "access.denied"), show_alert=True)
    elif message is not None and chat is not None:
        bot = context.bot
        addressed = (
            chat.type == "private"
            or bool(message.text and message.text.startswith("/"))
            or replies_to_bot(message, bot.id)
            or mentions_bot(message, bot.username, bot.id)
        )
        if addressed:  # in groups, stay quiet about messages that weren't for the bot
            await message.reply_text(tr(update, "access.denied"))
    raise ApplicationHandlerStop


def register(app: ParleyApp) -> None:
    app.add_handler(TypeHandler(Update, gate), group=-1)
