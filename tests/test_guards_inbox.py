"""An update Telegram delivers again is not handled again: commands and buttons too (issue 18).

Texts and photos have a second guard (a message whose turn is logged is not answered
again), which once hid a broken inbox; commands and button presses have only the inbox.
Both ways updates arrive are covered: long polling and the webhook.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
from telegram import Update

from bot.app import ALLOWED_UPDATES, build_application
from bot.durability import Inbox
from bot.texts import command_help, t
from bot.webhook import SECRET_HEADER, serving
from tests.conftest import SettingsFactory, running, settled
from tests.pg import AnyStore
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram, private_text_update

USER = 100
KEPT = t("forget.kept")
HELP = t("help", commands=command_help())


def _command(tg: FakeTelegram, text: str) -> dict[str, Any]:
    """A command as the user's message (what push_message builds), for a raw update."""
    return {
        "message_id": tg.next_message_id(USER),
        "date": int(time.time()),
        "chat": tg.chats[USER],
        "from": {"id": USER, "is_bot": False, "first_name": "U", "language_code": "en"},
        "text": text,
        "entities": [{"type": "bot_command", "offset": 0, "length": len(text)}],
    }


def _press(tg: FakeTelegram, data_prefix: str) -> dict[str, Any]:
    """A press on the bot's button whose data starts with `data_prefix` (no update_id)."""
    mid, _, data = next(b for b in tg.buttons(USER) if b[2].startswith(data_prefix))
    return {
        "callback_query": {
            "id": f"cb-{mid}-{data}",
            "chat_instance": f"ci{USER}",
            "data": data,
            "from": {"id": USER, "is_bot": False, "first_name": "U", "language_code": "en"},
            "message": tg.messages[(USER, mid)],
        }
    }


def _answered(tg: FakeTelegram, press: dict[str, Any]) -> int:
    """How many times the bot answered a button press."""
    query_id = press["callback_query"]["id"]
    return sum(
        c.method == "answerCallbackQuery" and c.params.get("callback_query_id") == query_id
        for c in tg.calls
    )


def _helps(tg: FakeTelegram) -> int:
    return tg.sent_texts(USER).count(HELP)


async def test_the_inbox_takes_each_update_id_once(store: AnyStore) -> None:
    inbox = Inbox(store)
    first = Update.de_json(private_text_update(7, USER, 1, "/help"), None)
    second = Update.de_json(private_text_update(8, USER, 2, "/start"), None)
    assert first is not None and second is not None
    assert [u.update_id for u in await inbox.accept([first])] == [7]
    assert await inbox.accept([first]) == []  # again while it is being handled
    await inbox.done([7])
    assert await inbox.accept([first]) == []  # again after it was handled
    assert [u.update_id for u in await inbox.accept([first, second])] == [8]
    assert [u for u, _ in await store.inbox.pending()] == [8]
    # The store on its own: the ids not seen before, and only those.
    assert await store.inbox.accept([(9, "{}")]) == {9}
    assert await store.inbox.accept([(9, "{}"), (10, "{}")]) == {10}


async def test_a_command_and_a_button_press_delivered_again_by_polling_are_answered_once(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings()
    tg.chat(USER)
    async with running(settings) as app:
        help_update = tg.push_update({"message": _command(tg, "/help")})
        await tg.wait_sent(USER, 1)
        tg.push_message(USER, "/forget", user_id=USER)
        await tg.wait_for(lambda: any(b[2].startswith("forget:no:") for b in tg.buttons(USER)))
        press = tg.push_update(_press(tg, "forget:no:"))
        await tg.wait_for(lambda: KEPT in tg.texts(USER))
        await settled(app)
    # The process went away before its next getUpdates confirmed them: Telegram delivers
    # both again, with the same update ids, to the next run.
    tg.push_update(help_update)
    tg.push_update(press)
    async with running(settings) as app:
        tg.push_message(USER, "/start", user_id=USER)  # after both, in this chat's order
        await tg.wait_for(lambda: any(x.startswith("Hi") for x in tg.sent_texts(USER)))
        await settled(app)
    assert (_helps(tg), _answered(tg, press)) == (1, 1)
    assert len(tg.calls_of("editMessageText")) == 1


async def test_a_command_and_a_button_press_posted_again_to_the_webhook_are_answered_once(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    secret = "webhook-secret-for-redelivery"
    settings = make_settings(
        webhook_url="https://bot.example.org/hook",
        webhook_listen="127.0.0.1",
        webhook_port=0,
        webhook_secret=secret,
    )
    tg.chat(USER)
    app = build_application(settings)
    async with (
        serving(app, settings, ALLOWED_UPDATES) as port,
        aiohttp.ClientSession(headers={SECRET_HEADER: secret}) as http,
    ):
        url = f"http://127.0.0.1:{port}/hook"

        async def post(update: dict[str, Any]) -> None:
            async with http.post(url, json=update) as response:
                assert response.status == 200

        help_update = {"update_id": 1, "message": _command(tg, "/help")}
        await post(help_update)
        await tg.wait_sent(USER, 1)
        await post({"update_id": 2, "message": _command(tg, "/forget")})
        await tg.wait_for(lambda: any(b[2].startswith("forget:no:") for b in tg.buttons(USER)))
        press = {"update_id": 3, **_press(tg, "forget:no:")}
        await post(press)
        await tg.wait_for(lambda: KEPT in tg.texts(USER))
        # Telegram did not hear the 200s (a timeout, a proxy): it posts both again.
        await post(help_update)
        await post(press)
        await post({"update_id": 4, "message": _command(tg, "/start")})
        await tg.wait_for(lambda: any(x.startswith("Hi") for x in tg.sent_texts(USER)))
        await settled(app)
    assert (_helps(tg), _answered(tg, press)) == (1, 1)
    assert len(tg.calls_of("editMessageText")) == 1
