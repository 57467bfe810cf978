"""Reply delivery: long answers split cleanly, groups get typing and replies, topics stay apart."""

from __future__ import annotations

import json

from bot.context import ParleyApp
from bot.services.formatting import plain_parts, render_parts, utf16_len
from tests.conftest import settled
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import FakeTelegram


def split_text(text: str) -> list[str]:
    return [p.text for p in plain_parts(text)]


def test_split_prefers_paragraphs_then_lines_then_words() -> None:
    para = "word " * 700  # ~3,500 characters
    parts = split_text(f"{para.strip()}\n\n{para.strip()}")
    assert [p == para.strip() for p in parts] == [True, True]
    lines = "\n".join(f"line {i} " + "x" * 90 for i in range(60))
    parts = split_text(lines)
    assert len(parts) == 2 and all(p.startswith("line ") for p in parts)
    assert "\n".join(parts) == lines
    words = " ".join(f"w{i}" for i in range(2000))
    parts = split_text(words)
    assert " ".join(parts) == words  # nothing lost, no word cut in two
    assert all(utf16_len(p) <= 4096 for p in parts)


def test_split_counts_utf16_and_cuts_hard_only_without_spaces() -> None:
    emoji = "😀" * 3000  # 6,000 UTF-16 units
    parts = split_text(emoji)
    assert "".join(parts) == emoji and all(utf16_len(p) <= 4096 for p in parts)
    blob = "x" * 9000
    assert [len(p) for p in split_text(blob)] == [4096, 4096, 808]
    assert split_text("  short  ") == ["short"]


async def test_markdown_is_sent_as_entities_and_drafts_are_formatted_too(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    answer = "Use **bold** and `x < y` here:\n\n```python\nprint('a_b * 2')\n```\n\n- one\n- two"
    oai.enqueue(Reply(answer, chunk_words=3, chunk_delay=0.05))
    tg.push_message(100, "format please")
    [text] = await tg.wait_sent(100, 1)
    assert "**" not in text and "```" not in text and "print('a_b * 2')" in text
    final = json.loads(tg.calls_of("sendMessage")[-1].params["entities"])
    types = {e["type"] for e in final}
    assert {"bold", "code", "pre"} <= types
    pre = next(e for e in final if e["type"] == "pre")
    assert pre["language"] == "python"
    drafts = [c.params for c in tg.calls_of("sendMessageDraft") if c.params.get("text")]
    assert drafts and all("**" not in d["text"] for d in drafts)
    await settled(bot)
    store = bot.bot_data.services.store  # type: ignore[union-attr]
    [(logged,)] = await store.fetch_all("SELECT content FROM messages WHERE role = 'assistant'")
    assert logged == answer  # the log keeps the model's own Markdown


async def test_a_part_telegram_refuses_to_format_is_sent_plain(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    oai.enqueue("**important** answer")
    tg.fail_next("sendMessage", 400, description="Bad Request: can't parse entities")
    tg.push_message(100, "hi")
    assert await tg.wait_sent(100, 1) == ["important answer"]
    attempts = tg.calls_of("sendMessage")
    assert "entities" in attempts[0].params and "entities" not in attempts[1].params


def test_render_parts_keeps_entities_valid_across_splits() -> None:
    code = "```\n" + "\n".join(f"line {i} = {i} * 2" for i in range(400)) + "\n```"
    parts = render_parts("**Intro** text.\n\n" + code + "\n\nThe end, *really*.")
    assert len(parts) >= 2 and all(utf16_len(p.text) <= 4096 for p in parts)
    assert all(e.offset + e.length <= utf16_len(p.text) for p in parts for e in p.entities)


async def test_long_reply_arrives_as_ordered_parts_and_is_logged_whole(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    paragraphs = [f"Paragraph {i}. " + "lorem ipsum dolor sit amet " * 40 for i in range(12)]
    paragraphs = [p.strip() for p in paragraphs]
    answer = "\n\n".join(paragraphs)  # ~13,000 characters
    oai.enqueue(Reply(answer, chunk_words=50))
    tg.push_message(100, "write a lot")
    await tg.wait_for(lambda: "".join(tg.sent_texts(100)).endswith(paragraphs[-1]))
    parts = tg.sent_texts(100)
    assert len(parts) == 4
    assert all(utf16_len(p) <= 4096 and p.startswith("Paragraph") for p in parts)
    assert "\n\n".join(parts) == answer
    await settled(bot)
    store = bot.bot_data.services.store  # type: ignore[union-attr]
    [(text,)] = await store.fetch_all("SELECT content FROM messages WHERE role = 'assistant'")
    assert text == answer
    rows = await store.fetch_all("SELECT part FROM reply_messages ORDER BY part")
    assert [r[0] for r in rows] == [0, 1, 2, 3]


async def test_group_chat_shows_typing_and_replies_to_the_message(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    tg.chat(-1001, "supergroup")
    oai.enqueue(Reply("group answer", delay=0.2))
    msg = tg.push_message(
        -1001, "@parley_test_bot question in a group", user_id=5, chat_type="supergroup"
    )
    assert await tg.wait_sent(-1001) == ["group answer"]
    assert oai.calls[0].last_user_text == "question in a group"  # the mention is stripped
    assert tg.calls_of("sendMessageDraft") == []  # drafts exist only in private chats
    [action, *_] = tg.calls_of("sendChatAction")
    assert action.params["action"] == "typing" and action.params["chat_id"] == "-1001"
    final = tg.calls_of("sendMessage")[-1].params
    assert f'"message_id": {msg["message_id"]}' in final["reply_parameters"]


async def test_each_forum_topic_is_its_own_thread_and_gets_its_replies(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    tg.chat(-1002, "supergroup", is_forum=True)
    tg.push_message(-1002, "@parley_test_bot in topic 7", chat_type="supergroup", topic_id=7)
    await tg.wait_sent(-1002, 1)
    tg.push_message(-1002, "@parley_test_bot in topic 9", chat_type="supergroup", topic_id=9)
    await tg.wait_sent(-1002, 2)
    tg.push_message(-1002, "@parley_test_bot topic 7 again", chat_type="supergroup", topic_id=7)
    await tg.wait_sent(-1002, 3)
    sends = [c.params for c in tg.calls_of("sendMessage")]
    assert [s["message_thread_id"] for s in sends] == ["7", "9", "7"]
    first, second, third = oai.calls
    assert first.conversation == third.conversation != second.conversation
    assert third.transcript[:2] == [("user", "in topic 7"), ("assistant", "echo: in topic 7")]
