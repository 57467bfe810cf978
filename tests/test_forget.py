"""/forget must forget (issue 17): nothing of the user's words is left where the bot keeps data.

Through the real bot on the stand-ins: a group's server-side conversation, answers that
quoted the user, the next /export, dataset files and held summaries, the database file and
its write-ahead log on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from bot.context import Services
from bot.services.dataset import DatasetOptions
from bot.texts import t
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram

FORGETTER = 100
OTHER = 101
ADMIN = 42
GROUP = -700
SECRET = "my zebra-striped secret is the blue door at dawn"


def _services(app: Any) -> Services:
    services = app.bot_data.services
    assert services is not None
    return services


async def _forget(tg: FakeTelegram, user_id: int, done: str = "Done: I deleted") -> str:
    """The user sends /forget in their private chat and confirms; the bot's final text."""
    tg.push_message(user_id, "/forget", user_id=user_id)
    await tg.wait_for(lambda: any(b[2].startswith("forget:yes:") for b in tg.buttons(user_id)))
    mid, _, data = [b for b in tg.buttons(user_id) if b[2].startswith("forget:yes:")][-1]
    tg.push_callback(user_id, user_id, mid, data)
    await tg.wait_for(lambda: tg.texts(user_id)[-1].startswith(done))
    return tg.texts(user_id)[-1]


async def _say(tg: FakeTelegram, user_id: int, text: str) -> None:
    """A user addresses the bot in the group and gets the answer."""
    before = len(tg.sent_texts(GROUP))
    tg.push_message(GROUP, f"@parley_test_bot {text}", user_id=user_id, chat_type="supergroup")
    await tg.wait_sent(GROUP, before + 1)


def _holds(conversations: dict[str, Any], word: str) -> bool:
    return word in json.dumps(conversations).casefold()


async def test_a_group_forgets_the_user_on_the_server_in_quotes_and_in_the_next_export(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()) as app:
        tg.chat(GROUP, "supergroup")
        await _say(tg, OTHER, "hello from the other one")
        await _say(tg, FORGETTER, SECRET)
        # The model had the forgetter's words in the group's conversation, and quoted them.
        oai.enqueue("They said: My Zebra-Striped secret is the blue door, at dawn!")
        await _say(tg, OTHER, "what did they just tell you?")
        await _say(tg, OTHER, "thanks, good night")
        await settled(app)
        assert _holds(oai.conversations, "zebra")

        await _forget(tg, FORGETTER)
        await settled(app)
        # The group's conversation went; nothing left on the server holds their words.
        assert oai.conversations == {}

        await _say(tg, OTHER, "still there?")
        rebuilt = oai.calls[-1]
        # A new conversation seeded from the log: the others' turns, with the quote cut out.
        assert rebuilt.transcript[:4] == [
            ("user", "hello from the other one"),
            ("assistant", "echo: hello from the other one"),
            ("user", "what did they just tell you?"),
            ("assistant", "They said: […]!"),
        ]
        assert rebuilt.transcript[-1] == ("user", "still there?")
        assert not _holds(oai.conversations, "zebra")
        assert not any("zebra" in text.casefold() for _, text in rebuilt.transcript)

        tg.chat(ADMIN)
        tg.push_message(ADMIN, "/export", user_id=ADMIN)
        await tg.wait_for(lambda: bool(tg.calls_of("sendDocument")))
        report = await _services(app).finetune.build(DatasetOptions())
    exported = b"".join(d for method, _, d in tg.uploads if method == "sendDocument").decode()
    assert "hello from the other one" in exported and "thanks, good night" in exported
    # The answer that quoted them is left out of datasets, and counted as such.
    assert "zebra" not in exported.casefold() and "They said" not in exported
    assert report.dropped["quotes_forgotten_user"] == 1


async def test_after_forget_no_file_the_bot_keeps_holds_the_words(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    words = "quixotic marmalade zeppelin"
    async with running(make_settings()) as app:
        services = _services(app)
        tg.push_message(FORGETTER, f"please remember {words} for me", user_id=FORGETTER)
        await tg.wait_sent(FORGETTER, 1)
        await settled(app)
        # A dataset built now holds the words, and its summary waits for "start".
        report = await services.finetune.build(DatasetOptions(min_examples=1))
        assert report.train_path is not None and words in report.train_path.read_text()
        token = await services.finetune.hold(report, DatasetOptions(), ADMIN)
        tg.chat(ADMIN)
        tg.push_message(ADMIN, "/help", user_id=ADMIN)
        await tg.wait_sent(ADMIN, 1)
        summary = max(mid for chat, mid in tg.messages if chat == ADMIN)

        await _forget(tg, FORGETTER)
        await settled(app)
        # Every file beside the database (the write-ahead log included: /forget
        # checkpointed it), byte for byte.
        holding = _files_holding(tmp_path, words.encode())
        folders = list((tmp_path / "datasets").iterdir())

        tg.push_callback(ADMIN, ADMIN, summary, f"ft:start:{token}")
        await tg.wait_for(lambda: t("train.expired") in tg.texts(ADMIN))
    assert holding == [] and folders == []
    assert oai.files == {} and oai.jobs == {}


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and needle in p.read_bytes()
    ]


async def test_a_conversation_the_server_could_not_delete_is_deleted_by_the_next_forget(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    refuse = {"delete": True}
    conversations = oai._conversations

    def flaky(method: str, parts: list[str], body: Any) -> web.Response:
        if method == "DELETE" and refuse["delete"]:
            return web.json_response(
                {"error": {"message": "down", "type": "server_error"}}, status=500
            )
        return conversations(method, parts, body)

    oai._conversations = flaky  # type: ignore[method-assign]
    async with running(make_settings()):
        tg.chat(FORGETTER)
        tg.push_message(FORGETTER, "my secret plan", user_id=FORGETTER)
        await tg.wait_sent(FORGETTER, 1)
        text = await _forget(tg, FORGETTER)
        assert t("forget.copies_left", count=1) in text
        assert len(oai.conversations) == 1  # still on the server

        refuse["delete"] = False
        text = await _forget(tg, FORGETTER, done="Done: I deleted 0")
        assert t("forget.copies_left", count=1) not in text
    assert oai.conversations == {}
