"""Benchmark the sentiment analyzers: accuracy on the eval set and time per reply.

    python bench/sentiment_bench.py [--data PATH] [--calls N] [--json]
        [--model-url URL [--model NAME] [--api chat|responses]]

The offline analyzers are timed on replies of realistic length. With --model-url the model
analyzer is measured too, against that OpenAI-compatible server, asked the way the bot
asks it (`--api chat`: Chat Completions with response_format, as on the local backend;
`responses`: the Responses API, as on the openai backend); the key is OPENAI_API_KEY.
It is timed on the eval rows themselves, one request each.

The eval set is for measuring only; nothing in bot/services/sentiment.py is tuned on it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LABELS = ("positive", "neutral", "negative")


def default_data_path() -> Path:
    shared = os.environ.get("PARLEY_SHARED_DIR") or str(REPO.parent / "shared")
    return Path(shared) / "data" / "sentiment-eval.jsonl"


def load_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        sys.exit(f"error: eval data not found at {path} (use --data or set PARLEY_SHARED_DIR)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    for i, row in enumerate(rows, 1):
        if not {"text", "label", "lang"} <= row.keys() or row["label"] not in LABELS:
            sys.exit(f"error: {path}:{i}: need text, label (one of {LABELS}) and lang")
    return rows


def macro_f1(gold: list[str], pred: list[str]) -> float:
    f1s = []
    for label in LABELS:
        tp = sum(g == p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(p == label != g for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label != p for g, p in zip(gold, pred, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def reply_texts(rows: list[dict[str, str]], n: int, seed: int = 0) -> list[str]:
    """Texts of realistic reply length (300-800 chars) made by concatenating eval texts."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = rng.randint(300, 800)
        parts: list[str] = []
        while len(" ".join(parts)) < target:
            parts.append(rng.choice(rows)["text"])
        texts.append(" ".join(parts)[:target])
    return texts


async def evaluate(analyzer: Any, rows: list[dict[str, str]], texts: list[str]) -> dict[str, Any]:
    preds = []
    for row in rows:
        result = await analyzer.analyze(row["text"])
        preds.append(result.label)
    gold = [r["label"] for r in rows]
    langs = sorted({r["lang"] for r in rows}, key=lambda x: (x != "en", x == "emoji", x))
    per_lang = {}
    for lang in langs:
        idx = [i for i, r in enumerate(rows) if r["lang"] == lang]
        per_lang[lang] = {"correct": sum(gold[i] == preds[i] for i in idx), "total": len(idx)}

    for text in texts[:50]:  # warm-up
        await analyzer.analyze(text)
    times = []
    for text in texts:
        t0 = time.perf_counter_ns()
        await analyzer.analyze(text)
        times.append((time.perf_counter_ns() - t0) / 1000)
    times.sort()
    return {
        "analyzer": analyzer.name,
        "correct": sum(g == p for g, p in zip(gold, preds, strict=True)),
        "total": len(rows),
        "macro_f1": round(macro_f1(gold, preds), 3),
        "per_lang": per_lang,
        "predicted": dict(Counter(preds)),
        "us_mean": round(statistics.fmean(times), 1),
        "us_p99": round(times[min(len(times) - 1, int(len(times) * 0.99))], 1),
    }


async def evaluate_model(analyzer: Any, rows: list[dict[str, str]], label: str) -> dict[str, Any]:
    """Accuracy and latency of a model analyzer; a failed request counts as wrong."""
    from bot.services.sentiment import SentimentError

    preds, times, failures = [], [], Counter[str]()
    for row in rows:
        t0 = time.perf_counter_ns()
        try:
            result = await analyzer.analyze(row["text"])
            preds.append(result.label)
        except SentimentError as exc:
            failures[str(exc)] += 1
            preds.append("failed")
        times.append((time.perf_counter_ns() - t0) / 1000)
    gold = [r["label"] for r in rows]
    per_lang: dict[str, dict[str, int]] = {}
    for row, pred in zip(rows, preds, strict=True):
        cell = per_lang.setdefault(row["lang"], {"correct": 0, "total": 0})
        cell["correct"] += pred == row["label"]
        cell["total"] += 1
    times.sort()
    return {
        "analyzer": label,
        "correct": sum(g == p for g, p in zip(gold, preds, strict=True)),
        "total": len(rows),
        "macro_f1": round(macro_f1(gold, preds), 3),
        "per_lang": per_lang,
        "predicted": dict(Counter(preds)),
        "failures": dict(failures),
        "us_mean": round(statistics.fmean(times), 1),
        "us_p99": round(times[min(len(times) - 1, int(len(times) * 0.99))], 1),
    }


async def model_result(args: argparse.Namespace, rows: list[dict[str, str]]) -> dict[str, Any]:
    import openai

    from bot.services import sentiment

    client = openai.AsyncOpenAI(
        api_key=os.environ.get("OPENAI_API_KEY") or "not-needed",
        base_url=args.model_url,
        max_retries=0,
    )
    kind = sentiment.ChatModelAnalyzer if args.api == "chat" else sentiment.ModelAnalyzer
    analyzer = kind(client, args.model, timeout=args.timeout)
    try:
        return await evaluate_model(analyzer, rows, f"model ({args.model}, {args.api})")
    finally:
        await client.close()


def machine() -> dict[str, Any]:
    return {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def pct(correct: int, total: int) -> str:
    return f"{correct}/{total} ({100 * correct / total:.0f}%)" if total else "-"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    langs = list(report["results"][0]["per_lang"])
    model_rows = [r for r in report["results"] if r.get("failures") is not None]
    lines = [
        f"Machine: {m['processor']} / {m['machine']}, {m['cpus']} CPUs, Python {m['python']}",
        f"Data: {report['data']} ({report['rows']} rows); timing: {report['calls']} calls on "
        f"texts of {report['text_chars']['min']}-{report['text_chars']['max']} chars "
        f"(mean {report['text_chars']['mean']})",
        f"Lexicon one-time load: import {report['vader_import_ms']} ms + "
        f"build {report['lexicon_load_ms']} ms",
        "",
        "| analyzer | overall | macro-F1 | "
        + " | ".join(langs)
        + " | mean µs/reply | p99 µs/reply |",
        "|---|---|---|" + "---|" * len(langs) + "---|---|",
    ]
    for r in report["results"]:
        cells = [pct(r["per_lang"][x]["correct"], r["per_lang"][x]["total"]) for x in langs]
        lines.append(
            f"| {r['analyzer']} | {pct(r['correct'], r['total'])} | {r['macro_f1']:.3f} | "
            + " | ".join(cells)
            + f" | {r['us_mean']:.0f} | {r['us_p99']:.0f} |"
        )
    for r in model_rows:
        if r["failures"]:
            lines.append(f"{r['analyzer']} failures: {r['failures']}")
    if model_rows:
        lines.append("(the model is timed per eval row, one request each; the others per reply)")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = load_rows(args.data)

    t0 = time.perf_counter()
    importlib.import_module("vaderSentiment.vaderSentiment")
    import_ms = (time.perf_counter() - t0) * 1000

    from bot.services import sentiment

    t0 = time.perf_counter()
    sentiment.shared_vader()  # first call parses the lexicon files
    load_ms = (time.perf_counter() - t0) * 1000

    texts = reply_texts(rows, args.calls)
    lengths = [len(t) for t in texts]
    analyzers = [sentiment.KeywordAnalyzer(), sentiment.LexiconAnalyzer()]
    return {
        "machine": machine(),
        "data": str(args.data),
        "rows": len(rows),
        "calls": args.calls,
        "text_chars": {
            "min": min(lengths),
            "max": max(lengths),
            "mean": round(statistics.fmean(lengths)),
        },
        "vader_import_ms": round(import_ms, 1),
        "lexicon_load_ms": round(load_ms, 1),
        "results": [await evaluate(a, rows, texts) for a in analyzers]
        + ([await model_result(args, rows)] if args.model_url else []),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_path())
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--model-url", help="an OpenAI-compatible API, e.g. http://host:8000/v1")
    parser.add_argument("--model", default="gpt-5.4-nano", help="the model to ask")
    parser.add_argument(
        "--api",
        choices=("chat", "responses"),
        default="chat",
        help="Chat Completions (the local backend's way) or the Responses API (openai's)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else markdown(report))


if __name__ == "__main__":
    main()
