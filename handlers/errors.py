"""The one error handler: log with the traceback, tell the user briefly, never the details."""

from __future__ import annotations

import logging

from telegram import Update
from telegram.error import TelegramError

from bot.context import CustomContext, ParleyApp
from bot.errors import StorageUnavailable, WriterClosed
from bot.texts import tr

log = logging.getLogger(__name__)


async def on_error(update: object, context: CustomContext) -> None:
    """Log an unexpected exception and send the user a generic apology."""
    if isinstance(context.error, StorageUnavailable | WriterClosed):
        # Storage refused or is closing (shutdown): the writer has logged why, once. An
        # answer may already have been delivered: never follow it with "something went
        # wrong". An update cut off by a shutdown is replayed at the next start.
        log.warning("an update waits for storage: %s", type(context.error).__name__)
        return
    log.error("unhandled error while processing an update", exc_info=context.error)
    if isinstance(update, Update) and update.effective_chat is not None:
        try:
            await context.bot.send_message(
                update.effective_chat.id,
                tr(update, "error.unknown"),
                message_thread_id=(
                    update.effective_message.message_thread_id
                    if update.effective_message and update.effective_message.is_topic_message
                    else None
                ),
            )
        except TelegramError:
            log.warning("could not send the error notice to chat %s", update.effective_chat.id)


def register(app: ParleyApp) -> None:
    app.add_error_handler(on_error)
