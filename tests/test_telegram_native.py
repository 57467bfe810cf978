"""Command menus and their scopes, replies in the user's language, assistant profiles."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import SettingsFactory, running
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram
from tests.test_photos import jpeg

PROFILES = """
[profiles.coder]
title = "Code reviewer"
instructions = "You review code tersely."
model = "gpt-5.4"
temperature = 0.2
vision = false

[profiles.poet]
title = "Poet"
instructions = "Answer in verse."
"""


async def test_command_menus_per_language_and_admin_scope(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(admin_user_ids="42,43")):
        calls = [c.params for c in tg.calls_of("setMyCommands")]
    menus = {
        (
            json.loads(c["scope"])["type"],
            json.loads(c["scope"]).get("chat_id"),
            c.get("language_code"),
        ): [cmd["command"] for cmd in json.loads(c["commands"])]
        for c in calls
    }
    everyone = menus[("default", None, None)]
    assert everyone == ["start", "help", "reset", "forget", "assistant", "id"]
    assert menus[("default", None, "ru")] == everyone and menus[("default", None, "es")] == everyone
    for admin in (42, 43):
        assert "train" in menus[("chat", admin, None)] and "stats" in menus[("chat", admin, "ru")]
    assert not any("train" in cmds for (scope, _, _), cmds in menus.items() if scope == "default")
    ru = next(c for c in calls if c.get("language_code") == "ru" and "chat_id" not in c["scope"])
    descriptions = "".join(c["description"] for c in json.loads(ru["commands"]))
    assert any("\u0400" <= ch <= "\u04ff" for ch in descriptions)  # Cyrillic descriptions


async def test_the_bot_answers_in_the_users_language(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(allowed_user_ids="1")):
        for chat, lang in ((201, "ru"), (202, "es-419"), (203, "de")):
            tg.chat(chat)
            sender = {"id": chat, "is_bot": False, "first_name": "U", "language_code": lang}
            tg.push_message(chat, "/help", user_id=chat, extra={"from": sender})
        [ru] = await tg.wait_sent(201, 1)
        [es] = await tg.wait_sent(202, 1)
        [de] = await tg.wait_sent(203, 1)
    assert ru != es != de
    assert any("\u0400" <= ch <= "\u04ff" for ch in ru)
    assert "privado" in es  # Spanish refusal (the allow-list refuses them all)
    assert de == "Sorry, this bot is private."  # unsupported language: English


async def test_assistant_profiles_switch_the_model_instructions_and_thread(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(PROFILES)
    settings = make_settings(profiles_file=str(profiles))
    async with running(settings):
        tg.chat(100)
        tg.push_message(100, "first question", user_id=100)
        await tg.wait_sent(100, 1)
        tg.push_message(100, "/assistant", user_id=100)
        listing = (await tg.wait_sent(100, 2))[-1]
        assert "Code reviewer (coder), gpt-5.4" in listing and "Current: Default" in listing
        mid, _, data = next(b for b in tg.buttons(100) if b[2] == "profile:coder")
        tg.push_callback(100, 100, mid, data)
        await tg.wait_for(lambda: any("Code reviewer" in t and "new" in t for t in tg.texts(100)))
        tg.push_message(100, "review this", user_id=100)
        await tg.wait_sent(100, 3)
        tg.push_photo(100, jpeg(64, 64), user_id=100)
        assert "doesn't look at images" in (await tg.wait_sent(100, 4))[-1]
    first, second = oai.calls
    assert second.model == "gpt-5.4" and second.instructions == "You review code tersely."
    assert second.body["temperature"] == 0.2 and "temperature" not in first.body
    assert second.conversation != first.conversation  # switching started a new thread
    assert second.transcript == [("user", "review this")]
    async with running(settings):  # the choice is kept across restarts
        tg.push_message(100, "/assistant poet", user_id=100)
        await tg.wait_sent(100, 5)
        tg.push_message(100, "a poem please", user_id=100)
        await tg.wait_sent(100, 6)
    assert oai.calls[-1].instructions == "Answer in verse."
    assert oai.calls[-1].model == "gpt-5.4-mini"  # no model in the profile: the bot's


def test_a_broken_profiles_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.test_cli import _env

    bad = tmp_path / "profiles.toml"
    bad.write_text("[profiles.x]\ntemperature = 7\n")
    result = subprocess.run(
        [sys.executable, "-m", "bot"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(TELEGRAM_BOT_TOKEN="1:x", OPENAI_API_KEY="k", PROFILES_FILE=str(bad)),
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "PROFILES_FILE" in result.stderr
    assert "temperature" in result.stderr
