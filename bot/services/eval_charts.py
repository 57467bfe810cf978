"""Charts of two models side by side, with 95% intervals: the evaluation and the canary.

Drawn with Pillow like bot/services/charts.py (whose font they share); every word on them
is passed in by the caller, from the message catalogs. CPU-bound: call them through
asyncio.to_thread.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from bot.services.charts import chart_font
from bot.services.intervals import Interval
from bot.texts import number

WIDTH = 760
CURRENT_COLOUR = (120, 144, 156)
CANDIDATE_COLOUR = (255, 152, 0)
OUTCOME_COLOURS = ((76, 175, 80), (158, 158, 158), (229, 57, 53))  # win, tie, loss
ROW_HEIGHT = 88  # a row: its label, then one bar per model
BARS_LEFT = 16


@dataclass(frozen=True, slots=True)
class PairRow:
    """One figure for both models: a label and the two estimates with their intervals."""

    label: str
    current: Interval
    candidate: Interval
    share: bool  # shown as a percentage (0..1 values) rather than as a number


def _fmt(value: float, share: bool, lang: str | None) -> str:
    if math.isnan(value):
        return "–"
    return f"{value * 100:.1f}%" if share else number(round(value), lang)


def _pairs(draw: ImageDraw.ImageDraw, rows: Sequence[PairRow], top: int, lang: str | None) -> None:
    """Each row: its label, then two bars (the model in use, the candidate) with their
    interval's whiskers; numbers grouped as `lang` (a language_code) does."""
    font, small = chart_font(15), chart_font(13)
    right = WIDTH - 130
    for n, row in enumerate(rows):
        y = top + n * ROW_HEIGHT
        draw.text((BARS_LEFT, y), row.label, fill="black", font=font)
        values = [v for i in (row.current, row.candidate) for v in (i.value, i.high)]
        scale = max([v for v in values if not math.isnan(v)] + [1e-9]) * 1.1
        if row.share:
            scale = min(1.0, scale) or 1.0
        for k, (interval, colour) in enumerate(
            ((row.current, CURRENT_COLOUR), (row.candidate, CANDIDATE_COLOUR))
        ):
            bar_y = y + 24 + k * 28
            if interval.n and not math.isnan(interval.value):

                def x(v: float, scale: float = scale) -> float:
                    return BARS_LEFT + (right - BARS_LEFT) * max(0.0, min(v, scale)) / scale

                draw.rectangle((BARS_LEFT, bar_y, x(interval.value), bar_y + 20), fill=colour)
                low, high = x(interval.low), x(interval.high)
                mid = bar_y + 10
                draw.line((low, mid, high, mid), fill="black", width=2)
                draw.line((low, mid - 6, low, mid + 6), fill="black", width=2)
                draw.line((high, mid - 6, high, mid + 6), fill="black", width=2)
            text = f"{_fmt(interval.value, row.share, lang)} (n={number(interval.n, lang)})"
            draw.text((right + 8, bar_y + 2), text, fill="black", font=small)


def _legend(draw: ImageDraw.ImageDraw, y: int, current: str, candidate: str) -> None:
    font = chart_font(14)
    x = 16
    for name, colour in ((current, CURRENT_COLOUR), (candidate, CANDIDATE_COLOUR)):
        draw.rectangle((x, y, x + 16, y + 16), fill=colour)
        draw.text((x + 22, y - 1), name, fill="black", font=font)
        x += 40 + int(draw.textlength(name, font=font))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def comparison_chart(
    title: str, rows: Sequence[PairRow], current: str, candidate: str, lang: str | None = None
) -> bytes:
    """The canary's figures: one row per figure, both models, 95% intervals as whiskers."""
    height = 90 + ROW_HEIGHT * len(rows)
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((16, 12), title, fill="black", font=chart_font(18))
    _legend(draw, 46, current, candidate)
    _pairs(draw, rows, 76, lang)
    return _png(image)


def evaluation_chart(
    title: str,
    outcomes: Sequence[tuple[str, int]],
    win_rate: Interval,
    win_rate_label: str,
    rows: Sequence[PairRow],
    current: str,
    candidate: str,
    *,
    lang: str | None = None,
) -> bytes:
    """Wins, ties and losses as one bar; the win rate on a 0-100% axis with its interval
    and the 50% line; then the two models' answers side by side."""
    height = 250 + ROW_HEIGHT * len(rows)
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    font = chart_font(15)
    draw.text((16, 12), title, fill="black", font=chart_font(18))
    left, right = 16, WIDTH - 16
    total = sum(n for _, n in outcomes) or 1
    x = float(left)
    for (label, n), colour in zip(outcomes, OUTCOME_COLOURS, strict=False):
        w = (right - left) * n / total
        if w >= 1:
            draw.rectangle((x, 48, x + w, 84), fill=colour)
            text = f"{label} {number(n, lang)}"
            if w > draw.textlength(text, font=font) + 10:
                draw.text((x + 6, 57), text, fill="white", font=font)
        x += w
    # The win rate: 0..100% with the 50% line (no difference) and the 95% interval.
    axis_y, a0, a1 = 140, 200, WIDTH - 60
    draw.text((16, axis_y - 10), win_rate_label, fill="black", font=font)
    draw.line((a0, axis_y, a1, axis_y), fill="black")
    for pct in (0, 25, 50, 75, 100):
        px = a0 + (a1 - a0) * pct / 100
        draw.line((px, axis_y - 4, px, axis_y + 4), fill="black")
        draw.text((px - 12, axis_y + 8), f"{pct}%", fill="black", font=chart_font(12))
    mid = a0 + (a1 - a0) / 2
    for dash in range(axis_y - 30, axis_y + 4, 6):
        draw.line((mid, dash, mid, dash + 3), fill=(120, 120, 120))
    if win_rate.n:
        low, high = (a0 + (a1 - a0) * v for v in (win_rate.low, win_rate.high))
        value = a0 + (a1 - a0) * win_rate.value
        draw.line((low, axis_y - 16, high, axis_y - 16), fill=CANDIDATE_COLOUR, width=4)
        draw.ellipse((value - 6, axis_y - 22, value + 6, axis_y - 10), fill=CANDIDATE_COLOUR)
    _legend(draw, 190, current, candidate)
    _pairs(draw, rows, 218, lang)
    return _png(image)
