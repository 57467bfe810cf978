"""/start, /help, /reset and /id."""

from __future__ import annotations

from telegram import Update
from telegram.ext import CommandHandler

from bot.concurrency import chat_key_of
from bot.context import CustomContext, ParleyApp
from bot.texts import command_help, language_of, tr


async def start(update: Update, context: CustomContext) -> None:
    """Say what the bot does, list the commands, and give the user's id (for ADMIN_USER_IDS)."""
    if update.effective_message:
        text = tr(update, "start", commands=command_help(language_of(update)))
        if update.effective_user:
            text += "\n\n" + tr(update, "id.user", user_id=update.effective_user.id)
        await update.effective_message.reply_text(text)


async def show_id(update: Update, context: CustomContext) -> None:
    """The user's numeric id and this chat's: what ADMIN_USER_IDS and the allow-lists take."""
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    if message is None or chat is None:
        return
    lines = [tr(update, "id.user", user_id=user.id)] if user else []
    if user is None or chat.id != user.id:  # in a private chat the two are the same
        lines.append(tr(update, "id.chat", chat_id=chat.id))
    await message.reply_text("\n".join(lines))


async def help_(update: Update, context: CustomContext) -> None:
    """List the commands (admins also see theirs)."""
    if update.effective_message is None:
        return
    user = update.effective_user
    admin = context.services.settings.is_admin(user.id if user else None)
    text = tr(update, "help", commands=command_help(language_of(update), admin=admin))
    await update.effective_message.reply_text(text)


async def reset(update: Update, context: CustomContext) -> None:
    """Close this chat's thread; the next message starts a new one."""
    key = chat_key_of(update)
    if key is None or update.effective_message is None:
        return
    await context.services.backend.reset(key)
    await update.effective_message.reply_text(tr(update, "reset_done"))


def register(app: ParleyApp) -> None:
    app.add_handler(CommandHandler("start", start))
    app.add_handler(CommandHandler("help", help_))
    app.add_handler(CommandHandler("reset", reset))
    app.add_handler(CommandHandler("id", show_id))
