"""Benchmark replicas (#16): 1, 2 and 4 bot processes on PostgreSQL beside one on SQLite.

    python bench/replicas.py [--quick] [--replicas 1,2,4] [--pg URL] [--json]

Every setup runs in one go on this machine: real `python -m bot` processes in webhook mode
behind the round-robin proxy (tests/stubs/proxy.py, its own process), the stand-in
Telegram and OpenAI servers in a process of their own (bench/standins.py's, with updates
sent to the webhook instead of getUpdates: `python -m bench.replicas standins`). Each
PostgreSQL setup gets a fresh schema in the server at --pg (PARLEY_BENCH_PG, else the
tests' PARLEY_TEST_PG or postgresql://postgres@127.0.0.1:5432/test), dropped afterwards.

Figures, per setup:
  burst      1,000 chats x 1 message, model latency 1 s: first update sent to the webhook
             -> last reply received; the bot processes' CPU (user+system, summed over
             the replicas, /proc) per message over the burst; and the PostgreSQL server's
             (all its processes on this machine, whoever they work for).
  overhead   per message, model instant, messages one at a time (bench/run.py's
             `overhead`): (sendMessage received) - (update sent to the webhook) - (model
             call); it includes the proxy hop and the inbox write. (The CPU figure its
             log line shows is the first replica's alone.)

A setup the bot can't run (PostgreSQL unreachable, a DATABASE_URL it refuses) is reported
with the reason, and the others still run. Only 127.0.0.1 is used; every wait has a
timeout and every process started here is stopped (killed if it must be) on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from aiohttp import web  # noqa: E402

from bench.run import (  # noqa: E402
    PY,
    Bot,
    Control,
    Standins,
    _clean_env,
    _code_state,
    _loadavg,
    _opener,
    _terminate,
    log,
    machine,
    new_chats,
    overhead,
    pct,
    proc_cpu,
    records,
    rotation,
)
from bench.standins import (  # noqa: E402
    TOKEN,
    BenchOpenAI,
    BenchTelegram,
    Recorder,
    run_control,
)
from bench.standins import Control as StandinsControl  # noqa: E402
from tests.pg import server_url, with_schema  # noqa: E402
from tests.replicas import WEBHOOK_PATH, WebhookSender, free_port, webhook_env  # noqa: E402

BURST_CHATS = 1000
BURST_LATENCY = 1.0
SECRET = "bench-replicas-secret"


# -- the stand-ins' side: updates go to the webhook -------------------------------------------


class WebhookTelegram(BenchTelegram):
    """The bench's stand-in Telegram, sending what it is pushed to the webhook (through
    `sender`) instead of keeping it for getUpdates. An update's `injected` time is still
    the moment it was pushed: delivering it is part of what the bot costs."""

    def __init__(self, token: str, rec: Recorder) -> None:
        super().__init__(token, rec)
        self.sender: WebhookSender | None = None

    def push_bulk(self, messages: list[dict[str, Any]]) -> list[str]:
        tokens = super().push_bulk(messages)
        if self.sender is not None and messages:
            fresh = self._updates[-len(messages) :]
            del self._updates[-len(messages) :]
            for update in fresh:
                self.sender.deliver(update)
        return tokens


class WebhookControl(StandinsControl):
    """bench/standins.py's control API, plus where the webhook is:
    POST /_control/webhook {"url": ..., "secret": ..., "max_connections": 40}
    GET  /_control/deliveries  the sender's counts (delivered, attempts, refusals, failures)
    """

    tg: WebhookTelegram

    def routes(self, app: web.Application) -> None:
        super().routes(app)
        app.router.add_post("/_control/webhook", self.webhook)
        app.router.add_get("/_control/deliveries", self.deliveries)

    async def webhook(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.tg.sender is not None:
            await self.tg.sender.close()
        self.tg.sender = WebhookSender(
            body["url"], body["secret"], max_connections=int(body.get("max_connections", 40))
        )
        return web.json_response({"ok": True})

    async def deliveries(self, request: web.Request) -> web.Response:
        sender = self.tg.sender
        if sender is None:
            return web.json_response({"delivered": 0, "attempts": 0, "refusals": {}, "failed": 0})
        stats = sender.stats
        return web.json_response(
            {
                "delivered": stats.delivered,
                "attempts": stats.attempts,
                "refusals": stats.refusals,
                "failed": len(sender.failures),
            }
        )


async def serve_standins(port_file: str | None) -> None:
    rec = Recorder()
    tg = WebhookTelegram(TOKEN, rec)
    oai = BenchOpenAI(rec)
    control = WebhookControl(tg, oai, rec)
    try:
        await run_control(tg, oai, control, port_file)
    finally:
        if tg.sender is not None:
            await tg.sender.close()


class WebhookStandins(Standins):
    """bench/run.py's stand-ins process, started as this module's `standins` command."""

    def start(self, timeout: float = 20.0) -> Control:
        port_file = self.workdir / "standins.json"
        self.log = open(self.workdir / "standins.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "bench.replicas", "standins", "--port-file", str(port_file)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=_clean_env(),
        )
        self.info = _await_port_file(self.proc, port_file, timeout, self.workdir / "standins.log")
        return Control(self.info["control"])


def _await_port_file(
    proc: subprocess.Popen[bytes], port_file: Path, timeout: float, log_path: Path
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{port_file.stem} did not start; see {log_path}")
        time.sleep(0.05)
    info: dict[str, Any] = json.loads(port_file.read_text())
    return info


# -- the bot processes and the proxy ----------------------------------------------------------


class SetupFailed(RuntimeError):
    """A setup could not run; the message says why (one line)."""


class Replica(Bot):
    """bench/run.py's bot process in webhook mode on a port of its own; ready once its
    /healthz answers (there is no first long poll to wait for)."""

    def __init__(
        self, workdir: Path, standins: dict[str, Any], name: str, database_url: str
    ) -> None:
        self.port = free_port()
        super().__init__(
            workdir, standins, name, DATABASE_URL=database_url, **webhook_env(self.port, SECRET)
        )

    def start_webhook(self, timeout: float = 60.0) -> None:
        self.log = open(self.workdir / "bot.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "bot"],
            cwd=REPO,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SetupFailed(f"{self.name} exited at start: {self.log_tail(1).strip()}")
            try:
                with _opener.open(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise SetupFailed(f"{self.name} did not answer /healthz within {timeout:g} s")
            time.sleep(0.05)


class Proxy:
    """tests/stubs/proxy.py in a process of its own, in front of `backends`."""

    def __init__(self, workdir: Path, backends: list[str]) -> None:
        self.workdir, self.backends = workdir, backends
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> str:
        port_file = self.workdir / "proxy.json"
        port_file.unlink(missing_ok=True)
        cmd = [PY, "-m", "tests.stubs.proxy", "--port-file", str(port_file)]
        for backend in self.backends:
            cmd += ["--backend", backend]
        self.log = open(self.workdir / "proxy.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log, env=_clean_env()
        )
        self.url = _await_port_file(self.proc, port_file, timeout, self.workdir / "proxy.log")[
            "url"
        ]
        return self.url

    def stop(self) -> None:
        _terminate(self.proc)


# -- the databases ----------------------------------------------------------------------------


def default_pg() -> str:
    return os.environ.get("PARLEY_BENCH_PG") or server_url()


@contextmanager
def pg_schema(url: str) -> Iterator[str]:
    """A fresh schema in the server at `url` (its URL), dropped afterwards."""
    schema = f"bench_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SetupFailed(f"PostgreSQL not reachable at {url}: {first}") from None
    try:
        yield with_schema(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def database(kind: str, workdir: Path, pg_url: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'parley.sqlite3'}"
    else:
        with pg_schema(pg_url) as url:
            yield url


# -- the measurements -------------------------------------------------------------------------


class Group:
    """The replicas of one setup, as bench/run.py's `overhead` sees a bot: its pid (the
    first replica's: that figure's CPU is not used here) and its log."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas

    @property
    def pid(self) -> int:
        return self.replicas[0].pid

    def cpu(self) -> float:
        return sum(proc_cpu(r.pid) for r in self.replicas)

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(f"[{r.name}] {r.log_tail(n)}" for r in self.replicas)


def postgres_cpu() -> dict[int, float]:
    """CPU seconds so far of every PostgreSQL server process on this machine, by pid (all
    of them: whatever else uses the server is counted too, as the SQLite row shows)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() in ("postgres", "postmaster"):
                out[int(entry.name)] = proc_cpu(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return out


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU between two postgres_cpu() readings (a process started meanwhile counts whole)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def burst(control: Control, group: Group, chats: int, latency: float) -> dict[str, Any]:
    """`chats` chats x 1 message pushed at once: first sent -> last reply, and the bot
    processes' CPU per message."""
    control.call(
        "/_control/config",
        {"latency": latency, "answer_words": 0, "chunk_words": 1, "chunk_delay": 0},
    )
    start = control.call("/_control/results", timeout=60)
    before, methods0 = start["replies"], start["methods"]
    cpu0, standins0, pg0 = group.cpu(), control.call("/_control/cpu")["cpu"], postgres_cpu()
    res = control.call("/_control/push", {"messages": rotation(new_chats(chats), chats)})
    w = control.call(f"/_control/wait?replies={before + chats}&timeout=300", timeout=310)
    cpu1, standins1, pg1 = group.cpu(), control.call("/_control/cpu")["cpu"], postgres_cpu()
    methods1 = control.call("/_control/results", timeout=60)["methods"]
    recs = records(control, res["tokens"])
    sent = [r["sent"] for r in recs if r["sent"] is not None]
    injected = min(r["injected"] for r in recs)
    lat = [(r["sent"] - r["injected"]) * 1000 for r in recs if r["sent"] is not None]
    out = {
        "chats": chats,
        "model_latency_s": latency,
        "answered": len(sent),
        "timed_out": not w["ok"],
        "wall_s": (max(sent) - injected) if sent else float("nan"),
        "reply_p50_ms": pct(lat, 0.5),
        "reply_p99_ms": pct(lat, 0.99),
        "bot_cpu_s": cpu1 - cpu0,
        "cpu_ms_per_msg": (cpu1 - cpu0) * 1000 / max(1, len(sent)),
        "standins_cpu_s": standins1 - standins0,
        "postgres_cpu_s": _spent(pg0, pg1),
        # Bot API calls the bots made meanwhile, by method.
        "telegram_calls": {
            m: n - methods0.get(m, 0) for m, n in sorted(methods1.items()) if n > methods0.get(m, 0)
        },
    }
    log(
        f"burst: {len(sent)}/{chats} answered in {out['wall_s']:.2f} s, bot CPU "
        f"{out['bot_cpu_s']:.2f} s ({out['cpu_ms_per_msg']:.2f} ms/msg)"
    )
    return out


def run_setup(
    control: Control,
    info: dict[str, Any],
    workdir: Path,
    kind: str,
    count: int,
    pg_url: str,
    n_overhead: int,
) -> dict[str, Any]:
    """Start `count` replicas on a fresh database behind a proxy; measure; stop them all."""
    label = f"{'SQLite' if kind == 'sqlite' else 'PostgreSQL'}, {count} process" + (
        "es" if count > 1 else ""
    )
    log(f"setup: {label}")
    where = workdir / f"{kind}-{count}"
    where.mkdir()
    result: dict[str, Any] = {"label": label, "kind": kind, "replicas": count}
    try:
        with database(kind, where, pg_url) as url:
            replicas: list[Replica] = []
            proxy: Proxy | None = None
            try:  # everything stops before the database goes
                control.call("/_control/reset", {})
                replicas = [Replica(where, info, f"r{i}", url) for i in range(count)]
                for replica in replicas:  # one by one: the first applies the migrations
                    replica.start_webhook()
                proxy = Proxy(where, [f"http://127.0.0.1:{r.port}" for r in replicas])
                proxy.start()
                control.call(
                    "/_control/webhook",
                    {"url": proxy.url + WEBHOOK_PATH, "secret": SECRET, "max_connections": 40},
                )
                group = Group(replicas)
                assert proxy.proc is not None
                proxy_cpu0 = proc_cpu(proxy.proc.pid)
                result["overhead"] = overhead(control, group, n_overhead, 50, label)  # type: ignore[arg-type]
                result["burst"] = burst(control, group, BURST_CHATS, BURST_LATENCY)
                result["proxy_cpu_s"] = proc_cpu(proxy.proc.pid) - proxy_cpu0
                result["deliveries"] = control.call("/_control/deliveries")
            except SetupFailed:
                raise
            except BaseException:
                for replica in replicas:
                    log(f"{replica.name} log tail:\n{replica.log_tail()}")
                raise
            finally:
                for replica in replicas:
                    replica.stop()
                if proxy is not None:
                    proxy.stop()
    except SetupFailed as exc:
        log(f"{label}: not run: {exc}")
        result["skipped"] = str(exc)
    return result


# -- report ----------------------------------------------------------------------------------


def _ms(v: float) -> str:
    return "–" if v != v else f"{v:.2f} ms"


def report(m: dict[str, Any], setups: list[dict[str, Any]], quick: bool) -> str:
    lines = [
        "# Parley replicas benchmark" + (" (--quick)" if quick else ""),
        "",
        f"Machine: {m['platform']}; CPU: {m['cpu']}; {m['cores']} cores; RAM {m['ram']}; "
        f"Python {m['python']}; load average before / after: {m.get('load_before', '?')} / "
        f"{m.get('load_after', '?')} (the cores may be shared with other work; PostgreSQL, "
        "the proxy and the stand-ins run on the same cores as the bots)",
        "",
        f"Code: {m.get('code_before', '?')} at start, {m.get('code_after', '?')} at the end.",
        "",
        f"| Setup | {BURST_CHATS:,} chats × 1 msg, model {BURST_LATENCY:g} s: first webhook → last reply "
        "| answered | bot CPU per message (sum over processes) | PostgreSQL server CPU per message "
        "| reply p50 / p99 in the burst | overhead p50 / p99 (model instant, one at a time) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in setups:
        if "skipped" in s:
            lines.append(f"| {s['label']} | not run: {s['skipped']} | | | | | |")
            continue
        b, o = s["burst"], s["overhead"]
        wall = "**TIMED OUT**" if b["timed_out"] else f"{b['wall_s']:.2f} s"
        lines.append(
            f"| {s['label']} | {wall} | {b['answered']:,}/{b['chats']:,} "
            f"| {b['cpu_ms_per_msg']:.2f} ms | {b['postgres_cpu_s'] * 1000 / max(1, b['answered']):.2f} ms "
            f"| {b['reply_p50_ms'] / 1000:.2f} s / {b['reply_p99_ms'] / 1000:.2f} s "
            f"| {_ms(o['p50_ms'])} / {_ms(o['p99_ms'])} ({o['answered']} msgs) |"
        )
    lines += ["", "CPU outside the bots during the burst (same cores):"]
    for s in setups:
        if "skipped" not in s:
            d = s["deliveries"]
            lines.append(
                f"- {s['label']}: stand-ins {s['burst']['standins_cpu_s']:.2f} s; proxy "
                f"{s['proxy_cpu_s']:.2f} s over the setup; webhook deliveries {d['delivered']:,} "
                f"in {d['attempts']:,} attempts, refusals {d['refusals'] or 'none'}, "
                f"given up {d['failed']}; Bot API calls: "
                + ", ".join(f"{m} {n:,}" for m, n in s["burst"]["telegram_calls"].items())
            )
    lines += [
        "",
        "PostgreSQL server CPU: every `postgres` process on the machine over the burst, so "
        "other users of the server count too (the SQLite row shows that background).",
        "",
        "Overhead = (sendMessage received) − (update pushed to the stand-in Telegram) − (model "
        "call at the stand-in): the webhook POST through the proxy, the inbox write, the chat's "
        "hand-over to the replica holding it, loopback HTTP and the database. The stand-in "
        "Telegram sends webhooks 40 at a time (setWebhook's default max_connections).",
    ]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    if sys.argv[1:2] == ["standins"]:
        parser = argparse.ArgumentParser(prog="bench.replicas standins")
        parser.add_argument("--port-file")
        args = parser.parse_args(sys.argv[2:])
        asyncio.run(serve_standins(args.port_file))
        return 0
    parser = argparse.ArgumentParser(description="Replicas on PostgreSQL vs one process on SQLite.")
    parser.add_argument("--quick", action="store_true", help="fewer paced messages")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--replicas", default="1,2,4", help="PostgreSQL setups (default 1,2,4)")
    parser.add_argument("--pg", default=None, help="PostgreSQL server URL (see the docstring)")
    args = parser.parse_args()
    counts = [int(c) for c in args.replicas.split(",") if c.strip()]
    pg_url = args.pg or default_pg()
    n_overhead = 150 if args.quick else 1000
    started, load_before, code_before = time.monotonic(), _loadavg(), _code_state()
    setups: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="parley-replicas-") as tmp:
        workdir = Path(tmp)
        standins = WebhookStandins(workdir)
        try:
            control = standins.start()
            info = standins.info
            setups.append(run_setup(control, info, workdir, "sqlite", 1, pg_url, n_overhead))
            for count in counts:
                setups.append(
                    run_setup(control, info, workdir, "postgres", count, pg_url, n_overhead)
                )
        finally:
            standins.stop()
    m = machine() | {
        "load_before": load_before,
        "load_after": _loadavg(),
        "code_before": code_before,
        "code_after": _code_state(),
    }
    print(report(m, setups, args.quick))
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    if args.json:
        print(json.dumps({"machine": m, "setups": setups}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
