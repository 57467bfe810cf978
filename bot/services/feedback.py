"""How users feel about the answers: reaction polarity, and the /stats report and chart."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from PIL import Image, ImageDraw, ImageFont

from storage.db import Store

# Telegram sends these without the variation selector (e.g. "❤", not "❤️").
POSITIVE_REACTIONS = frozenset({"👍", "❤", "🔥", "🎉", "🥰", "👏", "😍", "🤩", "💯", "❤‍🔥", "🏆"})
NEGATIVE_REACTIONS = frozenset({"👎", "💩", "😡", "🤬", "🤮"})
LABELS = ("positive", "neutral", "negative")
EMOJI = {"positive": "🙂", "neutral": "😐", "negative": "🙁"}
CHART_MIN_MESSAGES = 10  # below this a chart shows noise, not a distribution


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


async def collect(store: Store, now: datetime | None = None) -> Stats:
    since = ((now or datetime.now(UTC)) - timedelta(days=7)).isoformat(timespec="milliseconds")
    return Stats(
        all_time=await store.sentiment_counts(),
        week=await store.sentiment_counts(since),
        reactions_all=await store.reaction_counts(),
        reactions_week=await store.reaction_counts(since),
        top_users=await store.usage("user_id", since),
        top_chats=await store.usage("chat_id", since),
        tokens_all=await store.total_tokens(None),
        tokens_week=await store.total_tokens(since),
    )


def _line(counts: dict[str, int], label: str) -> str:
    total = sum(counts.values())
    share = f" ({counts[label] * 100 // total}%)" if total else ""
    return f"{counts[label]}{share}"


def render_text(stats: Stats) -> str:
    """The /stats report: label counts (share) for all time and the last 7 days."""
    lines = ["Sentiment, all time / last 7 days"]
    for role, title in (("assistant", "Bot replies"), ("user", "User messages")):
        lines.append(f"\n{title}:")
        for label in LABELS:
            lines.append(
                f"{EMOJI[label]} {label}: {_line(stats.all_time[role], label)}"
                f" / {_line(stats.week[role], label)}"
            )
    ra, rw = stats.reactions_all, stats.reactions_week
    lines.append(
        f"\nReactions on replies: 👍 {ra[1]} / {rw[1]}, 👎 {ra[-1]} / {rw[-1]},"
        f" other {ra[0]} / {rw[0]}"
    )
    lines.append(f"\nTokens used: {stats.tokens_all:,} / {stats.tokens_week:,}")
    if stats.top_users:
        users = ", ".join(f"{u}: {n:,}" for u, n in stats.top_users)
        lines.append(f"Top users (7 days): {users}")
    if stats.top_chats:
        chats = ", ".join(f"{c}: {n:,}" for c, n in stats.top_chats)
        lines.append(f"Top chats (7 days): {chats}")
    if stats.tagged == 0:
        lines.append("\nNo tagged messages yet.")
    return "\n".join(lines)


COLORS = {"positive": (76, 175, 80), "neutral": (158, 158, 158), "negative": (229, 57, 53)}


def render_chart(stats: Stats) -> bytes:
    """A PNG of stacked bars (share of each label) for replies and user messages.

    CPU-bound (Pillow): call it through asyncio.to_thread.
    """
    width, height, left, bar_h = 720, 300, 170, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=18)
    draw.text((20, 16), "Sentiment share (all time)", fill="black", font=font)
    rows = [("Bot replies", stats.all_time["assistant"]), ("User messages", stats.all_time["user"])]
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
    x = left
    for label in LABELS:
        draw.rectangle((x, height - 34, x + 16, height - 18), fill=COLORS[label])
        draw.text((x + 22, height - 38), label, fill="black", font=font)
        x += 150
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
