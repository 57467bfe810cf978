"""Admin commands around a candidate model: /eval before the switch; /canary, /promote and
/rollback after it; and the canary's part of /stats."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Sequence

from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.ext import CommandHandler

from bot.context import CustomContext, ParleyApp, Services
from bot.domain import EvalResult, EvalRun
from bot.services.canary import Comparison, Metric
from bot.services.chat import CHAT_ROUTE
from bot.services.eval_charts import PairRow, comparison_chart, evaluation_chart
from bot.services.evaluation import EvalSummary, examples
from bot.services.intervals import Interval
from bot.texts import known, language_of, number, t
from handlers.admin import admin_command, problem

_EXAMPLE_CHARS = 700  # of each answer, in an example pair


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{value * 100:.0f}%"


def _num(value: float, lang: str | None) -> str:
    return "–" if math.isnan(value) else number(round(value), lang)


def _pair(current: Interval, candidate: Interval, lang: str | None) -> str:
    return f"{_num(current.value, lang)} / {_num(candidate.value, lang)}"


def render_summary(summary: EvalSummary, lang: str | None) -> str:
    """An evaluation's result: counts, the win rate and its interval, the two side by side."""
    run = summary.run
    if summary.judged == 0:
        verdict = t("eval.verdict_none", lang=lang)
    elif summary.verdict == "unclear" and (more := summary.more_needed):
        verdict = t("eval.verdict_unclear_more", lang=lang, more=number(more, lang))
    else:
        verdict = t(f"eval.verdict_{summary.verdict}", lang=lang)
    text = t(
        "eval.result",
        lang=lang,
        candidate=run.candidate_model,
        current=run.current_model,
        judged=summary.judged,
        judge=run.judge_model,
        wins=summary.wins,
        ties=summary.ties,
        losses=summary.losses,
        rate=_pct(summary.win_rate.value),
        low=_pct(summary.win_rate.low),
        high=_pct(summary.win_rate.high),
        verdict=verdict,
        length=_pair(summary.current.length, summary.candidate.length, lang),
        latency=_pair(summary.current.latency, summary.candidate.latency, lang),
        tokens=_pair(summary.current.tokens, summary.candidate.tokens, lang),
    )
    if summary.errors:
        text += "\n" + t(
            "eval.errors", lang=lang, count=summary.errors, kinds=_errors(summary, lang)
        )
    if summary.pending and run.status == "running":
        text += "\n" + t("eval.pending", lang=lang, count=summary.pending)
    return text


def _errors(summary: EvalSummary, lang: str | None) -> str:
    """What failed, in words: "judge: server error (4), candidate: no answer in time (1)"."""
    counts: Counter[tuple[str, str]] = Counter()
    for recorded, n in summary.error_kinds.items():
        for failure in recorded.split(", "):  # current:KIND, candidate:KIND or judge:KIND
            side, _, kind = failure.rpartition(":")
            counts[(side, kind)] += n
    return ", ".join(
        t(
            "eval.error_kind",
            lang=lang,
            side=t(f"eval.side_{side}", lang=lang) if known(f"eval.side_{side}") else side,
            problem=problem(kind, lang),
            count=n,
        )
        for (side, kind), n in counts.most_common()
    )


def running_note(run: EvalRun, lang: str | None) -> str:
    """The line under a job's success notice: its evaluation is under way."""
    return t("eval.running_note", lang=lang, items=run.size, current=run.current_model)


def use_button(run: EvalRun, lang: str | None) -> InlineKeyboardMarkup:
    """The switch button of the job's success notice, beside the evaluation's result."""
    button = InlineKeyboardButton(
        t("job.use_button", lang=lang), callback_data=f"ft:use:{run.job_id}"
    )
    return InlineKeyboardMarkup([[button]])


def _chart(summary: EvalSummary, lang: str | None) -> bytes:
    run = summary.run
    rows = [
        PairRow(
            t(f"eval.row_{name}", lang=lang),
            getattr(summary.current, name),
            getattr(summary.candidate, name),
            share=False,
        )
        for name in ("length", "latency", "tokens")
    ]
    return evaluation_chart(
        t("eval.chart_title", lang=lang),
        [
            (t("eval.wins", lang=lang), summary.wins),
            (t("eval.ties", lang=lang), summary.ties),
            (t("eval.losses", lang=lang), summary.losses),
        ],
        summary.win_rate,
        t("eval.win_rate", lang=lang),
        rows,
        t("eval.legend_current", lang=lang, model=run.current_model),
        t("eval.legend_candidate", lang=lang, model=run.candidate_model),
        lang=lang,
    )


def _cut(text: str | None) -> str:
    text = (text or "").strip()
    return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS].rstrip() + "…"


def render_example(title_key: str, result: EvalResult, question: str, lang: str | None) -> str:
    # The candidate's reason from the order that showed it first, else the other one's.
    reason = result.reason_ba or result.reason_ab or ""
    return t(
        "eval.example",
        lang=lang,
        title=t(title_key, lang=lang),
        question=_cut(question),
        current=_cut(result.current_answer),
        candidate=_cut(result.candidate_answer),
        reason=reason,
    )


async def send_report(bot: Bot, services: Services, run: EvalRun) -> None:
    """Tell the admin who asked for an evaluation its result, with the switch button."""
    lang = await services.alerts.language_of(run.requested_by)
    summary, _results = await services.evaluation.summary(run)
    await bot.send_message(
        run.requested_by, render_summary(summary, lang), reply_markup=use_button(run, lang)
    )


@admin_command
async def evaluate(update: Update, context: CustomContext) -> None:
    """`/eval JOB`: the job's last evaluation, with a chart and three example pairs (a new
    one if it has none); `/eval JOB N`: a new one on its first N test conversations."""
    message = update.effective_message
    user = update.effective_user
    if message is None or user is None:
        return
    lang = language_of(update)
    args = context.args or []
    if not args or len(args) > 2:
        await message.reply_text(t("eval.usage", lang=lang))
        return
    size: int | None = None
    if len(args) == 2:
        if not (args[1].isascii() and args[1].isdigit()) or int(args[1]) < 1:
            await message.reply_text(t("eval.bad_size", lang=lang))
            return
        size = int(args[1])
    services = context.services
    record = await services.evaluation.job(args[0])
    if record is None or not record.fine_tuned_model:
        await message.reply_text(t("eval.unknown_job", lang=lang, job_id=args[0]))
        return
    last = await services.evaluation.last(record.job_id)
    if last is not None and (size is None or last[0].run.status == "running"):
        summary, results = last
        if size is not None:  # one at a time: the one under way is shown, not doubled
            await message.reply_text(
                t(
                    "eval.under_way",
                    lang=lang,
                    done=len(results),
                    items=summary.run.size,
                    job_id=record.job_id,
                )
            )
            return
        await _show(message, summary, results, lang, services)
        return
    if record.fine_tuned_model == services.models.current:
        await message.reply_text(t("eval.same_model", lang=lang, model=record.fine_tuned_model))
        return
    run = await services.evaluation.start(record, record.fine_tuned_model, user.id, size)
    if run is None:
        await message.reply_text(t("eval.no_items", lang=lang, job_id=record.job_id))
        return
    await message.reply_text(
        t(
            "eval.started",
            lang=lang,
            candidate=run.candidate_model,
            current=run.current_model,
            items=run.size,
        )
    )


async def _show(
    message: Message,
    summary: EvalSummary,
    results: Sequence[EvalResult],
    lang: str | None,
    services: Services,
) -> None:
    await message.reply_text(
        render_summary(summary, lang), reply_markup=use_button(summary.run, lang)
    )
    if summary.judged:
        chart = await asyncio.to_thread(_chart, summary, lang)
        await message.reply_photo(chart, caption=t("eval.chart_caption", lang=lang))
    questions = await services.evaluation.questions(summary.run)
    for key, result in zip(
        ("eval.example_win", "eval.example_loss", "eval.example_tie"),
        examples(results),
        strict=True,
    ):
        if result is not None:
            question = questions.get(result.item_id, "")
            await message.reply_text(render_example(key, result, question, lang))


def _percent(text: str) -> float | None:
    try:
        value = float(text.rstrip("%").replace(",", "."))
    except ValueError:
        return None
    return value if 0 < value <= 100 and math.isfinite(value) else None


@admin_command
async def canary(update: Update, context: CustomContext) -> None:
    """`/canary MODEL PERCENT`: send that share of the chats to MODEL, each as it begins a
    conversation (one under way keeps its model); `/canary` alone: the canary in force."""
    message = update.effective_message
    if message is None:
        return
    lang = language_of(update)
    services = context.services
    args = context.args or []
    if not args:
        state = services.canary.state
        if state is None:
            await message.reply_text(t("canary.none", lang=lang))
        else:
            await message.reply_text(
                t(
                    "canary.state",
                    lang=lang,
                    model=state.model,
                    percent=f"{state.percent:g}",
                    since=state.started_at[:16].replace("T", " "),
                    current=services.models.current,
                )
            )
        return
    if len(args) != 2:
        await message.reply_text(t("canary.usage", lang=lang))
        return
    name, percent = args[0], _percent(args[1])
    if percent is None:
        await message.reply_text(t("canary.bad_percent", lang=lang))
        return
    if name == services.models.current:
        await message.reply_text(t("canary.same_model", lang=lang, model=name))
        return
    catalog = await services.models.catalog()
    route = catalog.route_of(name)
    if route is None and catalog.complete:
        await message.reply_text(t("model.unknown", lang=lang, model=name))
        return
    # An endpoint that can't be asked right now: trust the admin, on the chat endpoint.
    state = await services.canary.start(name, route or CHAT_ROUTE, percent)
    await message.reply_text(
        t(
            "canary.started",
            lang=lang,
            model=state.model,
            percent=f"{state.percent:g}",
            current=services.models.current,
        )
    )


@admin_command
async def promote(update: Update, context: CustomContext) -> None:
    """Make the canary's model everyone's model (persisted) and end the canary."""
    message = update.effective_message
    if message is None:
        return
    lang = language_of(update)
    state = await context.services.canary.promote()
    if state is None:
        await message.reply_text(t("canary.none", lang=lang))
        return
    await message.reply_text(t("canary.promoted", lang=lang, model=state.model))


@admin_command
async def rollback(update: Update, context: CustomContext) -> None:
    """End the canary: every chat back on the model in use (persisted)."""
    message = update.effective_message
    if message is None:
        return
    lang = language_of(update)
    state = await context.services.canary.rollback()
    if state is None:
        await message.reply_text(t("canary.none", lang=lang))
        return
    await message.reply_text(
        t("canary.rolled_back", lang=lang, model=context.services.models.current)
    )


def _figure(metric: Metric, interval: Interval, lang: str | None) -> str:
    if interval.n == 0:
        return "–"

    def fmt(value: float) -> str:
        return _pct(value) if metric.share else _num(value, lang)

    n = number(interval.n, lang)
    return f"{fmt(interval.value)} [{fmt(interval.low)}–{fmt(interval.high)}] n={n}"


def render_comparison(comparison: Comparison, lang: str | None) -> str:
    """The canary's part of /stats: each figure for both models, and what can be said."""
    state = comparison.state
    lines = [
        t(
            "canary.stats_title",
            lang=lang,
            model=state.model,
            percent=f"{state.percent:g}",
            current=comparison.current_model,
            since=state.started_at[:16].replace("T", " "),
        )
    ]
    for metric in comparison.metrics:
        if metric.current.n == 0 or metric.candidate.n == 0:
            said = t("canary.no_data", lang=lang)
        elif (called := metric.called) is not None:
            said = t(f"canary.called_{called}", lang=lang)
        elif (more := metric.more_needed) is not None:
            said = t("canary.not_enough", lang=lang, more=number(more, lang))
        else:
            said = t("canary.no_difference", lang=lang)
        lines.append(
            t(
                "canary.metric",
                lang=lang,
                name=t(f"canary.metric_{metric.name}", lang=lang),
                current=_figure(metric, metric.current, lang),
                candidate=_figure(metric, metric.candidate, lang),
                said=said,
            )
        )
    return "\n".join(lines)


async def canary_stats(update: Update, context: CustomContext) -> None:
    """The canary's comparison under /stats, with its chart; nothing when no canary runs."""
    message = update.effective_message
    comparison = await context.services.canary.compare()
    if message is None or comparison is None:
        return
    lang = language_of(update)
    await message.reply_text(render_comparison(comparison, lang))
    if any(m.current.n and m.candidate.n for m in comparison.metrics):
        rows = [
            PairRow(t(f"canary.metric_{m.name}", lang=lang), m.current, m.candidate, m.share)
            for m in comparison.metrics
        ]
        chart = await asyncio.to_thread(
            comparison_chart,
            t("canary.chart_title", lang=lang),
            rows,
            t("eval.legend_current", lang=lang, model=comparison.current_model),
            t("eval.legend_candidate", lang=lang, model=comparison.state.model),
            lang,
        )
        await message.reply_photo(chart, caption=t("canary.chart_caption", lang=lang))


def register(app: ParleyApp) -> None:
    for name, callback in (
        ("eval", evaluate),
        ("canary", canary),
        ("promote", promote),
        ("rollback", rollback),
    ):
        app.add_handler(CommandHandler(name, callback))
