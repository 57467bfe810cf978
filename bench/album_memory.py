"""Peak memory of image work: per image (prepare_image alone) and per album (the real bot).

    python bench/album_memory.py [--json] [--skip-bot]

Per image: every case is prepared once in a fresh interpreter, which reports its peak RSS
above what it held before (Linux VmHWM, reset just before) next to the estimate the bot
budgets with (ImageInfo.decode_bytes, from the headers alone) and whether the default cap
(ImageLimits.max_decode_bytes) admits it.

Per album: `python -m bot` runs against the stand-in Telegram and OpenAI servers (from
tests/stubs, in this process, spec checks off), with IMAGE_MAX_MB=20 as against Telegram's
own Bot API server; the figure is the bot process's VmHWM, its peak RSS since it started,
next to its RSS once it polls. Only 127.0.0.1 is used; the bot is always killed.

No assertions (tests/test_image_memory.py has them): numbers are for reading. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import PIL  # noqa: E402
from PIL import Image  # noqa: E402

from bot.services.images import DEFAULT_LIMITS  # noqa: E402

MIB = 1024 * 1024

# --------------------------------------------------------------------------- inputs


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    bands = [Image.effect_noise((width, height), 80).convert("L") for _ in range(4)]
    if mode == "RGBA":
        return Image.merge("RGBA", bands)
    return Image.merge("RGB", bands[:3])


def photo(width: int, height: int) -> Image.Image:
    """Smooth structure plus light grain: compresses like a photograph."""
    base = Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize((width, height)),
            Image.radial_gradient("L").resize((width, height)),
            Image.linear_gradient("L").rotate(90).resize((width, height)),
        ),
    )
    return Image.blend(base, noise(width, height), 0.15)


def flat(mode: str, size: tuple[int, int]) -> Image.Image:
    return Image.new(
        mode, size, 0 if mode in ("P", "L", "1", "I;16") else (200, 30, 30, 128)[: len(mode)]
    )


IMAGES: dict[str, Callable[[], bytes]] = {
    "JPEG 12 MP photo, q90": lambda: encode(photo(4000, 3000), "JPEG", quality=90),
    "JPEG 12 MP noise, progressive": lambda: encode(noise(4000, 3000), "JPEG", progressive=True),
    "JPEG 36 MP, progressive 4:4:4": lambda: encode(
        flat("RGB", (6000, 6000)), "JPEG", progressive=True, subsampling=0
    ),
    "PNG 12 MP photo, RGB": lambda: encode(photo(4000, 3000), "PNG", compress_level=1),
    "PNG 12 MP noise, RGBA": lambda: encode(noise(4000, 3000, "RGBA"), "PNG", compress_level=1),
    "PNG 36 MP single colour, RGBA": lambda: encode(flat("RGBA", (6000, 6000)), "PNG"),
    "PNG 36 MP single colour, palette + tRNS": lambda: encode(
        flat("P", (6000, 6000)), "PNG", transparency=0
    ),
    "PNG 36 MP single colour, 16-bit grey": lambda: encode(flat("I;16", (6000, 6000)), "PNG"),
    "GIF 36 MP single colour": lambda: encode(flat("P", (6000, 6000)), "GIF"),
    "WebP 12 MP photo, lossy": lambda: encode(photo(4000, 3000), "WEBP", quality=85),
    "WebP 12 MP single colour, lossless": lambda: encode(
        flat("RGB", (4000, 3000)), "WEBP", lossless=True
    ),
    "WebP 36 MP single colour, lossless (the 1.4 KB bomb)": lambda: encode(
        flat("RGB", (6000, 6000)), "WEBP", lossless=True
    ),
}

CHILD = """
import io, json, sys
from pathlib import Path
from PIL import Image
from bot.services.images import ImageLimits, inspect_image, prepare_image

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

for fmt in ("JPEG", "PNG", "WEBP", "GIF"):  # codecs initialised before measuring
    small = io.BytesIO()
    Image.new("RGB", (16, 16)).save(small, fmt)
    prepare_image(small.getvalue())
limits = ImageLimits(max_bytes=1 << 30, max_decode_bytes=1 << 40)  # measure what is refused
data = Path(sys.argv[1]).read_bytes()
info = inspect_image(data, limits)
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
out = prepare_image(data, limits, info)
print(json.dumps({"estimate": info.decode_bytes, "peak": status("VmHWM") - before,
                  "size": f"{info.width}x{info.height}", "out": f"{out.width}x{out.height}"}))
"""


def per_image(tmp: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for name, make in IMAGES.items():
        path = tmp / "image"
        data = make()
        path.write_bytes(data)
        run = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        row = json.loads(run.stdout)
        row["file_bytes"] = len(data)
        row["admitted"] = row["estimate"] <= DEFAULT_LIMITS.max_decode_bytes
        results[name] = row
    return results


# --------------------------------------------------------------------------- albums


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def _album(name: str, push: Callable[[Any], list[int]], workdir: Path) -> dict[str, Any]:
    from tests.stubs.openai_server import API_KEY, FakeOpenAI
    from tests.stubs.telegram_server import FakeTelegram

    token = "123456789:AAFakeTokenForParleyBench-abcdefghijkl"
    tg, oai = FakeTelegram(token, None), FakeOpenAI(None)
    await tg.start()
    await oai.start()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO),
        "HOME": "/nonexistent",
        "TELEGRAM_BOT_TOKEN": token,
        "TELEGRAM_API_URL": tg.url,
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": oai.url,
        "ALBUM_WAIT": "0.5",
        "LOG_LEVEL": "WARNING",
        "SENTIMENT_BACKEND": "off",
        "IMAGE_MAX_MB": "20",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        cwd=workdir,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await tg.wait_for(lambda: bool(tg.calls_of("getUpdates")), timeout=60)
        start = _status(proc.pid, "VmRSS")
        loop = asyncio.get_running_loop()
        began = loop.time()
        chats = push(tg)
        for chat in chats:
            await tg.wait_sent(chat, 1, timeout=300)
        took = loop.time() - began
        peak = _status(proc.pid, "VmHWM")
        answers = sorted({tg.sent_texts(chat)[0][:48] for chat in chats})
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await tg.stop()
        await oai.stop()
    return {
        "rss_start_mib": round(start / MIB),
        "peak_rss_mib": round(peak / MIB),
        "seconds": round(took, 1),
        "answers": answers,
        "name": name,
    }


def _pushes() -> dict[str, Callable[[Any], list[int]]]:
    bomb = encode(flat("RGB", (6000, 6000)), "WEBP", lossless=True)
    webps = [
        encode(Image.new("RGB", (4000, 3000), (20 * i, 80, 160)), "WEBP", lossless=True)
        for i in range(10)
    ]
    big = encode(noise(4000, 3000), "JPEG", quality=88)  # ~9 MB
    ordinary = encode(photo(4000, 3000), "JPEG", quality=92)

    def album(chat: int, parts: list[bytes], **kw: Any) -> Callable[[Any], list[int]]:
        def push(tg: Any) -> list[int]:
            for data in parts:
                tg.push_photo(chat, data, media_group_id=f"album{chat}", **kw)
            return [chat]

        return push

    def ten_chats(tg: Any) -> list[int]:
        for chat in range(1, 11):
            for _ in range(10):
                tg.push_photo(chat, big, media_group_id=f"album{chat}")
        return list(range(1, 11))

    return {
        "album of 10 lossless 6000x6000 WebPs (1.4 KB each)": album(
            100, [bomb] * 10, as_document="image/webp"
        ),
        "album of 10 lossless 4000x3000 WebPs": album(100, webps, as_document="image/webp"),
        f"album of 10 photo-like 12 MP JPEGs ({len(ordinary) / MIB:.1f} MB each)": album(
            100, [ordinary] * 10
        ),
        f"10 chats x album of 10 noise 12 MP JPEGs ({len(big) / MIB:.1f} MB each)": ten_chats,
    }


def per_album(tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for i, (name, push) in enumerate(_pushes().items()):
        workdir = tmp / f"bot{i}"
        workdir.mkdir()
        rows.append(asyncio.run(_album(name, push, workdir)))
    return rows


# --------------------------------------------------------------------------- main


def machine() -> str:
    return (
        f"{platform.platform()} | {os.cpu_count()} CPUs | Python {platform.python_version()}"
        f" | Pillow {PIL.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--skip-bot", action="store_true", help="per-image figures only")
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("needs Linux /proc")
    with tempfile.TemporaryDirectory() as tmpdir:
        images = per_image(Path(tmpdir))
        albums = [] if args.skip_bot else per_album(Path(tmpdir))
    if args.json:
        print(json.dumps({"machine": machine(), "images": images, "albums": albums}, indent=2))
        return
    cap = DEFAULT_LIMITS.max_decode_bytes // MIB
    print(f"### Image memory -- {machine()}\n")
    print(f"Per image, prepare_image in a fresh process; default cap {cap} MiB.\n")
    print("| image | file | estimate | measured peak | admitted |")
    print("|---|---:|---:|---:|---|")
    for name, r in images.items():
        print(
            f"| {name} | {r['file_bytes'] / 1024:,.0f} KiB | {r['estimate'] / MIB:.0f} MiB"
            f" | {r['peak'] / MIB:.0f} MiB | {'yes' if r['admitted'] else 'refused'} |"
        )
    if albums:
        print("\nPer album, the real bot process (`python -m bot`), peak RSS since start.\n")
        print("| sent | RSS at start | peak RSS | answer |")
        print("|---|---:|---:|---|")
        for a in albums:
            print(
                f"| {a['name']} | {a['rss_start_mib']} MiB | {a['peak_rss_mib']} MiB"
                f" | {'; '.join(a['answers'])} |"
            )


if __name__ == "__main__":
    main()
