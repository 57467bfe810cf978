"""Several real bot processes behind one webhook, driven as Telegram would drive them.

`Replicas` starts N `python -m bot` processes in webhook mode (one WEBHOOK_SECRET and
WEBHOOK_URL for all, a port each) against the stand-in Telegram and OpenAI servers, and a
round-robin proxy in front (tests/stubs/proxy.py). `WebhookSender` plays Telegram's side
of the webhook: it posts updates with the secret header and delivers each one until it is
acknowledged with a 200 (Telegram redelivers on any other answer), one chat's updates one
after another. `Updates` builds the updates; `check_answers` reads what the stand-in
Telegram server received. Every wait here is bounded; `Replicas` kills its processes on
the way out whatever happened.

The benchmark (bench/replicas.py) uses the sender and the webhook settings too.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from bot.webhook import SECRET_HEADER
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.proxy import RoundRobinProxy
from tests.stubs.telegram_server import FakeTelegram, utf16_len

ROOT = Path(__file__).resolve().parents[1]
# What setWebhook is told (the stand-in, like Telegram, takes https only); the replicas
# serve its path on 127.0.0.1.
WEBHOOK_URL = "https://bot.example.org/hook"
WEBHOOK_PATH = "/hook"
WEBHOOK_SECRET = "replicas-webhook-secret"
START_TIMEOUT = 60.0  # seconds for a replica to answer /healthz after its start
STOP_TIMEOUT = 30.0  # seconds for a replica to exit after SIGTERM before it is killed
# A reply Telegram took but the bot had not recorded when it was killed is sent again by
# whoever handles the update next (the Bot API has no idempotency key; see
# tests/test_durability.py): a second copy is explained only if the first was sent this
# close before a kill, or read by the stand-in this soon after it.
IN_FLIGHT_AT_KILL = 0.5
READ_AFTER_KILL = 0.1


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the replicas keep theirs across restarts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def webhook_env(port: int, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    """The settings that put a replica in webhook mode on 127.0.0.1:`port`."""
    return {
        "WEBHOOK_URL": WEBHOOK_URL,
        "WEBHOOK_LISTEN": "127.0.0.1",
        "WEBHOOK_PORT": str(port),
        "WEBHOOK_SECRET": secret,
    }


def replica_env(database_url: str, **extra: str) -> dict[str, str]:
    """What every replica of a test runs with: the shared database, exact texts (sentiment
    off), no outgoing rate limit, quick drafts, one admin."""
    return {
        "DATABASE_URL": database_url,
        "SENTIMENT_BACKEND": "off",
        "TELEGRAM_MAX_RATE": "0",
        "TELEGRAM_GROUP_RATE": "0",
        "DRAFT_INTERVAL": "0.05",
        "ADMIN_USER_IDS": "42",
        "LOG_LEVEL": "INFO",
        "SHUTDOWN_GRACE": "5",
        **extra,
    }


class ReplicaFailed(AssertionError):
    """A replica did not start, or exited when it should be running; its log's tail says why."""


# -- the bot processes ------------------------------------------------------------------------


class Replica:
    """One `python -m bot` serving the webhook on its own port; it may be killed and started
    again on the same port (the proxy's list of backends does not change)."""

    def __init__(
        self, name: str, tg: FakeTelegram, oai: FakeOpenAI, workdir: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.tg, self.oai = tg, oai
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # A clean environment: nothing from the developer's shell or a .env leaks in.
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            "HOME": "/nonexistent",
            "TELEGRAM_BOT_TOKEN": tg.token,
            "TELEGRAM_API_URL": tg.url,
            "OPENAI_API_KEY": oai.api_key,
            "OPENAI_BASE_URL": oai.url,
            **env,
            **webhook_env(self.port, env.get("WEBHOOK_SECRET", WEBHOOK_SECRET)),
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.log_path = self.workdir / "bot.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Spawn the process; return once its /healthz answers 200."""
        assert not self.alive, f"{self.name} is already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot",
                cwd=self.workdir,
                env=self.env,
                stdout=log.fileno(),
                stderr=log.fileno(),
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.returncode is not None:
                    raise ReplicaFailed(
                        f"{self.name} exited with {self.proc.returncode} at start:\n"
                        + self.log_tail()
                    )
                try:
                    async with http.get(
                        self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)
                    ) as answer:
                        if answer.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    await self.kill()
                    raise ReplicaFailed(
                        f"{self.name} did not answer /healthz within {timeout:g} s:\n"
                        + self.log_tail()
                    )
                await asyncio.sleep(0.05)

    async def kill(self) -> float:
        """SIGKILL (no cleanup at all); the moment of the kill, time.monotonic()."""
        at = time.monotonic()
        if self.alive:
            assert self.proc is not None
            self.resume()  # a stopped process takes SIGKILL too, but leaves no doubt
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        return at

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, as a service manager stops it; killed if it outstays `timeout`. Its
        exit status (None if it had to be killed, or was not running)."""
        if not self.alive:
            return None
        assert self.proc is not None
        self.resume()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            return None

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets and leases but does nothing."""
        if self.alive:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive:
            os.kill(self.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(f"  [{self.name}] {line}" for line in text.splitlines()[-lines:])


class Replicas:
    """N replicas sharing `database_url`, behind a round-robin proxy; an async context
    manager that starts them all and, on the way out, stops them (killing what won't stop)."""

    def __init__(
        self,
        tg: FakeTelegram,
        oai: FakeOpenAI,
        workdir: Path,
        database_url: str,
        count: int,
        **env: str,
    ) -> None:
        base = replica_env(database_url, **env)
        self.replicas = [Replica(f"r{i}", tg, oai, workdir, base) for i in range(count)]
        self.proxy = RoundRobinProxy([r.url for r in self.replicas])
        self.sender = WebhookSender("", WEBHOOK_SECRET)

    async def __aenter__(self) -> Replicas:
        try:
            url = await self.proxy.start()
            self.sender.url = url + WEBHOOK_PATH
            # The first one alone: it migrates the database; then the others together.
            await self.replicas[0].start()
            started = await asyncio.gather(
                *(r.start() for r in self.replicas[1:]), return_exceptions=True
            )
            for outcome in started:
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await asyncio.gather(*(r.stop() for r in self.replicas), return_exceptions=True)
        finally:
            for replica in self.replicas:  # whatever the stops did: nothing outlives a test
                if replica.alive:
                    assert replica.proc is not None
                    replica.proc.kill()
                    await replica.proc.wait()
            await self.sender.close()
            await self.proxy.stop()

    async def stop_all(self) -> list[int | None]:
        """Stop every replica with SIGTERM, as at a deploy; their exit statuses."""
        return list(await asyncio.gather(*(r.stop() for r in self.replicas)))

    async def until(
        self,
        predicate: Callable[[], bool | Awaitable[bool]],
        timeout: float,
        what: str,
        state: Callable[[], object] | None = None,
    ) -> None:
        """Wait until `predicate` (sync or async) holds; after `timeout` seconds fail saying
        `what` did not happen, with `state()` (what the test sees) and the replicas' logs."""
        deadline = time.monotonic() + timeout
        while True:
            held = predicate()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            if time.monotonic() > deadline:
                seen = f"\n{state()}" if state is not None else ""
                raise AssertionError(f"{what}: not within {timeout:g} s{seen}\n{self.logs()}")
            await asyncio.sleep(0.05)

    def logs(self, lines: int = 30) -> str:
        return "\n".join(r.log_tail(lines) for r in self.replicas)

    def spread(self) -> dict[str, int]:
        """Webhook requests each replica answered through the proxy, by replica name."""
        return {r.name: self.proxy.forwarded[r.url] for r in self.replicas}


# -- Telegram's side of the webhook ---------------------------------------------------------


class DeliveryFailed(AssertionError):
    """An update was still not acknowledged with 200 when its time ran out."""


def chat_of(update: dict[str, Any]) -> int | None:
    """The chat an update belongs to (its message's, or its callback's message's)."""
    message = update.get("message") or (update.get("callback_query") or {}).get("message")
    return int(message["chat"]["id"]) if message else None


@dataclass
class DeliveryStats:
    delivered: int = 0  # updates acknowledged with 200
    attempts: int = 0  # POSTs made
    refusals: dict[int, int] = field(default_factory=dict)  # non-200 answers by status
    errors: int = 0  # connections that failed outright (the proxy itself away)


class WebhookSender:
    """Posts updates to the webhook as Telegram does: the secret header on each, at most
    `max_connections` at once (setWebhook's default), each update redelivered after any
    answer but 200 (backing off) until `give_up_after` seconds have passed."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        max_connections: int = 40,
        retry_first: float = 0.1,
        retry_max: float = 1.0,
        give_up_after: float = 120.0,
    ) -> None:
        self.url, self.secret = url, secret
        self.retry_first, self.retry_max = retry_first, retry_max
        self.give_up_after = give_up_after
        self.stats = DeliveryStats()
        self.failures: list[tuple[int, str]] = []  # (update_id, last answer) given up on
        self._slots = asyncio.Semaphore(max_connections)
        self._session: aiohttp.ClientSession | None = None
        self._last: dict[int | None, asyncio.Task[None]] = {}  # per chat: its latest delivery
        self._pending: set[asyncio.Task[None]] = set()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, update: dict[str, Any], url: str | None = None) -> None:
        """Deliver one update (to `url` instead of the proxy if given); return once it is
        acknowledged; DeliveryFailed if it never is."""
        deadline = time.monotonic() + self.give_up_after
        delay, last = self.retry_first, ""
        headers = {SECRET_HEADER: self.secret}
        while True:
            async with self._slots:
                self.stats.attempts += 1
                try:
                    async with self._http().post(
                        url or self.url, json=update, headers=headers
                    ) as answer:
                        await answer.read()
                        if answer.status == 200:
                            self.stats.delivered += 1
                            return
                        self.stats.refusals[answer.status] = (
                            self.stats.refusals.get(answer.status, 0) + 1
                        )
                        last = f"HTTP {answer.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.stats.errors += 1
                    last = type(exc).__name__
            if time.monotonic() + delay > deadline:
                self.failures.append((int(update["update_id"]), last))
                raise DeliveryFailed(f"update {update['update_id']} not delivered: {last}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    def deliver(self, update: dict[str, Any]) -> asyncio.Task[None]:
        """Send in the background, after the same chat's earlier updates are acknowledged
        (Telegram's order within a chat); `drain` waits for all of them."""
        chat = chat_of(update)
        before = self._last.get(chat)
        task = asyncio.create_task(self._after(before, update))
        self._last[chat] = task
        self._pending.add(task)
        task.add_done_callback(lambda t: self._finished(chat, t))
        return task

    async def _after(self, before: asyncio.Task[None] | None, update: dict[str, Any]) -> None:
        if before is not None:
            await asyncio.wait([before])  # its failure is counted there, not here
        try:
            await self.send(update)
        except DeliveryFailed:
            pass  # in self.failures

    def _finished(self, chat: int | None, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if self._last.get(chat) is task:
            del self._last[chat]

    async def drain(self, timeout: float) -> bool:
        """Wait until every background delivery is done; False on timeout."""
        if not self._pending:
            return True
        _, pending = await asyncio.wait(list(self._pending), timeout=timeout)
        return not pending


class Updates:
    """Updates as Telegram sends them, numbered in order; the chats are made known to the
    stand-in Telegram server (it refuses to send to a chat it does not know), and each
    update is checked against the Bot API spec when the stand-in has it."""

    def __init__(self, tg: FakeTelegram, first_update_id: int = 1) -> None:
        self.tg = tg
        self._ids = itertools.count(first_update_id)

    def _checked(self, update: dict[str, Any]) -> dict[str, Any]:
        if self.tg.spec is not None:
            problems = self.tg.spec.validate_object("Update", update)
            self.tg.violations += [f"webhook update: {p}" for p in problems]
        return update

    def text(self, chat_id: int, text: str, *, user_id: int | None = None) -> dict[str, Any]:
        """A text message in a private chat (a command when it starts with /)."""
        chat = self.tg.chats.get(chat_id) or self.tg.chat(chat_id)
        user_id = chat_id if user_id is None else user_id
        message: dict[str, Any] = {
            "message_id": self.tg.next_message_id(chat_id),
            "date": int(time.time()),
            "chat": chat,
            "from": {
                "id": user_id,
                "is_bot": False,
                "first_name": f"User{user_id}",
                "language_code": "en",
            },
            "text": text,
        }
        if text.startswith("/"):
            command = text.split()[0]
            message["entities"] = [
                {"type": "bot_command", "offset": 0, "length": utf16_len(command)}
            ]
        return self._checked({"update_id": next(self._ids), "message": message})

    def callback(self, user_id: int, chat_id: int, message_id: int, data: str) -> dict[str, Any]:
        """A press on an inline button under one of the bot's messages."""
        query = {
            "id": f"cb{next(self._ids)}",
            "chat_instance": f"ci{chat_id}",
            "data": data,
            "from": {
                "id": user_id,
                "is_bot": False,
                "first_name": f"User{user_id}",
                "language_code": "en",
            },
            "message": self.tg.messages[(chat_id, message_id)],
        }
        return self._checked({"update_id": next(self._ids), "callback_query": query})


# -- what the stand-in Telegram server received ----------------------------------------------


@dataclass
class AnswerReport:
    """How the answers to `expected` came out: each message's answer is its text echoed."""

    lost: list[str]  # messages never answered
    doubled: list[tuple[str, list[float]]]  # answered twice, not explained by a kill
    out_of_order: dict[int, list[str]]  # chat -> the order its answers came in
    answered: int  # messages answered at least once

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.out_of_order)


def answers_by_chat(tg: FakeTelegram, chats: Iterable[int]) -> dict[int, list[tuple[float, str]]]:
    """(when the stand-in read it, text) of each message delivered to each chat, in order."""
    wanted = set(chats)
    out: dict[int, list[tuple[float, str]]] = {c: [] for c in wanted}
    for call in tg.calls_of("sendMessage"):
        if call.status == 200 and int(call.params["chat_id"]) in wanted:
            out[int(call.params["chat_id"])].append((call.at, str(call.params["text"])))
    return out


def check_answers(
    tg: FakeTelegram,
    expected: dict[int, list[str]],
    killed_at: Iterable[float] = (),
    prefix: str = "echo: ",
) -> AnswerReport:
    """Every message in `expected` (chat -> its texts, in the order sent) answered, once,
    in order per chat. A second copy counts only if it cannot be explained by a kill
    (see IN_FLIGHT_AT_KILL)."""
    kills = list(killed_at)
    sends = answers_by_chat(tg, expected)
    lost: list[str] = []
    doubled: list[tuple[str, list[float]]] = []
    out_of_order: dict[int, list[str]] = {}
    answered = 0
    for chat, texts in expected.items():
        got = [(at, text.removeprefix(prefix)) for at, text in sends[chat]]
        for text in texts:
            copies = [at for at, t in got if t == text]
            if not copies:
                lost.append(text)
                continue
            answered += 1
            if not all(
                any(-READ_AFTER_KILL <= kill - at <= IN_FLIGHT_AT_KILL for kill in kills)
                for at in copies[:-1]
            ):
                near = [round(_to_nearest(kills, at), 3) for at in copies] if kills else copies
                doubled.append((text, near))
        order = [t for _, t in got]
        firsts = sorted(set(order), key=order.index)
        if firsts != [t for t in texts if t in firsts]:
            out_of_order[chat] = order
    return AnswerReport(lost, doubled, out_of_order, answered)


def _to_nearest(kills: list[float], at: float) -> float:
    """Seconds from `at` to the nearest kill (negative: the kill came first)."""
    distances: list[float] = [k - at for k in kills]
    return min(distances, key=abs)


def all_answered(tg: FakeTelegram, expected: dict[int, list[str]], prefix: str = "echo: ") -> bool:
    """Whether every message in `expected` has at least one answer."""
    for chat, texts in expected.items():
        got = {t.removeprefix(prefix) for t in tg.sent_texts(chat)}
        if not got.issuperset(texts):
            return False
    return True
