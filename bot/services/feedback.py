"""How users feel about the answers: reaction polarity, and the /stats report and chart."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from PIL import Image, ImageDraw

from bot.services.charts import chart_font
from bot.texts import number, t
from storage.interface import StatsStore

# Telegram sends these without the variation selector (e.g. "❤", not "❤️").
POSITIVE_REACTIONS = frozenset({"👍", "❤", "🔥", "🎉", "🥰", "👏", "😍", "🤩", "💯", "❤‍🔥", "🏆"})
NEGATIVE_REACTIONS = frozenset({"👎", "💩", "😡", "🤬", "🤮"})
LABELS = ("positive", "neutral", "negative")
EMOJI = {"positive": "🙂", "neutral": "😐", "negative": "🙁"}
CHART_MIN_MESSAGES = 10  # below this a chart shows noise, not a distribution
CHART_TITLE_AT = (20, 16)  # where render_chart writes its title


def reaction_polarity(emoji: str) -> int:
    """+1 for a positive reaction, -1 for a negative one, 0 otherwise."""
    emoji = emoji.replace("\ufe0f", "")
    if emoji in POSITIVE_REACTIONS:
        return 1
    return -1 if emoji in NEGATIVE_REACTIONS else 0


@dataclass(frozen=True, slots=True)
class Stats:
    all_time: dict[str, dict[str, int]]
    week: dict[str, dict[str, int]]
    reactions_all: dict[int, int]
    reactions_week: dict[int, int]
    top_users: list[tuple[int, int]] = field(default_factory=list)  # (user id, tokens), 7 days
    top_chats: list[tuple[int, int]] = field(default_factory=list)  # (chat id, tokens), 7 days
    tokens_all: int = 0
    tokens_week: int = 0

    @property
    def tagged(self) -> int:
        return sum(sum(c.values()) for c in self.all_time.values())


class Feedback:
    """Users' reactions on the bot's replies, and the /stats report built from the log."""

    def __init__(self, stats: StatsStore) -> None:
        self._stats = stats

    async def record_reactions(
        self, chat_id: int, message_id: int, user_id: int, emojis: list[str]
    ) -> None:
        """A user's current reactions on one of the bot's replies (replacing earlier ones)."""
        await self._stats.set_reactions(
            chat_id, message_id, user_id, [(e, reaction_polarity(e)) for e in emojis]
        )

    async def stats(self, now: datetime | None = None) -> Stats:
        return await collect(self._stats, now)


async def collect(stats: StatsStore, now: datetime | None = None) -> Stats:
    since = ((now or datetime.now(UTC)) - timedelta(days=7)).isoformat(timespec="milliseconds")
    return Stats(
        all_time=await stats.sentiment_counts(),
        week=await stats.sentiment_counts(since),
        reactions_all=await stats.reaction_counts(),
        reactions_week=await stats.reaction_counts(since),
        top_users=await stats.usage("user_id", since),
        top_chats=await stats.usage("chat_id", since),
        tokens_all=await stats.total_tokens(None),
        tokens_week=await stats.total_tokens(since),
    )


def _line(counts: dict[str, int], label: str) -> str:
    total = sum(counts.values())
    share = f" ({counts[label] * 100 // total}%)" if total else ""
    return f"{counts[label]}{share}"


def _who(chat_id: int, names: Mapping[int, str]) -> str:
    """A user or chat as admins read it: its name with the id (for /train chat=ID), or the id."""
    name = names.get(chat_id)
    return f"{name} ({chat_id})" if name else str(chat_id)


def render_text(stats: Stats, lang: str | None = None, names: Mapping[int, str] = {}) -> str:
    """The /stats report in `lang`: label counts (share) for all time and the last 7 days.

    `names`: display names for the top users' and chats' ids, where known.
    """
    lines = [t("stats.title", lang=lang)]
    for role, title in (("assistant", "stats.replies"), ("user", "stats.user_messages")):
        lines.append(f"\n{t(title, lang=lang)}:")
        for label in LABELS:
            lines.append(
                f"{EMOJI[label]} {t(f'sentiment.{label}', lang=lang)}:"
                f" {_line(stats.all_time[role], label)} / {_line(stats.week[role], label)}"
            )
    ra, rw = stats.reactions_all, stats.reactions_week
    lines.append(
        "\n"
        + t(
            "stats.reactions",
            lang=lang,
            up=ra[1],
            up_week=rw[1],
            down=ra[-1],
            down_week=rw[-1],
            other=ra[0],
            other_week=rw[0],
        )
    )
    lines.append(
        "\n" + t("stats.tokens", lang=lang, total=stats.tokens_all, week=stats.tokens_week)
    )
    if stats.top_users:
        users = ", ".join(f"{_who(u, names)}: {number(n, lang)}" for u, n in stats.top_users)
        lines.append(t("stats.top_users", lang=lang, users=users))
    if stats.top_chats:
        chats = ", ".join(f"{_who(c, names)}: {number(n, lang)}" for c, n in stats.top_chats)
        lines.append(t("stats.top_chats", lang=lang, chats=chats))
    if stats.tagged == 0:
        lines.append("\n" + t("stats.none", lang=lang))
    return "\n".join(lines)


COLORS = {"positive": (76, 175, 80), "neutral": (158, 158, 158), "negative": (229, 57, 53)}


def render_chart(stats: Stats, lang: str | None = None) -> bytes:
    """A PNG of stacked bars (share of each label) for replies and user messages, in `lang`.

    CPU-bound (Pillow): call it through asyncio.to_thread.
    """
    width, height, bar_h = 720, 300, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = chart_font(18)
    draw.text(CHART_TITLE_AT, t("stats.chart_title", lang=lang), fill="black", font=font)
    rows = [
        (t("stats.replies", lang=lang), stats.all_time["assistant"]),
        (t("stats.user_messages", lang=lang), stats.all_time["user"]),
    ]
    # The bars start past the longer row title (titles differ in length between languages).
    left = min(
        width // 2, max(170, 40 + round(max(draw.textlength(r, font=font) for r, _ in rows)))
    )
    for i, (title, counts) in enumerate(rows):
        y = 70 + i * (bar_h + 40)
        draw.text((20, y + bar_h // 2 - 10), title, fill="black", font=font)
        total = sum(counts.values()) or 1
        x = left
        for label in LABELS:
            w = round((width - left - 30) * counts[label] / total)
            if w:
                draw.rectangle((x, y, x + w, y + bar_h), fill=COLORS[label])
                if w > 40:
                    draw.text(
                        (x + 6, y + bar_h // 2 - 10), str(counts[label]), fill="white", font=font
                    )
            x += w
    x = 20  # the legend, under the row titles: its words fit in every language
    for label in LABELS:
        name = t(f"sentiment.{label}", lang=lang)
        draw.rectangle((x, height - 34, x + 16, height - 18), fill=COLORS[label])
        draw.text((x + 22, height - 38), name, fill="black", font=font)
        x += 22 + round(draw.textlength(name, font=font)) + 40
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
