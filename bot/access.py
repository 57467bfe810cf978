"""Who may do what: admin-only handlers refuse everyone else before doing anything.

An admin command runs only in the admin's own private chat with the bot: its output (the
dataset, statistics, job details) goes nowhere else, even should an update claiming to come
from an admin name another chat.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from telegram import Update

from bot.context import CustomContext
from bot.texts import tr

log = logging.getLogger(__name__)

Handler = Callable[[Update, CustomContext], Coroutine[Any, Any, Any]]


def admin_only(handler: Handler) -> Handler:
    """Run `handler` only for users in ADMIN_USER_IDS, in their private chat with the bot;
    anyone else, or an admin elsewhere, gets a short refusal and nothing else."""

    @functools.wraps(handler)
    async def guarded(update: Update, context: CustomContext) -> Any:
        user = update.effective_user
        message = update.effective_message
        if update.callback_query is None and message is not None and message.forward_origin:
            # A forwarded command was typed by someone else, whoever forwards it.
            await message.reply_text(tr(update, "forwarded_command"))
            return None
        if not context.services.settings.is_admin(user.id if user else None):
            log.info("refused %s to user %s", handler.__name__, user.id if user else None)
            if update.callback_query is not None:
                await update.callback_query.answer(tr(update, "admin_only"), show_alert=True)
            elif update.effective_message is not None:
                await update.effective_message.reply_text(tr(update, "admin_only"))
            return None
        if not in_own_private_chat(update):
            chat = update.effective_chat
            log.info(
                "refused %s to admin %s in chat %s: not their private chat",
                handler.__name__,
                user.id if user else None,
                chat.id if chat else None,
            )
            if update.callback_query is not None:
                await update.callback_query.answer(
                    tr(update, "admin.private_only"), show_alert=True
                )
            elif message is not None:
                await message.reply_text(tr(update, "admin.private_only"))
            return None
        return await handler(update, context)

    return guarded


def in_own_private_chat(update: Update) -> bool:
    """Whether the update comes from its sender's own private chat with the bot.

    A button on an inline message has no chat at all: never.
    """
    user, chat = update.effective_user, update.effective_chat
    return user is not None and chat is not None and chat.type == "private" and chat.id == user.id
