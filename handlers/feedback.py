"""Reactions on the bot's replies, and /stats for admins."""

from __future__ import annotations

import asyncio

from telegram import ReactionTypeEmoji, Update
from telegram.ext import CommandHandler, MessageReactionHandler

from bot.context import CustomContext, ParleyApp
from bot.services import feedback
from bot.texts import language_of, t
from handlers.admin import admin_command
from handlers.evaluation import canary_stats


async def on_reaction(update: Update, context: CustomContext) -> None:
    """Store a user's current reactions on one of the bot's replies."""
    reaction = update.message_reaction
    if reaction is None or reaction.user is None:
        return  # anonymous reactions carry no user to attribute them to
    emojis = [r.emoji for r in reaction.new_reaction if isinstance(r, ReactionTypeEmoji)]
    await context.services.feedback.record_reactions(
        reaction.chat.id, reaction.message_id, reaction.user.id, emojis
    )


@admin_command
async def stats(update: Update, context: CustomContext) -> None:
    """Sentiment of replies and user messages, overall and for the last 7 days, in the
    admin's language; the top users and chats by name where Telegram gives one."""
    message = update.effective_message
    if message is None:
        return
    lang = language_of(update)
    report = await context.services.feedback.stats()
    ids = [u for u, _ in report.top_users] + [c for c, _ in report.top_chats]
    names = await context.services.names.of(context.bot, ids)
    await message.reply_text(feedback.render_text(report, lang, names))
    if report.tagged >= feedback.CHART_MIN_MESSAGES:
        chart = await asyncio.to_thread(feedback.render_chart, report, lang)
        await message.reply_photo(chart, caption=t("stats.chart_caption", lang=lang))
    await canary_stats(update, context)  # while a canary runs: both models compared


def register(app: ParleyApp) -> None:
    app.add_handler(MessageReactionHandler(on_reaction))
    app.add_handler(CommandHandler("stats", stats))
