"""Benchmark the evaluation: its wall time, and what it does to ordinary chats meanwhile.

    python bench/eval_bench.py [--items 200] [--latency 1.0] [--chats 8] [--think 4.0]
        [--concurrency 4] [--yield-seconds 1.0] [--duration 60] [--scenarios chats,eval,both]
        [--json]

The stand-in Telegram and OpenAI servers run in a process of their own (bench/standins.py,
as for bench/run.py), so their CPU is not the bot's; every model call there -- chat
answers, the evaluation's replays and its judge -- takes --latency seconds. The real bot
(Application, services, SQLite) runs in this process, with a job that has a fine-tuned
model and --items test-split items written to a fresh database first.

Scenarios:
* chats: --chats users talk for --duration seconds, each sending a message every 0.5x to
  1.5x of (--think + --latency) seconds: the reply latency (update injected to the reply's
  sendMessage, both timed by the stand-ins) without any evaluation;
* eval: the evaluation of all items alone: its wall time;
* both: the evaluation with the same chats going on until it ends: its wall time and the
  chats' reply latency.

No assertions: numbers are for reading.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run import Control, Standins  # noqa: E402
from bot.app import ALLOWED_UPDATES, build_application  # noqa: E402
from bot.context import ParleyApp  # noqa: E402
from bot.domain import JobRecord, utcnow  # noqa: E402
from bot.settings import Settings  # noqa: E402
from storage.db import Store  # noqa: E402

ADMIN = 42
JOB = "ftjob-bench"
CANDIDATE = "ft:gpt-4.1-mini-2025-04-14:parley:bench:abc123"


async def seed(db: Path, items: int) -> None:
    """A succeeded job with `items` test-split items (three exchanges of context each)."""
    store = await Store.open(db)
    try:
        now = utcnow()
        await store.jobs.add(
            JobRecord(
                JOB,
                "openai",
                "gpt-4.1-mini-2025-04-14",
                "file-1",
                None,
                100,
                0,
                10_000,
                ADMIN,
                "bench",
                "succeeded",
                now,
                now,
            )
        )
        await store.jobs.update(JOB, "succeeded", CANDIDATE, None)
        system = {"role": "system", "content": "You are Parley, a helpful assistant."}
        rows = []
        for i in range(items):
            context = [system]
            for k in range(3):
                context.append(
                    {"role": "user", "content": f"item {i} question {k}: what about it?"}
                )
                context.append({"role": "assistant", "content": f"item {i} answer {k}: this."})
            context.append({"role": "user", "content": f"item {i}: and finally?"})
            rows.append((context, f"item {i}: the answer then", [i + 1]))
        await store.evals.add_items(JOB, rows)
    finally:
        await store.close()


async def start_bot(settings: Settings) -> ParleyApp:
    app = build_application(settings)
    await app.initialize()
    if app.post_init:
        await app.post_init(app)
    assert app.updater is not None
    await app.updater.start_polling(poll_interval=0, timeout=5, allowed_updates=ALLOWED_UPDATES)
    await app.start()
    return app


async def stop_bot(app: ParleyApp) -> None:
    assert app.updater is not None
    await app.updater.stop()
    await app.stop()
    if app.post_stop:
        await app.post_stop(app)
    await app.shutdown()
    if app.post_shutdown:
        await app.post_shutdown(app)


async def chat_loop(
    control: Control,
    chat: int,
    period: float,
    stop: asyncio.Event,
    tokens: list[str],
    rng: random.Random,
) -> None:
    """One user: a message every 0.5x-1.5x `period` seconds until `stop`."""
    while not stop.is_set():
        pushed = await asyncio.to_thread(
            control.call, "/_control/push", {"messages": [{"chat_id": chat, "text": "tell me"}]}
        )
        tokens += pushed["tokens"]
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(0.5, 1.5) * period)
        except TimeoutError:
            pass


async def latencies_of(control: Control, tokens: list[str]) -> list[float]:
    """Injected to sent, per message, once every reply is in (the stand-ins' clock)."""
    for _ in range(300):
        records = (await asyncio.to_thread(control.call, "/_control/results", None, 60))["records"]
        if all(records.get(t, {}).get("sent") is not None for t in tokens):
            break
        await asyncio.sleep(0.1)
    return [
        records[t]["sent"] - records[t]["injected"]
        for t in tokens
        if records.get(t, {}).get("sent") is not None
    ]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_figures(latencies: list[float]) -> dict[str, Any]:
    return {
        "replies": len(latencies),
        "p50_s": round(pct(latencies, 0.5), 3),
        "p99_s": round(pct(latencies, 0.99), 3),
        "max_s": round(max(latencies), 3) if latencies else None,
        "mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
    }


async def run_eval(app: ParleyApp, items: int) -> tuple[float, dict[str, Any]]:
    services = app.bot_data.services
    assert services is not None
    record = await services.evaluation.job(JOB)
    assert record is not None
    started = time.monotonic()
    run = await services.evaluation.start(record, CANDIDATE, ADMIN, items)
    assert run is not None
    while True:
        current = await services.evaluation.evals.run(run.id)
        if current is not None and current.status == "done":
            break
        await asyncio.sleep(0.1)
    wall = time.monotonic() - started
    summary, _ = await services.evaluation.summary(current)
    slots = services.evaluation.slots
    return wall, {
        "judged": summary.judged,
        "errors": summary.errors,
        "max_calls_in_flight": slots.max_in_flight,
        "calls_that_waited_for_a_slot": slots.deferred,
    }


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    standins = Standins(workdir)
    control = standins.start()
    info = standins.info
    results: dict[str, Any] = {
        "items": args.items,
        "model_latency_s": args.latency,
        "chats": args.chats,
        "think_s": args.think,
        "eval_concurrency": args.concurrency,
        "eval_yield_seconds": args.yield_seconds,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "scenarios": {},
    }
    try:
        control.call("/_control/config", {"latency": args.latency})
        db = workdir / "bench.sqlite3"
        await seed(db, args.items)
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            telegram_bot_token=info["token"],
            telegram_api_url=info["telegram"],
            openai_api_key=info["api_key"],
            openai_base_url=info["openai"],
            openai_max_retries=0,
            database_url=f"sqlite:///{db}",
            admin_user_ids=str(ADMIN),
            sentiment_backend="off",
            telegram_max_rate=0,
            telegram_group_rate=0,
            log_level="WARNING",
            eval_concurrency=args.concurrency,
            eval_yield_seconds=args.yield_seconds,
        )
        app = await start_bot(settings)
        # The admin's chat exists once they have written (the evaluation reports there).
        control.call("/_control/push", {"messages": [{"chat_id": ADMIN, "text": "hello"}]})
        rng = random.Random(1)
        chat_ids = iter(range(5000, 10_000_000))
        period = args.think + args.latency
        try:
            for scenario in args.scenarios.split(","):
                print(f"[eval bench] {scenario}...", file=sys.stderr, flush=True)
                stop = asyncio.Event()
                tokens: list[str] = []
                loops = []
                if scenario in ("chats", "both"):
                    loops = [
                        asyncio.create_task(
                            chat_loop(control, next(chat_ids), period, stop, tokens, rng)
                        )
                        for _ in range(args.chats)
                    ]
                figures: dict[str, Any] = {}
                if scenario in ("eval", "both"):
                    wall, extra = await run_eval(app, args.items)
                    figures["eval_wall_s"] = round(wall, 1)
                    figures.update(extra)
                else:
                    await asyncio.sleep(args.duration)
                stop.set()
                await asyncio.gather(*loops)
                if loops:
                    figures["chat_reply_latency"] = latency_figures(
                        await latencies_of(control, tokens)
                    )
                results["scenarios"][scenario] = figures
                services = app.bot_data.services
                assert services is not None
                services.evaluation.slots.max_in_flight = services.evaluation.slots.deferred = 0
        finally:
            await stop_bot(app)
    finally:
        standins.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--think", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--yield-seconds", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--scenarios", default="chats,eval,both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"evaluation of {args.items} items at {args.latency:g} s model latency,"
        f" EVAL_CONCURRENCY={args.concurrency}, EVAL_YIELD_SECONDS={args.yield_seconds:g};"
        f" {args.chats} chats, think time ~{args.think:g} s"
    )
    for scenario in args.scenarios.split(","):
        r = results["scenarios"].get(scenario, {})
        line = f"  {scenario:6}"
        if "eval_wall_s" in r:
            line += (
                f"  eval wall {r['eval_wall_s']} s ({r['judged']} judged, {r['errors']} errors,"
                f" {r['calls_that_waited_for_a_slot']} calls waited for a slot)"
            )
        if "chat_reply_latency" in r:
            c = r["chat_reply_latency"]
            line += f"  chat replies {c['replies']}: p50 {c['p50_s']} s, p99 {c['p99_s']} s"
        print(line)


if __name__ == "__main__":
    main()
