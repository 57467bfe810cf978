"""Benchmark for bot.services.images.prepare_image.

    python bench/images_bench.py [--json] [--runs N]

Generates photo-like inputs with Pillow only (no numpy, no fixtures): a 12 MP (4000x3000)
JPEG carrying EXIF orientation 6, a 12 MP PNG and a 4000x3000 WebP. Reports wall time per
call (min/median/p95 over N runs) with and without JPEG draft mode, and memory for a batch of
10 distinct large images, each measured in a fresh subprocess:

* tracemalloc peak -- Python-visible allocations only (input/output ``bytes``, BytesIO).
  Pillow's pixel buffers and libjpeg/libwebp/zlib working memory come from C malloc and are
  NOT seen by tracemalloc.
* ru_maxrss -- the process high-water mark, which does include them. Reported as the value
  after loading the inputs (baseline) and after the batch; the difference is what preparing
  cost on top. Note ru_maxrss never goes down, so it shows the worst single moment.

No assertions: numbers are for reading. Peak memory per image format against the estimate
the bot budgets with, and per album in the real bot process: bench/album_memory.py.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import PIL  # noqa: E402
from PIL import Image  # noqa: E402

from bot.services import images  # noqa: E402
from bot.services.images import ImageLimits, prepare_image  # noqa: E402

BIG_BYTES = 64 * 1024 * 1024  # the 12 MP PNG is bigger than the default 20 MiB max_bytes


# --------------------------------------------------------------------------- inputs


@functools.cache
def _base(w: int, h: int) -> Image.Image:
    """Smooth structure: gradients plus a Mandelbrot patch (rendered small, then upscaled)."""
    grad = Image.linear_gradient("L").resize((w, h))
    radial = Image.radial_gradient("L").resize((w, h))
    mandel = Image.effect_mandelbrot((w // 4, h // 4), (-0.75, -0.1, -0.74, -0.09), 120)
    return Image.merge("RGB", (grad, radial, mandel.resize((w, h), Image.Resampling.BICUBIC)))


@functools.cache
def _grain(w: int, h: int, noise: float) -> Image.Image:
    return Image.effect_noise((w + 512, h + 512), noise).convert("RGB")


_calls = iter(range(1_000_000))


def _photo(w: int, h: int, noise: float = 40.0, blend: float = 0.3) -> Image.Image:
    """Photo-like: smooth structure plus sensor-like noise, a different crop on every call."""
    i = next(_calls)
    dx, dy = (i * 97) % 512, (i * 53) % 512
    grain = _grain(w, h, noise).crop((dx, dy, dx + w, dy + h))
    return Image.blend(_base(w, h), grain, blend)


def make_jpeg(w: int = 4000, h: int = 3000) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "BenchCam"
    buf = io.BytesIO()
    _photo(w, h).save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def make_png(w: int = 4000, h: int = 3000) -> bytes:
    buf = io.BytesIO()
    _photo(w, h, noise=12.0, blend=0.15).save(buf, "PNG")  # screenshot-ish, less grain
    return buf.getvalue()


def make_webp(w: int = 4000, h: int = 3000) -> bytes:
    buf = io.BytesIO()
    _photo(w, h).save(buf, "WEBP", quality=85)
    return buf.getvalue()


MAKERS: dict[str, Callable[[], bytes]] = {"JPEG": make_jpeg, "PNG": make_png, "WEBP": make_webp}


# --------------------------------------------------------------------------- timing


def _no_draft(*_args: object, **_kwargs: object) -> None:
    return None


def time_case(data: bytes, limits: ImageLimits, runs: int, draft: bool = True) -> dict:
    original = images._apply_draft
    if not draft:
        images._apply_draft = _no_draft  # bench-only switch to show what draft mode buys
    try:
        prepare_image(data, limits)  # warm-up
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            out = prepare_image(data, limits)
            samples.append((time.perf_counter() - t0) * 1000)
    finally:
        images._apply_draft = original
    samples.sort()
    p95 = samples[min(len(samples) - 1, max(0, round(0.95 * len(samples)) - 1))]
    return {
        "in_bytes": len(data),
        "out": f"{out.width}x{out.height}",
        "out_bytes": len(out.data),
        "min_ms": round(samples[0], 1),
        "median_ms": round(statistics.median(samples), 1),
        "p95_ms": round(p95, 1),
    }


# --------------------------------------------------------------------------- memory


def _ru_maxrss_mib() -> float:
    # Linux reports KiB, macOS bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the per-process RSS high-water mark)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(paths: list[str], threads: int) -> dict:
    """Runs in a fresh interpreter: prepare every file once, report memory high-water marks."""
    limits = ImageLimits(max_bytes=BIG_BYTES)
    for fmt in ("JPEG", "PNG", "WEBP"):  # initialise codecs on a tiny image first
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, fmt)
        prepare_image(buf.getvalue(), limits)
    inputs = [Path(p).read_bytes() for p in paths]
    # ru_maxrss is not usable as a baseline here: Linux carries the parent's high-water mark
    # across fork/exec into sig->maxrss, and the parent held several 12 MP images. VmHWM is
    # per address space and can be reset, so use it where available.
    baseline = _proc_status_mib("VmRSS")  # interpreter + Pillow + the encoded inputs
    has_hwm = _reset_peak_rss() and baseline is not None
    ru_before = _ru_maxrss_mib()
    tracemalloc.start()
    if threads <= 1:
        for data in inputs:
            prepare_image(data, limits)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda d: prepare_image(d, limits), inputs))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    ru_after = _ru_maxrss_mib()
    if has_hwm:
        assert baseline is not None
        before, after, source = baseline, _proc_status_mib("VmHWM") or 0.0, "VmHWM"
    else:
        before, after, source = ru_before, ru_after, "ru_maxrss"
    return {
        "inputs_mib": round(sum(map(len, inputs)) / 2**20, 1),
        "tracemalloc_peak_mib": round(peak / 2**20, 1),
        "rss_source": source,
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(after, 1),
        "peak_rss_delta_mib": round(after - before, 1),
        "ru_maxrss_before_mib": round(ru_before, 1),
        "ru_maxrss_after_mib": round(ru_after, 1),
    }


def memory_case(fmt: str, tmp: Path, threads: int) -> dict:
    paths = []
    for i in range(10):  # ten distinct images (fresh noise each time)
        p = tmp / f"{fmt.lower()}_{i}"
        if not p.exists():
            p.write_bytes(MAKERS[fmt]())
        paths.append(str(p))
    cmd = [sys.executable, __file__, "--memory-child", str(threads), *paths]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout)


# --------------------------------------------------------------------------- main


def machine() -> str:
    return (
        f"{platform.platform()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPUs | Python {platform.python_version()} | Pillow {PIL.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--memory-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        threads, *paths = args.memory_child
        print(json.dumps(memory_child(paths, int(threads))))
        return

    jpeg, png, webp = make_jpeg(), make_png(), make_webp()
    big = ImageLimits(max_bytes=BIG_BYTES)
    timing = {
        "JPEG 12MP, draft + 5% slack (default) -> 1/2-scale decode": time_case(
            jpeg, big, args.runs
        ),
        "JPEG 12MP, draft_slack=0 (exact 2048; 4000/2048 < 2 so draft can't help)": time_case(
            jpeg, ImageLimits(max_bytes=BIG_BYTES, draft_slack=0.0), args.runs
        ),
        "JPEG 12MP, draft disabled": time_case(jpeg, big, args.runs, draft=False),
        "JPEG 12MP, max_side=1024, draft": time_case(
            jpeg, ImageLimits(max_bytes=BIG_BYTES, max_side=1024), args.runs
        ),
        "JPEG 12MP, max_side=1024, draft disabled": time_case(
            jpeg, ImageLimits(max_bytes=BIG_BYTES, max_side=1024), args.runs, draft=False
        ),
        "JPEG 12MP -> WebP output (default otherwise)": time_case(
            jpeg, ImageLimits(max_bytes=BIG_BYTES, output_format="WEBP"), args.runs
        ),
        "PNG 12MP (verify + decode + resize)": time_case(png, big, args.runs),
        "WebP 4000x3000": time_case(webp, big, args.runs),
    }
    memory = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for fmt in ("JPEG", "PNG", "WEBP"):
            memory[f"{fmt} x10, sequential"] = memory_case(fmt, tmp, 1)
        memory["JPEG x10, 2 threads"] = memory_case("JPEG", tmp, 2)
        memory["PNG x10, 2 threads"] = memory_case("PNG", tmp, 2)

    if args.json:
        print(json.dumps({"machine": machine(), "timing": timing, "memory": memory}, indent=2))
        return

    print(f"### prepare_image benchmark -- {machine()}\n")
    print(f"Wall time per call, {args.runs} runs after one warm-up.\n")
    print("| case | input | output | min ms | median ms | p95 ms |")
    print("|---|---:|---|---:|---:|---:|")
    for name, r in timing.items():
        print(
            f"| {name} | {r['in_bytes'] / 2**20:.1f} MiB | {r['out']}, "
            f"{r['out_bytes'] / 1024:.0f} KiB | {r['min_ms']} | {r['median_ms']} | {r['p95_ms']} |"
        )
    print(
        "\nMemory, batch of 10 distinct large images, fresh process per row. tracemalloc sees "
        "Python allocations only; Pillow/codec buffers are C malloc and show in RSS only. "
        "RSS before = interpreter + Pillow + the 10 encoded inputs; peak = high-water mark "
        "during the batch (Linux VmHWM, reset before the batch; ru_maxrss in --json).\n"
    )
    print("| batch | inputs | tracemalloc peak | RSS before | peak RSS | peak - before |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in memory.items():
        print(
            f"| {name} | {m['inputs_mib']} MiB | {m['tracemalloc_peak_mib']} MiB | "
            f"{m['rss_before_mib']} MiB | {m['peak_rss_mib']} MiB ({m['rss_source']}) | "
            f"{m['peak_rss_delta_mib']} MiB |"
        )


if __name__ == "__main__":
    main()
