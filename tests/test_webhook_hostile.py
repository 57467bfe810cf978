"""Webhook bodies that are JSON but not an update get a 400: no 500, no traceback, no inbox row."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from bot.app import ALLOWED_UPDATES, build_application
from bot.webhook import SECRET_HEADER, serving
from tests.conftest import SettingsFactory, settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram, private_text_update

SECRET = "hostile-bodies-secret"
DEEP = 100_000


def _message(update_id: str) -> bytes:
    """A well-formed private text message whose update_id is given as raw JSON text."""
    message = (
        '"message": {"message_id": 1, "date": 1, "text": "hi",'
        ' "chat": {"id": 100, "type": "private"}, "from": {"id": 100, "is_bot": false,'
        ' "first_name": "U"}}'
    )
    return ('{"update_id": ' + update_id + ", " + message + "}").encode()


HOSTILE: dict[str, bytes] = {
    "an array": b"[]",
    "an array of updates": b'[{"update_id": 1}]',
    "a number": b"42",
    "a string": b'"update"',
    "null": b"null",
    "true": b"true",
    "update_id 2**70": _message(str(2**70)),
    "update_id NaN": _message("NaN"),
    "update_id Infinity": _message("Infinity"),
    "update_id -1": _message("-1"),
    "update_id as text": _message('"5"'),
    "update_id as a float": _message("5.0"),
    "update_id true": _message("true"),
    "no update_id": b'{"message": {}}',
    "an array nested 100k deep": b"[" * DEEP + b"]" * DEEP,
    "an object nested 100k deep": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "an update nested 100k deep": (
        b'{"update_id": 9, "message": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    ),
    "a message that is a number": b'{"update_id": 10, "message": 5}',
    "a message whose chat is text": (
        b'{"update_id": 11, "message": {"message_id": 1, "date": 1, "chat": "x"}}'
    ),
    "not UTF-8": b'{"update_id": 12, "message": "\xff\xfe"}',
}


@pytest.mark.parametrize("body", list(HOSTILE.values()), ids=list(HOSTILE))
async def test_a_body_that_is_not_an_update_gets_400_and_no_inbox_row(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
) -> None:
    settings = make_settings(
        webhook_url="https://bot.example.org/hook",
        webhook_listen="127.0.0.1",
        webhook_port=0,
        webhook_secret=SECRET,
    )
    tg.chat(100)
    caplog.set_level(logging.INFO)
    app = build_application(settings)
    async with serving(app, settings, ALLOWED_UPDATES) as port, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port}/hook"
        headers = {SECRET_HEADER: SECRET, "Content-Type": "application/json"}
        async with http.post(url, data=body, headers=headers) as response:
            assert response.status == 400
            assert await response.text() == "not an update"
        store = app.bot_data.services.store  # type: ignore[union-attr]
        assert await store.fetch_all("SELECT update_id FROM inbox") == []
        # The bot is none the worse: a real update right after is answered.
        real = private_text_update(20, 100, 2, "still fine")
        async with http.post(url, json=real, headers={SECRET_HEADER: SECRET}) as response:
            assert response.status == 200
        assert await tg.wait_sent(100, 1) == ["echo: still fine"]
        await settled(app)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
