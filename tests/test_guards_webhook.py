"""Without WEBHOOK_SECRET the webhook still demands a secret: a random one (issue 18).

The other webhook tests always set the secret; this is the default a deployment gets.
"""

from __future__ import annotations

import re

import aiohttp

from bot.app import ALLOWED_UPDATES, build_application
from bot.webhook import SECRET_HEADER, serving
from tests.conftest import SettingsFactory
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram, private_text_update

# Telegram's rule for secret_token: 1-256 characters A-Z, a-z, 0-9, _ and -.
TELEGRAM_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")


async def test_without_webhook_secret_a_random_one_is_given_to_telegram_and_demanded(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        webhook_url="https://bot.example.org/hook",
        webhook_listen="127.0.0.1",
        webhook_port=0,
    )
    assert settings.webhook_secret is None
    tg.chat(100)
    given = []
    for start in (1, 2):
        async with (
            serving(build_application(settings), settings, ALLOWED_UPDATES) as port,
            aiohttp.ClientSession() as http,
        ):
            secret = tg.calls_of("setWebhook")[-1].params.get("secret_token") or ""
            assert TELEGRAM_SECRET.fullmatch(secret) and len(secret) >= 32
            given.append(secret)
            url = f"http://127.0.0.1:{port}/hook"
            update = private_text_update(start, 100, start, f"message {start}")
            for headers in ({}, {SECRET_HEADER: ""}, {SECRET_HEADER: secret[:-1]}):
                async with http.post(url, json=update, headers=headers) as response:
                    assert response.status == 403, headers
            assert oai.calls[start - 1 :] == []  # nothing refused reached the model
            async with http.post(url, json=update, headers={SECRET_HEADER: secret}) as response:
                assert response.status == 200
            await tg.wait_sent(100, start)
    assert given[0] != given[1]  # a new one each start
    assert tg.sent_texts(100) == ["echo: message 1", "echo: message 2"]
