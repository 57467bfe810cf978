"""Small charts drawn with Pillow (no plotting library needed for a line and two axes)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def loss_chart(points: Sequence[tuple[int, float]], title: str = "Training loss") -> bytes:
    """A PNG line chart of (step, loss). CPU-bound: call it through asyncio.to_thread."""
    width, height, pad = 720, 360, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=16)
    draw.text((pad, 14), title, fill="black", font=font)
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
    draw.text((left, bottom + 8), f"step {x0}", fill="black", font=font)
    draw.text((right - 80, bottom + 8), f"step {x1}", fill="black", font=font)
    draw.line([xy(s, v) for s, v in points], fill=(33, 150, 243), width=3)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
