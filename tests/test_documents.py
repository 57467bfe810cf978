"""Documents end to end: PDFs and text files with follow-ups in both backends, bad files.

PDFs are made here with pypdf's writer (tests/pdfs.py). The OpenAI stand-in checks each
request against the spec and reads every `input_file` it is sent (a PDF's pages too), so a
test can see what the model was given.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.context import ParleyApp
from bot.services import pdf_text
from bot.services.dataset import DatasetOptions
from bot.texts import t
from tests.conftest import SettingsFactory, eventually, running, settled
from tests.pdfs import blank_pdf, corrupt_pdf, flate_bomb_pdf, text_pdf
from tests.stubs.openai_server import FakeOpenAI, ModelCall, Reply
from tests.stubs.telegram_server import FakeTelegram

REPORT = text_pdf(
    [
        ["Quarterly report", "Revenue grew to 42 million."],
        ["Outlook", "The board expects steady growth."],
    ]
)
MIB = 1024 * 1024


async def _turns(app: ParleyApp) -> list[tuple[Any, ...]]:
    store = app.bot_data.services.store  # type: ignore[union-attr]
    return await store.fetch_all(
        "SELECT t.input_kind, t.status, m.content FROM turns t JOIN messages m"
        " ON m.turn_id = t.id AND m.role = 'user' ORDER BY t.id"
    )


def _readers_alive() -> list[int]:
    """Process ids of PDF readers this process started that still run (Linux's /proc)."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, NotADirectoryError):
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"pdf_text.py" in cmdline:
            alive.append(int(entry.name))
    return alive


def _parts(call: ModelCall) -> list[dict[str, Any]]:
    """The content parts of the new user message of a Responses call."""
    items = call.body["input"]
    assert isinstance(items, list)
    return list(items[-1]["content"])


def _last_user_message(call: ModelCall) -> Any:
    return call.body["messages"][-1]["content"]


async def test_a_pdf_goes_to_the_openai_backend_as_a_file_and_stays_for_follow_ups(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()) as app:
        # The scripted model answers from what it was shown: the file's text.
        oai.enqueue(Reply(lambda call: f"It says: {call.files[0][1].splitlines()[1]}"))
        tg.push_document(100, REPORT, "report.pdf", "application/pdf", caption="What grew?")
        assert await tg.wait_sent(100, 1) == ["It says: Revenue grew to 42 million."]
        tg.push_message(100, "And the outlook?")
        await tg.wait_sent(100, 2)
        await settled(app)
        turns = await _turns(app)
    first, follow_up = oai.calls
    file_part, text_part = _parts(first)
    assert file_part["type"] == "input_file" and file_part["filename"] == "report.pdf"
    assert base64.b64decode(file_part["file_data"].split(";base64,", 1)[1]) == REPORT
    assert file_part["file_data"].startswith("data:application/pdf;base64,")
    assert text_part == {"type": "input_text", "text": "What grew?"}
    # The conversation keeps the file: the follow-up is answered with it in view.
    assert [name for name, _ in follow_up.files] == ["report.pdf"]
    assert follow_up.transcript[-1] == ("user", "And the outlook?")
    # The log keeps the document's text form, not its bytes, and the turn's input kind.
    (kind, status, content), second = turns
    assert (kind, status) == ("document", "ok") and second[:2] == ("text", "ok")
    assert content.startswith(t("document.header_pages", name="report.pdf", pages=2))
    assert "Revenue grew to 42 million." in content and "steady growth" in content
    assert content.endswith("What grew?")


async def test_a_pdf_goes_to_the_local_backend_as_text_and_stays_for_follow_ups(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(conversation_backend="local")) as app:
        oai.enqueue("Revenue did.")
        tg.push_document(100, REPORT, "report.pdf", "application/pdf", caption="What grew?")
        assert await tg.wait_sent(100, 1) == ["Revenue did."]
        tg.push_message(100, "And the outlook?")
        assert (await tg.wait_sent(100, 2))[1] == "echo: And the outlook?"
        await settled(app)
        turns = await _turns(app)
    first, follow_up = oai.calls
    sent = _last_user_message(first)
    assert isinstance(sent, str)  # text only: the local backend's servers take no files
    assert sent.startswith(t("document.header_pages", name="report.pdf", pages=2))
    assert t("document.page", number=1) in sent and t("document.page", number=2) in sent
    assert "Revenue grew to 42 million." in sent and sent.endswith("What grew?")
    # The history the bot keeps replays the document with the follow-up.
    assert follow_up.transcript[0] == ("user", sent)
    assert follow_up.transcript[-1] == ("user", "And the outlook?")
    assert [(kind, status, content) for kind, status, content in turns][0] == (
        "document",
        "ok",
        sent,
    )


@pytest.mark.parametrize("backend", ["openai", "local"])
async def test_a_text_file_joins_the_thread_as_text_with_follow_ups(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, backend: str
) -> None:
    table = "city,population\nLisbon,545000\nPorto,232000\n"
    async with running(make_settings(conversation_backend=backend)) as app:
        oai.enqueue("Lisbon.")
        tg.push_document(100, table.encode(), "cities.csv", "text/csv", caption="Which is bigger?")
        assert await tg.wait_sent(100, 1) == ["Lisbon."]
        tg.push_message(100, "By how much?")
        await tg.wait_sent(100, 2)
        await settled(app)
        [(kind, _, logged), _second] = await _turns(app)
    first, follow_up = oai.calls
    expected = f"{t('document.header', name='cities.csv')}\n\n{table.strip()}\n\nWhich is bigger?"
    if backend == "openai":
        assert _parts(first) == [{"type": "input_text", "text": expected}]
    else:
        assert _last_user_message(first) == expected
    assert first.files == []  # a text file is sent as text in both backends
    assert ("user", expected) in follow_up.transcript
    assert follow_up.transcript[-1] == ("user", "By how much?")
    assert (kind, logged) == ("document", expected)


RU_USER = {"id": 100, "is_bot": False, "first_name": "Аня", "language_code": "ru"}


async def test_a_file_without_a_name_is_called_a_document_in_the_senders_language(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    oai.enqueue("Выручка.", "Список покупок.", "A shopping list.")
    ru = {"from": RU_USER}
    tg.push_document(100, REPORT, None, "application/pdf", caption="Что выросло?", extra=ru)
    await tg.wait_sent(100, 1)
    tg.push_document(100, b"milk\n", None, "text/plain", caption="Что это?", extra=ru)
    await tg.wait_sent(100, 2)
    tg.push_document(100, b"milk\n", None, "text/plain", caption="What is it?")
    await tg.wait_sent(100, 3)
    pdf, ru_text, en_text = oai.calls
    assert _parts(pdf)[0]["filename"] == "документ.pdf"
    assert ru_text.last_user_text.startswith(t("document.header", lang="ru", name="документ.txt"))
    assert en_text.last_user_text.startswith(t("document.header", name="document.txt"))


async def test_a_text_file_over_the_character_limit_names_it_grouped_as_the_reader_does(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    """'12,000' reads as twelve in Russian: there the limit is grouped with a no-break space."""
    async with running(make_settings(document_max_chars=12_000)):
        big = b"x" * 12_001
        tg.push_document(100, big, "big.txt", "text/plain", caption="?", extra={"from": RU_USER})
        [ru] = await tg.wait_sent(100, 1)
        tg.push_document(100, big, "big.txt", "text/plain", caption="?")
        en = (await tg.wait_sent(100, 2))[1]
    assert ru == t("document.too_long", lang="ru", limit=12_000)
    assert "до 12\u00a0000 символов" in ru
    assert "up to 12,000 characters" in en
    assert oai.calls == []


async def test_a_file_without_a_caption_gets_a_summary_and_says_so(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    oai.enqueue("A shopping list.")
    tg.push_document(100, b"# Notes\n\nBuy milk.\n", "notes.md", "text/markdown")
    [text] = await tg.wait_sent(100, 1)
    question = t("document.summarize")
    assert text == f"A shopping list.\n\n{t('document.summarized')}"
    assert oai.calls[0].last_user_text.endswith(question)


async def test_a_long_text_file_is_cut_to_the_budget_and_both_model_and_user_are_told(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    lines = [f"line {n:05d} of the log" for n in range(1, 5001)]
    async with running(make_settings(document_max_tokens=500)):
        oai.enqueue("None.")
        tg.push_document(100, "\n".join(lines).encode(), "app.log", None, caption="Any errors?")
        [text] = await tg.wait_sent(100, 1)
    sent = oai.calls[0].last_user_text
    assert "line 00001 of the log" in sent and "line 05000 of the log" not in sent
    percent = int(re.findall(r"(\d+)%", text)[0])
    assert 0 < percent < 10
    assert text == f"None.\n\n{t('document.cut_text', name='app.log', percent=percent)}"
    assert t("document.cut_text_note", percent=percent) in sent
    # Cut at a line's end, within the budget (with the question and the header).
    kept = [line for line in sent.splitlines() if line.startswith("line ")]
    assert kept == lines[: len(kept)]
    assert len(sent) < 500 * 4 + 200


async def test_a_long_pdf_in_the_local_backend_is_cut_by_pages_and_says_which(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    pages = [[f"Page {p} line {n} with some words in it." for n in range(40)] for p in range(12)]
    settings = make_settings(conversation_backend="local", document_max_tokens=1500)
    async with running(settings):
        oai.enqueue("There is none.")
        tg.push_document(100, text_pdf(pages), "book.pdf", "application/pdf", caption="Plot?")
        [text] = await tg.wait_sent(100, 1)
    sent = _last_user_message(oai.calls[0])
    last = max(n for n in range(1, 13) if t("document.page", number=n) in sent)
    assert 1 < last < 12
    assert t("document.cut_pages_note", last=last, pages=12) in sent
    note = t("document.cut_pages", name="book.pdf", last=last, pages=12)
    assert text == f"There is none.\n\n{note}"


async def test_text_in_a_legacy_encoding_is_decoded(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    letter = "Привет! Это письмо написано в кодировке Windows-1251, как в старых файлах."
    tg.push_document(100, letter.encode("cp1251"), "letter.txt", "text/plain", caption="Tone?")
    await tg.wait_sent(100, 1)
    assert letter in oai.calls[0].last_user_text


# Each file is made when its test runs (the bomb takes a second to squeeze).
BAD_FILES = [
    pytest.param(
        corrupt_pdf, "broken.pdf", "application/pdf", "document.corrupt", {}, id="corrupt"
    ),
    pytest.param(
        lambda: text_pdf(["top secret"], password="hunter2"),
        "locked.pdf",
        "application/pdf",
        "document.encrypted",
        {},
        id="encrypted",
    ),
    # 400 MB of spaces squeezed into 0.4 MB: pypdf stops inflating at its 75 MB limit.
    pytest.param(
        lambda: flate_bomb_pdf(400),
        "bomb.pdf",
        "application/pdf",
        "document.too_costly",
        {},
        id="bomb",
    ),
    pytest.param(
        lambda: blank_pdf(101),
        "long.pdf",
        "application/pdf",
        "document.too_many_pages",
        {"limit": 100},
        id="pages",
    ),
    pytest.param(
        lambda: b"\x89PNG\r\n\x1a\n" + bytes(200),
        "a.pdf",
        None,
        "document.corrupt",
        {},
        id="not-a-pdf",
    ),
    pytest.param(
        lambda: b"PK\x03\x04" + bytes(100),
        "a.zip",
        "application/zip",
        "document.unsupported",
        {},
        id="zip",
    ),
    pytest.param(
        lambda: bytes(range(256)) * 4,
        "data.txt",
        "text/plain",
        "document.unsupported",
        {},
        id="binary",
    ),
    pytest.param(
        lambda: b" \n\t\n", "empty.txt", "text/plain", "document.empty", {}, id="blank-text"
    ),
]


@pytest.mark.parametrize(("data", "name", "mime", "key", "values"), BAD_FILES)
async def test_a_bad_file_gets_a_short_refusal_and_nothing_is_logged(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    bot: ParleyApp,
    data: Callable[[], bytes],
    name: str,
    mime: str | None,
    key: str,
    values: dict[str, Any],
) -> None:
    tg.push_document(100, data(), name, mime, caption="What is in it?")
    assert await tg.wait_sent(100, 1) == [t(key, **values)]
    await settled(bot)
    assert oai.calls == [] and await _turns(bot) == []
    tg.push_message(100, "still there?")  # the bot is up and the chat goes on
    assert (await tg.wait_sent(100, 2))[1] == "echo: still there?"


async def test_a_file_declared_too_big_is_refused_before_it_is_downloaded(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(document_max_mb=20)) as app:
        tg.push_document(100, REPORT, "big.pdf", "application/pdf", file_size=21 * MIB)
        assert await tg.wait_sent(100, 1) == [t("document.too_large", limit=20)]
        await settled(app)
        assert await _turns(app) == []
    assert tg.calls_of("getFile") == [] and oai.calls == []


async def test_a_pdf_that_takes_too_long_to_read_is_refused_and_its_reader_killed(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    # 2,000 dense pages, all wanted: several seconds of reading, allowed half a second.
    slow = text_pdf([[f"page {p} line {n} " * 4 for n in range(40)] for p in range(2000)])
    settings = make_settings(
        document_parse_seconds=0.5,
        document_max_pages=5000,
        document_max_tokens=1_000_000,
        document_max_mb=50,
    )
    async with running(settings) as app:
        tg.push_document(100, slow, "slow.pdf", "application/pdf", caption="?")
        assert await tg.wait_sent(100, 1) == [t("document.too_costly")]
        assert _readers_alive() == []  # killed at the deadline, not left to finish
        await settled(app)
        assert await _turns(app) == []
        tg.push_message(100, "ok then")
        assert (await tg.wait_sent(100, 2))[1] == "echo: ok then"
    assert len(oai.calls) == 1


async def test_a_pdf_being_read_holds_up_no_other_chat(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    slow = text_pdf([[f"page {p} line {n} " * 4 for n in range(40)] for p in range(2000)])
    settings = make_settings(
        document_parse_seconds=3,
        document_max_pages=5000,
        document_max_tokens=1_000_000,
        document_max_mb=50,
    )
    async with running(settings):
        tg.push_document(100, slow, "slow.pdf", "application/pdf", caption="?")
        await eventually(lambda: bool(_readers_alive()))
        tg.push_message(200, "hello from another chat")
        assert await tg.wait_sent(200, 1) == ["echo: hello from another chat"]
        assert tg.sent_texts(100) == []  # the PDF is still being read meanwhile
        assert _readers_alive()
        assert await tg.wait_sent(100, 1) == [t("document.too_costly")]


async def test_a_scanned_pdf_is_refused_as_text_but_sent_as_a_file(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    """No text layer: the local backend has nothing to send; OpenAI reads the page images."""
    async with running(make_settings(conversation_backend="local")):
        tg.push_document(100, blank_pdf(2), "scan.pdf", "application/pdf", caption="Read it")
        assert await tg.wait_sent(100, 1) == [t("document.no_text")]
    assert oai.calls == []
    async with running(make_settings()) as app:
        tg.push_document(100, blank_pdf(2), "scan.pdf", "application/pdf", caption="Read it")
        assert (await tg.wait_sent(100, 2))[1] == "echo: Read it"
        await settled(app)
        [(kind, _, logged)] = await _turns(app)
    assert [name for name, _ in oai.calls[0].files] == ["scan.pdf"]
    assert t("document.no_text_layer") in logged and kind == "document"


async def test_files_sent_together_are_one_turn_and_a_skipped_one_is_named(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(album_wait=0.3)) as app:
        oai.enqueue("Both list cities.")
        tg.push_document(100, b"city\nLisbon\n", "a.csv", "text/csv", media_group_id="g1")
        tg.push_document(100, b"PK\x03\x04", "b.zip", "application/zip", media_group_id="g1")
        tg.push_document(
            100, b"# Porto\n", "c.md", "text/markdown", media_group_id="g1", caption="Compare"
        )
        skipped = t("document.some_skipped", count=1, reason=t("document.unsupported"))
        assert await tg.wait_sent(100, 2) == [skipped, "Both list cities."]
        await settled(app)
        [(kind, _, logged)] = await _turns(app)
    [call] = oai.calls
    assert (
        call.last_user_text
        == logged
        == (
            f"{t('document.header', name='a.csv')}\n\ncity\nLisbon\n\n"
            f"{t('document.header', name='c.md')}\n\n# Porto\n\nCompare"
        )
    )
    assert kind == "document"


async def test_in_groups_a_document_is_read_only_when_addressed(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    group = -100500
    tg.chat(group, "supergroup")
    tg.push_document(group, b"a,b\n1,2\n", "t.csv", "text/csv", user_id=7, caption="fyi")
    tg.push_document(
        group, b"a,b\n1,2\n", "t.csv", "text/csv", user_id=7, caption="@parley_test_bot sum b?"
    )
    await tg.wait_sent(group, 1)
    await settled(bot)
    assert len(tg.calls_of("getFile")) == 1 and len(oai.calls) == 1
    assert oai.calls[0].last_user_text.endswith("\n\nsum b?")  # the mention is not asked
    [reply] = [c for c in tg.calls_of("sendMessage") if int(c.params["chat_id"]) == group]
    assert "reply_parameters" in reply.params  # answers the document it was asked about


async def test_in_groups_files_sent_together_are_read_when_any_of_them_mentions_the_bot(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    # Telegram's apps put the caption of files sent together on the last one: the album's
    # first part, the one handled, has none.
    group = -100501
    mention = "@parley_test_bot"
    async with running(make_settings(album_wait=0.3)) as app:
        tg.chat(group, "supergroup")
        oai.enqueue("Both list cities.")
        first = tg.push_document(
            group, b"city\nLisbon\n", "a.csv", "text/csv", media_group_id="g7", user_id=7
        )
        tg.push_document(
            group,
            b"# Porto\n",
            "c.md",
            "text/markdown",
            media_group_id="g7",
            caption=f"{mention} compare",
            user_id=7,
        )
        assert await tg.wait_sent(group, 1) == ["Both list cities."]
        # Files sent together that don't address the bot stay unread.
        tg.push_document(group, b"x\n1\n", "d.csv", "text/csv", media_group_id="g8", user_id=7)
        tg.push_document(group, b"y\n2\n", "e.csv", "text/csv", media_group_id="g8", user_id=7)
        await settled(app)
        [(kind, _, logged)] = await _turns(app)
    [call] = oai.calls
    assert call.last_user_text == logged and logged.endswith("\n\ncompare")
    assert "Lisbon" in logged and "Porto" in logged and kind == "document"
    assert len(tg.calls_of("getFile")) == 2  # the unaddressed album was never downloaded
    [reply] = [c for c in tg.calls_of("sendMessage") if int(c.params["chat_id"]) == group]
    assert json.loads(reply.params["reply_parameters"])["message_id"] == first["message_id"]


async def test_a_pdf_the_model_read_whole_but_the_log_keeps_in_part_stays_out_of_datasets(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    """On the openai backend the model reads the PDF itself; the log keeps its text up to the
    budget. A cut one (or a scan, of which it keeps no text) would make an example whose
    answer draws on what the example doesn't show: left out, and the /train summary says
    why. Elsewhere the model read exactly what the log keeps: such a turn is kept."""
    pages = [[f"Page {p} line {n} with some words in it." for n in range(40)] for p in range(12)]
    book, admin = text_pdf(pages), 42
    async with running(make_settings(document_max_tokens=1500)) as app:
        oai.enqueue("It ends on page 12.", "Revenue.", "A blank page.")
        tg.push_document(100, book, "book.pdf", "application/pdf", caption="How does it end?")
        tg.push_document(101, REPORT, "report.pdf", "application/pdf", caption="What grew?")
        tg.push_document(102, blank_pdf(1), "scan.pdf", "application/pdf", caption="Read it")
        for chat in (100, 101, 102):
            await tg.wait_sent(chat, 1)
        await settled(app)
        tg.chat(admin)
        tg.push_message(admin, "/train", user_id=admin)
        [_building, reply] = await tg.wait_sent(admin, 2)
    assert sorted(name for call in oai.calls for name, _ in call.files) == [
        "book.pdf",
        "report.pdf",
        "scan.pdf",
    ]
    assert t("train.left_out", dropped=f"{t('reason.document_cut')}: 2") in reply
    assert t("train.too_few", examples=1, needed=10, missing=9) in reply

    settings = make_settings(conversation_backend="local", document_max_tokens=1500)
    async with running(settings) as app:
        oai.enqueue("It ends on page 3.")
        tg.push_document(100, book, "book.pdf", "application/pdf", caption="How does it end?")
        await tg.wait_sent(100, 2)
        await settled(app)
        report = await app.bot_data.services.finetune.build(DatasetOptions(min_examples=1))  # type: ignore[union-attr]
    # The same log: the two left out before, and now the local backend's turn among examples.
    assert report.examples == 2 and report.dropped == {"document_cut": 2}


async def test_in_groups_a_document_replying_to_the_bot_is_addressed_to_it(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    group = -100600
    tg.chat(group, "group")
    tg.push_message(group, "@parley_test_bot send me the figures", user_id=7)
    await tg.wait_sent(group, 1)
    bots_message = next(m for (c, _), m in tg.messages.items() if c == group)
    tg.push_document(group, b"a,b\n1,2\n", "t.csv", "text/csv", user_id=7, caption="here")
    oai.enqueue("b sums to 2.")
    document = tg.push_document(
        group,
        b"a,b\n1,2\n",
        "t.csv",
        "text/csv",
        user_id=7,
        caption="sum b?",
        extra={"reply_to_message": bots_message},
    )
    texts = await tg.wait_sent(group, 2)
    await settled(bot)
    assert texts[1] == "b sums to 2."
    assert len(tg.calls_of("getFile")) == 1  # the unaddressed one was never downloaded
    assert oai.calls[-1].last_user_text.endswith("\n\nsum b?")
    answer = [c for c in tg.calls_of("sendMessage") if int(c.params["chat_id"]) == group][-1]
    assert json.loads(answer.params["reply_parameters"])["message_id"] == document["message_id"]


async def test_hostile_files_get_short_answers_and_leave_nothing_half_stored(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    limit = bot.bot_data.services.documents.limit_mb  # type: ignore[union-attr]
    # A size no file has, declared by a message whose file is small: refused unread.
    tg.push_document(100, b"a,b\n", "t.csv", "text/csv", file_size=2**53)
    assert await tg.wait_sent(100, 1) == [t("document.too_large", limit=limit)]
    assert tg.calls_of("getFile") == []
    # A size the message left out, and Telegram won't hand the file out (over 20 MB).
    tg.fail_next("getFile", 400, description="Bad Request: file is too big")
    tg.push_document(100, b"a,b\n", "t.csv", "text/csv")
    assert (await tg.wait_sent(100, 2))[1] == t("document.too_large", limit=limit)
    await settled(bot)
    assert oai.calls == [] and await _turns(bot) == []

    # A name with control characters and a right-to-left override: shown as it reads.
    oai.enqueue("Noted.")
    tg.push_document(100, b"# hi\n", "notes\u202e\x07dm.txt\n", "text/markdown", caption="?")
    assert (await tg.wait_sent(100, 3))[2] == "Noted."
    assert oai.calls[-1].last_user_text.startswith(t("document.header", name="notes dm.txt"))

    # NUL bytes: a file that starts with them is not text; one late in a long text file is
    # dropped from what is read and kept.
    tg.push_document(100, b"\x00\x00text", "nul.txt", "text/plain", caption="?")
    assert (await tg.wait_sent(100, 4))[3] == t("document.unsupported")
    late = b"line of text\n" * 1000 + b"\x00tail\n"
    oai.enqueue("Read.")
    tg.push_document(100, late, "late.txt", "text/plain", caption="tail?")
    assert (await tg.wait_sent(100, 5))[4] == "Read."
    assert "\x00" not in oai.calls[-1].last_user_text and "tail\n" in oai.calls[-1].last_user_text

    # The longest caption Telegram allows (Premium): the question, whole.
    question = "why " * 1024
    oai.enqueue("Because.")
    tg.push_document(100, b"x = 1\n", "a.py", "text/x-python", caption=question)
    assert (await tg.wait_sent(100, 6))[5] == "Because."
    assert oai.calls[-1].last_user_text.endswith(question.strip())

    await settled(bot)
    logged = await _turns(bot)
    assert [kind for kind, _, _ in logged] == ["document"] * 3
    assert not any("\x00" in content or "\u202e" in content for _, _, content in logged)
    tg.push_message(100, "still there?")
    assert (await tg.wait_sent(100, 7))[6] == "echo: still there?"


def test_the_pdf_reader_hands_over_no_more_text_than_asked_for() -> None:
    """One page of much text: cut in the reader process, so the bot parses little."""
    pdf = text_pdf([[f"line {n} of a page full of words" for n in range(60)]])
    whole = pdf_text.extract(pdf, max_pages=5, max_chars=100_000)
    cut = pdf_text.extract(pdf, max_pages=5, max_chars=500)
    assert whole.pages == cut.pages == 1 and len(whole.texts[0]) > 1000
    assert cut.texts == [whole.texts[0][:500]]
