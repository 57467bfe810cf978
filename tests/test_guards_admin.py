"""Every admin handler the app registers refuses everyone else, by what it does (issue 18).

The handlers are taken from the running app, not from a list in this file: a command or a
button added later is covered without anyone remembering to add it here.
"""

from __future__ import annotations

from typing import Any

from telegram.ext import CallbackQueryHandler, CommandHandler

from bot.access import admin_only
from bot.context import ParleyApp
from bot.texts import ADMIN_COMMANDS, t
from handlers import admin
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import BOT_USER, FakeTelegram

ADMIN = 42
USER = 100
REFUSAL = t("admin_only")
DEFAULT_MODEL = "gpt-5.4-mini"
# Arguments that would make each command do something, were it run.
ARGS = {"model": "gpt-5.4-nano", "job": "ftjob-1", "cancel": "ftjob-1"}


async def _noop(*_: Any) -> None:
    return None


def _admin_handlers(app: ParleyApp) -> list[Any]:
    """Handlers that are the admins' by where they live, by name, or by their guard."""
    guarded = admin_only(_noop).__code__  # every guarded handler runs this same code
    return [
        h
        for group in app.handlers.values()
        for h in group
        if isinstance(h, CommandHandler | CallbackQueryHandler)
        and (
            h.callback.__module__ == admin.__name__
            or getattr(h.callback, "__code__", None) is guarded
            or (isinstance(h, CommandHandler) and h.commands & set(ADMIN_COMMANDS))
        )
    ]


def _refusals(tg: FakeTelegram, query_id: str) -> list[dict[str, Any]]:
    return [
        c.params
        for c in tg.calls
        if c.method == "answerCallbackQuery" and c.params.get("callback_query_id") == query_id
    ]


async def test_every_admin_command_the_app_registers_refuses_non_admins(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()) as app:
        commands = sorted(
            {c for h in _admin_handlers(app) if isinstance(h, CommandHandler) for c in h.commands}
        )
        assert set(ADMIN_COMMANDS) <= set(commands)  # the derivation found them all
        tg.chat(USER)
        for n, command in enumerate(commands, 1):
            tg.push_message(USER, f"/{command} {ARGS.get(command, '')}".strip(), user_id=USER)
            assert (await tg.wait_sent(USER, n))[-1] == REFUSAL, command
        await settled(app)
        services = app.bot_data.services
        assert services is not None
        assert services.models.current == DEFAULT_MODEL
        assert await services.store.settings.get("model") is None
    # One refusal each, and nothing else: no chart, no document, no model or API call.
    assert {c.method for c in tg.calls if "chat_id" in c.params} == {"sendMessage"}
    assert oai.requests == []


async def test_every_admin_button_refuses_non_admins_even_forwarded_to_them(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(job_poll_interval=0.1)) as app:
        services = app.bot_data.services
        assert services is not None
        patterns = [h.pattern for h in _admin_handlers(app) if isinstance(h, CallbackQueryHandler)]
        # Twelve one-message threads: /train's least (ten) and a validation split.
        for chat in range(1000, 1012):
            tg.push_message(chat, f"question {chat}: tell me about topic {chat}")
        for chat in range(1000, 1012):
            await tg.wait_sent(chat, 1)
        await settled(app)
        # The admin's buttons, for real: two dataset summaries, one started; its job
        # succeeds and the notice carries "use this model".
        tg.chat(ADMIN)
        for n in (1, 2):
            tg.push_message(ADMIN, "/train", user_id=ADMIN)
            await tg.wait_for(
                lambda n=n: sum(b[2].startswith("ft:start:") for b in tg.buttons(ADMIN)) == n
            )
        mid, start = _button(tg, "ft:start:")
        _press(tg, ADMIN, tg.messages[(ADMIN, mid)], start)
        await tg.wait_for(lambda: any(b[2].startswith("ft:use:") for b in tg.buttons(ADMIN)))
        assert len(oai.jobs) == 1
        files = len(oai.files)  # its training and validation files
        buttons = tg.buttons(ADMIN)
        for pattern in patterns:  # every admin button the app handles is pressed below
            assert any(pattern.search(data) for _, _, data in buttons), pattern

        # Someone else presses each of them, on a copy forwarded to their own chat.
        tg.chat(USER)
        for mid, _, data in buttons:
            if not any(p.search(data) for p in patterns):
                continue
            query_id = _press(tg, USER, _forwarded(tg, tg.messages[(ADMIN, mid)], USER), data)
            await tg.wait_for(lambda query_id=query_id: bool(_refusals(tg, query_id)))
            [answer] = _refusals(tg, query_id)
            assert answer.get("show_alert") == "true" and answer.get("text") == REFUSAL, data
        await settled(app)
        assert tg.sent_texts(USER) == []  # an alert only: nothing said, nothing switched
        assert len(oai.jobs) == 1 and len(oai.files) == files
        assert services.models.current == DEFAULT_MODEL
        assert await services.store.settings.get("model") is None
        tg.push_message(ADMIN, "/model", user_id=ADMIN)
        await tg.wait_for(lambda: any(t.startswith("The bot uses") for t in tg.texts(ADMIN)))
        assert f"The bot uses {DEFAULT_MODEL}." in tg.texts(ADMIN)[-1]
        # The dataset someone else tried to drop is still there: its admin can start it.
        mid, start = _button(tg, "ft:start:")
        _press(tg, ADMIN, tg.messages[(ADMIN, mid)], start)
        await tg.wait_for(lambda: len(oai.jobs) == 2)
        await settled(app)


def _button(tg: FakeTelegram, prefix: str) -> tuple[int, str]:
    """(message id, callback data) of the first button now shown to the admin with `prefix`."""
    mid, _, data = next(b for b in tg.buttons(ADMIN) if b[2].startswith(prefix))
    return mid, data


def _forwarded(tg: FakeTelegram, original: dict[str, Any], chat_id: int) -> dict[str, Any]:
    """A copy of the bot's message, forwarded by the user to their chat (buttons and all)."""
    return {
        **original,
        "message_id": tg.next_message_id(chat_id),
        "chat": tg.chats[chat_id],
        "from": {"id": chat_id, "is_bot": False, "first_name": f"User{chat_id}"},
        "forward_origin": {"type": "user", "date": original["date"], "sender_user": BOT_USER},
    }


def _press(tg: FakeTelegram, user_id: int, message: dict[str, Any], data: str) -> str:
    """Queue a press on a button of `message` by `user_id`; returns the query's id."""
    query_id = f"cb-{user_id}-{len(tg.calls)}-{data}"
    user = {"id": user_id, "is_bot": False, "first_name": f"User{user_id}", "language_code": "en"}
    query = {
        "id": query_id,
        "chat_instance": f"ci{message['chat']['id']}",
        "data": data,
        "from": user,
        "message": message,
    }
    tg.push_update({"callback_query": query})
    return query_id
