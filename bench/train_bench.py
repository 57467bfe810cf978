"""Benchmark the LoRA worker: training throughput, peak memory, time per 1,000 examples.

    python bench/train_bench.py [--model DIR_OR_HUB_ID | --hidden-size 64 --layers 2]
                                [--examples 256] [--turns 4]
                                [--epochs 1] [--batch-size 4] [--max-seq-len 1024]
                                [--json] [--keep DIR]

Without --model it builds the tiny test model (tests/tinymodel.py: a random ~0.1M-parameter
Qwen2 with its own tokenizer) in a temporary directory, so it runs anywhere, offline, on the
CPU. With --model (e.g. Qwen/Qwen2.5-0.5B-Instruct or a local directory) it measures a real
base model, on the GPU when there is one.

It runs the real worker (`python -m trainer.worker JOB_DIR`, the service's config.json contract)
as a subprocess and reads its events. The figures come from the worker's `done` event:

* tokens/s: non-padding tokens trained per second of the training loop (TRL's token count);
* time per 1,000 examples: training-loop seconds per example-epoch, times 1,000;
* peak memory: the worker's peak RSS on the CPU (getrusage), or torch's peak allocated CUDA
  memory on a GPU;
* start-up: the worker's wall time outside the training loop (imports, loading, tokenizing,
  saving the adapter).

Examples are the tiny model's learnable chat (system + `--turns` question/answer pairs). No
assertions: numbers are for reading.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.tinymodel import SYSTEM, build_tiny_model, chat_example  # noqa: E402


def write_examples(path: Path, n: int, turns: int, seed: int = 0) -> Path:
    """n conversations of a system message and `turns` user/assistant pairs, as JSONL."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(n):
            messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
            for _ in range(turns):
                messages += chat_example(rng)["messages"][1:]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        device = f"cuda: {torch.cuda.get_device_name(0)}" + (f" (x{n} visible)" if n > 1 else "")
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }


def run_worker(job: Path, *, verbose: bool) -> tuple[list[dict[str, Any]], float, str]:
    """Run the worker to the end; its events, the wall time, and its stderr tail."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.worker", str(job)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events: list[dict[str, Any]] = []
    assert proc.stdout is not None and proc.stderr is not None
    with proc:
        for line in proc.stdout:
            event = json.loads(line)
            events.append(event)
            if verbose and event["type"] in ("status", "eval", "checkpoint", "error"):
                print(f"  {event}", file=sys.stderr)
        stderr = proc.stderr.read()
    return events, time.monotonic() - started, stderr[-4000:]


def bench(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    if args.model:
        model = args.model
    else:
        model = str(
            build_tiny_model(base / "tiny-model", hidden_size=args.hidden_size, layers=args.layers)
        )
    train = write_examples(base / "train.jsonl", args.examples, args.turns)
    job = base / "job"
    job.mkdir(parents=True, exist_ok=True)
    config = {
        "base_model_path": model,
        "training_file": str(train),
        "validation_file": None,
        "n_epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate_multiplier": 1.0,
        "seed": 0,
        "max_seq_len": args.max_seq_len,
        "output_dir": str(base / "out"),
        "resume_from_checkpoint": None,
        "save_steps": None,
    }
    (job / "config.json").write_text(json.dumps(config), encoding="utf-8")
    events, wall, stderr = run_worker(job, verbose=not args.json)
    done = [e for e in events if e["type"] == "done"]
    if not done:
        errors = [e["message"] for e in events if e["type"] == "error"]
        sys.exit(f"the worker failed: {errors or stderr}")
    d = done[0]
    steps = [e for e in events if e["type"] == "step"]
    example_epochs = args.examples * args.epochs
    return {
        "model": args.model
        or f"tiny (tests/tinymodel.py, hidden {args.hidden_size}, {args.layers} layers)",
        "examples": args.examples,
        "turns": args.turns,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "steps": len(steps),
        "trained_tokens": d["trained_tokens"],
        "tokens_per_example": round(d["trained_tokens"] / example_epochs, 1),
        "tokens_per_second": d["tokens_per_second"],
        "train_seconds": d["train_seconds"],
        "seconds_per_1000_examples": round(d["train_seconds"] / example_epochs * 1000, 2),
        "startup_seconds": round(d["seconds"] - d["train_seconds"], 2),
        "wall_seconds": round(wall, 2),
        "peak_memory_mb": round(d["peak_memory_bytes"] / 2**20, 1),
        "first_loss": steps[0]["train_loss"] if steps else None,
        "last_loss": steps[-1]["train_loss"] if steps else None,
    }


def markdown(report: dict[str, Any]) -> str:
    m, r = report["machine"], report["result"]
    rows = [
        ("model", r["model"]),
        (
            "data",
            f"{r['examples']:,} examples x {r['epochs']} epoch(s), {r['turns']} turns each, "
            f"~{r['tokens_per_example']} tokens/example, batch {r['batch_size']}, "
            f"{r['steps']} steps",
        ),
        ("throughput", f"{r['tokens_per_second']:,} tokens/s"),
        ("time per 1,000 examples", f"{r['seconds_per_1000_examples']} s"),
        ("training loop", f"{r['train_seconds']} s"),
        ("start-up + save (imports, load, tokenize)", f"{r['startup_seconds']} s"),
        ("worker wall time", f"{r['wall_seconds']} s"),
        ("peak memory", f"{r['peak_memory_mb']} MB"),
        ("loss (first step -> last step)", f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"),
    ]
    return "\n".join(
        [
            f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}, "
            f"device {m['device']}",
            "",
            "| measure | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base model: Hub id or local directory (default: tiny)")
    parser.add_argument("--hidden-size", type=int, default=64, help="of the built model")
    parser.add_argument("--layers", type=int, default=2, help="of the built model")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--turns", type=int, default=4, help="question/answer pairs an example")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parley-train-bench-") as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        result = bench(args, base)
    report = {"machine": machine(), "result": result}
    print(json.dumps(report, indent=2) if args.json else markdown(report))


if __name__ == "__main__":
    main()
