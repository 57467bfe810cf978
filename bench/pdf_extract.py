"""Reading a PDF's text as the bot does: time and peak memory of the reader process.

    python bench/pdf_extract.py [--pages 100] [--runs 5] [--json]

Builds a PDF of `--pages` text pages (40 lines of about 60 characters each, Flate-compressed
content streams, as tests/pdfs.py makes them), then runs the bot's PDF reader
(`bot/services/pdf_text.py`, a child process, exactly as bot/services/documents.py starts
it: isolated, no environment, RLIMIT_AS 512 MB) `--runs` times in each of three ways:

* whole: every page's text (what a dataset or a model reading the whole file would need);
* budget: pages until the default DOCUMENT_MAX_TOKENS (8,000 tokens) is full, what a turn
  on the local backend reads;
* start-up: a one-page PDF, the fixed cost of a reader process.

Wall time covers the whole process (start, imports, reading, JSON out); peak memory is the
reader's own peak RSS (VmHWM, reported as it exits). Figures are printed, never asserted. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pypdf  # noqa: E402

from bot.services.documents import PDF_WORKER  # noqa: E402
from tests.pdfs import text_pdf  # noqa: E402

MEMORY_MB = 512
CPU_SECONDS = 31
BUDGET_CHARS = 8000 * 4 + 64  # as DocumentService._read_pdf asks for the default budget
# The reader, run as the bot runs it, reporting its peak RSS (VmHWM, since its exec) as it
# exits. wait4's ru_maxrss would count the bench's own memory, which the child had at fork.
REPORT_PEAK = """
import atexit, runpy, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write(line.split()[1])
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
WORDS = "the board expects steady growth in revenue across every region this year".split()


def sample_pdf(pages: int) -> bytes:
    def line(p: int, n: int) -> str:
        words = [WORDS[(p * 7 + n * 3 + i) % len(WORDS)] for i in range(10)]
        return f"{p + 1}.{n + 1} " + " ".join(words).capitalize() + "."

    return text_pdf([[line(p, n) for n in range(40)] for p in range(pages)])


def read_once(data: bytes, max_pages: int, max_chars: int) -> tuple[float, int, dict[str, Any]]:
    """(seconds, peak RSS in bytes, result) of one reader process."""
    args = [str(max_pages), str(max_chars), str(MEMORY_MB), str(CPU_SECONDS)]
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-I", "-c", REPORT_PEAK, str(PDF_WORKER), *args],
        input=data,
        capture_output=True,
        env={},
        check=False,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"error: the reader exited with {proc.returncode}: {proc.stderr[-500:]!r}")
    return seconds, int(proc.stderr.split()[-1]) * 1024, json.loads(proc.stdout)


def measure(data: bytes, max_pages: int, max_chars: int, runs: int) -> dict[str, Any]:
    times, peaks = [], []
    result: dict[str, Any] = {}
    for _ in range(runs):
        seconds, peak, result = read_once(data, max_pages, max_chars)
        times.append(seconds)
        peaks.append(peak)
    texts = result.get("texts", [])
    return {
        "pages_read": len(texts),
        "chars": sum(len(t) for t in texts),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mib": max(peaks) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("error: Linux only (wait4's max RSS, RLIMIT_AS)")
    started = time.perf_counter()
    data = sample_pdf(opts.pages)
    built = time.perf_counter() - started
    report = {
        "python": platform.python_version(),
        "pypdf": pypdf.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "pdf_pages": opts.pages,
        "pdf_bytes": len(data),
        "build_s": built,
        "whole": measure(data, opts.pages, 10**9, opts.runs),
        "budget": measure(data, opts.pages, BUDGET_CHARS, opts.runs),
        "start_up": measure(sample_pdf(1), 1, 10**9, opts.runs),
    }
    if opts.json:
        print(json.dumps(report, indent=2))
        return
    print(f"PDF reader, {report['machine']}, Python {report['python']}, pypdf {report['pypdf']}")
    print(f"{opts.pages}-page PDF: {len(data) / 1024:.0f} KiB, built in {built:.2f} s")
    print(f"{'case':<10} {'pages':>6} {'chars':>9} {'median':>9} {'min':>9} {'peak RSS':>10}")
    for case in ("whole", "budget", "start_up"):
        row = report[case]
        print(
            f"{case:<10} {row['pages_read']:>6} {row['chars']:>9,} {row['median_s'] * 1000:>7.0f} ms"
            f" {row['min_s'] * 1000:>6.0f} ms {row['peak_rss_mib']:>7.1f} MiB"
        )


if __name__ == "__main__":
    main()
