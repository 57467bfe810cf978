"""Webhook mode (secret token checked on every request, /healthz) and `python -m bot check`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest

from bot.app import ALLOWED_UPDATES, build_application
from bot.webhook import SECRET_HEADER, serving
from tests.conftest import TOKEN, SettingsFactory
from tests.stubs.openai_server import API_KEY, FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram, private_text_update
from tests.test_cli import _env

SECRET = "s3cret-token_for-tests"


async def test_webhook_checks_the_secret_and_answers_updates(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        webhook_url="https://bot.example.org/tg/hook",
        webhook_listen="127.0.0.1",
        webhook_port=0,
        webhook_secret=SECRET,
    )
    tg.chat(100)
    async with serving(build_application(settings), settings, ALLOWED_UPDATES) as port:
        [set_webhook] = tg.calls_of("setWebhook")
        assert set_webhook.params["url"] == "https://bot.example.org/tg/hook"
        assert set_webhook.params["secret_token"] == SECRET
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            body = private_text_update(1, 100, 1, "via webhook")
            for headers in ({}, {SECRET_HEADER: "wrong"}, {SECRET_HEADER: SECRET[:-1]}):
                async with http.post(f"{base}/tg/hook", json=body, headers=headers) as r:
                    assert r.status == 403
            async with http.post(
                f"{base}/tg/hook", data=b"{not json", headers={SECRET_HEADER: SECRET}
            ) as r:
                assert r.status == 400
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200 and (await r.json()) == {"ok": True}
            assert oai.calls == []  # nothing refused reached the bot
            async with http.post(
                f"{base}/tg/hook", json=body, headers={SECRET_HEADER: SECRET}
            ) as r:
                assert r.status == 200
            assert await tg.wait_sent(100, 1) == ["echo: via webhook"]
    assert tg.calls_of("getUpdates") == []  # no polling in webhook mode


async def test_check_reports_a_good_configuration(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    env = _env(
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_API_URL=tg.url,
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=oai.url,
        DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite3",
        # The stand-in plays the trainer and the serving endpoint too.
        FINE_TUNE_BASE_URL=oai.url,
        FINE_TUNE_API_KEY=API_KEY,
        FINE_TUNE_BASE_MODEL="gpt-4.1-mini",
        SERVE_BASE_URL=oai.url,
        SERVE_API_KEY=API_KEY,
    )
    code, out = await _run_check(env, tmp_path)
    assert code == 0, out
    assert "✓ Trainer: reached" in out and "✓ FINE_TUNE_BASE_MODEL gpt-4.1-mini is available" in out
    assert "✓ Serving: reached" in out
    assert "✓ Telegram: reached" in out and "@parley_test_bot" in out
    assert "✓ OPENAI_MODEL gpt-5.4-mini is available" in out and "✓ Database:" in out
    assert "✗" not in out and TOKEN not in out and API_KEY not in out


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"TELEGRAM_BOT_TOKEN": "123:wrong-token"}, "✗ Telegram: TELEGRAM_BOT_TOKEN was rejected"),
        ({"OPENAI_API_KEY": "sk-wrong"}, "✗ OpenAI: could not list models"),
        ({"OPENAI_MODEL": "gpt-9-imaginary"}, "✗ OPENAI_MODEL gpt-9-imaginary is not available"),
        ({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, "✗ OpenAI: could not list models"),
        ({"TELEGRAM_BOT_TOKEN": ""}, "✗ Configuration: TELEGRAM_BOT_TOKEN is empty"),
        (
            {"FINE_TUNE_BASE_URL": "<oai>", "FINE_TUNE_API_KEY": "wrong"},
            "✗ Trainer: could not list models at http://127.0.0.1",
        ),
        (
            {"FINE_TUNE_BASE_URL": "<oai>", "FINE_TUNE_API_KEY": "wrong"},
            ": API key refused (check FINE_TUNE_API_KEY)",
        ),
        (
            {
                "FINE_TUNE_BASE_URL": "<oai>",
                "FINE_TUNE_API_KEY": API_KEY,
                "FINE_TUNE_BASE_MODEL": "qwen-imaginary",
            },
            "✗ FINE_TUNE_BASE_MODEL qwen-imaginary is not available there",
        ),
        ({"SERVE_BASE_URL": "http://127.0.0.1:9/v1"}, "✗ Serving: could not list models"),
        ({"FINE_TUNE_BASE_URL": "gpu-box:8400"}, "✗ Configuration: FINE_TUNE_BASE_URL must be"),
    ],
    ids=[
        "bad-token",
        "bad-key",
        "unknown-model",
        "unreachable-openai",
        "empty-token",
        "trainer-bad-key",
        "trainer-bad-key-hint",
        "trainer-unknown-base-model",
        "serving-unreachable",
        "trainer-url-not-a-url",
    ],
)
async def test_check_reports_what_is_wrong(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, change: dict[str, str], expected: str
) -> None:
    env = _env(
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_API_URL=tg.url,
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=oai.url,
        DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite3",
    )
    env.update({k: v.replace("<oai>", oai.url) for k, v in change.items()})
    code, out = await _run_check(env, tmp_path)
    assert code == 1 and expected in out, out
    assert "Traceback" not in out


async def _run_check(env: dict[str, str], cwd: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "check",
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()
