"""Small charts drawn with Pillow (no plotting library needed for a line and two axes).

Their words come from the message catalogs, in Russian and Spanish too: they are drawn with a
system font that has Cyrillic and accented letters (CHART_FONTS: DejaVu Sans, Debian's
fonts-dejavu-core, is installed by the Dockerfile); Pillow's own default font has neither and
would draw boxes for them.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

# Fonts with Cyrillic and accented Latin, looked up by name in the system's font folders, the
# first found is used: Debian/Ubuntu (fonts-dejavu-core, in the Docker image), Fedora and
# others (Noto, Liberation), macOS and Windows (Arial).
CHART_FONTS = (
    "DejaVuSans.ttf",
    "NotoSans-Regular.ttf",
    "LiberationSans-Regular.ttf",
    "Arial Unicode.ttf",
    "Arial.ttf",
    "arial.ttf",
)
LOSS_TITLE_AT = (60, 14)  # where loss_chart writes its title


@functools.cache
def chart_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The charts' font at `size` px: one of CHART_FONTS, or Pillow's default (Latin only)."""
    for name in CHART_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    log.warning("no font of %s found: chart labels outside Latin script won't show", CHART_FONTS)
    return ImageFont.load_default(size=size)


def loss_chart(points: Sequence[tuple[int, float]], title: str, step: str) -> bytes:
    """A PNG line chart of (step, loss), with `title` and `step` (the x axis' word) as given.

    CPU-bound: call it through asyncio.to_thread.
    """
    width, height, pad = 720, 360, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = chart_font(16)
    draw.text(LOSS_TITLE_AT, title, fill="black", font=font)
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    x0, x1 = min(steps), max(steps) or 1
    y0, y1 = min(0.0, min(losses)), max(losses) or 1.0
    left, top, right, bottom = pad, 50, width - 30, height - pad

    def xy(step: int, loss: float) -> tuple[float, float]:
        x = left + (right - left) * ((step - x0) / ((x1 - x0) or 1))
        y = bottom - (bottom - top) * ((loss - y0) / ((y1 - y0) or 1))
        return x, y

    draw.line((left, top, left, bottom), fill="black")
    draw.line((left, bottom, right, bottom), fill="black")
    draw.text((left - 50, top - 8), f"{y1:.2f}", fill="black", font=font)
    draw.text((left - 50, bottom - 8), f"{y0:.2f}", fill="black", font=font)
    draw.text((left, bottom + 8), f"{step} {x0}", fill="black", font=font)
    draw.text((right - 80, bottom + 8), f"{step} {x1}", fill="black", font=font)
    draw.line([xy(s, v) for s, v in points], fill=(33, 150, 243), width=3)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
