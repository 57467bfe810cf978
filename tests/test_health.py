"""The image's HEALTHCHECK (`python -m bot.health`) against a real bot process.

Webhook mode: the bot's own GET /healthz. Long polling: the heartbeat file the bot touches
while it is alive; frozen (SIGSTOP) or stopped, the check turns unhealthy, and so it does while
updates can't be stored.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pydantic import SecretStr

from bot.health import HEARTBEAT_STALE, alive, check, keep_heartbeat
from bot.settings import Settings
from tests.conftest import TOKEN, SettingsFactory, eventually, running
from tests.stubs.openai_server import API_KEY, FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram
from tests.test_cli import _env, bot_process, sigterm
from tests.test_docker import healthcheck_command
from tests.test_storage_failures import disk, fill, free

__all__ = ["disk"]  # the fixture, used below


def _bot_env(tg: FakeTelegram, oai: FakeOpenAI, **values: str) -> dict[str, str]:
    """The environment the bot runs with: the health check sees the same in the container."""
    return _env(
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_API_URL=tg.url,
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=oai.url,
        **values,
    )


async def _health(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's HEALTHCHECK command, with this interpreter as its `python`."""
    command = healthcheck_command()
    assert command[0] == "python"
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, *command[1:]],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_in_long_polling_the_health_check_follows_the_heartbeat(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    beat = tmp_path / "parley.heartbeat"
    env = _bot_env(tg, oai, HEARTBEAT_FILE=str(beat))
    async with bot_process(tg, oai, tmp_path, HEARTBEAT_FILE=str(beat)) as proc:
        await eventually(beat.exists, timeout=30)
        healthy = await _health(env, tmp_path)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert healthy.stdout.startswith("ok: heartbeat")

        # A stuck bot (here: frozen) touches nothing; once the heartbeat is old, it's unhealthy.
        proc.send_signal(signal.SIGSTOP)
        try:
            old = time.time() - 2 * HEARTBEAT_STALE
            os.utime(beat, (old, old))
            stuck = await _health(env, tmp_path)
            assert stuck.returncode == 1
            assert re.fullmatch(rf"unhealthy: the heartbeat at {beat} is 6\d s old\n", stuck.stdout)
        finally:
            proc.send_signal(signal.SIGCONT)
        await eventually(lambda: beat.stat().st_mtime > time.time() - HEARTBEAT_STALE, timeout=20)
        assert (await _health(env, tmp_path)).returncode == 0

        log = await sigterm(proc)
    assert "Traceback" not in log
    assert not beat.exists()  # removed on the way out: unhealthy at once, not 30 s later
    stopped = await _health(env, tmp_path)
    assert stopped.returncode == 1
    assert stopped.stdout == f"unhealthy: no heartbeat at {beat} (the bot is not running)\n"


async def test_in_webhook_mode_the_health_check_asks_healthz(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    webhook = {
        "WEBHOOK_URL": "https://bot.example.org/hook",
        "WEBHOOK_LISTEN": "127.0.0.1",
        "WEBHOOK_PORT": str(port),
        "WEBHOOK_SECRET": "webhook-secret-for-the-test",
    }
    env = _bot_env(tg, oai, **webhook)
    async with bot_process(tg, oai, tmp_path, **webhook) as proc:
        await eventually(lambda: tg.calls_of("setWebhook"), timeout=30)
        healthy = await _health(env, tmp_path)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert healthy.stdout == f"ok: http://127.0.0.1:{port}/healthz answered 200\n"
        await sigterm(proc)
    stopped = await _health(env, tmp_path)
    assert stopped.returncode == 1
    assert stopped.stdout.startswith(f"unhealthy: http://127.0.0.1:{port}/healthz did not answer")


async def test_a_check_with_nothing_to_look_at_says_so(tmp_path: Path) -> None:
    unconfigured = await _health(_env(), tmp_path)
    assert unconfigured.returncode == 1
    assert unconfigured.stdout == "unhealthy: configuration error: TELEGRAM_BOT_TOKEN is not set\n"
    polling = Settings(_env_file=None, telegram_bot_token=SecretStr("1:x"))  # type: ignore[call-arg]
    assert check(polling) == (
        False,
        "unknown: long polling has no port to ask; set HEARTBEAT_FILE (the image does)",
    )
    wildcard = polling.model_copy(
        update={"webhook_url": "https://x.org/h", "webhook_listen": "::", "webhook_port": 1}
    )
    ok, line = check(wildcard)
    assert not ok and line.startswith("unhealthy: http://[::1]:1/healthz did not answer")


async def test_the_heartbeat_pauses_while_updates_cant_be_stored(
    tg: FakeTelegram, make_settings: SettingsFactory, disk: Path, tmp_path: Path
) -> None:
    beat = tmp_path / "beat"
    async with running(make_settings(database_url=f"sqlite:///{disk}/parley.sqlite3")) as app:
        beating = asyncio.create_task(keep_heartbeat(app, beat, interval=0.05))
        try:
            await eventually(beat.exists)
            filler = fill(disk)
            tg.push_message(100, "while the disk is full")  # storing it fails
            await eventually(lambda: not alive(app), timeout=20)
            await asyncio.sleep(0.2)  # a touch under way when it turned may still land
            frozen = beat.stat().st_mtime_ns
            await asyncio.sleep(0.5)
            assert beat.stat().st_mtime_ns == frozen
            free(filler)
            await eventually(lambda: beat.stat().st_mtime_ns > frozen, timeout=30)
            assert alive(app)
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
    assert not beat.exists()
