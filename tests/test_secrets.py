"""No path prints a secret; admin output reaches only the admin's own chat; a wrong webhook
secret cannot flood the log. Issue 17, "Secrets".
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from itertools import pairwise
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bot.app import ALLOWED_UPDATES, build_application
from bot.logs import REDACTED, LogThrottle, setup_logging
from bot.texts import t
from bot.webhook import SECRET_HEADER, serving
from tests.conftest import SettingsFactory, local_http, running, settled
from tests.stubs.openai_server import API_KEY, FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram, private_text_update
from tests.test_cli import _env
from tests.test_guards_admin import ADMIN, ARGS, _admin_handlers
from tests.test_webhook_check import _run_check

# A token the stand-in Bot API does not know: it answers 401, and PTB's InvalidToken then
# names the token in its message.
REJECTED = "987654321:AAWrongTokenForTheSecretsTest-abcdefgh"
SECRET_HALF = REJECTED.split(":", 1)[1]


# -- start-up failures that carry the token, through the real process --------------------------


@asynccontextmanager
async def _garbage_bot_api() -> AsyncIterator[str]:
    """A "Bot API server" that answers every request with malformed HTTP; its URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n{not json")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def _failed_start(api_url: str, oai: FakeOpenAI, cwd: Path) -> str:
    """Run `python -m bot` until it gives up; all it printed, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        cwd=cwd,
        env=_env(
            TELEGRAM_BOT_TOKEN=REJECTED,
            TELEGRAM_API_URL=api_url,
            OPENAI_API_KEY=API_KEY,
            OPENAI_BASE_URL=oai.url,
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode != 0  # it could not start
    return out.decode() + err.decode()


@pytest.mark.parametrize("answer", ["rejected token", "malformed HTTP"])
async def test_a_start_up_failure_that_names_the_token_never_prints_it(
    tg: FakeTelegram, oai: FakeOpenAI, tmp_path: Path, answer: str
) -> None:
    if answer == "rejected token":
        output = await _failed_start(tg.url, oai, tmp_path)
        # PTB's InvalidToken quotes the token; the one line said instead doesn't.
        assert "Telegram refused TELEGRAM_BOT_TOKEN" in output
    else:
        async with _garbage_bot_api() as url:
            output = await _failed_start(url, oai, tmp_path)
        # aiohttp's error, with the request's URL, in the one line: redacted.
        assert "Content-Length" in output and REDACTED in output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert REJECTED not in output and SECRET_HALF not in output and API_KEY not in output


@asynccontextmanager
async def _path_quoting_bot_api() -> AsyncIterator[str]:
    """A "Bot API server" (a proxy, say) that refuses every request quoting its path, token
    and all, in the description; its URL. PTB capitalizes a description: the rest of it,
    the token's secret half included, reaches the bot lowercased."""

    async def answer(request: web.Request) -> web.Response:
        description = f"Bad Request: no route for {request.path}"
        body = {"ok": False, "error_code": 400, "description": description}
        return web.json_response(body, status=400)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    async with local_http(app) as url:
        yield url


async def test_a_token_a_server_quotes_back_lowercased_is_never_printed(
    oai: FakeOpenAI, tmp_path: Path
) -> None:
    async with _path_quoting_bot_api() as url:
        started = await _failed_start(url, oai, tmp_path)
        code, checked = await _run_check(
            _env(
                TELEGRAM_BOT_TOKEN=REJECTED,
                TELEGRAM_API_URL=url,
                OPENAI_API_KEY=API_KEY,
                OPENAI_BASE_URL=oai.url,
                DATABASE_URL=f"sqlite:///{tmp_path / 'check.sqlite3'}",
            ),
            tmp_path,
        )
    assert code == 1
    for output in (started, checked):
        assert "no route for /bot" in output.lower()  # the server's words are shown...
        assert SECRET_HALF.lower() not in output.lower()  # ...without the token, in any case
        assert REDACTED in output
    assert len(started.strip().splitlines()) == 1 and "Traceback" not in started


# -- what Python prints by itself ----------------------------------------------------------------


@contextmanager
def _logging_to(secrets: list[str]) -> Iterator[io.StringIO]:
    """`setup_logging` into a buffer; the process-wide hooks it sets are put back after."""
    root = logging.getLogger()
    saved = (
        root.handlers[:],
        root.level,
        sys.excepthook,
        threading.excepthook,
        sys.unraisablehook,
        warnings.showwarning,
    )
    out = io.StringIO()
    setup_logging("INFO", secrets, stream=out)
    try:
        yield out
    finally:
        root.handlers[:], level, sys.excepthook, threading.excepthook = saved[:4]
        sys.unraisablehook, warnings.showwarning = saved[4:]
        root.setLevel(level)


class _LeaksOnCollection:
    def __del__(self) -> None:
        raise RuntimeError(f"in a destructor: {REJECTED}")


def _raise_in_thread() -> None:
    raise RuntimeError(f"in a thread: {REJECTED}")


def test_uncaught_exceptions_ignored_ones_and_warnings_go_through_the_filter() -> None:
    with _logging_to([REJECTED, API_KEY]) as out:
        try:
            raise RuntimeError(f"uncaught: {REJECTED}")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
        thread = threading.Thread(target=_raise_in_thread, name="leaky")
        thread.start()
        thread.join()
        _LeaksOnCollection()  # collected at once: its __del__ raises, "Exception ignored"
        warnings.showwarning(UserWarning(f"a warning: {API_KEY}"), UserWarning, "x.py", 1)
        text = out.getvalue()
    assert "uncaught exception\n" in text and "uncaught: " in text
    assert "uncaught exception in thread leaky" in text and "in a thread: " in text
    assert "Exception ignored in" in text and "in a destructor: " in text
    assert "a warning: " in text
    assert text.count(REDACTED) >= 4
    assert REJECTED not in text and SECRET_HALF not in text and API_KEY not in text


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_the_event_loops_exception_handler_goes_through_the_filter(loop_kind: str) -> None:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    with _logging_to([REJECTED]) as out:
        try:
            loop.call_exception_handler(
                {"message": f"a callback failed: {REJECTED}", "exception": RuntimeError(REJECTED)}
            )
        finally:
            loop.close()
        text = out.getvalue()
    assert "a callback failed" in text and "RuntimeError" in text
    assert REJECTED not in text and SECRET_HALF not in text and text.count(REDACTED) >= 2


def test_a_secret_is_also_hidden_url_encoded() -> None:
    with _logging_to([REJECTED]) as out:
        logging.getLogger("test").warning("GET /bot987654321%3A" + SECRET_HALF + "/getMe")
        text = out.getvalue()
    assert SECRET_HALF not in text and REDACTED in text


# -- admin output only in the admin's own private chat ------------------------------------------

FORGED_PRIVATE = 555  # someone's private chat, in an update claiming to come from the admin
GROUP = -700
PRIVATE_ONLY = t("admin.private_only")


async def test_admin_commands_run_only_in_the_admins_own_private_chat(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()) as app:
        # Enough logged turns for /train and /export to have a dataset to give away.
        for chat in range(1000, 1012):
            tg.push_message(chat, f"question {chat}: tell me about topic {chat}")
        for chat in range(1000, 1012):
            await tg.wait_sent(chat, 1)
        await settled(app)
        services = app.bot_data.services
        assert services is not None
        commands = sorted({c for h in _admin_handlers(app) for c in getattr(h, "commands", ())})
        tg.chat(FORGED_PRIVATE)
        tg.chat(GROUP, "supergroup")
        for chat, chat_type in ((FORGED_PRIVATE, "private"), (GROUP, "supergroup")):
            for n, command in enumerate(commands, 1):
                text = f"/{command} {ARGS.get(command, '')}".strip()
                tg.push_message(chat, text, user_id=ADMIN, chat_type=chat_type)
                assert (await tg.wait_sent(chat, n))[-1] == PRIVATE_ONLY, (chat, command)
        # The admin's buttons, pressed outside their chat: an alert, nothing done.
        mid = max(m for c, m in tg.messages if c == GROUP)
        for data in ("ft:start:token", "ft:drop:token", "ft:use:ftjob-1"):
            tg.push_callback(ADMIN, GROUP, mid, data)
        await tg.wait_for(lambda: len(tg.calls_of("answerCallbackQuery")) == 3)
        assert {c.params.get("text") for c in tg.calls_of("answerCallbackQuery")} == {PRIVATE_ONLY}
        await settled(app)
        assert services.models.current == "gpt-5.4-mini"
        # The same command in the admin's own chat does give the dataset: there was one.
        tg.chat(ADMIN)
        tg.push_message(ADMIN, "/export", user_id=ADMIN)
        await tg.wait_for(lambda: bool(tg.calls_of("sendDocument")))
    leaked = {"sendDocument", "sendPhoto", "editMessageText"}
    assert {c.params["chat_id"] for c in tg.calls if c.method in leaked} == {str(ADMIN)}
    assert oai.files == {} and oai.jobs == {}


# -- a wrong webhook secret, a thousand times ---------------------------------------------------

SECRET = "the-right-webhook-secret"


async def test_a_thousand_requests_with_a_wrong_secret_log_one_line(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(
        webhook_url="https://bot.example.org/hook",
        webhook_listen="127.0.0.1",
        webhook_port=0,
        webhook_secret=SECRET,
    )
    caplog.set_level(logging.INFO)
    async with (
        serving(build_application(settings), settings, ALLOWED_UPDATES) as port,
        aiohttp.ClientSession() as http,
    ):
        url = f"http://127.0.0.1:{port}/hook"
        body = private_text_update(1, 100, 1, "forged")

        async def refused(n: int) -> int:
            headers = {SECRET_HEADER: f"guess-{n}"} if n % 2 else {}
            async with http.post(url, json=body, headers=headers) as response:
                return response.status

        for batch in range(0, 1000, 100):
            statuses = await asyncio.gather(*(refused(n) for n in range(batch, batch + 100)))
            assert set(statuses) == {403}
    lines = [r for r in caplog.records if "secret token" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert oai.calls == [] and SECRET not in caplog.text


def test_the_refusal_line_is_then_a_summary_at_most_once_a_minute() -> None:
    now = [0.0]
    throttle = LogThrottle(60.0, clock=lambda: now[0])
    logged: list[tuple[float, int]] = []
    for second in range(600):  # ten minutes of five refusals a second
        for _ in range(5):
            now[0] = float(second)
            if count := throttle.hit():
                logged.append((now[0], count))
    assert logged[0] == (0.0, 1)  # the first at once
    assert len(logged) == 10 and all(b - a >= 60 for (a, _), (b, _) in pairwise(logged))
    # Each line counts the refusals since the one before: all of them up to the last line.
    assert sum(count for _, count in logged) == 540 * 5 + 1
