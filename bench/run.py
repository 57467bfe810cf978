"""Benchmark Parley's own cost: latency overhead, CPU, concurrency, memory, streaming.

    python bench/run.py [--quick] [--json] [--profile DIR]

The bot runs as a real `python -m bot` subprocess against stand-in Telegram and OpenAI
servers that run in a separate process (bench/standins.py), so the CPU the bot uses is
measured alone (/proc/<pid>/stat) and every timestamp comes from the stand-ins' clock.
Only 127.0.0.1 is used. Every wait has a timeout and both subprocesses are always killed.

Figures:
  overhead   per text message: (sendMessage received) - (update injected) - (model call
             duration as the stand-in saw it), model latency 0, messages paced one at a
             time (no queueing). Includes the getUpdates long-poll pickup and loopback HTTP
             (conversations.create for a chat's first message, drafts, sendMessage).
  cpu        the bot's user+system CPU over the paced run / messages.
  concurrency 1,000 chats x 1 message, model latency 1 s: push -> last reply.
  order      100 chats x 5 messages at once: each chat's replies must come in send order.
  memory     VmRSS idle after start, and after 10,000 distinct chats x 1 message.
  streaming  model's first delta -> first non-empty sendMessageDraft (private chat).
  long       one ~1 MB answer streamed to a private chat by a server that ignores the
             output cap, while other chats write: the bot's CPU and peak RSS, the messages
             and drafts it sent, the other chats' delay; and the CPU of one draft render at
             answer lengths up to 1 MB, in this process (whole answer vs the kept end).

--profile DIR additionally runs the bot under cProfile for a paced run and prints the top
functions (diagnostic only; its figures are not the benchmark's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only

TARGETS = {
    "overhead_p50_ms": 10.0,
    "overhead_p99_ms": 50.0,
    "concurrency_1000_s": 3.0,
    "rss_after_mb": 150.0,
}


# -- process and machine facts ----------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of the full line


def proc_mem(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value = line.split(":", 1)
            out[name] = int(value.split()[0]) / 1024  # kB -> MB
    return out


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GB"
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram": ram,
        "python": platform.python_version(),
    }


def _code_state() -> str:
    """The commit measured, and whether bot code had uncommitted changes (read-only git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bot", "handlers", "storage"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{head or '?'}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the stand-ins and the bot ----------------------------------------------------------------


class Control:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method="POST" if body is not None else "GET",
            headers={"Content-Type": "application/json"},
        )
        with _opener.open(req, timeout=timeout) as resp:
            return json.loads(resp.read())


class Standins:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout: float = 20.0) -> Control:
        port_file = self.workdir / "standins.json"
        self.log = open(self.workdir / "standins.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "bench.standins", "--port-file", str(port_file)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=_clean_env(),
        )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"stand-ins did not start; see {self.workdir / 'standins.log'}")
            time.sleep(0.05)
        self.info = json.loads(port_file.read_text())
        return Control(self.info["control"])

    def stop(self) -> None:
        _terminate(self.proc)


class Bot:
    telegram_rate = "0"  # TELEGRAM_MAX_RATE for every bot of the run (--telegram-rate)

    def __init__(self, workdir: Path, standins: dict[str, Any], name: str, **env: str) -> None:
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = _clean_env()
        self.env.update(
            TELEGRAM_BOT_TOKEN=standins["token"],
            TELEGRAM_API_URL=standins["telegram"],
            OPENAI_API_KEY=standins["api_key"],
            OPENAI_BASE_URL=standins["openai"],
            DATABASE_URL=f"sqlite:///{self.workdir / 'db.sqlite3'}",
            CONVERSATION_BACKEND="openai",
            SENTIMENT_BACKEND="off",
            TELEGRAM_MAX_RATE=self.telegram_rate,
            TELEGRAM_GROUP_RATE="0",
            LOG_LEVEL="WARNING",
            MAX_CONCURRENT_UPDATES="4096",
        )
        self.env.update(env)
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self,
        control: Control,
        profile: Path | None = None,
        timeout: float = 30.0,
        cmd: list[str] | None = None,
    ) -> int:
        control.call("/_control/reset", {})
        cmd = cmd or [PY, "-m", "bot"]
        if profile is not None:
            cmd = [PY, "-m", "cProfile", "-o", str(profile), "-m", "bot"]
        self.log = open(self.workdir / "bot.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ready = control.call(f"/_control/ready?timeout={timeout}", timeout=timeout + 5)
        if not ready["ok"] or self.proc.poll() is not None:
            raise RuntimeError(f"bot {self.name} did not start; see {self.workdir / 'bot.log'}")
        return self.proc.pid

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        _terminate(self.proc, sig=signal.SIGINT, grace=15.0)

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(
                (self.workdir / "bot.log").read_text(errors="replace").splitlines()[-n:]
            )
        except OSError:
            return ""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO)
    env.pop("PYTHONDEVMODE", None)
    env.pop("PYTHONASYNCIODEBUG", None)
    return env


def _terminate(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, grace: float = 10.0
) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except ProcessLookupError:
        pass


# -- the measurements -------------------------------------------------------------------------

_next_chat = [10_000_000]


def new_chats(n: int) -> list[int]:
    """Chat ids never used before in this run (private chats: positive ids)."""
    start = _next_chat[0]
    _next_chat[0] += n
    return list(range(start, start + n))


def rotation(chats: list[int], n: int) -> list[dict[str, Any]]:
    return [
        {"chat_id": chats[i % len(chats)], "text": "how are you doing today?"} for i in range(n)
    ]


def records(control: Control, tokens: list[str]) -> list[dict[str, Any]]:
    recs = control.call("/_control/results", timeout=60)["records"]
    return [recs[t] | {"token": t} for t in tokens if t in recs]


def overhead(control: Control, bot: Bot, n: int, chats: int, label: str) -> dict[str, Any]:
    control.call(
        "/_control/config", {"latency": 0.0, "answer_words": 0, "chunk_words": 1, "chunk_delay": 0}
    )
    warm = control.call(
        "/_control/paced", {"messages": rotation(new_chats(10), 30), "wave": 1, "timeout": 60}, 70
    )
    if warm["timed_out"]:
        raise RuntimeError(f"{label}: warm-up timed out\n{bot.log_tail()}")
    msgs = rotation(new_chats(chats), n)
    cpu0, t0 = proc_cpu(bot.pid), time.monotonic()
    res = control.call("/_control/paced", {"messages": msgs, "wave": 1, "timeout": 240}, 250)
    cpu1, wall = proc_cpu(bot.pid), time.monotonic() - t0
    recs = records(control, res["tokens"])
    done = [r for r in recs if r["sent"] is not None and r["model_finished"] is not None]
    seen: set[int] = set()
    first, later, total, allv = [], [], [], []
    for r in sorted(done, key=lambda r: r["injected"]):
        model = r["model_finished"] - r["model_started"]
        ms = (r["sent"] - r["injected"] - model) * 1000
        allv.append(ms)
        total.append((r["sent"] - r["injected"]) * 1000)
        (later if r["chat_id"] in seen else first).append(ms)
        seen.add(r["chat_id"])
    out = {
        "label": label,
        "messages": n,
        "answered": len(done),
        "timed_out": res["timed_out"],
        "chats": chats,
        "p50_ms": pct(allv, 0.5),
        "p99_ms": pct(allv, 0.99),
        "mean_ms": statistics.fmean(allv) if allv else float("nan"),
        "first_in_chat_p50_ms": pct(first, 0.5),
        "later_in_chat_p50_ms": pct(later, 0.5),
        "later_in_chat_p99_ms": pct(later, 0.99),
        "end_to_end_p50_ms": pct(total, 0.5),
        "cpu_ms_per_msg": (cpu1 - cpu0) * 1000 / max(1, len(done)),
        "wall_s": wall,
    }
    log(
        f"{label}: p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms, "
        f"CPU {out['cpu_ms_per_msg']:.2f} ms/msg ({len(done)}/{n} answered, {wall:.1f} s)"
    )
    return out


def per_delta(
    control: Control, bot: Bot, n: int, base_cpu_ms: float, words: int = 300
) -> dict[str, Any]:
    """CPU of a reply streamed as `words` one-word deltas, minus a short reply's CPU."""
    control.call(
        "/_control/config",
        {"latency": 0.0, "answer_words": words, "chunk_words": 1, "chunk_delay": 0},
    )
    msgs = rotation(new_chats(max(1, n // 5)), n)
    cpu0 = proc_cpu(bot.pid)
    res = control.call("/_control/paced", {"messages": msgs, "wave": 1, "timeout": 120}, 130)
    cpu = (proc_cpu(bot.pid) - cpu0) * 1000 / n
    control.call("/_control/config", {"answer_words": 0})
    out = {
        "messages": n,
        "deltas_per_reply": words + 7,
        "cpu_ms_per_msg": cpu,
        "cpu_us_per_delta": (cpu - base_cpu_ms) * 1000 / words,
        "timed_out": res["timed_out"],
    }
    log(
        f"long replies ({words} deltas): {cpu:.2f} ms CPU/msg -> {out['cpu_us_per_delta']:.0f} us per delta"
    )
    return out


def concurrency(control: Control, bot: Bot, chats: int, latency: float) -> dict[str, Any]:
    control.call(
        "/_control/config",
        {"latency": latency, "answer_words": 0, "chunk_words": 1, "chunk_delay": 0},
    )
    start = control.call("/_control/results", timeout=60)
    before, drafts0 = start["replies"], start["methods"].get("sendMessageDraft", 0)
    cpu0, standins0 = proc_cpu(bot.pid), control.call("/_control/cpu")["cpu"]
    res = control.call("/_control/push", {"messages": rotation(new_chats(chats), chats)})
    w = control.call(f"/_control/wait?replies={before + chats}&timeout=150", timeout=160)
    cpu1, standins1 = proc_cpu(bot.pid), control.call("/_control/cpu")["cpu"]
    drafts = control.call("/_control/results", timeout=60)["methods"].get("sendMessageDraft", 0)
    recs = records(control, res["tokens"])
    sent = [r["sent"] for r in recs if r["sent"] is not None]
    injected = min(r["injected"] for r in recs)
    lat = [(r["sent"] - r["injected"]) * 1000 for r in recs if r["sent"] is not None]
    model_start = [
        r["model_started"] - r["injected"] for r in recs if r["model_started"] is not None
    ]
    out = {
        "chats": chats,
        "model_latency_s": latency,
        "answered": len(sent),
        "timed_out": not w["ok"],
        "wall_s": (max(sent) - injected) if sent else float("nan"),
        "last_model_start_s": max(model_start) if model_start else float("nan"),
        "reply_p50_ms": pct(lat, 0.5),
        "bot_cpu_s": cpu1 - cpu0,
        "standins_cpu_s": standins1 - standins0,  # same cores: it bounds what sharding could gain
        "drafts": drafts - drafts0,  # "Thinking..." placeholders the gate let through
    }
    log(
        f"concurrency {chats} chats: all replies in {out['wall_s']:.2f} s "
        f"({len(sent)}/{chats}), last model call started at +{out['last_model_start_s']:.2f} s"
    )
    return out


def order(control: Control, chats: int, per_chat: int, latency: float) -> dict[str, Any]:
    control.call(
        "/_control/config",
        {"latency": latency, "answer_words": 0, "chunk_words": 1, "chunk_delay": 0},
    )
    before = control.call("/_control/results", timeout=60)["replies"]
    ids = new_chats(chats)
    msgs = [{"chat_id": c, "text": f"message {k}"} for k in range(per_chat) for c in ids]
    res = control.call("/_control/push", {"messages": msgs})
    total = chats * per_chat
    w = control.call(
        f"/_control/wait?replies={before + total}&timeout={per_chat * latency + 30}",
        timeout=per_chat * latency + 40,
    )
    recs = records(control, res["tokens"])
    by_chat: dict[int, list[dict[str, Any]]] = {}
    for r in recs:
        by_chat.setdefault(r["chat_id"], []).append(r)
    bad = 0
    for rs in by_chat.values():
        sent_order = [
            r["token"]
            for r in sorted((r for r in rs if r["sent_seq"]), key=lambda r: r["sent_seq"])
        ]
        push_order = [r["token"] for r in sorted(rs, key=lambda r: int(r["token"][1:]))]
        if sent_order != push_order:
            bad += 1
    sent = [r["sent"] for r in recs if r["sent"] is not None]
    out = {
        "chats": chats,
        "per_chat": per_chat,
        "model_latency_s": latency,
        "answered": len(sent),
        "timed_out": not w["ok"],
        "chats_out_of_order": bad,
        "wall_s": (max(sent) - min(r["injected"] for r in recs)) if sent else float("nan"),
    }
    log(
        f"order {chats}x{per_chat}: {bad} chats out of order, {len(sent)}/{total} answered, "
        f"{out['wall_s']:.2f} s"
    )
    return out


def streaming(control: Control, n: int) -> dict[str, Any]:
    """One reply at a time (so replies don't queue behind each other's first delta)."""
    control.call(
        "/_control/config",
        {"latency": 0.05, "answer_words": 30, "chunk_words": 2, "chunk_delay": 0.005},
    )
    msgs = rotation(new_chats(10), n)
    res = control.call("/_control/paced", {"messages": msgs, "wave": 1, "timeout": 120}, 130)
    control.call("/_control/config", {"latency": 0.0, "answer_words": 0, "chunk_delay": 0})
    recs = records(control, res["tokens"])
    delays = [(r["first_draft"] - r["first_delta"]) * 1000 for r in recs
              if r["first_draft"] is not None and r["first_delta"] is not None]  # fmt: skip
    out = {
        "replies": len(recs),
        "with_draft": len(delays),
        "p50_ms": pct(delays, 0.5),
        "p99_ms": pct(delays, 0.99),
        "timed_out": res["timed_out"],
    }
    log(f"streaming: first delta -> first draft p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms "
        f"({len(delays)}/{len(recs)})")  # fmt: skip
    return out


def long_answer(control: Control, bot: Bot, words: int, pace: float = 0.25) -> dict[str, Any]:
    """One answer of `words` words (a server ignoring the cap) while other chats write."""
    control.call(
        "/_control/config",
        {"latency": 0.0, "answer_words": words, "chunk_words": 8, "chunk_delay": 0.001},
    )
    time.sleep(0.5)
    rss0 = proc_mem(bot.pid)["VmRSS"]
    start = control.call("/_control/results", timeout=60)
    sends0 = start["methods"].get("sendMessage", 0)
    drafts0 = start["methods"].get("sendMessageDraft", 0)
    [long_chat] = new_chats(1)
    cpu0, t0 = proc_cpu(bot.pid), time.monotonic()
    [token] = control.call("/_control/push", {"messages": rotation([long_chat], 1)})["tokens"]
    deadline = time.monotonic() + 30
    while records(control, [token])[0]["model_started"] is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"long answer: the model was never asked\n{bot.log_tail()}")
        time.sleep(0.02)
    # The long answer's text is fixed once its model call started: later calls are short.
    control.call("/_control/config", {"answer_words": 0, "chunk_words": 1, "chunk_delay": 0})
    # Other chats write, one message every `pace` s, until the long answer is delivered.
    tokens: list[str] = []
    while records(control, [token])[0]["sent"] is None and time.monotonic() < deadline + 600:
        msgs = rotation(new_chats(1), 1)
        res = control.call("/_control/paced", {"messages": msgs, "wave": 1, "timeout": 60}, 70)
        tokens += res["tokens"]
        time.sleep(pace)
    delays = [
        (r["sent"] - r["injected"] - (r["model_finished"] - r["model_started"])) * 1000
        for r in records(control, tokens)
        if r["sent"] is not None and r["model_finished"] is not None
    ]
    [answer] = records(control, [token])
    # The chat's next message is answered after the long one is delivered, in full.
    [last] = control.call("/_control/push", {"messages": rotation([long_chat], 1)})["tokens"]
    while records(control, [last])[0]["sent"] is None:
        if time.monotonic() > deadline + 600:
            raise RuntimeError(f"long answer: never delivered\n{bot.log_tail()}")
        time.sleep(0.05)
    cpu, wall = proc_cpu(bot.pid) - cpu0, time.monotonic() - t0
    end = control.call("/_control/results", timeout=60)
    mem = proc_mem(bot.pid)
    out = {
        "answer_words": words,
        "bot_cpu_s": cpu,
        "wall_s": wall,
        "stream_s": answer["model_finished"] - answer["model_started"],
        "messages": end["methods"].get("sendMessage", 0) - sends0 - len(tokens) - 1,
        "drafts": end["methods"].get("sendMessageDraft", 0) - drafts0,
        "rss_before_mb": rss0,
        "rss_peak_mb": mem["VmHWM"],
        "others": len(delays),
        "others_p50_ms": pct(delays, 0.5),
        "others_max_ms": max(delays) if delays else float("nan"),
    }
    log(
        f"long answer ({words:,} words): bot CPU {cpu:.2f} s over {wall:.1f} s (stream "
        f"{out['stream_s']:.1f} s), {out['messages']} messages, "
        f"{out['drafts']} drafts, RSS {rss0:.0f} -> peak {mem['VmHWM']:.0f} MB, other chats "
        f"p50 {out['others_p50_ms']:.1f} ms, max {out['others_max_ms']:.1f} ms"
    )
    return out


def draft_render(sizes: tuple[int, ...] = (4096, 65536, 262144, 1 << 20)) -> dict[str, Any]:
    """CPU of one draft at each answer length, in this process: the whole answer rendered
    (every draft did so before), and the end MarkdownTail keeps (where it exists)."""
    sys.path.insert(0, str(REPO))
    from bot.services.formatting import render_parts

    try:
        from bot.services.formatting import MarkdownTail
    except ImportError:  # code from before it
        MarkdownTail = None  # noqa: N806
    paragraph = (
        "The **quick** brown fox jumps over the `lazy` dog, and *then* some more words "
        "follow to make a paragraph of ordinary length for a chat answer.\n\n"
    )
    code = "```python\n" + "".join(f"x = {i}\n" for i in range(40)) + "```\n\n"
    unit = paragraph * 6 + code
    rows = []
    for size in sizes:
        text = (unit * (size // len(unit) + 1))[:size]
        reps = max(1, 2_000_000 // size)
        c0 = time.process_time()
        for _ in range(reps):
            render_parts(text)[-1]
        whole = (time.process_time() - c0) / reps
        tail_ms = float("nan")
        if MarkdownTail is not None:
            tail = MarkdownTail()
            for i in range(0, len(text), 4):  # as a stream of small deltas
                tail.append(text[i : i + 4])
            c0 = time.process_time()
            for _ in range(50):
                render_parts(tail.view())[-1]
            tail_ms = (time.process_time() - c0) / 50 * 1000
        rows.append({"chars": size, "whole_ms": whole * 1000, "tail_ms": tail_ms})
        log(f"draft render at {size:,} chars: whole {whole * 1000:.2f} ms, tail {tail_ms:.2f} ms")
    return {"rows": rows}


def memory(control: Control, bot: Bot, chats: int, batch: int) -> dict[str, Any]:
    control.call(
        "/_control/config", {"latency": 0.0, "answer_words": 0, "chunk_words": 1, "chunk_delay": 0}
    )
    time.sleep(1.0)
    idle = proc_mem(bot.pid)
    ids = new_chats(chats)
    timed_out = False
    cpu0, t0 = proc_cpu(bot.pid), time.monotonic()
    curve: list[tuple[int, float]] = [(0, idle["VmRSS"])]
    target = control.call("/_control/results", timeout=60)["replies"]
    for i in range(0, chats, batch):
        part = ids[i : i + batch]
        control.call("/_control/push", {"messages": rotation(part, len(part))})
        target += len(part)
        w = control.call(f"/_control/wait?replies={target}&timeout=60", timeout=70)
        if not w["ok"]:
            timed_out = True
            break
        if (i + batch) % max(batch, chats // 5) == 0:
            curve.append((i + batch, proc_mem(bot.pid)["VmRSS"]))
    wall, cpu = time.monotonic() - t0, proc_cpu(bot.pid) - cpu0
    time.sleep(0.5)
    after = proc_mem(bot.pid)
    out = {
        "chats": chats,
        "batch": batch,
        "idle_rss_mb": idle["VmRSS"],
        "after_rss_mb": after["VmRSS"],
        "peak_rss_mb": after["VmHWM"],
        "timed_out": timed_out,
        "wall_s": wall,
        "cpu_ms_per_msg": cpu * 1000 / chats,
        "rss_curve_mb": curve,
    }
    log(
        f"memory: idle {idle['VmRSS']:.1f} MB, after {chats} chats {after['VmRSS']:.1f} MB "
        f"(peak {after['VmHWM']:.1f} MB), {wall:.1f} s"
    )
    return out


def profile_run(
    control: Control, workdir: Path, standins: dict[str, Any], outdir: Path, n: int, backend: str
) -> str:
    """Run the bot under cProfile for a paced run; return the top of the report."""
    import io
    import pstats

    outdir.mkdir(parents=True, exist_ok=True)
    prof = outdir / f"bot-{backend}.prof"
    bot = Bot(workdir, standins, f"profile-{backend}", CONVERSATION_BACKEND=backend)
    try:
        bot.start(control, profile=prof)
        overhead(control, bot, n, max(10, n // 7), f"profile {backend}")
    finally:
        bot.stop()
    if not prof.exists():
        return "(no profile written)"
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(str(REPO) + r"/(bot|handlers|storage)/", 25)
    return buf.getvalue()


# -- report ----------------------------------------------------------------------------------


def fmt_ms(v: float) -> str:
    return "–" if v != v else f"{v:.2f} ms"


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "**MISSED**"


def report(m: dict[str, Any], r: dict[str, Any], quick: bool) -> str:
    lines = [
        "# Parley overhead benchmark" + (" (--quick)" if quick else ""),
        "",
        f"Machine: {m['platform']}; CPU: {m['cpu']}; {m['cores']} cores; RAM {m['ram']}; "
        f"Python {m['python']}; load average before / after the run: {m.get('load_before', '?')} / "
        f"{m.get('load_after', '?')} (the cores may be shared with other work)",
        "",
        f"Code: {m.get('code_before', '?')} at start, {m.get('code_after', '?')} at the end.",
        "",
        f"Bot: `python -m bot` subprocess, TELEGRAM_MAX_RATE={Bot.telegram_rate}, TELEGRAM_GROUP_RATE=0, LOG_LEVEL=WARNING, "
        "DRAFT_INTERVAL default (0.8 s); stand-ins in their own process on 127.0.0.1.",
        "",
        "| Figure | Result | Target | |",
        "|---|---|---|---|",
    ]
    for o in r["overhead"]:
        tag = o["label"]
        lines.append(
            f"| Overhead per message, {tag}: p50 ({o['answered']} msgs, {o['chats']} chats) "
            f"| {fmt_ms(o['p50_ms'])} | ≤ 10 ms | {verdict(o['p50_ms'], 10)} |"
        )
        lines.append(
            f"| Overhead per message, {tag}: p99 | {fmt_ms(o['p99_ms'])} | ≤ 50 ms "
            f"| {verdict(o['p99_ms'], 50)} |"
        )
        lines.append(
            f"| ↳ first message of a chat p50 / later messages p50, p99 | "
            f"{fmt_ms(o['first_in_chat_p50_ms'])} / {fmt_ms(o['later_in_chat_p50_ms'])}, "
            f"{fmt_ms(o['later_in_chat_p99_ms'])} | | |"
        )
        lines.append(f"| Bot CPU per message, {tag} | {o['cpu_ms_per_msg']:.2f} ms | | |")
    d = r.get("per_delta")
    if d:
        lines.append(
            f"| Bot CPU per streamed delta (replies of {d['deltas_per_reply']} deltas) "
            f"| {d['cpu_us_per_delta']:.0f} µs | | |"
        )
    c = r.get("concurrency")
    if c:
        lines.append(
            f"| {c['chats']:,} chats × 1 msg, model latency {c['model_latency_s']:g} s: push → last reply "
            f"({c['answered']}/{c['chats']} answered) | {c['wall_s']:.2f} s | ≤ 3 s "
            f"| {verdict(c['wall_s'], 3) if not c['timed_out'] else '**TIMED OUT**'} |"
        )
        lines.append(
            f"| ↳ last model call started after push / CPU during the burst: bot, stand-ins | "
            f"+{c['last_model_start_s']:.2f} s / {c['bot_cpu_s']:.2f} s, {c['standins_cpu_s']:.2f} s | | |"
        )
        lines.append(
            f"| ↳ drafts sent during the burst (the rest shed under load, PROGRESS_SHED_LAG) | "
            f"{c['drafts']:,} for {c['chats']:,} replies | | |"
        )
    o2 = r.get("order")
    if o2:
        ok = o2["chats_out_of_order"] == 0 and o2["answered"] == o2["chats"] * o2["per_chat"]
        lines.append(
            f"| Order: {o2['chats']} chats × {o2['per_chat']} msgs, latency {o2['model_latency_s']:g} s "
            f"| {o2['chats_out_of_order']} chats out of order, {o2['answered']}/{o2['chats'] * o2['per_chat']} "
            f"answered, {o2['wall_s']:.2f} s | all in order | {'ok' if ok else '**MISSED**'} |"
        )
    mem = r.get("memory")
    if mem:
        lines.append(f"| Memory (VmRSS) idle after start | {mem['idle_rss_mb']:.1f} MB | | |")
        lines.append(
            f"| Memory (VmRSS) after {mem['chats']:,} distinct chats × 1 msg (peak {mem['peak_rss_mb']:.1f} MB) "
            f"| {mem['after_rss_mb']:.1f} MB | ≤ 150 MB | {verdict(mem['after_rss_mb'], 150)} |"
        )
        curve = ", ".join(f"{n:,}: {mb:.0f}" for n, mb in mem["rss_curve_mb"])
        lines.append(
            f"| ↳ VmRSS (MB) by chats served, {mem['batch']} chats at a time | {curve} | | |"
        )
        lines.append(
            f"| ↳ bot CPU per message during the memory run | {mem['cpu_ms_per_msg']:.2f} ms | | |"
        )
    s = r.get("streaming")
    if s:
        lines.append(
            f"| Streaming: model's first delta → first non-empty draft, p50 ({s['with_draft']} replies) "
            f"| {fmt_ms(s['p50_ms'])} | | |"
        )
        lines.append(f"| Streaming: same, p99 | {fmt_ms(s['p99_ms'])} | | |")
    la = r.get("long")
    if la:
        for o in la["runs"]:
            lines.append(
                f"| Long answer ({o['answer_words']:,} words, ~1 MB; {o['label']}): bot CPU "
                f"(over the stream's {o['stream_s']:.1f} s) / messages / drafts "
                f"| {o['bot_cpu_s']:.2f} s / {o['messages']} / {o['drafts']} | | |"
            )
            lines.append(
                f"| ↳ RSS before → peak; other chats' overhead meanwhile p50 / max "
                f"({o['others']} msgs) | {o['rss_before_mb']:.0f} → {o['rss_peak_mb']:.0f} MB; "
                f"{fmt_ms(o['others_p50_ms'])} / {fmt_ms(o['others_max_ms'])} | | |"
            )
        for row in la["draft_render"]["rows"]:
            lines.append(
                f"| CPU of one draft at {row['chars']:,} chars: whole answer rendered / "
                f"kept end rendered | {fmt_ms(row['whole_ms'])} / {fmt_ms(row['tail_ms'])} | | |"
            )
    lines += [
        "",
        "Overhead = (sendMessage received) − (update injected) − (model call duration at the stand-in); "
        "it includes the getUpdates long-poll pickup, loopback HTTP, SQLite, and for a chat's first "
        "message (openai backend) conversations.create. Messages are paced one at a time.",
        "",
        f"Stand-ins' own CPU over the whole run: {r.get('standins_cpu_s', float('nan')):.1f} s (separate process, "
        "not counted as the bot's). Streaming is measured one reply at a time, model latency 50 ms, "
        "31 deltas 5 ms apart.",
        "",
        "With PTB's default AIORateLimiter (TELEGRAM_MAX_RATE=30) every request carrying a chat_id "
        "counts against 30 req/s, so 1,000 replies take ≥ 33 s for sendMessage alone; "
        "`--telegram-rate 30 --only concurrency` measures the burst that way.",
        "",
        "Other benches (not run here):",
    ]
    for name in ("images_bench.py", "sentiment_bench.py", "dataset_bench.py"):
        if (REPO / "bench" / name).exists():
            lines.append(f"- `python bench/{name}`")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="Parley's own cost (see the module docstring).")
    parser.add_argument("--quick", action="store_true", help="fewer messages (< 1 minute)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--profile", metavar="DIR", help="also cProfile the bot (diagnostic)")
    parser.add_argument(
        "--only",
        help="comma list: overhead,local,lexicon,concurrency,order,streaming,memory,long",
    )
    parser.add_argument(
        "--telegram-rate",
        default="0",
        help="TELEGRAM_MAX_RATE for the bots (default 0: limiter off; Telegram's is 30)",
    )
    args = parser.parse_args()
    Bot.telegram_rate = args.telegram_rate
    q = args.quick
    only = set(args.only.split(",")) if args.only else None

    def want(name: str) -> bool:
        return only is None or name in only

    n_overhead = 150 if q else 2000
    chats_overhead = 50 if q else 300
    mem_chats = 300 if q else 10_000
    results: dict[str, Any] = {"overhead": []}
    started = time.monotonic()
    load_before = _loadavg()
    code_before = _code_state()
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
        workdir = Path(tmp)
        standins = Standins(workdir)
        bots: list[Bot] = []
        try:
            control = standins.start()
            info = standins.info
            scpu0 = proc_cpu(info["pid"])

            if want("overhead") or want("concurrency") or want("order") or want("streaming"):
                bot = Bot(workdir, info, "openai-off")
                bots.append(bot)
                bot.start(control)
                if want("overhead"):
                    results["overhead"].append(
                        overhead(control, bot, n_overhead, chats_overhead, "openai backend")
                    )
                    results["per_delta"] = per_delta(
                        control, bot, 30 if q else 100, results["overhead"][-1]["cpu_ms_per_msg"]
                    )
                if want("streaming"):
                    results["streaming"] = streaming(control, 50)
                if want("concurrency"):
                    results["concurrency"] = concurrency(control, bot, 300 if q else 1000, 1.0)
                if want("order"):
                    results["order"] = (
                        order(control, 50, 3, 0.5) if q else order(control, 100, 5, 1.0)
                    )
                if want("overhead") and want("concurrency"):
                    # Same bot, after the burst: does the bot stay as cheap once it has served many chats?
                    results["overhead"].append(
                        overhead(
                            control,
                            bot,
                            50 if q else 300,
                            chats_overhead,
                            f"openai backend, after the {results['concurrency']['chats']:,}-chat burst",
                        )
                    )
                bot.stop()

            if want("local") or (only is None):
                bot = Bot(workdir, info, "local-off", CONVERSATION_BACKEND="local")
                bots.append(bot)
                bot.start(control)
                results["overhead"].append(
                    overhead(control, bot, n_overhead // 2, chats_overhead, "local backend")
                )
                bot.stop()

            if want("lexicon") or (only is None):
                bot = Bot(workdir, info, "openai-lexicon", SENTIMENT_BACKEND="lexicon")
                bots.append(bot)
                bot.start(control)
                results["overhead"].append(
                    overhead(
                        control,
                        bot,
                        n_overhead // 4,
                        chats_overhead,
                        "openai backend + lexicon sentiment",
                    )
                )
                bot.stop()

            if want("memory"):
                bot = Bot(workdir, info, "memory")
                bots.append(bot)
                bot.start(control)
                results["memory"] = memory(control, bot, mem_chats, 100)
                bot.stop()

            if want("long"):
                runs = []
                for label, env in (
                    ("default cap", {}),
                    ("MAX_ANSWER_TOKENS=1000000: not cut", {"MAX_ANSWER_TOKENS": "1000000"}),
                ):
                    bot = Bot(workdir, info, f"long-{len(runs)}", **env)
                    bots.append(bot)
                    bot.start(control)
                    runs.append({"label": label, **long_answer(control, bot, 180_000)})
                    bot.stop()
                results["long"] = {"runs": runs, "draft_render": draft_render()}

            if args.profile:
                for backend in ("openai", "local"):
                    text = profile_run(
                        control, workdir, info, Path(args.profile), 300 if q else 1000, backend
                    )
                    (Path(args.profile) / f"bot-{backend}.txt").write_text(text)
                    log(f"profile written to {Path(args.profile) / f'bot-{backend}.txt'}")

            results["standins_cpu_s"] = proc_cpu(info["pid"]) - scpu0
        except BaseException:
            for b in bots:
                tail = b.log_tail()
                if tail.strip():
                    log(f"bot {b.name} log tail:\n{tail}")
            raise
        finally:
            for b in bots:
                b.stop()
            standins.stop()
    results["machine"] = machine() | {
        "load_before": load_before,
        "load_after": _loadavg(),
        "code_before": code_before,
        "code_after": _code_state(),
    }
    results["runtime_s"] = time.monotonic() - started
    results["targets"] = TARGETS
    print(report(results["machine"], results, q))
    print(f"\n(run took {results['runtime_s']:.0f} s)")
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
