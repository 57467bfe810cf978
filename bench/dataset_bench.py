"""Benchmark bot.services.dataset.build_dataset on a generated dialogue log.

    python bench/dataset_bench.py [--messages 100000] [--json] [--keep DIR]

Generates a database with the real migrations (Store.open) and then fills it fast with
executemany in one sqlite3 transaction: ~2 messages per turn, ~25 turns per thread, one thread
per chat (so --messages 100000 gives ~50,000 turns over ~2,000 threads/chats), texts of 20-600
characters (about a fifth Cyrillic) with some e-mail addresses, phone numbers and card numbers,
~3% failed turns, ~2% turns with negative reactions, ~4% negative user messages, a few opted-out
users and two instruction texts. Generation time is not measured.

Each measurement runs build_dataset in a fresh subprocess, so the numbers are its own:

* time run: wall time of build_dataset, and the process peak RSS -- VmHWM from
  /proc/self/status after resetting it by writing "5" to /proc/self/clear_refs (if the kernel
  allows it; otherwise ru_maxrss, which also counts the interpreter start-up) -- next to the
  RSS just before the call;
* tracemalloc run: the Python allocation peak during build_dataset (a separate run, because
  tracemalloc slows Python code down several times).

No assertions: numbers are for reading.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORDS = (
    "the a to of and is in it you that for on with this be are can not have do what how "
    "please thanks model answer question python code error file server data time day today "
    "tomorrow week meeting price order delivery address weather travel ticket book hotel "
    "could would should maybe really great good bad problem help explain example write list"
).split()
CYRILLIC = (
    "привет спасибо пожалуйста вопрос ответ модель код ошибка файл сервер время день завтра "
    "встреча цена заказ доставка адрес погода билет отель помоги объясни пример список"
).split()
INSTRUCTIONS = (  # ~1,000 characters each
    "You are Parley, a helpful assistant in a Telegram chat. Answer briefly and kindly. " * 12,
    "You are Parley. Be concise, use plain text, and ask a question when unsure. " * 14,
)


def _text(rng: random.Random, lo: int, hi: int) -> str:
    target = rng.randint(lo, hi)
    vocab = CYRILLIC if rng.random() < 0.2 else WORDS
    words = rng.choices(vocab, k=target // 4 + 2)
    text = " ".join(words)[:target]
    roll = rng.random()
    if roll < 0.03:
        text += f" write to user{rng.randint(1, 999)}@example.com"
    elif roll < 0.05:
        text += f" call +1 (555) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
    elif roll < 0.055:
        text += " card 4111 1111 1111 1111"
    return text


async def _migrate(path: Path) -> None:
    from storage.db import Store

    store = await Store.open(path)
    await store.close()


def generate(path: Path, messages: int, seed: int = 1) -> dict[str, int]:
    asyncio.run(_migrate(path))
    rng = random.Random(seed)
    turns_per_thread = 25
    start = datetime(2026, 1, 1, tzinfo=UTC)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO instructions (id, sha256, text) VALUES (?, ?, ?)",
        [(i + 1, f"sha{i}", text) for i, text in enumerate(INSTRUCTIONS)],
    )
    threads, turns, msgs, reactions, replies = [], [], [], [], []
    turn_id = msg_id = 0
    thread_id = 0
    written = 0
    while written < messages:
        thread_id += 1
        chat_id = 10_000 + thread_id
        users = [chat_id * 10 + u for u in range(rng.choice((1, 1, 1, 3)))]
        threads.append((thread_id, chat_id, 0, "openai", start.isoformat()))
        instr = 1 if thread_id % 5 else 2
        for n in range(turns_per_thread):
            if written >= messages:
                break
            if n == 12 and thread_id % 7 == 0:
                instr = 3 - instr  # instructions changed mid-thread
            turn_id += 1
            at = (start + timedelta(minutes=turn_id)).isoformat(timespec="milliseconds")
            failed = rng.random() < 0.03 or written + 1 >= messages  # no room for a reply
            turns.append(
                (
                    turn_id,
                    thread_id,
                    chat_id,
                    0,
                    "private",
                    rng.choice(users),
                    turn_id,
                    "failed" if failed else "ok",
                    "timeout" if failed else None,
                    "gpt-4.1-mini",
                    instr,
                    at,
                    at,
                )
            )
            label = "negative" if rng.random() < 0.04 else rng.choice(("positive", "neutral"))
            msg_id += 1
            msgs.append((msg_id, turn_id, "user", _text(rng, 20, 300), at, label))
            written += 1
            if not failed:
                msg_id += 1
                msgs.append((msg_id, turn_id, "assistant", _text(rng, 60, 600), at, "neutral"))
                written += 1
                replies.append((chat_id, 1_000_000 + turn_id, turn_id, 0))
                reply = (chat_id, 1_000_000 + turn_id, users[0])
                if rng.random() < 0.02:
                    reactions.append((*reply, "👎", -1, turn_id, at))
                elif rng.random() < 0.05:
                    reactions.append((*reply, "👍", 1, turn_id, at))
    conn.executemany(
        "INSERT INTO threads (id, chat_id, topic_id, backend, created_at) VALUES (?, ?, ?, ?, ?)",
        threads,
    )
    conn.executemany(
        "INSERT INTO turns (id, thread_id, chat_id, topic_id, chat_type, user_id, user_message_id,"
        " status, error_kind, model, instructions_id, started_at, finished_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        turns,
    )
    conn.executemany(
        "INSERT INTO messages (id, turn_id, role, content, created_at, sentiment_label)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        msgs,
    )
    conn.executemany(
        "INSERT INTO reply_messages (chat_id, message_id, turn_id, part) VALUES (?, ?, ?, ?)",
        replies,
    )
    conn.executemany(
        "INSERT INTO reactions (chat_id, message_id, user_id, emoji, polarity, turn_id,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        reactions,
    )
    opted = sorted({t[5] for t in rng.sample(turns, 8)})
    conn.executemany(
        "INSERT INTO opted_out_users (user_id, created_at) VALUES (?, ?)",
        [(u, start.isoformat()) for u in opted],
    )
    conn.execute("COMMIT")
    conn.close()
    return {
        "threads": len(threads),
        "turns": len(turns),
        "messages": len(msgs),
        "reactions": len(reactions),
        "opted_out_users": len(opted),
        "db_mb": round(path.stat().st_size / 2**20, 1),
    }


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure(db: Path, out: Path, mode: str) -> dict[str, Any]:
    """Run build_dataset once in this (fresh) process; mode 'time' or 'tracemalloc'."""
    from bot.services.dataset import DatasetOptions, build_dataset
    from storage.dataset import DatasetSource

    source = DatasetSource(db)  # what the store's `dataset` part is, for this file
    options = DatasetOptions()
    result: dict[str, Any] = {}
    if mode == "tracemalloc":
        tracemalloc.start()
        build_dataset(source, out, options, base_model="gpt-4.1-mini-2025-04-14")
        result["tracemalloc_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
        return result
    rss_before = _status("VmRSS")
    reset = _reset_hwm() and _status("VmHWM") is not None
    t0 = time.perf_counter()
    report = build_dataset(source, out, options, base_model="gpt-4.1-mini-2025-04-14")
    seconds = time.perf_counter() - t0
    if reset:
        peak_kb, source = _status("VmHWM"), "VmHWM after clear_refs reset"
    else:
        peak_kb, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    result.update(
        seconds=round(seconds, 2),
        rss_before_mb=round((rss_before or 0) / 1024, 1),
        rss_peak_mb=round((peak_kb or 0) / 1024, 1),
        rss_source=source,
        examples=report.examples,
        train_examples=report.train_examples,
        validation_examples=report.validation_examples,
        tokens=report.tokens,
        estimated_cost_usd=report.estimated_cost_usd,
        dropped=dict(sorted(report.dropped.items())),
        redactions=dict(sorted(report.redactions.items())),
        problems=report.problems,
        train_mb=round(report.train_path.stat().st_size / 2**20, 1) if report.train_path else 0,
    )
    return result


def _child(db: Path, out: Path, mode: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--_measure", mode, str(db), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def markdown(report: dict[str, Any]) -> str:
    m, g, r = report["machine"], report["generated"], report["result"]
    rows = [
        ("messages / turns / threads", f"{g['messages']:,} / {g['turns']:,} / {g['threads']:,}"),
        ("database size", f"{g['db_mb']} MB"),
        ("build_dataset wall time", f"{r['seconds']} s"),
        (
            "peak RSS (" + r["rss_source"] + ")",
            f"{r['rss_peak_mb']} MB (before call: {r['rss_before_mb']} MB)",
        ),
        ("tracemalloc peak (separate run)", f"{r['tracemalloc_peak_mb']} MB"),
        (
            "examples (train / validation)",
            f"{r['examples']:,} ({r['train_examples']:,} / {r['validation_examples']:,})",
        ),
        ("train.jsonl size", f"{r['train_mb']} MB"),
        ("estimated tokens (one epoch)", f"{r['tokens']:,}"),
        ("estimated cost, 3 epochs gpt-4.1-mini", f"${r['estimated_cost_usd']}"),
        ("dropped", ", ".join(f"{k} {v:,}" for k, v in r["dropped"].items()) or "-"),
        ("redactions", ", ".join(f"{k} {v:,}" for k, v in r["redactions"].items()) or "-"),
        ("problems", "; ".join(r["problems"]) or "-"),
    ]
    lines = [
        f"Machine: {m['platform']}, {m['processor']}, {m['cpus']} CPUs, Python {m['python']}, "
        f"SQLite {m['sqlite']}",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--_measure":
        print(json.dumps(measure(Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--keep", type=Path, help="build in this directory and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parley-dataset-bench-") as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        db = base / "bench.sqlite3"
        if db.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(str(db) + suffix).unlink(missing_ok=True)
        generated = generate(db, args.messages)
        result = _child(db, base / "out", "time")
        result.update(_child(db, base / "out", "tracemalloc"))
    report = {"machine": machine(), "generated": generated, "result": result}
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else markdown(report))


if __name__ == "__main__":
    main()
