"""Admin commands: /train, /jobs, /job, /cancel, /model, /export; and the job notices."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.ext import CallbackQueryHandler, CommandHandler

from bot.access import admin_only
from bot.context import CustomContext, ParleyApp
from bot.services.charts import loss_chart
from bot.services.chat import CHAT_ROUTE
from bot.services.dataset import DatasetOptions, DatasetReport
from bot.services.finetune import describe, served_route
from bot.services.trainer import Estimate, JobInfo, TrainerError
from bot.texts import t, tr
from handlers.common import edit_or_send
from storage.db import JobRecord

log = logging.getLogger(__name__)


class BadArgs(ValueError):
    pass


def parse_options(args: list[str]) -> DatasetOptions:
    """`since=YYYY-MM-DD chat=ID photos=on|off` into dataset options."""
    since: str | None = None
    chat_id: int | None = None
    photos = False
    for arg in args:
        name, _, value = arg.partition("=")
        try:
            if name == "since":
                since = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC).isoformat()
            elif name == "chat":
                chat_id = int(value)
            elif name == "photos" and value in ("on", "off"):
                photos = value == "on"
            else:
                raise BadArgs(arg)
        except ValueError:
            raise BadArgs(arg) from None
    return DatasetOptions(since=since, chat_id=chat_id, include_photos=photos)


def summary(
    update: Update,
    report: DatasetReport,
    options: DatasetOptions,
    model: str,
    estimate: Estimate,
) -> str:
    """The dataset summary shown before anything is uploaded: where it trains, at what cost."""
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(report.dropped.items())) or "nothing"
    redacted = ", ".join(f"{k} {v}" for k, v in sorted(report.redactions.items())) or "nothing"
    return tr(
        update,
        "train.summary",
        description=describe(options, report),
        examples=report.examples,
        train=report.train_examples,
        validation=report.validation_examples,
        tokens=report.tokens,
        model=model,
        where=estimate.where,
        cost=_cost(update, estimate, model),
        dropped=dropped,
        redacted=redacted,
    )


def _cost(update: Update, estimate: Estimate, model: str) -> str:
    if estimate.self_hosted:
        if estimate.gpu_seconds is None:
            return tr(update, "train.cost_gpu_unknown", model=model)
        minutes = max(1, round(estimate.gpu_seconds / 60))
        return tr(update, "train.cost_gpu", minutes=minutes)
    if estimate.usd is None:
        return tr(update, "train.cost_unknown")
    return f"~${estimate.usd:.2f}"


@admin_only
async def train(update: Update, context: CustomContext) -> None:
    """Build a curated dataset and offer to start a fine-tuning job with it."""
    message = update.effective_message
    user = update.effective_user
    if message is None or user is None:
        return
    try:
        options = parse_options(context.args or [])
    except BadArgs as exc:
        await message.reply_text(tr(update, "train.bad_args", arg=str(exc)))
        return
    await message.reply_text(tr(update, "train.building"))
    tuner = context.services.finetune
    report = await tuner.build(options)
    text = summary(update, report, options, tuner.base_model, await tuner.estimate(report))
    if not report.ok:
        await message.reply_text(
            f"{text}\n\n{tr(update, 'train.problems', problems='; '.join(report.problems))}"
        )
        return
    token = tuner.hold(report, options, user.id)
    keyboard = InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(
                    tr(update, "train.start_button"), callback_data=f"ft:start:{token}"
                ),
                InlineKeyboardButton(
                    tr(update, "train.cancel_button"), callback_data=f"ft:drop:{token}"
                ),
            ]
        ]
    )
    await message.reply_text(f"{text}\n\n{tr(update, 'train.confirm')}", reply_markup=keyboard)


@admin_only
async def train_button(update: Update, context: CustomContext) -> None:
    """Start or cancel the held dataset (callback data ft:start:TOKEN / ft:drop:TOKEN)."""
    query = update.callback_query
    if query is None or query.data is None or update.effective_user is None:
        return
    _, action, token = query.data.split(":", 2)
    tuner = context.services.finetune
    await query.answer()
    if action == "drop":
        tuner.drop(token)
        await edit_or_send(query, tr(update, "train.cancelled"))
        return
    try:
        job = await tuner.start(token, update.effective_user.id)
    except KeyError:
        await edit_or_send(query, tr(update, "train.expired"))
        return
    except TrainerError as exc:
        log.warning("fine-tuning job not started: %s (%s)", exc.kind, exc.detail)
        if exc.kind == "permission":
            text = tr(update, "train.forbidden")
        elif exc.kind == "invalid" and exc.detail:
            text = tr(update, "train.refused", reason=exc.detail)
        else:
            text = tr(update, "train.failed_to_start", kind=exc.kind)
        await edit_or_send(query, text)
        return
    if lang := update.effective_user.language_code:
        # The poller tells this admin how the job ends, outside any update: in this language.
        await context.services.store.set_setting(notice_language_key(job.started_by), lang)
    await edit_or_send(query, tr(update, "train.started", job_id=job.job_id, model=job.base_model))


def _age(created: int | str) -> str:
    if isinstance(created, str):
        seconds = (datetime.now(UTC) - datetime.fromisoformat(created)).total_seconds()
    else:
        seconds = datetime.now(UTC).timestamp() - created
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return "just now"


def _job_line(record: JobRecord | None, info: JobInfo | None) -> str:
    """One line per job; the trainer's live view wins over the bot's own record."""
    if info is not None:
        job_id, status, base, age, result = (
            info.id,
            info.status,
            info.base_model,
            _age(info.created_at),
            info.fine_tuned_model,
        )
    elif record is not None:
        job_id, status, base, age, result = (
            record.job_id,
            record.status,
            record.base_model,
            _age(record.created_at),
            record.fine_tuned_model,
        )
    else:
        return ""
    line = f"{job_id}: {status}, {base}, {age}"
    return f"{line} → {result}" if result else line


@admin_only
async def jobs(update: Update, context: CustomContext) -> None:
    """List fine-tuning jobs: the trainer's view merged with the bot's own records."""
    message = update.effective_message
    if message is None:
        return
    merged, online = await context.services.finetune.jobs()
    if not merged:
        await message.reply_text(tr(update, "jobs.none") if online else tr(update, "jobs.offline"))
        return
    lines = [_job_line(record, info) for record, info in merged[:20]]
    if not online:
        lines.append(tr(update, "jobs.offline"))
    await message.reply_text("\n".join(lines))


async def _job_argument(update: Update, context: CustomContext, usage: str) -> str | None:
    """The job id a command was given; without one, the command's usage is the answer."""
    message = update.effective_message
    if message is None:
        return None
    if not context.args:
        await message.reply_text(tr(update, usage))
        return None
    return context.args[0]


@admin_only
async def job(update: Update, context: CustomContext) -> None:
    """Details of one job, its recent events, and a training-loss chart when there is one."""
    message = update.effective_message
    job_id = await _job_argument(update, context, "job.usage")
    if message is None or job_id is None:
        return
    record, details = await context.services.finetune.details(job_id)
    if isinstance(details, TrainerError):
        if details.kind == "not_found" and record is None:
            await message.reply_text(tr(update, "job.unknown"))
            return
        text = tr(update, "job.unreachable", kind=details.kind)
        if record is not None:
            text = f"{_job_line(record, None)}\n{text}"
        await message.reply_text(text)
        return
    info = details.info
    lines = [_job_line(record, info)]
    if record is not None:
        lines.append(
            tr(update, "job.dataset", description=record.description, tokens=record.tokens)
        )
    if info.error:
        lines.append(tr(update, "job.error", error=info.error))
    lines += [f"• {e.message}" for e in details.events]
    await message.reply_text("\n".join(lines))
    if len(details.losses) >= 2:
        points = [(p.step, p.train_loss) for p in details.losses]
        png = await asyncio.to_thread(loss_chart, points)
        await message.reply_photo(png, caption=tr(update, "job.loss_caption", job_id=job_id))


@admin_only
async def cancel(update: Update, context: CustomContext) -> None:
    """Cancel a fine-tuning job."""
    message = update.effective_message
    job_id = await _job_argument(update, context, "cancel.usage")
    if message is None or job_id is None:
        return
    try:
        info = await context.services.finetune.cancel(job_id)
    except TrainerError as exc:
        key = "job.unknown" if exc.kind == "not_found" else "job.unreachable"
        await message.reply_text(tr(update, key, kind=exc.kind))
        return
    await message.reply_text(tr(update, "job.cancelled", job_id=info.id, status=info.status))


@admin_only
async def model(update: Update, context: CustomContext) -> None:
    """Show the model in use and the available ones; `/model NAME` switches (persisted)."""
    message = update.effective_message
    if message is None:
        return
    models = context.services.models
    catalog = await models.catalog()
    if context.args:
        name = context.args[0]
        route = catalog.route_of(name)
        if route is None and catalog.complete:
            await message.reply_text(tr(update, "model.unknown", model=name))
            return
        # An endpoint that can't be asked right now: trust the admin, on the chat endpoint.
        await models.switch(name, route or CHAT_ROUTE)
        await message.reply_text(tr(update, "model.switched", model=name))
        return
    text = tr(update, "model.current", model=models.current)
    available = sorted({*(catalog.chat or ()), *(catalog.serve or ())})
    if catalog.problem is not None:
        text += "\n" + tr(update, "model.unreachable", kind=catalog.problem)
    if available:
        text += "\n\n" + tr(update, "model.available", models="\n".join(available))
    await message.reply_text(text)


@admin_only
async def use_model(update: Update, context: CustomContext) -> None:
    """The button under a success notice: switch the bot to the fine-tuned model."""
    query = update.callback_query
    if query is None or query.data is None:
        return
    services = context.services
    record = await services.store.job(query.data.split(":", 2)[2])
    await query.answer()
    if record is None or not record.fine_tuned_model:
        await edit_or_send(query, tr(update, "job.unknown"))
        return
    await services.models.switch(record.fine_tuned_model, served_route(record))
    await edit_or_send(query, tr(update, "model.switched", model=record.fine_tuned_model))


@admin_only
async def export(update: Update, context: CustomContext) -> None:
    """Send the curated dataset as JSONL documents, to train elsewhere."""
    message = update.effective_message
    if message is None:
        return
    try:
        options = parse_options(context.args or [])
    except BadArgs as exc:
        await message.reply_text(tr(update, "train.bad_args", arg=str(exc)))
        return
    report = await context.services.finetune.build(options)
    if report.examples == 0 or report.train_path is None:
        await message.reply_text(tr(update, "export.empty"))
        return
    caption = tr(
        update, "export.caption", examples=report.examples, description=describe(options, report)
    )
    await message.reply_document(report.train_path, filename="train.jsonl", caption=caption)
    if report.validation_path is not None:
        await message.reply_document(report.validation_path, filename="validation.jsonl")


def notice_language_key(admin_id: int) -> str:
    """The bot setting that holds the language an admin's job notices are written in."""
    return f"notice_language:{admin_id}"


def job_notice(
    record: JobRecord, info: JobInfo, lang: str | None = None
) -> tuple[str, InlineKeyboardMarkup | None]:
    """What the admin who started a job is told when its status changes, in `lang`."""
    if info.status == "succeeded" and info.fine_tuned_model:
        button = InlineKeyboardButton(
            t("job.use_button", lang=lang), callback_data=f"ft:use:{info.id}"
        )
        return (
            t("job.succeeded", lang=lang, job_id=info.id, model=info.fine_tuned_model),
            InlineKeyboardMarkup([[button]]),
        )
    if info.status == "failed":
        error = info.error or t("job.no_reason", lang=lang)
        return t("job.failed", lang=lang, job_id=info.id, error=error), None
    return t("job.status", lang=lang, job_id=info.id, status=info.status), None


def register(app: ParleyApp) -> None:
    for name, callback in (
        ("train", train),
        ("jobs", jobs),
        ("job", job),
        ("cancel", cancel),
        ("model", model),
        ("export", export),
    ):
        app.add_handler(CommandHandler(name, callback))
    app.add_handler(CallbackQueryHandler(train_button, pattern=r"^ft:(start|drop):"))
    app.add_handler(CallbackQueryHandler(use_model, pattern=r"^ft:use:"))
