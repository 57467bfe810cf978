"""/assistant: list the assistant profiles and switch this chat's (a new thread starts)."""

from __future__ import annotations

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.ext import CallbackQueryHandler, CommandHandler

from bot.concurrency import chat_key_of
from bot.context import CustomContext, ParleyApp
from bot.domain import ChatKey
from bot.services.profiles import DEFAULT, DEFAULT_TITLE, Profile
from bot.texts import tr
from handlers.common import edit_or_send


def title(profile: Profile, update: Update) -> str:
    """A profile's title; the built-in default's in the reader's language."""
    if profile.name == DEFAULT and profile.title == DEFAULT_TITLE:
        return tr(update, "assistant.default_title")
    return profile.title


async def _switch(context: CustomContext, key: ChatKey, name: str) -> None:
    await context.services.chat.profiles.choose(key, name)
    await context.services.backend.reset(key)  # the old thread had other instructions


async def assistant(update: Update, context: CustomContext) -> None:
    """Show the profiles with buttons; `/assistant NAME` switches directly."""
    message, key = update.effective_message, chat_key_of(update)
    if message is None or key is None:
        return
    profiles = context.services.chat.profiles
    if context.args:
        name = context.args[0]
        if name not in profiles.all:
            await message.reply_text(tr(update, "assistant.unknown", name=name))
            return
        await _switch(context, key, name)
        await message.reply_text(
            tr(update, "assistant.switched", name=title(profiles.all[name], update))
        )
        return
    current = await profiles.for_chat(key)
    lines = "\n".join(
        f"• {title(p, update)} ({p.name})" + (f", {p.model}" if p.model else "")
        for p in profiles.all.values()
    )
    keyboard = InlineKeyboardMarkup(
        [
            [InlineKeyboardButton(title(p, update), callback_data=f"profile:{p.name}")]
            for p in profiles.all.values()
        ]
    )
    text = tr(update, "assistant.list", profiles=lines, current=title(current, update))
    await message.reply_text(text, reply_markup=keyboard)


async def choose(update: Update, context: CustomContext) -> None:
    """A profile button: switch this chat's profile."""
    query, key = update.callback_query, chat_key_of(update)
    if query is None or query.data is None or key is None:
        return
    name = query.data.removeprefix("profile:")
    profiles = context.services.chat.profiles
    await query.answer()
    if name not in profiles.all:
        await edit_or_send(query, tr(update, "assistant.unknown", name=name))
        return
    await _switch(context, key, name)
    await edit_or_send(
        query, tr(update, "assistant.switched", name=title(profiles.all[name], update))
    )


def register(app: ParleyApp) -> None:
    app.add_handler(CommandHandler("assistant", assistant))
    app.add_handler(CallbackQueryHandler(choose, pattern=r"^profile:[\w-]{1,32}$"))
