"""Whether a group message is addressed to the bot: a mention, a reply to it, or a command."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from telegram import Message, MessageEntity
from telegram.ext import filters

if TYPE_CHECKING:
    from bot.services.albums import Albums


def mentions_bot(message: Message, username: str | None, bot_id: int) -> bool:
    """The text or caption @mentions the bot (or text-mentions it)."""
    text = message.text or message.caption or ""
    entities = message.entities or message.caption_entities or ()
    for entity in entities:
        if entity.type == MessageEntity.TEXT_MENTION and entity.user and entity.user.id == bot_id:
            return True
        if entity.type == MessageEntity.MENTION and username:
            mention = (
                message.parse_entity(entity)
                if message.text
                else message.parse_caption_entity(entity)
            )
            if mention.lower() == f"@{username.lower()}":
                return True
    # Without entities (e.g. a forwarded text), fall back to the plain text.
    return username is not None and not entities and f"@{username.lower()}" in text.lower()


def replies_to_bot(message: Message, bot_id: int) -> bool:
    reply = message.reply_to_message
    # In forum topics every message "replies" to the topic's creation message: not to us.
    if reply is None or reply.forum_topic_created is not None:
        return False
    return reply.from_user is not None and reply.from_user.id == bot_id


def strip_mention(text: str, username: str | None) -> str:
    """The message without the @botname that addressed it."""
    if not username:
        return text
    stripped = re.sub(rf"[ \t]*@{re.escape(username)}\b[ \t]*", " ", text, flags=re.IGNORECASE)
    return stripped.strip() or text


class Addressed(filters.MessageFilter):
    """Private messages always; group messages when they mention or reply to the bot.

    With trigger "all", every group message the bot receives counts.

    With `albums`, an album is addressed as a whole: its first part (the one handled, once
    the album is complete) counts if any part mentions or replies to the bot. Telegram's
    apps put the caption of files sent together on the last one.
    """

    def __init__(self, trigger: str, albums: Albums | None = None) -> None:
        super().__init__(name=f"Addressed({trigger})")
        self.trigger = trigger
        self.albums = albums

    def filter(self, message: Message) -> bool:
        if message.chat.type == "private" or self.trigger == "all":
            return True
        bot = message.get_bot()
        parts = self.albums.take(message) if self.albums is not None else [message]
        return any(
            replies_to_bot(part, bot.id) or mentions_bot(part, bot.username, bot.id)
            for part in parts
        )
