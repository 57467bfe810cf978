"""Unit tests for bot.services.images. Every input is generated here with Pillow."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageFile
from PIL.PngImagePlugin import PngInfo

from bot.services.images import (
    ALLOWED_FORMATS,
    ImageLimits,
    ImageRejected,
    PreparedImage,
    prepare_image,
)

# --------------------------------------------------------------------------- helpers


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int, h: int) -> Image.Image:
    """Photo-ish content: a gradient plus noise (JPEG sizes look like real photos)."""
    base = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    noise = Image.effect_noise((w, h), 40).convert("RGB")
    return Image.blend(base, noise, 0.3)


def decode(prepared: PreparedImage) -> Image.Image:
    im = Image.open(io.BytesIO(prepared.data))
    im.load()
    return im


def reject_reason(data: bytes, limits: ImageLimits | None = None) -> str:
    with pytest.raises(ImageRejected) as info:
        prepare_image(data, limits or ImageLimits())
    assert isinstance(info.value.detail, str)
    return info.value.reason


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but holds a few bytes of IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def forbid_decode(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call the returned function (after building the input) to fail on any pixel decode."""

    def boom(self: Image.Image) -> None:
        raise AssertionError("pixel data was decoded")

    def arm() -> None:
        monkeypatch.setattr(Image.Image, "load", boom)
        monkeypatch.setattr(ImageFile.ImageFile, "load", boom)

    return arm


# --------------------------------------------------------------------------- happy paths


def test_large_jpeg_exact_downscale_to_max_side() -> None:
    data = encode(photo(4000, 3000), "JPEG", quality=90)
    out = prepare_image(data, ImageLimits(draft_slack=0.0))
    assert (out.width, out.height) == (2048, 1536)
    im = decode(out)
    assert im.format == "JPEG"
    assert im.mode == "RGB"
    assert im.size == (2048, 1536)
    assert out.mime_type == "image/jpeg"
    assert out.source_format == "JPEG"


def test_large_jpeg_default_uses_draft_within_slack() -> None:
    data = encode(photo(4000, 3000), "JPEG", quality=90)
    out = prepare_image(data)
    # Decoded at 1/2 scale by libjpeg: 2000x1500, within 5% of max_side, never above it.
    assert (out.width, out.height) == (2000, 1500)
    assert decode(out).size == (2000, 1500)


def test_draft_still_resizes_exactly_when_far_above_max_side() -> None:
    data = encode(photo(3000, 1500), "JPEG")
    out = prepare_image(data, ImageLimits(max_side=1000))
    # 1/2 scale gives 1500x750 (> 1000): resized down to exactly 1000 on the long side.
    assert (out.width, out.height) == (1000, 500)


def test_configurable_max_side() -> None:
    out = prepare_image(encode(photo(1200, 800), "PNG"), ImageLimits(max_side=300))
    assert (out.width, out.height) == (300, 200)


def test_small_image_not_upscaled() -> None:
    out = prepare_image(encode(photo(320, 200), "JPEG"))
    assert (out.width, out.height) == (320, 200)


@pytest.mark.parametrize("slack", [0.0, 0.05])
def test_exif_orientation_6_swaps_dimensions(slack: float) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    src = Image.new("RGB", (400, 200), "white")
    src.paste((255, 0, 0), (0, 0, 200, 200))  # left half red
    out = prepare_image(encode(src, "JPEG", exif=exif), ImageLimits(draft_slack=slack))
    assert (out.width, out.height) == (200, 400)
    im = decode(out)
    assert im.size == (200, 400)
    r, g, b = im.getpixel((100, 50))  # left half ends up on top after rotating clockwise
    assert r > 200 and g < 60 and b < 60
    assert 0x0112 not in im.getexif()


def test_exif_orientation_applied_after_downscale() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    out = prepare_image(encode(photo(3000, 1000), "JPEG", exif=exif), ImageLimits(max_side=600))
    assert (out.width, out.height) == (200, 600)


def test_metadata_dropped() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0132] = "2024:01:01 00:00:00"
    exif.get_ifd(0x8825)[2] = (52.0, 31.0, 12.0)  # GPSLatitude
    src = photo(300, 200)
    data = encode(
        src,
        "JPEG",
        exif=exif,
        comment=b"secret comment",
        icc_profile=b"\x00" * 128,
        xmp=b"<x:xmpmeta>secret</x:xmpmeta>",
        dpi=(300, 300),
    )
    assert b"SecretCam" in data and b"secret comment" in data
    out = prepare_image(data)
    im = decode(out)
    assert len(im.getexif()) == 0
    for key in ("exif", "icc_profile", "xmp", "comment"):
        assert key not in im.info
    assert b"SecretCam" not in out.data
    assert b"secret" not in out.data


def test_png_metadata_dropped() -> None:
    info = PngInfo()
    info.add_text("Author", "secret author")
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    data = encode(photo(200, 100), "PNG", pnginfo=info, exif=exif)
    out = prepare_image(data)
    assert b"secret" not in out.data and b"SecretCam" not in out.data
    assert len(decode(out).getexif()) == 0


def test_png_alpha_flattened_on_white() -> None:
    src = Image.new("RGBA", (100, 100), (0, 0, 255, 0))  # fully transparent blue
    src.paste((255, 0, 0, 255), (0, 0, 50, 100))  # opaque red left half
    out = prepare_image(encode(src, "PNG"))
    im = decode(out)
    assert im.mode == "RGB"
    r, g, b = im.getpixel((75, 50))
    assert min(r, g, b) > 240  # transparent area became white, not blue/black
    r, g, b = im.getpixel((25, 50))
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_flattened() -> None:
    src = Image.new("P", (64, 64), 0)
    src.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    src.paste(1, (0, 0, 32, 64))
    data = encode(src, "PNG", transparency=0)
    im = decode(prepare_image(data))
    assert im.mode == "RGB"
    assert min(im.getpixel((48, 32))) > 240  # transparent index -> white
    r, g, b = im.getpixel((16, 32))
    assert r > 200 and g < 60


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("P", "PNG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("1", "PNG"),
        ("RGB", "WEBP"),
        ("RGBA", "WEBP"),
        ("CMYK", "JPEG"),
        ("L", "JPEG"),
        ("RGB", "GIF"),
    ],
)
def test_modes_convert_to_rgb(mode: str, fmt: str) -> None:
    src = photo(120, 80).convert(mode)
    out = prepare_image(encode(src, fmt))
    im = decode(out)
    assert im.mode == "RGB"
    assert im.size == (120, 80)


def test_16_bit_grey_png_is_scaled_not_clipped() -> None:
    src = Image.new("I;16", (4, 1))
    for x, v in enumerate((0, 16384, 32768, 65535)):
        src.putpixel((x, 0), v)
    im = decode(prepare_image(encode(src, "PNG"), ImageLimits(output_format="WEBP", quality=100)))
    values = [im.getpixel((x, 0))[0] for x in range(4)]
    assert values[0] < 20 and values[3] > 235
    assert 40 < values[1] < 90 and 100 < values[2] < 160  # mid-greys, not clipped to 255


def test_16_bit_rgb_png() -> None:
    # 16-bit RGB(A) PNGs are opened by Pillow as 8-bit RGB(A); craft one by hand.
    w, h = 8, 4
    row = b"\x00" + b"\x80\x00\x40\x00\xff\xff" * w
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(row * h))
        + png_chunk(b"IEND", b"")
    )
    im = decode(prepare_image(data))
    assert im.size == (8, 4) and im.mode == "RGB"


def test_animated_gif_first_frame() -> None:
    red = Image.new("RGB", (60, 40), (255, 0, 0))
    blue = Image.new("RGB", (60, 40), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = prepare_image(data)
    assert out.source_format == "GIF"
    r, g, b = decode(out).getpixel((30, 20))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_webp_and_apng_first_frame(fmt: str) -> None:
    red = Image.new("RGB", (60, 40), (255, 0, 0))
    blue = Image.new("RGB", (60, 40), (0, 0, 255))
    data = encode(red, fmt, save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    r, g, b = decode(prepare_image(data)).getpixel((30, 20))
    assert r > 200 and g < 60 and b < 60


def test_webp_output_option() -> None:
    out = prepare_image(encode(photo(300, 200), "PNG"), ImageLimits(output_format="WEBP"))
    assert out.mime_type == "image/webp"
    im = decode(out)
    assert im.format == "WEBP" and im.mode == "RGB" and im.size == (300, 200)
    assert out.data_url().startswith("data:image/webp;base64,")


def test_data_url_and_sha256_roundtrip() -> None:
    data = encode(photo(200, 150), "JPEG")
    first = prepare_image(data)
    second = prepare_image(data)
    assert first.sha256 == second.sha256
    assert first.data == second.data
    assert len(first.sha256) == 64
    prefix = "data:image/jpeg;base64,"
    url = first.data_url()
    assert url.startswith(prefix)
    assert base64.b64decode(url[len(prefix) :]) == first.data


def test_mpo_is_accepted() -> None:
    a, b = photo(200, 100), photo(200, 100)
    data = encode(a, "MPO", save_all=True, append_images=[b])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = prepare_image(data)
    assert out.source_format == "MPO"
    assert "MPO" in ALLOWED_FORMATS


def test_accepts_bytearray_and_memoryview() -> None:
    data = encode(photo(50, 50), "PNG")
    assert prepare_image(bytearray(data)).width == 50  # type: ignore[arg-type]
    assert prepare_image(memoryview(data)).width == 50  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rejections


def test_empty() -> None:
    assert reject_reason(b"") == "empty"


@pytest.mark.parametrize(
    "data",
    [
        random.Random(1234).randbytes(4096),
        b"Hello, this is not an image at all.\n" * 10,
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        b"\x00",
    ],
)
def test_not_an_image(data: bytes) -> None:
    assert reject_reason(data) == "not_an_image"


def test_claims_to_be_png_but_garbage() -> None:
    assert reject_reason(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100) == "not_an_image"


def test_claims_to_be_jpeg_but_garbage() -> None:
    data = b"\xff\xd8\xff\xe0" + random.Random(5).randbytes(2000)
    assert reject_reason(data) in ("not_an_image", "truncated")


def test_valid_header_corrupt_body() -> None:
    data = bytearray(encode(photo(200, 200), "PNG"))
    data[60:200] = b"\x00" * 140  # smash the start of the zlib stream
    assert reject_reason(bytes(data)) in ("not_an_image", "truncated")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated(fmt: str) -> None:
    src = photo(400, 300)
    data = encode(src.convert("P") if fmt == "GIF" else src, fmt)
    assert reject_reason(data[: len(data) // 2]) == "truncated"


def test_truncated_inside_header() -> None:
    data = encode(photo(100, 100), "JPEG")
    assert reject_reason(data[:3]) == "truncated"
    assert reject_reason(data[:20]) == "truncated"
    assert reject_reason(encode(photo(100, 100), "PNG")[:20]) == "truncated"


def test_png_decompression_bomb_refused_before_decoding(forbid_decode: Callable[[], None]) -> None:
    data = crafted_png(30_000, 30_000)  # 900 MP declared, a few dozen bytes on disk
    assert len(data) < 200
    forbid_decode()
    assert reject_reason(data) == "too_many_pixels"


def test_pillow_generated_bomb_refused_before_decoding() -> None:
    # A real 1-bit 10000x5000 PNG (50 MP) compresses to a few KB.
    data = encode(Image.new("1", (10_000, 5_000)), "PNG")
    assert len(data) < 50_000
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
        mp.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
        assert reject_reason(data) == "too_many_pixels"


def test_jpeg_bomb_refused_before_decoding(forbid_decode: Callable[[], None]) -> None:
    data = bytearray(encode(photo(64, 64), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    forbid_decode()
    assert reject_reason(bytes(data)) == "too_many_pixels"


def test_webp_bomb_refused_before_decoding(forbid_decode: Callable[[], None]) -> None:
    # VP8X header declaring a 16384 x 16384 canvas; nothing else.
    body = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4
    body += (16383).to_bytes(3, "little") + (16383).to_bytes(3, "little")
    data = b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body
    forbid_decode()
    assert reject_reason(data) == "too_many_pixels"


def test_gif_first_frame_extent_bomb(forbid_decode: Callable[[], None]) -> None:
    # Logical screen 1x1, but the first image descriptor claims 20000x20000.
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    desc = data.index(b"\x2c\x00\x00\x00\x00")
    data[desc + 5 : desc + 9] = struct.pack("<HH", 20_000, 20_000)
    forbid_decode()
    assert reject_reason(bytes(data)) == "too_many_pixels"


def test_max_pixels_is_configurable(forbid_decode: Callable[[], None]) -> None:
    data = encode(photo(100, 100), "PNG")
    forbid_decode()
    assert reject_reason(data, ImageLimits(max_pixels=9_999)) == "too_many_pixels"


def test_pillow_global_limit_is_respected_not_modified(monkeypatch: pytest.MonkeyPatch) -> None:
    before = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # stricter than ours
    assert reject_reason(encode(photo(100, 100), "PNG")) == "too_many_pixels"
    monkeypatch.undo()
    assert Image.MAX_IMAGE_PIXELS == before
    # 90 MP is just over Pillow's own warning threshold (~89.5 MP): no DecompressionBombWarning
    # (warnings are errors in this suite) because our header check runs before Image.open.
    assert reject_reason(crafted_png(10_000, 9_000)) == "too_many_pixels"
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO"), ("PPM", None), ("TGA", None)],
)
def test_unsupported_formats(fmt: str, name: str | None) -> None:
    data = encode(photo(64, 64), fmt)
    reason = reject_reason(data)
    if name is not None:  # formats with a real signature are named as unsupported
        assert reason == "unsupported_format"
    else:  # signature-less or rare formats: refused either way
        assert reason in ("unsupported_format", "not_an_image")


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
        b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf",
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>',
        b"<svg></svg>",
    ],
)
def test_heif_avif_svg_unsupported(data: bytes) -> None:
    assert reject_reason(data) == "unsupported_format"


def test_too_many_frames_gif() -> None:
    frames = [Image.new("RGB", (8, 8), (i * 20, 0, 255 - i * 20)) for i in range(12)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert reject_reason(data, ImageLimits(max_frames=10)) == "too_many_frames"
    assert prepare_image(data, ImageLimits(max_frames=12)).source_format == "GIF"


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_too_many_frames_webp_apng(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(12)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)
    assert reject_reason(data, ImageLimits(max_frames=10)) == "too_many_frames"


def test_gif_frame_count_does_not_decode_frames(forbid_decode: Callable[[], None]) -> None:
    frames = [Image.new("RGB", (8, 8), (i * 8, 0, 0)) for i in range(30)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    forbid_decode()
    assert reject_reason(data, ImageLimits(max_frames=5)) == "too_many_frames"


def test_too_large() -> None:
    data = encode(photo(300, 300), "PNG")
    assert reject_reason(data, ImageLimits(max_bytes=len(data) - 1)) == "too_large"
    assert prepare_image(data, ImageLimits(max_bytes=len(data))).width == 300


def test_too_large_checked_first(forbid_decode: Callable[[], None]) -> None:
    forbid_decode()
    assert reject_reason(b"\x00" * 101, ImageLimits(max_bytes=100)) == "too_large"


def test_reject_detail_has_no_user_data() -> None:
    with pytest.raises(ImageRejected) as info:
        prepare_image(b"my password is hunter2")
    assert "hunter2" not in info.value.detail
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_side": 0}, {"quality": 0}, {"quality": 101}, {"output_format": "PNG"}],
)
def test_invalid_limits(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ImageLimits(**kwargs)  # type: ignore[arg-type]


def test_concurrent_calls_are_independent() -> None:
    inputs = [
        encode(photo(900, 600), "JPEG"),
        encode(photo(300, 200).convert("RGBA"), "PNG"),
        crafted_png(30_000, 30_000),
        b"not an image",
        encode(photo(500, 500), "WEBP"),
    ] * 4

    def run(data: bytes) -> str:
        try:
            out = prepare_image(data, ImageLimits(max_side=256))
        except ImageRejected as exc:
            return exc.reason
        return f"{out.width}x{out.height}"

    before = Image.MAX_IMAGE_PIXELS
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, inputs))
    assert results == ["256x171", "256x171", "too_many_pixels", "not_an_image", "256x256"] * 4
    assert Image.MAX_IMAGE_PIXELS == before
