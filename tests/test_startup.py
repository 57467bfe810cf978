"""Start-up failures and `python -m bot check` as a user meets them: real processes against
the stand-in servers. A start that fails says so in one line (what failed, what to check),
exits non-zero and leaves nothing open; `check` judges the configuration as the bot does and
changes nothing. Also /id and /start, which tell an admin the id ADMIN_USER_IDS takes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bot.app import ALLOWED_UPDATES, build_application
from bot.startup import StartupError
from bot.texts import t
from bot.webhook import serving
from storage.db import Store
from storage.migrations import MIGRATIONS
from tests.conftest import TOKEN, SettingsFactory, eventually, running
from tests.stubs.openai_server import API_KEY, FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram
from tests.test_cli import _env, spawn_bot
from tests.test_webhook_check import _run_check

NOBODY = 65534


async def _failed_start(
    tg: FakeTelegram, oai: FakeOpenAI, cwd: Path, *, user: int | None = None, **env: str
) -> tuple[int, str]:
    """Run the bot, which must stop by itself; its exit status and stderr."""
    proc = await spawn_bot(tg, oai, cwd, user=user, **env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:  # it started after all: the test fails below
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    assert out == b""
    return proc.returncode, err.decode()


def _the_line(stderr: str) -> str:
    """The one line a failed start prints: nothing else, no traceback, nothing left open."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "Unclosed" not in stderr, stderr
    assert TOKEN not in stderr and API_KEY not in stderr
    assert lines[0].startswith("parley: ")
    return lines[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- Telegram --------------------------------------------------------------------------------


async def test_a_wrong_or_revoked_token_is_one_line_and_leaves_nothing_open(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    wrong = "123456789:AARevokedTokenNobodyShouldSee-xyz"
    code, err = await _failed_start(tg, oai, tmp_path, TELEGRAM_BOT_TOKEN=wrong)
    assert code == 1
    line = _the_line(err)
    assert "Telegram refused TELEGRAM_BOT_TOKEN" in line and "@BotFather" in line
    assert wrong not in err  # PTB's own message quotes the token
    assert not (tmp_path / "data").exists()  # it stopped before opening the database


async def test_unreachable_telegram_is_one_line_naming_the_url(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    code, err = await _failed_start(tg, oai, tmp_path, TELEGRAM_API_URL=nowhere)
    assert code == 1
    line = _the_line(err)
    assert f"cannot reach Telegram at {nowhere}" in line and "TELEGRAM_API_URL" in line


# -- the database ----------------------------------------------------------------------------


@contextmanager
def _shared_dir() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="parley-startup-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for sub in sorted(path.rglob("*"), reverse=True):
            if sub.is_dir():
                sub.chmod(0o755)
                sub.rmdir()
            else:
                sub.unlink()
        path.rmdir()


def _unprivileged() -> int | None:
    """The user to run the bot as so that permissions apply: nobody when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        subprocess.run([sys.executable, "-c", ""], user=NOBODY, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("as root, and this Python can't be run as nobody to make permissions apply")
    return NOBODY


async def test_a_database_folder_this_user_cant_write_is_one_line(
    tg: FakeTelegram, oai: FakeOpenAI
) -> None:
    user = _unprivileged()  # root writes anywhere: the bot runs as nobody, as a service would
    with _shared_dir() as cwd:
        data = cwd / "data"
        data.mkdir(mode=0o555)
        data.chmod(0o555)  # the umask may have taken bits off
        code, err = await _failed_start(tg, oai, cwd, user=user)
        assert list(data.iterdir()) == []
    assert code == 1
    line = _the_line(err)
    assert "cannot open the database data/parley.sqlite3" in line
    assert "DATABASE_URL" in line and "may write to data" in line


@pytest.mark.parametrize(
    ("blocker", "reason"),
    [("data", "(File exists: data)"), ("data/parley.sqlite3", "(unable to open database file)")],
    ids=["folder-is-a-file", "database-is-a-folder"],
)
async def test_a_database_that_cant_be_opened_is_one_line(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, blocker: str, reason: str
) -> None:
    if blocker == "data":
        (tmp_path / "data").write_text("not a folder")
    else:
        (tmp_path / blocker).mkdir(parents=True)
    code, err = await _failed_start(tg, oai, tmp_path)
    assert code == 1
    line = _the_line(err)
    assert f"cannot open the database data/parley.sqlite3 {reason}" in line
    assert "check DATABASE_URL" in line


# -- the model endpoints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OPENAI_API_KEY": "sk-wrong-key-0000"}, "refused OPENAI_API_KEY (HTTP 401)"),
        (
            {"FINE_TUNE_BASE_URL": "<oai>", "FINE_TUNE_API_KEY": "wrong-trainer-key"},
            "refused FINE_TUNE_API_KEY (HTTP 401)",
        ),
        ({"SERVE_BASE_URL": "<oai>"}, "wants a key: set SERVE_API_KEY"),
        (
            {"EVAL_BASE_URL": "<oai>", "EVAL_API_KEY": "wrong-judge-key"},
            "refused EVAL_API_KEY (HTTP 401)",
        ),
        ({"EVAL_BASE_URL": "<oai>"}, "wants a key: set EVAL_API_KEY"),
    ],
    ids=["chat-key", "trainer-key", "serving-no-key", "judge-key", "judge-no-key"],
)
async def test_a_model_endpoint_refusing_the_key_is_one_line_before_telegram_is_asked(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, env: dict[str, str], named: str
) -> None:
    env = {k: v.replace("<oai>", oai.url) for k, v in env.items()}
    code, err = await _failed_start(tg, oai, tmp_path, **env)
    assert code == 1
    line = _the_line(err)
    assert f"the model API at {oai.url} {named}" in line
    assert not any(v in err for k, v in env.items() if k.endswith("_KEY"))
    assert tg.calls == []  # it failed fast: Telegram was never asked


@pytest.mark.parametrize(
    ("url_var", "label"), [("SERVE_BASE_URL", "Serving"), ("EVAL_BASE_URL", "Evaluation")]
)
async def test_an_unreachable_model_endpoint_is_logged_and_the_bot_starts(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, url_var: str, label: str
) -> None:
    nowhere = f"http://127.0.0.1:{_free_port()}/v1"
    log = tmp_path / "bot.log"
    with log.open("wb") as out:
        proc = await spawn_bot(tg, oai, tmp_path, output_fd=out.fileno(), **{url_var: nowhere})
    try:
        await eventually(
            lambda: "Parley started" in log.read_text() or proc.returncode is not None, 60
        )
        assert proc.returncode is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.read_text()
    said = f"{label}: could not list models at {nowhere} (could not connect); starting anyway"
    assert said in text
    assert "Traceback" not in text


async def test_offline_the_one_line_is_telegram_not_the_model_endpoint_too(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    """No network at all: neither Telegram nor the model API answers. The start stops on
    Telegram in one line; the model endpoint out of reach is not said before it."""
    code, err = await _failed_start(
        tg,
        oai,
        tmp_path,
        TELEGRAM_API_URL=f"http://127.0.0.1:{_free_port()}",
        OPENAI_BASE_URL=f"http://127.0.0.1:{_free_port()}/v1",
    )
    assert code == 1
    assert "cannot reach Telegram at" in _the_line(err)


@pytest.mark.parametrize("env_file", [False, True], ids=["no-env-file", "env-file"])
def test_a_missing_setting_says_where_settings_come_from(tmp_path: Path, env_file: bool) -> None:
    """The first-run slip: the .env file is in another folder. Said only when there is none."""
    if env_file:
        (tmp_path / ".env").write_text("LOG_LEVEL=INFO\n")
    for command in (["-m", "bot"], ["-m", "bot", "check"]):
        result = subprocess.run(
            [sys.executable, *command],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        said = (result.stderr + result.stdout).strip()
        assert len(said.splitlines()) == 1 and "TELEGRAM_BOT_TOKEN is not set" in said, said
        hint = f"(no .env file in {tmp_path}: set it there or in the environment)"
        assert (hint in said) is not env_file, said


# -- the profiles file -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read"), ("[profiles.poet\n", "is not valid TOML")],
    ids=["missing", "broken"],
)
async def test_a_missing_or_broken_profiles_file_is_one_line(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, content: str | None, expected: str
) -> None:
    if content is not None:
        (tmp_path / "profiles.toml").write_text(content)
    code, err = await _failed_start(tg, oai, tmp_path, PROFILES_FILE="profiles.toml")
    assert code == 2
    line = _the_line(err)
    assert "PROFILES_FILE" in line and expected in line
    assert tg.calls == []


# -- webhook mode ----------------------------------------------------------------------------


async def test_a_webhook_port_in_use_is_one_line_after_the_log(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = await _failed_start(
            tg,
            oai,
            tmp_path,
            WEBHOOK_URL="https://bot.example.org/hook",
            WEBHOOK_LISTEN="127.0.0.1",
            WEBHOOK_PORT=str(port),
        )
    assert code == 1
    # The database was opened (and migrated, which the log says) before the port was tried.
    assert "Traceback" not in err and "Unclosed" not in err and "Parley started" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"parley: cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert "WEBHOOK_PORT" in last
    assert tg.calls_of("setWebhook") == []


async def test_a_webhook_start_that_fails_after_post_init_stops_what_post_init_started(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    def background() -> list[asyncio.Task[object]]:
        names = ("ProgressGate.watch_lag", "FineTuner.run")
        return [
            task
            for task in asyncio.all_tasks()
            if not task.done() and getattr(task.get_coro(), "__qualname__", "") in names
        ]

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = make_settings(
            webhook_url="https://bot.example.org/hook",
            webhook_listen="127.0.0.1",
            webhook_port=taken.getsockname()[1],
            webhook_secret="s3cret",
            progress_shed_lag=0.1,  # the lag watcher runs
        )
        app = build_application(settings)
        with pytest.raises(StartupError, match="cannot listen on"):
            async with serving(app, settings, ALLOWED_UPDATES):
                pass
    assert background() == []
    assert app.bot_data.services is None  # post_shutdown ran: the store is closed


async def test_a_webhook_url_telegram_refuses_is_one_line_naming_it(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    code, err = await _failed_start(
        tg,
        oai,
        tmp_path,
        LOG_LEVEL="WARNING",
        WEBHOOK_URL="http://bot.example.org/hook",  # Telegram takes https only
        WEBHOOK_LISTEN="127.0.0.1",
        WEBHOOK_PORT="0",
    )
    assert code == 1
    line = _the_line(err)
    assert "Telegram refused the webhook http://bot.example.org/hook" in line
    assert "WEBHOOK_URL" in line


# -- check -----------------------------------------------------------------------------------


def _check_env(tg: FakeTelegram, oai: FakeOpenAI, **values: str) -> dict[str, str]:
    """What `check` runs with: the stand-ins, changed by `values` ("" removes a setting)."""
    env = _env(
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_API_URL=tg.url,
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=oai.url,
    )
    env.update(values)
    return {k: v for k, v in env.items() if v}


@pytest.mark.parametrize(
    ("change", "expected", "refused"),
    [
        (
            {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""},
            "✗ Configuration: OPENAI_API_KEY is not set",
            "OPENAI_API_KEY is not set",
        ),
        (
            {"PROFILES_FILE": "nowhere.toml"},
            "✗ Configuration: PROFILES_FILE: cannot read nowhere.toml",
            "PROFILES_FILE: cannot read nowhere.toml",
        ),
    ],
    ids=["no-openai-key", "no-profiles-file"],
)
async def test_check_refuses_what_the_bot_refuses(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    tmp_path: Path,
    change: dict[str, str],
    expected: str,
    refused: str,
) -> None:
    env = _check_env(tg, oai, **change)
    code, out = await _run_check(env, tmp_path)
    assert code == 1 and expected in out, out
    assert "✓ Configuration" not in out and "Traceback" not in out
    assert "✓ Telegram: reached" in out  # the other checks still ran
    # The bot refuses the same configuration, for the same reason.
    bot = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(bot.communicate(), 60)
    assert bot.returncode == 2 and refused in err.decode()


async def test_check_does_not_create_the_database(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    code, out = await _run_check(_check_env(tg, oai), tmp_path)  # default DATABASE_URL
    assert code == 0, out
    expected = "✓ Database: data/parley.sqlite3 does not exist yet; the bot creates it"
    assert expected in out
    assert os.listdir(tmp_path) == []  # not even its folder


async def test_check_reads_an_existing_database_without_changing_it(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "db" / "parley.sqlite3"
    store = await Store.open(path)
    await store.close()
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    env = _check_env(tg, oai, DATABASE_URL=f"sqlite:///{path}")
    code, out = await _run_check(env, tmp_path)
    assert code == 0, out
    latest = max(m.version for m in MIGRATIONS)
    assert f"✓ Database: {path} (schema {latest})" in out
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before  # no -wal, -shm

    # An older schema: the migrations the next start applies are counted.
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM schema_migrations WHERE version = ?", (latest,))
    db.close()
    code, out = await _run_check(env, tmp_path)
    assert f"✓ Database: {path} (schema {latest - 1}, 1 migrations to apply at start)" in out


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        ("file-as-folder", "✗ Database: cannot create {path}: {tmp}/data is not a folder"),
        ("not-sqlite", "✗ Database: {path} cannot be read (file is not a database)"),
        ("other-sqlite", "✗ Database: {path} is not a Parley database"),
    ],
)
async def test_check_reports_a_database_the_bot_could_not_use(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, make: str, expected: str
) -> None:
    path = tmp_path / "data" / "parley.sqlite3"
    if make == "file-as-folder":
        (tmp_path / "data").write_text("a file")
    else:
        path.parent.mkdir()
        if make == "not-sqlite":
            path.write_bytes(b"x" * 4096)
        else:
            with sqlite3.connect(path) as db:
                db.execute("CREATE TABLE notes (text TEXT)")
            db.close()
    env = _check_env(tg, oai, DATABASE_URL=f"sqlite:///{path}")
    code, out = await _run_check(env, tmp_path)
    assert code == 1 and expected.format(path=path, tmp=tmp_path) in out, out


async def test_check_asks_the_evaluation_endpoint_for_the_judge_model(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    """EVAL_BASE_URL is a model endpoint like the others: its key and EVAL_JUDGE_MODEL."""
    judge = {"EVAL_BASE_URL": oai.url, "EVAL_API_KEY": API_KEY, "EVAL_JUDGE_MODEL": "gpt-4.1-mini"}
    code, out = await _run_check(_check_env(tg, oai, **judge), tmp_path)
    assert code == 0, out
    assert f"✓ Evaluation: reached {oai.url}, " in out
    assert "✓ EVAL_JUDGE_MODEL gpt-4.1-mini is available" in out

    code, out = await _run_check(
        _check_env(tg, oai, **{**judge, "EVAL_JUDGE_MODEL": "judge-imaginary"}), tmp_path
    )
    assert code == 1 and "✗ EVAL_JUDGE_MODEL judge-imaginary is not available there" in out, out

    wrong = "judge-key-nobody-should-see"
    code, out = await _run_check(_check_env(tg, oai, **{**judge, "EVAL_API_KEY": wrong}), tmp_path)
    expected = f"✗ Evaluation: could not list models at {oai.url}: API key refused"
    assert code == 1 and f"{expected} (check EVAL_API_KEY)" in out, out
    assert wrong not in out

    # Unset, the judge is the chat endpoint's: no line of its own.
    code, out = await _run_check(_check_env(tg, oai), tmp_path)
    assert code == 0 and "Evaluation" not in out and "EVAL_" not in out, out


async def test_check_says_what_went_wrong_in_words(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{_free_port()}/v1"
    code, out = await _run_check(_check_env(tg, oai, OPENAI_BASE_URL=nowhere), tmp_path)
    expected = f"✗ OpenAI: could not list models at {nowhere}: could not connect"
    assert code == 1 and f"{expected} (check the network and OPENAI_BASE_URL)" in out, out
    telegram = f"http://127.0.0.1:{_free_port()}"
    code, out = await _run_check(_check_env(tg, oai, TELEGRAM_API_URL=telegram), tmp_path)
    [line] = [line for line in out.splitlines() if line.startswith("✗ Telegram")]
    assert line.startswith(f"✗ Telegram: could not reach {telegram} (")
    assert line.endswith("): check the network and TELEGRAM_API_URL"), line


# -- /id and /start --------------------------------------------------------------------------


async def test_id_and_start_tell_a_user_their_id(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()):
        tg.push_message(100, "/id", user_id=100)
        assert await tg.wait_sent(100, 1) == [t("id.user", user_id=100)]
        tg.push_message(-1001, "/id", user_id=7, chat_type="supergroup")
        assert await tg.wait_sent(-1001, 1) == [
            t("id.user", user_id=7) + "\n" + t("id.chat", chat_id=-1001)
        ]
        tg.push_message(100, "/start", user_id=100)
        start = (await tg.wait_sent(100, 2))[1]
        assert start.endswith("\n\n" + t("id.user", user_id=100))
        assert "/id" in start  # the command list names it
    assert oai.calls == []
