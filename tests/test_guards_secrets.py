"""`python -m bot` keeps every secret out of its log, at DEBUG, in both modes (issue 18).

The filter itself has its own tests; what these check is that `main()` hands it every
secret. Of the secrets, only the bot token shows up in PTB's DEBUG lines by itself (the Bot
API URL), and the webhook secret in webhook mode (setWebhook's parameters), so a probe
loaded into the spawned process (a `sitecustomize` module on its PYTHONPATH) logs each
configured secret once logging is set up: in a message, in an argument and in a
traceback, as a library might. Each secret must then read [REDACTED].
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from bot.webhook import SECRET_HEADER
from tests.conftest import TOKEN
from tests.stubs.openai_server import API_KEY, FakeOpenAI
from tests.stubs.specs import OpenAISpec, TelegramSpec
from tests.stubs.telegram_server import FakeTelegram, private_text_update
from tests.test_cli import ROOT, _env

SECRETS = {
    "TELEGRAM_BOT_TOKEN": TOKEN,
    "OPENAI_API_KEY": API_KEY,
    "WEBHOOK_SECRET": "webhook-secret-0123456789abcdef",
    "FINE_TUNE_API_KEY": "trainer-key-0123456789abcdef",
    "SERVE_API_KEY": "serving-key-0123456789abcdef",
}
RANDOM_WEBHOOK_SECRET = "random secret_token"  # WEBHOOK_SECRET unset: made up at start

PROBE = '''\
"""Test probe: once the bot has set up logging, log each secret as a library might."""
import logging
import os

import bot.logs

_setup = bot.logs.setup_logging


def setup_logging(*args, **kwargs):
    _setup(*args, **kwargs)
    probe = logging.getLogger("tests.probe")
    for name in os.environ["PARLEY_PROBE"].split(","):
        value = os.environ.get(name)
        if value:
            probe.warning("probe %s in a message: " + value.replace("%", "%%"), name)
            probe.warning("probe %s in an argument: %s", name, value)
            try:
                raise RuntimeError(f"probe {name} in a traceback: {value}")
            except RuntimeError:
                probe.exception("probe %s", name)


bot.logs.setup_logging = setup_logging
'''


async def _run(shared: Path, probe_dir: Path, cwd: Path, *, webhook: bool) -> dict[str, Any]:
    """One run of `python -m bot` at DEBUG: a message in, its answer out, SIGTERM."""
    tg = FakeTelegram(TOKEN, TelegramSpec.load(shared / "specs" / "telegram-bot-api.json"))
    oai = FakeOpenAI(OpenAISpec.load(shared / "specs" / "openai-openapi.json"))
    # The trainer and the serving endpoint, each taking its own key: the bot checks at
    # start that every endpoint accepts its key.
    trainer, serving = (
        FakeOpenAI(OpenAISpec.load(shared / "specs" / "openai-openapi.json"), SECRETS[key])
        for key in ("FINE_TUNE_API_KEY", "SERVE_API_KEY")
    )
    await tg.start()
    await oai.start()
    await trainer.start()
    await serving.start()
    env = _env(
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_API_URL=tg.url,
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=oai.url,
        LOG_LEVEL="DEBUG",
        SENTIMENT_BACKEND="off",
        FINE_TUNE_BASE_URL=trainer.url,
        FINE_TUNE_API_KEY=SECRETS["FINE_TUNE_API_KEY"],
        SERVE_BASE_URL=serving.url,
        SERVE_API_KEY=SECRETS["SERVE_API_KEY"],
        PARLEY_PROBE=",".join(SECRETS),
    )
    env["PYTHONPATH"] = f"{probe_dir}:{ROOT}"
    if webhook:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        env.update(
            WEBHOOK_URL="https://bot.example.org/hook",
            WEBHOOK_LISTEN="127.0.0.1",
            WEBHOOK_PORT=str(port),
        )
    else:
        env["WEBHOOK_SECRET"] = SECRETS["WEBHOOK_SECRET"]  # set, unused: still a secret
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    secrets = {k: v for k, v in SECRETS.items() if k in env}
    try:
        tg.chat(100)
        if webhook:
            await tg.wait_for(lambda: bool(tg.calls_of("setWebhook")), timeout=30)
            secrets[RANDOM_WEBHOOK_SECRET] = tg.calls_of("setWebhook")[0].params["secret_token"]
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"http://127.0.0.1:{port}/hook",
                    json=private_text_update(1, 100, 1, "hello"),
                    headers={SECRET_HEADER: secrets[RANDOM_WEBHOOK_SECRET]},
                ) as response,
            ):
                assert response.status == 200
        else:
            tg.push_message(100, "hello")
        assert await tg.wait_sent(100, 1, timeout=30) == ["echo: hello"]
        await asyncio.sleep(0.3)  # the turn is logged after the reply; let it land
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, output.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await serving.stop()
        await trainer.stop()
        await oai.stop()
        await tg.stop()
    return {"log": output.decode(), "secrets": secrets}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runs(
    shared: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, dict[str, Any]]]:
    probe_dir = tmp_path_factory.mktemp("probe")
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    yield {
        mode: await _run(shared, probe_dir, tmp_path_factory.mktemp(mode), webhook=webhook)
        for mode, webhook in (("polling", False), ("webhook", True))
    }


@pytest.mark.parametrize(
    ("mode", "name"),
    [
        ("polling", "TELEGRAM_BOT_TOKEN"),
        ("polling", "OPENAI_API_KEY"),
        ("polling", "WEBHOOK_SECRET"),
        ("polling", "FINE_TUNE_API_KEY"),
        ("polling", "SERVE_API_KEY"),
        ("webhook", "TELEGRAM_BOT_TOKEN"),
        ("webhook", "OPENAI_API_KEY"),
        ("webhook", "FINE_TUNE_API_KEY"),
        ("webhook", "SERVE_API_KEY"),
        ("webhook", RANDOM_WEBHOOK_SECRET),
    ],
)
def test_python_m_bot_keeps_the_secret_out_of_its_debug_log(
    runs: dict[str, dict[str, Any]], mode: str, name: str
) -> None:
    log, secret = runs[mode]["log"], runs[mode]["secrets"][name]
    if name == RANDOM_WEBHOOK_SECRET:
        assert "Calling Bot API endpoint `setWebhook`" in log  # where PTB would show it
    else:
        assert log.count(f"probe {name} in ") == 3  # the probe ran: these lines are there
    assert secret not in log
