"""/start, /help and /reset."""

from __future__ import annotations

from telegram import Update
from telegram.ext import CommandHandler

from bot.concurrency import chat_key_of
from bot.context import CustomContext, ParleyApp
from bot.texts import tr


async def start(update: Update, context: CustomContext) -> None:
    """Say what the bot does and list the commands."""
    if update.effective_message:
        await update.effective_message.reply_text(
            tr(update, "start", commands=tr(update, "commands"))
        )


async def help_(update: Update, context: CustomContext) -> None:
    """List the commands (admins also see theirs)."""
    if update.effective_message is None:
        return
    text = tr(update, "help", commands=tr(update, "commands"))
    user = update.effective_user
    if context.services.settings.is_admin(user.id if user else None):
        text += "\n\n" + tr(update, "admin_commands")
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
