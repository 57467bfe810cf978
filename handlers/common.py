"""Small helpers shared by handlers."""

from __future__ import annotations

import logging

from telegram import CallbackQuery, InlineKeyboardMarkup, Message
from telegram.error import BadRequest

log = logging.getLogger(__name__)


async def edit_or_send(
    query: CallbackQuery, text: str, reply_markup: InlineKeyboardMarkup | None = None
) -> int | None:
    """Show `text` in place of the button's message, or as a new message if that is gone.
    The id of the message that shows it (None for a button on an inline message).

    Buttons on old messages keep working: Telegram can't edit a message that was deleted,
    is too old, or (inaccessible messages) was never shown to the bot again.
    """
    try:
        edited = await query.edit_message_text(text, reply_markup=reply_markup)
        return edited.message_id if isinstance(edited, Message) else None
    except BadRequest as exc:
        log.info("could not edit a button's message (%s); sending a new one", exc.message)
    if query.message is not None:
        sent = await query.get_bot().send_message(
            query.message.chat.id, text, reply_markup=reply_markup
        )
        return sent.message_id
    return None
