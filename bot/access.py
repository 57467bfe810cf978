"""Who may do what: admin-only handlers refuse everyone else before doing anything."""

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
    """Run `handler` only for users in ADMIN_USER_IDS; others get a short refusal, nothing else."""

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
        return await handler(update, context)

    return guarded
