"""`python -m bot` as a user runs it: configuration errors, and a real run against the stand-ins."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from bot.settings import ConfigError, load_settings
from tests.conftest import TOKEN, eventually
from tests.stubs.openai_server import API_KEY, FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram, private_text_update

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_LOOP = "asyncio" if sys.platform == "win32" else "uvloop"  # uvloop: not on Windows


def _env(**values: str) -> dict[str, str]:
    """A clean environment: nothing from the developer's shell or a .env leaks in."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    env.update(values)
    return env


async def sigterm(proc: asyncio.subprocess.Process) -> str:
    """Stop a spawned bot as a service manager would; its stderr once it has exited cleanly."""
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    return stderr.decode()


@asynccontextmanager
async def bot_process(
    tg: FakeTelegram, oai: FakeOpenAI, cwd: Path, **env: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A spawned bot, killed on the way out if the test did not stop it."""
    proc = await spawn_bot(tg, oai, cwd, **env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def spawn_bot(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    cwd: Path,
    *,
    quiet: bool = False,
    output_fd: int | None = None,
    user: int | None = None,
    **env: str,
) -> asyncio.subprocess.Process:
    """`python -m bot` against the stand-ins; its output piped, dropped if `quiet`, or
    written to `output_fd`; run as `user` (a uid) if given."""
    output = asyncio.subprocess.DEVNULL if quiet else asyncio.subprocess.PIPE
    if output_fd is not None:
        output = output_fd
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        cwd=cwd,
        env=_env(
            **{
                "TELEGRAM_BOT_TOKEN": TOKEN,
                "TELEGRAM_API_URL": tg.url,
                "OPENAI_API_KEY": API_KEY,
                "OPENAI_BASE_URL": oai.url,
                **env,  # these may replace the ones above
            }
        ),
        stdout=output,
        stderr=output,
        user=user,
    )


def test_missing_token_exits_with_one_line_naming_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TELEGRAM_BOT_TOKEN" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TELEGRAM_BOT_TOKEN": "x"}, "OPENAI_API_KEY"),
        (
            {"TELEGRAM_BOT_TOKEN": "x", "OPENAI_API_KEY": "k", "ADMIN_USER_IDS": "1,bob"},
            "ADMIN_USER_IDS",
        ),
        (
            {"TELEGRAM_BOT_TOKEN": "x", "OPENAI_API_KEY": "k", "CONVERSATION_BACKEND": "x"},
            "CONVERSATION_BACKEND",
        ),
        (
            {"TELEGRAM_BOT_TOKEN": "x", "OPENAI_API_KEY": "k", "DATABASE_URL": "mysql://db"},
            "DATABASE_URL",
        ),
        ({"TELEGRAM_BOT_TOKEN": "x", "OPENAI_API_KEY": "k", "EVENT_LOOP": "trio"}, "EVENT_LOOP"),
        (
            {"TELEGRAM_BOT_TOKEN": "x", "OPENAI_API_KEY": "k", "PROFILES_FILE": "absent.toml"},
            "PROFILES_FILE",
        ),
        (
            {
                "TELEGRAM_BOT_TOKEN": "x",
                "OPENAI_API_KEY": "k",
                "DATABASE_URL": "sqlite:///:memory:",
            },
            "DATABASE_URL",
        ),
    ],
)
def test_bad_configuration_is_one_line_naming_the_variable(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot"],
        cwd=tmp_path,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and named in result.stderr


def test_settings_parse_ids_paths_and_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for var in list(os.environ):
        if var.startswith(("TELEGRAM_", "OPENAI_", "ADMIN_", "DATABASE_", "CONVERSATION_")):
            monkeypatch.delenv(var)
    (tmp_path / ".env").write_text(
        "TELEGRAM_BOT_TOKEN=1:abc\nADMIN_USER_IDS= 5, 7 ,9\nDATABASE_URL=sqlite:////var/x.db\n"
        "TELEGRAM_API_URL=http://bot-api.local/\nLOG_LEVEL=debug\n"
    )
    s = load_settings()
    assert s.admin_user_ids == {5, 7, 9} and s.is_admin(7) and not s.is_admin(8)
    assert s.database_path == Path("/var/x.db")
    assert s.telegram_api_url == "http://bot-api.local"
    assert s.log_level == "DEBUG"
    assert "1:abc" not in repr(s)  # SecretStr
    assert load_settings(database_url="sqlite:///data/p.db").database_path == Path("data/p.db")
    # The sentiment classifier: cheap OpenAI model by default, the chat model elsewhere.
    assert s.effective_sentiment_model == "gpt-5.4-nano"
    local = load_settings(openai_base_url="http://localhost:11434/v1", openai_model="llama3")
    assert local.effective_sentiment_model == "llama3"
    # Telegram's cloud API downloads up to 20 MB; a self-hosted Bot API server more.
    assert load_settings(telegram_api_url="https://api.telegram.org").image_max_bytes == 20 * 2**20
    assert s.image_max_bytes == 50 * 2**20  # TELEGRAM_API_URL above is self-hosted
    assert load_settings(image_max_mb=5).image_max_bytes == 5 * 2**20
    with pytest.raises(ConfigError, match="TELEGRAM_BOT_TOKEN is empty"):
        load_settings(telegram_bot_token=" ")


async def test_python_m_bot_answers_and_stops_cleanly_on_sigterm(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    async with bot_process(tg, oai, tmp_path, LOG_LEVEL="DEBUG", DRAFT_INTERVAL="0.05") as proc:
        tg.push_message(100, "hello from a real process")
        # Default settings: replies carry a sentiment tag from the model analyzer.
        assert await tg.wait_sent(100, 1, timeout=30) == [
            "echo: hello from a real process\n\n😐 neutral"
        ]
        assert len(oai.classify_calls) == 2  # the user's message and the reply
        # The turn is logged before the update counts as done; let it finish, then stop.
        await asyncio.sleep(0.3)
        log = await sigterm(proc)
    assert "Parley started" in log and "Traceback" not in log
    assert f"event loop: {EXPECTED_LOOP}" in log
    assert TOKEN not in log and API_KEY not in log
    assert (tmp_path / "data" / "parley.sqlite3").exists()  # default DATABASE_URL, relative


async def test_python_m_bot_in_webhook_mode_answers_and_stops_cleanly_on_sigterm(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a free port for the bot to listen on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = "webhook-secret-for-the-test"
    tg.chat(100)
    async with bot_process(
        tg,
        oai,
        tmp_path,
        SENTIMENT_BACKEND="off",
        WEBHOOK_URL="https://bot.example.org/hook",
        WEBHOOK_LISTEN="127.0.0.1",
        WEBHOOK_PORT=str(port),
        WEBHOOK_SECRET=secret,
    ) as proc:
        await eventually(lambda: tg.calls_of("setWebhook"), timeout=30)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{port}/hook",
                json=private_text_update(1, 100, 1, "through the webhook"),
                headers={"X-Telegram-Bot-Api-Secret-Token": secret},
            ) as response,
        ):
            assert response.status == 200
        assert await tg.wait_sent(100, 1, timeout=30) == ["echo: through the webhook"]
        await asyncio.sleep(0.3)  # the turn is logged after the reply; let it land
        log = await sigterm(proc)
    assert "webhook mode: listening" in log and "Traceback" not in log
    assert f"event loop: {EXPECTED_LOOP}" in log


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_gives_the_commands_the_main_settings_and_the_readme(
    tmp_path: Path, flag: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot", flag],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr == ""
    out = result.stdout
    assert out.startswith("usage: python -m bot [check]\n")
    assert "python -m bot check" in out
    for setting in ("TELEGRAM_BOT_TOKEN", "OPENAI_API_KEY", "ADMIN_USER_IDS", "WEBHOOK_URL"):
        assert f"  {setting} " in out
    assert "/id" in out  # how an admin finds their id
    assert f"{ROOT / 'README.md'}\n" in out
    assert not (tmp_path / "data").exists()


def test_an_unknown_argument_is_one_usage_line_pointing_at_help(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot", "serve"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("usage: python -m bot [check]") and "--help" in line


def test_the_parley_console_script_is_the_same_entry_point(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "parley"
    if not script.exists():
        pytest.skip("the package is not installed here (pip install -e . makes `parley`)")
    env = _env()
    env.pop("PYTHONPATH")  # the installed package, as a user runs it
    result = subprocess.run(
        [str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: parley [check]\n") and "parley check" in result.stdout
    result = subprocess.run(
        [str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "TELEGRAM_BOT_TOKEN is not set" in result.stderr
