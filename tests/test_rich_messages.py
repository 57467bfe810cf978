"""Rich answers (Bot API 10.1): which need one, how they are sent, the fall-back to entities."""

from __future__ import annotations

import asyncio
import json

import pytest
from telegram.error import BadRequest, EndPointNotFound

from bot.context import ParleyApp
from bot.services.formatting import (
    RICH_TEXT_LIMIT,
    escape_rich,
    link_list,
    needs_rich,
    rich_fits,
    rich_link_list,
    to_rich,
)
from bot.services.replies import RichMessages
from bot.texts import t
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.rich_markdown import plain, read_rich
from tests.stubs.telegram_server import FakeTelegram

TABLE = (
    "Here are the two cities:\n\n"
    "| City | Population |\n"
    "|------|-----------:|\n"
    "| Paris | 2.1 M |\n"
    "| Lyon | 0.5 M |\n\n"
    "Paris is about four times larger."
)
GROUP = -3001

# --- which answers need a rich message ----------------------------------------------------------


@pytest.mark.parametrize(
    "markdown",
    [
        TABLE,
        "The energy is $E = mc^2$ here.",
        "Display:\n\n$$\\int_0^1 x\\,dx = \\frac{1}{2}$$",
        "LaTeX's own: \\(a^2 + b^2\\)",
        "and \\[ a^2 + b^2 = c^2 \\]",
        "<details>\n<summary>Proof</summary>\n\nIt follows.\n\n</details>",
    ],
)
def test_tables_formulas_and_collapsible_blocks_need_a_rich_message(markdown: str) -> None:
    assert needs_rich(markdown)


@pytest.mark.parametrize(
    "markdown",
    [
        "Just **bold** text with a [link](https://example.com).",
        "It costs $5 and the other $10.",
        "Between $5-$10 each.",
        "A pipe | in prose | is not a table.",
        "```\n| a | b |\n|---|---|\n| 1 | 2 |\n```",
        "In the shell, `echo $HOME$PATH` prints both.",
        "Escaped \\$x\\$ is no formula.",
    ],
)
def test_what_entities_show_stays_on_entities(markdown: str) -> None:
    assert not needs_rich(markdown)


def test_to_rich_keeps_formulas_and_code_and_escapes_money_and_stray_tags() -> None:
    answer = (
        "Area \\(\\pi r^2\\), sum $a+b$, price $5-$10.\n\n"
        "`$HOME` and <script>x</script>, H<sub>2</sub>O, a<br>b\n\n"
        "\\[ E = mc^2 \\]"
    )
    rich = to_rich(answer)
    assert rich == (
        "Area $\\pi r^2$, sum $a+b$, price \\$5-\\$10.\n\n"
        "`$HOME` and \\<script>x\\</script>, H<sub>2</sub>O, a<br>b\n\n"
        "$$E = mc^2$$"
    )
    # As the stand-in Telegram reads it: two inline formulas, money as text, one formula block.
    blocks, problems = read_rich(rich)
    assert problems == []
    first, second, third = blocks
    formulas = [t["expression"] for t in first["text"] if isinstance(t, dict)]
    assert formulas == ["\\pi r^2", "a+b"] and "$5-$10" in plain(first["text"])
    assert "<script>x</script>" in plain(second["text"])
    assert third == {"type": "mathematical_expression", "expression": "E = mc^2"}


def test_to_rich_closes_a_code_block_the_answer_was_cut_in() -> None:
    rich = to_rich("Start:\n\n```python\nx = 1")
    assert rich.endswith("\n```")
    blocks, _ = read_rich(rich + "\n\nafter")
    assert [b["type"] for b in blocks] == ["paragraph", "pre", "paragraph"]


def test_rich_fits_keeps_to_telegrams_limits() -> None:
    wide = "|" + "|".join(f"c{i}" for i in range(21)) + "|\n|" + "---|" * 21 + "\n"
    narrow = "|" + "|".join(f"c{i}" for i in range(20)) + "|\n|" + "---|" * 20 + "\n"
    assert rich_fits(narrow) and not rich_fits(wide)
    assert rich_fits("\n\n".join(["p"] * 500)) and not rich_fits("\n\n".join(["p"] * 501))
    assert not rich_fits("x" * (RICH_TEXT_LIMIT + 1))
    assert not rich_fits(">" * 17 + " deep") and not rich_fits("  ")


def test_links_are_listed_once_safely_and_as_text_links() -> None:
    links = [
        ("Paris - Wikipedia", "https://en.wikipedia.org/wiki/Paris"),
        ("", "https://insee.fr/stats(2024)"),
        ("Evil", "javascript:alert(1)"),
        ("Again", "https://en.wikipedia.org/wiki/Paris"),
    ]
    listed = link_list("Sources", links)
    assert listed is not None
    assert listed.text == "Sources\n1. Paris - Wikipedia\n2. insee.fr"
    kinds = [(e.type, listed.text[e.offset : e.offset + e.length], e.url) for e in listed.entities]
    assert kinds == [
        ("expandable_blockquote", listed.text, None),
        ("bold", "Sources", None),
        ("text_link", "Paris - Wikipedia", "https://en.wikipedia.org/wiki/Paris"),
        ("text_link", "insee.fr", "https://insee.fr/stats(2024)"),
    ]
    assert link_list("Sources", [("Evil", "javascript:alert(1)")]) is None
    many = [(f"t{i}", f"https://e.org/{i}") for i in range(15)]
    assert link_list("S", many).text.count("\n") == 10  # type: ignore[union-attr]

    rich = rich_link_list("Sources", [("A [b] *c*", "https://insee.fr/stats(2024)")])
    assert rich is not None
    [details], problems = read_rich(rich)
    assert problems == [] and details["type"] == "details" and details["summary"] == "Sources"
    [item] = details["blocks"][0]["items"]
    link = item["blocks"][0]["text"]
    assert link == {
        "type": "url",
        "text": "A [b] *c*",
        "url": "https://insee.fr/stats%282024%29",
    }


def test_escape_rich_shows_plain_text_as_written() -> None:
    footer = "✂️ Cut off. Say “continue”!\n🙂 positive (0.80) *not bold* $5 <b>"
    blocks, problems = read_rich(escape_rich(footer))
    assert problems == []
    assert [plain(b["text"]) for b in blocks] == [
        "✂️ Cut off. Say “continue”!",
        "🙂 positive (0.80) *not bold* $5 <b>",
    ]


async def test_refusals_in_a_row_turn_rich_messages_off_for_the_pause_only() -> None:
    rich = RichMessages(pause=0.2, streak=2)
    assert rich.allowed()
    rich.refused("sendRichMessage", BadRequest("can't parse rich message"))
    assert rich.allowed()  # one answer's Markdown may be all that was wrong
    rich.accepted()  # the next was taken: the count starts again
    rich.refused("sendRichMessage", BadRequest("can't parse rich message"))
    assert rich.allowed()
    rich.refused("sendRichMessage", BadRequest("can't parse rich message"))
    assert not rich.allowed() and rich.refusals == 3
    await asyncio.sleep(0.25)
    assert rich.allowed()
    rich.refused("sendRichMessage", EndPointNotFound("Not Found"))  # no such method: at once
    assert not rich.allowed()
    assert not RichMessages(enabled=False).allowed()


# --- end to end ---------------------------------------------------------------------------------


async def test_a_table_answer_streams_and_arrives_as_one_rich_message(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    oai.enqueue(Reply("Plain words only.", chunk_delay=0.02))
    oai.enqueue(Reply(TABLE, chunk_delay=0.03))
    async with running(make_settings(sentiment_backend="lexicon")) as app:
        tg.push_message(100, "hello", user_id=100)
        assert await tg.wait_sent(100, 1) == ["Plain words only.\n\n😐 neutral"]
        assert tg.calls_of("sendRichMessage") == tg.calls_of("sendRichMessageDraft") == []

        tg.push_message(100, "compare the cities", user_id=100)
        await tg.wait_for(lambda: len(tg.rich_sent(100)) == 1)
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        rows = await store.fetch_all("SELECT message_id FROM reply_messages ORDER BY turn_id, part")
    assert tg.rich_sent(100) == [TABLE + "\n\n😐 neutral"]  # the tag under it, as text
    assert len(tg.sent_texts(100)) == 1  # the table went rich, not as text
    [call] = tg.calls_of("sendRichMessage")
    message = tg.messages[(100, rows[-1][0])]  # the logged reply is the rich message
    table = next(b for b in message["rich_message"]["blocks"] if b["type"] == "table")
    cells = [[plain(c["text"]) for c in row] for row in table["cells"]]
    assert cells == [["City", "Population"], ["Paris", "2.1 M"], ["Lyon", "0.5 M"]]
    assert table["cells"][1][1]["align"] == "right"
    # The draft went rich once the table showed, the same way, and landed before the message.
    drafts = tg.calls_of("sendRichMessageDraft")
    assert drafts and all(d.status == 200 and d.at <= call.at for d in drafts)
    last = json.loads(drafts[-1].params["rich_message"])["markdown"]
    assert "| Paris | 2.1 M |" in last


async def test_formulas_go_rich_written_in_telegrams_delimiters(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    oai.enqueue("The area of a circle is \\(\\pi r^2\\), so for $r = 2$ it is $4\\pi$.")
    tg.push_message(100, "area?", user_id=100)
    await tg.wait_for(lambda: len(tg.rich_sent(100)) == 1)
    [markdown] = tg.rich_sent(100)
    assert markdown == "The area of a circle is $\\pi r^2$, so for $r = 2$ it is $4\\pi$."


async def test_refused_rich_messages_fall_back_to_entities_and_stop_after_three_in_a_row(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    tg.refuse_rich = 400
    tg.chat(GROUP, "supergroup")
    oai.enqueue(TABLE, TABLE, TABLE, TABLE)
    async with running(make_settings(sentiment_backend="lexicon")) as app:
        asked = tg.push_message(
            GROUP, "@parley_test_bot compare", user_id=7, chat_type="supergroup"
        )
        [first] = await tg.wait_sent(GROUP, 1)
        for n in range(2, 5):
            tg.push_message(GROUP, f"@parley_test_bot again {n}", user_id=7, chat_type="supergroup")
            await tg.wait_sent(GROUP, n)
        await settled(app)
    # Three refusals in a row (each answer tried once, in case its own Markdown was at fault)
    # turn rich messages off: the fourth answer doesn't pay a failed call first.
    refusals = tg.calls_of("sendRichMessage")
    assert [c.status for c in refusals] == [400, 400, 400]
    refused = refusals[0]
    assert tg.rich_sent(GROUP) == []
    # The first answer still came, as text with entities, replying to the question, with
    # its sentiment tag under it.
    assert "Paris | 2.1 M" in first  # the table as fixed-width text
    assert first.endswith("Paris is about four times larger.\n\n😐 neutral")
    answer = next(c for c in tg.calls_of("sendMessage") if c.status == 200)
    assert json.loads(answer.params["reply_parameters"])["message_id"] == asked["message_id"]
    assert refused.at < answer.at


async def test_a_bot_api_server_older_than_10_1_gets_entities(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    tg.refuse_rich = 404  # no such method: PTB raises EndPointNotFound
    oai.enqueue(Reply(TABLE, chunk_delay=0.02), TABLE)
    tg.push_message(100, "compare", user_id=100)
    [first] = await tg.wait_sent(100, 1)
    tg.push_message(100, "again", user_id=100)
    await tg.wait_sent(100, 2)
    assert "Paris is about four times larger." in first
    tried = tg.calls_of("sendRichMessage") + tg.calls_of("sendRichMessageDraft")
    assert len(tried) == 1 and tried[0].status == 404
    assert tg.calls_of("sendMessageDraft")  # drafts carried on with entities


async def test_rich_messages_can_be_turned_off(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    oai.enqueue(TABLE)
    async with running(make_settings(rich_messages=False)):
        tg.push_message(100, "compare", user_id=100)
        await tg.wait_sent(100, 1)
    assert tg.calls_of("sendRichMessage") == tg.calls_of("sendRichMessageDraft") == []


async def test_in_a_forum_topic_the_rich_answer_replies_in_the_topic(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    tg.chat(GROUP, "supergroup", is_forum=True)
    oai.enqueue(TABLE)
    asked = tg.push_message(
        GROUP, "@parley_test_bot compare", user_id=7, chat_type="supergroup", topic_id=5
    )
    await tg.wait_for(lambda: len(tg.rich_sent(GROUP)) == 1)
    [call] = tg.calls_of("sendRichMessage")
    assert int(call.params["message_thread_id"]) == 5
    assert json.loads(call.params["reply_parameters"])["message_id"] == asked["message_id"]
    assert tg.calls_of("sendRichMessageDraft") == []  # drafts are for private chats


# --- the "Thinking..." placeholder ------------------------------------------------------------


def _placeholders(tg: FakeTelegram) -> list[tuple[str, str]]:
    """The drafts sent before any answer text: ("rich", markdown) or ("plain", text)."""
    calls = sorted(
        tg.calls_of("sendRichMessageDraft") + tg.calls_of("sendMessageDraft"), key=lambda c: c.at
    )
    out = []
    for call in calls:
        if call.method == "sendRichMessageDraft":
            out.append(("rich", json.loads(call.params["rich_message"])["markdown"]))
        else:
            out.append(("plain", call.params.get("text", "")))
    return out


async def test_a_slow_start_shows_a_thinking_block_in_the_users_language(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    oai.enqueue(Reply(TABLE, delay=0.7, chunk_delay=0.03))
    russian = {"id": 100, "is_bot": False, "first_name": "Anna", "language_code": "ru"}
    tg.push_message(100, "сравни города", user_id=100, extra={"from": russian})
    await tg.wait_for(lambda: len(tg.rich_sent(100)) == 1)
    [placeholder, *rest] = _placeholders(tg)
    assert placeholder == ("rich", f"<tg-thinking>{t('draft.thinking', lang='ru')}</tg-thinking>")
    assert t("draft.thinking", lang="ru") != t("draft.thinking", lang="en")
    # The answer's own drafts replace it (rich once the table shows), and so does the message.
    assert rest and all("tg-thinking" not in md for _, md in rest)
    assert rest[-1][0] == "rich"
    [draft, *_] = tg.calls_of("sendRichMessageDraft")
    assert draft.status == 200  # the stand-in takes it: a thinking block is for drafts


async def test_a_refused_thinking_block_falls_back_to_telegrams_placeholder_only(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    """A server that won't take the thinking block: Telegram's own placeholder (an empty
    draft) instead, tried once per pause, and tables still go as rich messages."""
    tg.refuse_rich_tags = {"tg-thinking"}
    oai.enqueue(Reply(TABLE, delay=0.7), Reply(TABLE, delay=0.7), Reply(TABLE, delay=0.7))
    for n in range(3):
        tg.push_message(100, f"compare {n}", user_id=100)
        await tg.wait_for(lambda n=n: len(tg.rich_sent(100)) == n + 1)  # type: ignore[misc]
    refused = [c for c in tg.calls_of("sendRichMessageDraft") if c.status == 400]
    assert len(refused) == 1  # not asked again for the pause
    empty = [c for c in tg.calls_of("sendMessageDraft") if c.params.get("text", "") == ""]
    assert len(empty) == 3
    assert len(tg.rich_sent(100)) == 3


async def test_without_rich_messages_the_placeholder_is_an_empty_draft(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    oai.enqueue(Reply("Slow.", delay=0.7))
    async with running(make_settings(rich_messages=False)):
        tg.push_message(100, "hi", user_id=100)
        await tg.wait_sent(100, 1)
    assert _placeholders(tg)[0] == ("plain", "")
    assert tg.calls_of("sendRichMessageDraft") == []
