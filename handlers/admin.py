"""Admin commands: /train, /jobs, /job, /cancel, /model, /export; and the job notices."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import BadRequest, TelegramError
from telegram.ext import CallbackQueryHandler, CommandHandler

from bot.access import Handler, admin_only
from bot.context import CustomContext, ParleyApp
from bot.domain import JobRecord
from bot.services.charts import loss_chart
from bot.services.chat import CHAT_ROUTE
from bot.services.dataset import DatasetOptions, DatasetReport
from bot.services.finetune import served_route
from bot.services.trainer import Estimate, JobInfo, TrainerError
from bot.texts import known, language_of, t, tr
from handlers.common import edit_or_send

log = logging.getLogger(__name__)


class BadArgs(ValueError):
    pass


def admin_command(handler: Handler) -> Handler:
    """`admin_only`, and the admin's language is remembered for what the bot tells them
    unasked (job notices, alerts)."""

    @functools.wraps(handler)
    async def remembering(update: Update, context: CustomContext) -> Any:
        user = update.effective_user
        if user is not None:
            await context.services.alerts.remember_language(user.id, user.language_code)
        return await handler(update, context)

    return admin_only(remembering)


def job_status(status: str, lang: str | None) -> str:
    """A job status in words (a status the catalogs don't know is shown as the trainer said it)."""
    key = f"job.status.{status}"
    return t(key, lang=lang) if known(key) else status


def problem(kind: str, lang: str | None) -> str:
    """What went wrong, in words, for a TrainerError or ModelError kind."""
    key = f"problem.{kind}"
    return t(key if known(key) else "problem.unknown", lang=lang)


def trainer_problem(exc: TrainerError, lang: str | None) -> str:
    """What went wrong with a trainer call, in words: for "unavailable", what the call met
    (its detail is then the ModelError kind: timeout, server_error...)."""
    if exc.kind == "unavailable" and known(f"problem.{exc.detail}"):
        return problem(exc.detail, lang)
    return problem(exc.kind, lang)


def describe(
    lang: str | None,
    *,
    examples: int,
    since: str | None,
    chat_id: int | None,
    photos: bool,
) -> str:
    """One line saying what went into a dataset, e.g. "12 examples, since 2026-01-01, text only"."""
    parts = [t("dataset.examples", lang=lang, count=examples)]
    if since:
        parts.append(t("dataset.since", lang=lang, date=since[:10]))
    if chat_id is not None:
        parts.append(t("dataset.chat", lang=lang, chat=chat_id))
    parts.append(t("dataset.with_photos" if photos else "dataset.text_only", lang=lang))
    return ", ".join(parts)


def _describe_report(lang: str | None, options: DatasetOptions, report: DatasetReport) -> str:
    return describe(
        lang,
        examples=report.examples,
        since=options.since,
        chat_id=options.chat_id,
        photos=options.include_photos,
    )


def _counts(counts: Mapping[str, int], prefix: str, lang: str | None) -> str:
    """Counts by code in words, "label: n; ...": drop reasons (`prefix` "reason") or
    redactions ("redaction"). A code the catalogs don't know is shown as it is."""
    merged: dict[str, int] = {}
    for code, n in counts.items():
        code = code.split(":", 1)[0]  # invalid:<rule> -> invalid
        merged[code] = merged.get(code, 0) + n
    parts = [
        f"{t(f'{prefix}.{code}', lang=lang) if known(f'{prefix}.{code}') else code}: {n}"
        for code, n in sorted(merged.items(), key=lambda item: -item[1])
        if n
    ]
    return "; ".join(parts) or t("train.nothing", lang=lang)


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
    lang = language_of(update)
    where = estimate.where
    if estimate.self_hosted:
        where = t("train.where_self_hosted", lang=lang, host=estimate.where)
    return tr(
        update,
        "train.summary",
        description=_describe_report(lang, options, report),
        examples=report.examples,
        train=report.train_examples,
        validation=report.validation_examples,
        tokens=report.tokens,
        model=model,
        where=where,
        cost=_cost(update, estimate, model),
        dropped=_counts(report.dropped, "reason", lang),
        redacted=_counts(report.redactions, "redaction", lang),
    )


def not_enough(update: Update, report: DatasetReport) -> str:
    """Why a dataset can't start a job (too few examples): how many more it needs, and why
    turns were left out."""
    lang = language_of(update)
    text = t(
        "train.too_few",
        lang=lang,
        examples=report.examples,
        needed=report.needed,
        missing=max(report.needed - report.examples, 0),
    )
    if report.dropped:
        text += "\n\n" + t(
            "train.left_out", lang=lang, dropped=_counts(report.dropped, "reason", lang)
        )
    return text


def _cost(update: Update, estimate: Estimate, model: str) -> str:
    if estimate.self_hosted:
        if estimate.gpu_seconds is None:
            return tr(update, "train.cost_gpu_unknown", model=model)
        minutes = max(1, round(estimate.gpu_seconds / 60))
        return tr(update, "train.cost_gpu", minutes=minutes)
    if estimate.usd is None:
        return tr(update, "train.cost_unknown")
    return f"~${estimate.usd:.2f}"


@admin_command
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
    if not report.ok:  # too few examples: the only problem a dataset has
        await message.reply_text(not_enough(update, report))
        return
    text = summary(update, report, options, tuner.base_model, await tuner.estimate(report))
    if report.voice_turns:
        text += "\n" + tr(update, "train.voice_turns", count=report.voice_turns)
    if report.test_items:  # kept out of training for the evaluation (handlers/evaluation.py)
        text += "\n" + tr(update, "train.test_split", count=report.test_items)
    token = await tuner.hold(report, options, user.id)
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


@admin_command
async def train_button(update: Update, context: CustomContext) -> None:
    """Start or cancel the held dataset (callback data ft:start:TOKEN / ft:drop:TOKEN)."""
    query = update.callback_query
    if query is None or query.data is None or update.effective_user is None:
        return
    _, action, token = query.data.split(":", 2)
    tuner = context.services.finetune
    await query.answer()
    if action == "drop":
        await tuner.drop(token)
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
            text = tr(
                update, "train.failed_to_start", kind=trainer_problem(exc, language_of(update))
            )
        await edit_or_send(query, text)
        return
    started = tr(update, "train.started", job_id=job.job_id, model=job.base_model)
    # This message follows the job: the poller edits it as the status moves.
    if (message_id := await edit_or_send(query, started)) is not None:
        await tuner.follow_with(job, message_id)


def _age(created: int | str, lang: str | None) -> str:
    if isinstance(created, str):
        seconds = (datetime.now(UTC) - datetime.fromisoformat(created)).total_seconds()
    else:
        seconds = datetime.now(UTC).timestamp() - created
    for key, size in (("age.days", 86400), ("age.hours", 3600), ("age.minutes", 60)):
        if seconds >= size:
            return t(key, lang=lang, count=int(seconds // size))
    return t("age.now", lang=lang)


def _job_line(record: JobRecord | None, info: JobInfo | None, lang: str | None) -> str:
    """One line per job; the trainer's live view wins over the bot's own record."""
    if info is not None:
        job_id, status, base, age, result = (
            info.id,
            info.status,
            info.base_model,
            _age(info.created_at, lang),
            info.fine_tuned_model,
        )
    elif record is not None:
        job_id, status, base, age, result = (
            record.job_id,
            record.status,
            record.base_model,
            _age(record.created_at, lang),
            record.fine_tuned_model,
        )
    else:
        return ""
    return t(
        "job.line_result" if result else "job.line",
        lang=lang,
        job_id=job_id,
        status=job_status(status, lang),
        model=base,
        age=age,
        result=result,
    )


@admin_command
async def jobs(update: Update, context: CustomContext) -> None:
    """List fine-tuning jobs: the trainer's view merged with the bot's own records."""
    message = update.effective_message
    if message is None:
        return
    merged, online = await context.services.finetune.jobs()
    if not merged:
        await message.reply_text(tr(update, "jobs.none") if online else tr(update, "jobs.offline"))
        return
    lang = language_of(update)
    lines = [_job_line(record, info, lang) for record, info in merged[:20]]
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


@admin_command
async def job(update: Update, context: CustomContext) -> None:
    """Details of one job, its recent events, and a training-loss chart when there is one."""
    message = update.effective_message
    job_id = await _job_argument(update, context, "job.usage")
    if message is None or job_id is None:
        return
    lang = language_of(update)
    record, details = await context.services.finetune.details(job_id)
    if isinstance(details, TrainerError):
        if details.kind == "not_found" and record is None:
            await message.reply_text(tr(update, "job.unknown"))
            return
        text = tr(update, "job.unreachable", kind=trainer_problem(details, lang))
        if record is not None:
            text = f"{_job_line(record, None, lang)}\n{text}"
        await message.reply_text(text)
        return
    info = details.info
    lines = [_job_line(record, info, lang)]
    if record is not None:
        lines.append(
            tr(update, "job.dataset", description=_job_dataset(record, lang), tokens=record.tokens)
        )
    if info.error:
        lines.append(tr(update, "job.error", error=info.error))
    # The trainer's own event log, in the trainer's words.
    lines += [f"• {e.message}" for e in details.events]
    await message.reply_text("\n".join(lines))
    if len(details.losses) >= 2:
        points = [(p.step, p.train_loss) for p in details.losses]
        png = await asyncio.to_thread(
            loss_chart, points, t("chart.loss_title", lang=lang), t("chart.step", lang=lang)
        )
        await message.reply_photo(png, caption=tr(update, "job.loss_caption", job_id=job_id))


def _job_dataset(record: JobRecord, lang: str | None) -> str:
    """What a job's dataset was built from; jobs from before migration 12 kept a description."""
    if record.dataset_photos is None:
        return record.description
    return describe(
        lang,
        examples=record.train_examples + record.validation_examples,
        since=record.dataset_since,
        chat_id=record.dataset_chat_id,
        photos=record.dataset_photos,
    )


@admin_command
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
        await message.reply_text(tr(update, key, kind=trainer_problem(exc, language_of(update))))
        return
    status = job_status(info.status, language_of(update))
    await message.reply_text(tr(update, "job.cancelled", job_id=info.id, status=status))


@admin_command
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
        text += "\n" + tr(
            update, "model.unreachable", kind=problem(catalog.problem, language_of(update))
        )
    if available:
        text += "\n\n" + tr(update, "model.available", models="\n".join(available))
    await message.reply_text(text)


@admin_command
async def use_model(update: Update, context: CustomContext) -> None:
    """The button under a success notice: switch the bot to the fine-tuned model."""
    query = update.callback_query
    if query is None or query.data is None:
        return
    services = context.services
    record = await services.finetune.job(query.data.split(":", 2)[2])
    await query.answer()
    if record is None or not record.fine_tuned_model:
        await edit_or_send(query, tr(update, "job.unknown"))
        return
    await services.models.switch(record.fine_tuned_model, served_route(record))
    await edit_or_send(query, tr(update, "model.switched", model=record.fine_tuned_model))


@admin_command
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
    description = _describe_report(language_of(update), options, report)
    caption = tr(update, "export.caption", examples=report.examples, description=description)
    await message.reply_document(report.train_path, filename="train.jsonl", caption=caption)
    if report.validation_path is not None:
        await message.reply_document(report.validation_path, filename="validation.jsonl")


def job_notice(
    record: JobRecord, info: JobInfo, lang: str | None = None, evaluation: str | None = None
) -> tuple[str, InlineKeyboardMarkup | None]:
    """The message that tells the admin who started a job how it ended (or, for a status
    that isn't an end, where it is), in `lang`; a success says how its `evaluation` goes."""
    if info.status == "succeeded" and info.fine_tuned_model:
        button = InlineKeyboardButton(
            t("job.use_button", lang=lang), callback_data=f"ft:use:{info.id}"
        )
        text = t("job.succeeded", lang=lang, job_id=info.id, model=info.fine_tuned_model)
        return (
            f"{text}\n\n{evaluation}" if evaluation else text,
            InlineKeyboardMarkup([[button]]),
        )
    if info.status == "failed":
        error = info.error or t("job.no_reason", lang=lang)
        return t("job.failed", lang=lang, job_id=info.id, error=error), None
    return t("job.status", lang=lang, job_id=info.id, status=job_status(info.status, lang)), None


async def tell_job_status(
    bot: Bot,
    record: JobRecord,
    info: JobInfo,
    lang: str | None = None,
    evaluation: str | None = None,
) -> int | None:
    """Tell the admin who started a job its new status, in `lang`; the id of the message
    that follows the job from now on.

    While the job runs, the one message that follows it is edited (a new one is sent if it
    can't be); when it ends, that message shows the end and a new message tells it, so the
    admin is notified once more, with the button to use the new model.
    """
    chat_id, live = record.started_by, record.notice_message_id
    status = job_status(info.status, lang)
    if not info.finished:
        text = t("job.live", lang=lang, job_id=info.id, model=record.base_model, status=status)
        if live is not None and await _edit(bot, chat_id, live, text):
            return live
        return (await bot.send_message(chat_id, text)).message_id
    if live is not None:
        ended = t("job.status", lang=lang, job_id=info.id, status=status)
        try:
            await _edit(bot, chat_id, live, ended)
        except TelegramError as exc:  # the notice below is what counts
            log.info("could not update the notice of job %s: %s", info.id, type(exc).__name__)
    text, keyboard = job_notice(record, info, lang, evaluation)
    await bot.send_message(chat_id, text, reply_markup=keyboard)
    return live


async def _edit(bot: Bot, chat_id: int, message_id: int, text: str) -> bool:
    """Edit a message of the bot's; False if Telegram can't (deleted, too old...)."""
    try:
        await bot.edit_message_text(text, chat_id=chat_id, message_id=message_id)
    except BadRequest as exc:
        if "not modified" in exc.message.lower():
            return True  # it already says this
        log.info("could not edit job notice %s: %s", message_id, exc.message)
        return False
    return True


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
