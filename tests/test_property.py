"""Property-based: malformed and unusual updates never crash the bot or reach the error handler."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.context import ParleyApp
from tests.conftest import settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import BOT_USER, FakeTelegram

CHATS = {
    "private": {"id": 301, "type": "private", "first_name": "P"},
    "group": {"id": -302, "type": "supergroup", "title": "G", "is_forum": True},
    "channel": {"id": -1003, "type": "channel", "title": "C"},
}
USER = {"id": 301, "is_bot": False, "first_name": "U", "language_code": "ru"}

texts = st.one_of(
    st.text(max_size=40),
    st.text(min_size=4090, max_size=4096),
    st.sampled_from(
        [
            "",
            " ",
            "\u200b",
            "/",
            "/start@other_bot",
            "/train now",
            "@parley_test_bot",
            "‮RTL override",
            "e\u0301\u0301\u0301",
            "👨‍👩‍👧‍👦" * 50,
            "\x00\x01",
        ]
    ),
)
# Far above the stand-in's own counter: Telegram never reuses a message id in a chat.
message_ids = st.integers(min_value=10**9, max_value=2**31 - 1)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    chat = CHATS[draw(st.sampled_from(["private", "group"]))]
    message: dict[str, Any] = {
        "message_id": draw(message_ids),
        "date": int(time.time()),
        "chat": chat,
        "from": USER,
    }
    kind = draw(st.sampled_from(["text", "text", "dice", "reply", "topic", "caption-only"]))
    if kind in ("text", "reply", "topic"):
        message["text"] = draw(texts) or "x"
    if kind == "dice":
        message["dice"] = {"emoji": "🎲", "value": draw(st.integers(1, 6))}
    if kind == "reply":
        message["reply_to_message"] = {"message_id": 1, "date": 0, "chat": chat, "from": BOT_USER}
    if kind == "topic" and chat["type"] != "private":
        message["message_thread_id"] = draw(st.integers(1, 1000))
        message["is_topic_message"] = True
    if kind == "caption-only":
        message["caption"] = draw(texts)
    return message


@st.composite
def updates(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """(update without update_id, whether the spec knows its shape)."""
    kind = draw(
        st.sampled_from(["message", "edited", "channel", "callback", "reaction", "unknown"])
    )
    if kind == "message":
        return {"message": draw(messages())}, True
    if kind == "edited":
        edited = draw(messages()) | {"edit_date": int(time.time())}
        return {"edited_message": edited}, True
    if kind == "channel":
        post = {
            "message_id": draw(message_ids),
            "date": 0,
            "chat": CHATS["channel"],
            "text": draw(texts) or "x",
        }
        return {"channel_post": post}, True
    if kind == "callback":
        old = {"chat": CHATS["private"], "message_id": draw(message_ids), "date": 0}  # inaccessible
        data = draw(
            st.sampled_from(
                [
                    "ft:start:gone",
                    "ft:use:nojob",
                    "forget:yes:1",
                    "profile:x",
                    "profile:default",
                    "junk",
                    "forget:yes:301",
                ]
            )
        )
        query = {
            "id": str(draw(message_ids)),
            "from": USER,
            "chat_instance": "c",
            "data": data,
            "message": old,
        }
        return {"callback_query": query}, True
    if kind == "reaction":
        reaction = {
            "chat": CHATS["private"],
            "message_id": draw(message_ids),
            "date": 0,
            "user": USER,
            "old_reaction": [],
            "new_reaction": [{"type": "emoji", "emoji": "👍"}],
        }
        return {"message_reaction": reaction}, True
    return {"future_update_kind": {"anything": draw(st.text(max_size=10))}}, False


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(updates(), min_size=1, max_size=6))
async def test_unusual_updates_never_crash_the_bot(
    batch: list[tuple[dict[str, Any], bool]],
    tg: FakeTelegram,
    oai: FakeOpenAI,
    bot: ParleyApp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="handlers.errors")
    caplog.clear()
    for chat in CHATS.values():
        tg.chats[chat["id"]] = chat
    for update, known in batch:
        tg.push_update(update, validate=known)
    await settled(bot)
    unhandled = [r for r in caplog.records if r.name == "handlers.errors"]
    assert unhandled == [], [r.exc_info for r in unhandled]
    # And the bot still answers a plain message.
    before = len(tg.sent_texts(301))
    tg.push_message(301, "are you alive?", user_id=301)
    await tg.wait_for(lambda: "echo: are you alive?" in tg.sent_texts(301)[before:])
