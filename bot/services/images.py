"""Image preparation for the vision model.

``prepare_image`` turns whatever bytes a user sent (Telegram photo or image document)
into a small, metadata-free RGB JPEG (or WebP) suitable for a ``data:`` URL.

It is synchronous and CPU-bound: call it with ``await asyncio.to_thread(prepare_image, data)``.

Pipeline (each step bounded; nothing is decoded before the size checks pass):

1. ``len(data)`` against ``max_bytes``; empty input.
2. Sniff the container from its magic bytes (JPEG/PNG/GIF/WebP only; a few well-known
   other image signatures are reported as ``unsupported_format``).
3. Parse the declared dimensions from the header ourselves (PNG IHDR, JPEG SOFn, GIF logical
   screen + first image descriptor, WebP VP8/VP8L/VP8X) and refuse ``width*height`` above the
   pixel limit -- *before* Pillow is even handed the bytes. For GIFs the same pass counts
   frames (block structure only, no LZW decoding) and stops as soon as ``max_frames`` is
   exceeded.
4. Estimate the memory preparing the image will take (``ImageInfo.decode_bytes``) from the
   same headers and refuse it (``too_costly``) above ``max_decode_bytes``. Pixels are not
   all equal: Pillow's WebP decoder holds 16 bytes per canvas pixel (two libwebp canvases,
   a bytes copy of the frame and the image), a progressive JPEG keeps every DCT coefficient
   of the full-size image however small it is decoded, a PNG's text chunks can unpack to
   ~256 MB. ``inspect_image`` runs steps 1-4 alone, so a caller can reserve that much memory
   (``bot.services.photos``) before step 5 starts.
5. ``Image.open`` restricted to the sniffed format (reads the header only), re-check the size
   Pillow reports, the format and the frame count (PNG/WebP/MPO declare it in the header).
6. JPEG draft mode (libjpeg DCT scaling by 1/2, 1/4, 1/8) when the image will be downscaled,
   then decode the first frame only. Everything after the decode works on horizontal strips
   of it (mode conversion, alpha flattened onto white, bicubic resize into the output), so
   no full-size copy is ever made: the decoded frame plus a few MB is the whole cost. Then
   EXIF orientation on the small image and re-encoding with no metadata.

Thread-safety: no process-global Pillow setting is read-modified-written and no warnings filter
is touched. The pixel limit actually applied is ``min(limits.max_pixels, Image.MAX_IMAGE_PIXELS)``
(read at call time), and it is enforced on the header *before* ``Image.open``, so Pillow's own
``DecompressionBombWarning``/``DecompressionBombError`` cannot fire for anything we let through.
If they fire anyway (someone lowered ``MAX_IMAGE_PIXELS`` concurrently, or runs with
``-W error``), they are mapped to ``too_many_pixels``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import struct
from dataclasses import dataclass
from typing import Literal

# The plugin imports register exactly the decoders we use up front, so Image.open never
# lazily runs Image.init() (importing every plugin) from a worker thread.
from PIL import (
    ExifTags,
    GifImagePlugin,  # noqa: F401
    Image,
    ImageFile,
    JpegImagePlugin,  # noqa: F401
    MpoImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_LIMITS",
    "ImageInfo",
    "ImageLimits",
    "ImageRejected",
    "PreparedImage",
    "RejectReason",
    "inspect_image",
    "prepare_image",
]

# Formats Pillow may report after opening. MPO is what Pillow calls a JPEG carrying a
# CIPA multi-picture index (most phone cameras); we use its primary image.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "MPO"})

RejectReason = Literal[
    "empty",
    "too_large",
    "not_an_image",
    "unsupported_format",
    "truncated",
    "too_many_pixels",
    "too_many_frames",
    "too_costly",
]


class ImageRejected(Exception):
    """The input cannot be turned into an image for the model.

    ``reason`` is stable and meant for mapping to a user-facing message; ``detail`` is a short
    technical note for logs and never contains user data.
    """

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: RejectReason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class PreparedImage:
    data: bytes
    mime_type: str  # "image/jpeg" | "image/webp"
    width: int
    height: int
    sha256: str  # hex digest of `data`
    source_format: str  # "JPEG", "PNG", "WEBP", "GIF", "MPO"

    def data_url(self) -> str:
        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_side: int = 2048
    # Header-declared width*height. 40 MP covers every phone camera (48/50 MP sensors bin to
    # 12 MP by default) and bounds a decoded frame to ~160 MB (Pillow keeps RGB/RGBA at 4 B/px).
    max_pixels: int = 40_000_000
    max_bytes: int = 20 * 1024 * 1024
    # We only ever decode frame 0, so frames cost us a header walk, not a decode. The cap
    # refuses pathological files (and bounds the GIF walk). 1000 frames is ~40 s at 25 fps,
    # far beyond any sticker/meme GIF.
    max_frames: int = 1000
    output_format: Literal["JPEG", "WEBP"] = "JPEG"
    quality: int = 85
    # JPEG only: how far (fraction of max_side) the output's longest side may fall short of
    # max_side when that lets libjpeg decode at 1/2, 1/4 or 1/8 scale and skip the resample.
    # 0.05 turns a 4000x3000 photo into 2000x1500 (not 2048x1536) about 2x faster. The OpenAI
    # vision models rescale to <= 2048 and then shortest side 768 anyway. 0.0 = exact.
    draft_slack: float = 0.05
    # Estimated peak memory of preparing one image (ImageInfo.decode_bytes). 256 MiB admits
    # the 40 MP JPEGs (except progressive 4:4:4 ones), PNGs and GIFs the pixel limit lets
    # through, and WebPs up to ~12.5 MP, 4000x3000 (Pillow's WebP decoder holds 16 B per px).
    max_decode_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_side", "max_pixels", "max_bytes", "max_frames", "max_decode_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageLimits.{name} must be >= 1")
        if not 1 <= self.quality <= 100:
            raise ValueError("ImageLimits.quality must be in 1..100")
        if self.output_format not in ("JPEG", "WEBP"):
            raise ValueError("ImageLimits.output_format must be 'JPEG' or 'WEBP'")
        if not 0.0 <= self.draft_slack < 0.5:
            raise ValueError("ImageLimits.draft_slack must be in [0, 0.5)")


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What an image's header says, and what preparing it will cost, before any decoding."""

    format: str  # the sniffed container: "JPEG" (incl. MPO), "PNG", "GIF", "WEBP"
    width: int
    height: int
    frames: int  # counted for GIF; 1 for the others (their count is checked after opening)
    decode_bytes: int  # estimated peak memory of prepare_image, beyond the input bytes


_MIME = {"JPEG": "image/jpeg", "WEBP": "image/webp"}
_WHITE = (255, 255, 255)

# Errors Pillow's parsers/decoders raise on malformed input.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


class _Truncated(Exception):
    pass


def inspect_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> ImageInfo:
    """Check an image's headers and estimate its cost, decoding nothing.

    Raises ``ImageRejected`` for everything the headers alone show to be refused, including
    ``too_costly`` when preparing it would take more than ``limits.max_decode_bytes``.
    Linear in ``len(data)`` at worst (the GIF frame walk, the PNG chunk walk): run it off
    the event loop for large inputs.
    """
    if not data:
        raise ImageRejected("empty", "no bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes > {limits.max_bytes}")
    data = bytes(data)
    kind = _sniff(data)
    width, height, gif_frames = _header_info(kind, data, limits.max_frames)
    _check_pixels(width, height, _max_pixels(limits))
    if gif_frames > limits.max_frames:
        raise ImageRejected("too_many_frames", f"> {limits.max_frames} frames")
    try:
        cost = _estimate(kind, data, width, height, limits)
    except _Truncated:
        raise ImageRejected("truncated", f"{kind} header incomplete") from None
    except (struct.error, IndexError, ValueError):
        raise ImageRejected("not_an_image", f"malformed {kind} header") from None
    if cost > limits.max_decode_bytes:
        raise ImageRejected(
            "too_costly",
            f"{kind} {width}x{height} needs ~{cost >> 20} MiB > {limits.max_decode_bytes >> 20}",
        )
    return ImageInfo(kind, width, height, gif_frames, cost)


def prepare_image(
    data: bytes, limits: ImageLimits = DEFAULT_LIMITS, info: ImageInfo | None = None
) -> PreparedImage:
    """Validate, normalise and re-encode one image. Raises ``ImageRejected``.

    ``info`` is ``inspect_image(data, limits)`` if the caller has it already.
    """
    if info is None:
        info = inspect_image(data, limits)
    data = bytes(data)  # accept bytearray/memoryview; freeze the content we parse
    kind = info.format
    max_pixels = _max_pixels(limits)

    try:
        if kind == "PNG":
            # Image.verify() only does real work for PNG (chunk CRCs, IEND present); Pillow's
            # PNG decoder does not check CRCs. For JPEG/GIF/WebP it is a no-op: the decode of
            # frame 0 below (strict about truncation) is the verification. verify() leaves the
            # image unusable, hence the second open (header only, cheap).
            with Image.open(io.BytesIO(data), formats=[kind]) as probe:
                probe.verify()
            del probe  # and its text chunks, before the decode
        with Image.open(io.BytesIO(data), formats=[kind]) as im:
            return _process(im, limits, max_pixels)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only reachable if MAX_IMAGE_PIXELS was lowered concurrently or warnings are errors.
        raise ImageRejected("too_many_pixels", type(exc).__name__) from None
    except Image.UnidentifiedImageError:
        raise ImageRejected("not_an_image", f"Pillow cannot identify {kind}") from None
    except _DECODE_ERRORS as exc:
        if "truncated" in str(exc).lower():
            raise ImageRejected("truncated", f"{kind} data ends early") from None
        raise ImageRejected("not_an_image", f"corrupt {kind}: {type(exc).__name__}") from exc


# --------------------------------------------------------------------------------------
# Decoding and re-encoding


def _max_pixels(limits: ImageLimits) -> int:
    pillow_limit = Image.MAX_IMAGE_PIXELS  # read only; never written here
    return limits.max_pixels if pillow_limit is None else min(limits.max_pixels, pillow_limit)


def _process(im: ImageFile.ImageFile, limits: ImageLimits, max_pixels: int) -> PreparedImage:
    source_format = im.format or ""
    if source_format not in ALLOWED_FORMATS:
        raise ImageRejected("unsupported_format", source_format or "unknown")
    # Authoritative re-check on what Pillow parsed (GIF frame 0 may enlarge the canvas; MPO).
    _check_pixels(im.width, im.height, max_pixels)
    n_frames = getattr(im, "n_frames", 1)  # from the header for PNG/WebP/MPO; GIF was walked
    if source_format != "GIF" and n_frames > limits.max_frames:
        raise ImageRejected("too_many_frames", f"{n_frames} > {limits.max_frames} frames")

    max_side = limits.max_side
    if source_format in ("JPEG", "MPO"):
        _apply_draft(im, max_side, limits.draft_slack)

    im.load()  # decodes frame 0 only; raises on truncation (LOAD_TRUNCATED_IMAGES is False)

    # Read after load() (PNG's getexif() would otherwise load() itself and a decode error
    # could be swallowed here); applied after the resize, where it is cheaper.
    orientation = _orientation(im)

    if max(im.size) > max_side:
        img = _downscale(im, _fit(im.size, max_side))
    else:
        img = _to_rgb(_to_resizable_mode(im))  # at most max_side^2 pixels: cheap
    if orientation in _ORIENTATION_OPS:
        img = img.transpose(_ORIENTATION_OPS[orientation])

    out = io.BytesIO()
    img.info = {}  # nothing from the source (comment, exif, icc, xmp, dpi) reaches the encoder
    if limits.output_format == "WEBP":
        # method=2: ~2.6x faster than the default 4 at 2000x1500 for ~4% more bytes.
        img.save(out, "WEBP", quality=limits.quality, method=2)
    else:
        img.save(out, "JPEG", quality=limits.quality, optimize=False, progressive=False)
    payload = out.getvalue()
    return PreparedImage(
        data=payload,
        mime_type=_MIME[limits.output_format],
        width=img.width,
        height=img.height,
        sha256=hashlib.sha256(payload).hexdigest(),
        source_format=source_format,
    )


_ORIENTATION_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# EXIF a camera writes fits in one 64 KB JPEG APP1 segment. A PNG eXIf or WebP EXIF chunk can
# be as big as the file, and Pillow unpacks a tag's values into a tuple of Python ints (~36 B
# per 2-byte value): an Orientation tag with millions of values would cost hundreds of MB.
_MAX_EXIF_BYTES = 64 * 1024


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8), or 1 if absent, broken or in an oversized EXIF block."""
    exif = im.info.get("exif")
    raw = im.info.get("Raw profile type exif")
    if (isinstance(exif, bytes) and len(exif) > _MAX_EXIF_BYTES) or (
        isinstance(raw, str) and len(raw) > 2 * _MAX_EXIF_BYTES + 256
    ):
        return 1
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return 1  # a broken EXIF block is not a reason to refuse the picture
    return value if isinstance(value, int) else 1


# One strip of the decoded image at 4 B/px is about this big. Larger strips save little time
# (each costs a crop and a resize call); smaller ones mostly add overlap.
_STRIP_BYTES = 4 * 1024 * 1024
# BICUBIC: 41 dB PSNR against LANCZOS on a 4000x3000 -> 2048 resize, ~25% faster. Pillow
# widens the kernel with the scale factor (support 2 * scale), so this is antialiased.
_RESAMPLE = Image.Resampling.BICUBIC
_REDUCING_GAP = 3.0


def _strip_plan(width: int, height: int, out_height: int) -> tuple[int, int, int]:
    """(output rows per strip, source rows of margin each side, most source rows in a strip)."""
    scale = height / out_height
    # Rows the kernel reaches beyond a strip's box, the block alignment of Pillow's reduce
    # step (reducing_gap), and one for rounding.
    factor = max(1, int(scale / _REDUCING_GAP))
    margin = math.ceil(2 * scale) + factor + 1
    rows = max(1, _STRIP_BYTES // (4 * width))
    out_rows = max(1, math.floor(rows / scale))
    return out_rows, margin, min(height, math.ceil(out_rows * scale) + 2 * margin + 2)


def _downscale(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize the decoded image into an RGB image of `size`, one horizontal strip at a time.

    Each strip is cropped with enough rows around it for the kernel, converted (mode, alpha
    flattened onto white) and resized with Pillow's `box`, which places it exactly where a
    whole-image resize would: the result matches one, but no full-size copy of the decoded
    image is ever made (a whole-image RGBA resize alone would premultiply into one).
    Flattening before resizing equals resizing premultiplied RGBA and flattening after.
    """
    width, height = im.size
    out_w, out_h = size
    scale = height / out_h
    out_rows, margin, _ = _strip_plan(width, height, out_h)
    out = Image.new("RGB", size)
    for oy0 in range(0, out_h, out_rows):
        oy1 = min(out_h, oy0 + out_rows)
        by0, by1 = oy0 * scale, min(float(height), oy1 * scale)
        cy0 = max(0, math.floor(by0) - margin)
        cy1 = min(height, math.ceil(by1) + margin)
        strip = _to_rgb(_to_resizable_mode(im.crop((0, cy0, width, cy1))))
        part = strip.resize(
            (out_w, oy1 - oy0),
            _RESAMPLE,
            box=(0.0, by0 - cy0, float(width), by1 - cy0),
            reducing_gap=_REDUCING_GAP,
        )
        out.paste(part, (0, oy0))
    return out


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _draft_scale(width: int, height: int, max_side: int, slack: float) -> int:
    """The libjpeg scale denominator (1, 2, 4 or 8) to decode a JPEG at."""
    longest = max(width, height)
    if longest <= max_side:
        return 1
    floor_side = max_side * (1.0 - slack)
    for s in (8, 4, 2):
        if math.ceil(longest / s) >= floor_side:
            return s
    return 1


def _apply_draft(im: ImageFile.ImageFile, max_side: int, slack: float) -> None:
    """Ask libjpeg to decode at 1/2, 1/4 or 1/8 scale if the result is still big enough."""
    w, h = im.size
    s = _draft_scale(w, h, max_side, slack)
    if s > 1:
        # Pillow picks the largest s' in {8,4,2,1} with s' <= min(w // tw, h // th).
        im.draft("RGB", (max(1, w // s), max(1, h // s)))


def _to_resizable_mode(im: Image.Image) -> Image.Image:
    """Bring any decoded mode to L, RGB or RGBA (RGBA resize is alpha-premultiplied)."""
    mode = im.mode
    if mode == "RGBA":
        return im
    has_alpha = (
        mode in ("LA", "La", "PA", "RGBa")
        or "transparency" in im.info  # P/L/RGB with a tRNS chunk or GIF transparent index
        or (mode == "P" and im.palette is not None and im.palette.mode == "RGBA")
    )
    if has_alpha and mode in ("P", "L", "RGB", "LA", "La", "PA", "RGBa"):
        return im.convert("RGBA")
    if mode in ("RGB", "L"):
        return im
    if mode == "P":
        return im.convert("RGB")
    if mode == "1":
        return im.convert("L")
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit grey (PNG): scale 0..65535 to 0..255; a plain convert() would clip.
        return im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return im.convert("RGB")  # CMYK (incl. Adobe inverted), YCbCr, F, ...


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, _WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


# --------------------------------------------------------------------------------------
# Sniffing and header parsing (pure Python, no decoding)

_PNG_SIG = b"\x89PNG\r\n\x1a\n"

# Signatures of image formats we recognise but refuse, so the user hears "unsupported"
# rather than "not an image". TIFF is refused on purpose: never produced by Telegram clients,
# libtiff is a large attack surface, and tiles/strips/multi-page make memory hard to bound.
_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEGXL"),
    (b"\xff\x0a", "JPEGXL"),
    (b"qoif", "QOI"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
)
_ISOBMFF_BRANDS = {
    b"heic",
    b"heix",
    b"hevc",
    b"hevx",
    b"heim",
    b"heis",
    b"mif1",
    b"msf1",
    b"avif",
    b"avis",
}


def _sniff(data: bytes) -> str:
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(_PNG_SIG):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for sig, name in _UNSUPPORTED_SIGNATURES:
        if data.startswith(sig):
            raise ImageRejected("unsupported_format", name)
    if data[4:8] == b"ftyp" and data[8:12] in _ISOBMFF_BRANDS:
        raise ImageRejected("unsupported_format", "HEIF/AVIF")
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        raise ImageRejected("unsupported_format", "SVG")
    # Short prefixes of an allowed signature: a file cut before its header finished.
    for sig in (b"\xff\xd8\xff", _PNG_SIG, b"GIF87a", b"GIF89a"):
        if len(data) < len(sig) and sig.startswith(data):
            raise ImageRejected("truncated", "header incomplete")
    raise ImageRejected("not_an_image", "unknown signature")


def _header_info(kind: str, data: bytes, max_frames: int) -> tuple[int, int, int]:
    """Declared (width, height, gif_frames) of the image; gif_frames is 1 for other formats."""
    try:
        if kind == "PNG":
            return (*_png_size(data), 1)
        if kind == "JPEG":
            return (*_jpeg_size(data), 1)
        if kind == "WEBP":
            return (*_webp_size(data), 1)
        return _gif_scan(data, max_frames)
    except _Truncated:
        raise ImageRejected("truncated", f"{kind} header incomplete") from None
    except (struct.error, IndexError, ValueError):
        raise ImageRejected("not_an_image", f"malformed {kind} header") from None


def _need(data: bytes, end: int) -> None:
    if len(data) < end:
        raise _Truncated


def _png_size(data: bytes) -> tuple[int, int]:
    _need(data, 24)
    if data[12:16] != b"IHDR":
        raise ValueError("IHDR must come first")
    return struct.unpack(">II", data[16:24])


_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    _, width, height, _ = _jpeg_sof(data)
    return width, height


def _jpeg_sof(data: bytes) -> tuple[int, int, int, list[tuple[int, int]]]:
    """The first frame header: (SOF marker, width, height, [(h, v) sampling per component])."""
    pos = 2
    n = len(data)
    while True:
        # Marker: one or more 0xFF fill bytes followed by the marker code.
        _need(data, pos + 2)
        if data[pos] != 0xFF:
            raise ValueError("expected marker")
        while data[pos] == 0xFF:
            pos += 1
            _need(data, pos + 1)
        marker = data[pos]
        pos += 1
        if marker in (0x01, *range(0xD0, 0xD8)):  # TEM, RSTn: no length
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            raise ValueError("no SOF before scan data")
        _need(data, pos + 2)
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise ValueError("bad segment length")
        if marker in _SOF_MARKERS:
            _need(data, pos + 8)
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            if width == 0 or height == 0:  # height 0 = DNL-defined; nobody uses it
                raise ValueError("zero dimension")
            count = data[pos + 7]
            _need(data, pos + 8 + 3 * count)
            sampling = [
                (data[pos + 9 + 3 * i] >> 4, data[pos + 9 + 3 * i] & 0x0F) for i in range(count)
            ]
            return marker, width, height, sampling
        pos += length
        if pos >= n:
            raise _Truncated


def _webp_size(data: bytes) -> tuple[int, int]:
    _need(data, 30)
    (riff_size,) = struct.unpack("<I", data[4:8])
    if riff_size + 8 > len(data):
        raise _Truncated
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise ValueError("bad VP8L signature")
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("bad VP8 start code")
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    raise ValueError("unknown WebP chunk")


def _gif_scan(data: bytes, max_frames: int) -> tuple[int, int, int]:
    """Walk the GIF block structure (no LZW decoding).

    Returns the canvas size Pillow will report for frame 0 (the logical screen, enlarged if the
    first image descriptor extends past it) and the frame count, stopping at max_frames + 1.
    Cost is O(len(data)) in the worst case (1-byte sub-blocks), bounded by max_bytes.
    """
    _need(data, 13)
    width, height = struct.unpack("<HH", data[6:10])
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    n = len(data)
    frames = 0
    try:
        while pos < n and frames <= max_frames:
            block = data[pos]
            if block == 0x3B:  # trailer
                break
            if block == 0x21:  # extension: label + sub-blocks
                pos = _skip_sub_blocks(data, pos + 2)
            elif block == 0x2C:  # image descriptor
                _need(data, pos + 11)
                x, y, fw, fh = struct.unpack("<HHHH", data[pos + 1 : pos + 9])
                lflags = data[pos + 9]
                pos += 10 + (3 << ((lflags & 7) + 1) if lflags & 0x80 else 0)
                pos = _skip_sub_blocks(data, pos + 1)  # +1: LZW minimum code size
                frames += 1
                if frames == 1:
                    width, height = max(width, x + fw), max(height, y + fh)
            else:  # garbage after the frames; Pillow stops here too
                break
    except _Truncated:
        if frames == 0:
            raise
        # Cut after frame 0 is complete: Pillow decodes frame 0 fine, and that's all we use.
    if frames == 0:
        if pos >= n:
            raise _Truncated
        raise ValueError("no image data")
    if width == 0 or height == 0:
        raise ValueError("zero dimension")
    return width, height, frames


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    n = len(data)
    while True:
        if pos >= n:
            raise _Truncated
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos


# --------------------------------------------------------------------------------------
# What preparing an image costs (estimated from headers; bench/album_memory.py measures it)

_MIB = 1024 * 1024
# Pillow decodes WebP through libwebp's animation decoder even for a still image: two RGBA
# canvases (the frame, and the previous one kept for blending), a bytes copy of the frame
# handed to Python, and the image it is unpacked into. All four live until the file is
# closed: 16 B per canvas pixel, whatever the file size (a lossless single-colour WebP of
# 6000x6000 is 1.4 KB). Lossy, lossless and alpha measure the same.
_WEBP_BYTES_PER_PIXEL = 16
# Mode conversions of the decoded pixels, bytes per pixel alive at once at most: none for
# plain RGB; 4 to reach RGB from L, P or CMYK; 9 where there may be alpha (RGBA, then RGB
# and the alpha band) and for 16-bit grey (I twice, then L).
_CONVERT_PLAIN, _CONVERT_OPAQUE, _CONVERT_ALPHA = 0, 4, 9
# The output: the RGB image (when not the converted image itself), its transposed copy
# (EXIF orientation), and the encoded bytes twice (the encoder's buffer and the result),
# at most ~1 B/px for noise at quality 85.
_OUTPUT_BYTES_PER_PIXEL = 6
# Interpreter-side allocations, codec state, the JPEG Huffman tables and such.
_FIXED_BYTES = 4 * _MIB
# Pillow's PNG plugin refuses text chunks past 64 MiB of characters in total and inflates each
# compressed one to at most 1 MiB (its MAX_TEXT_MEMORY and MAX_TEXT_CHUNK). zlib inflates at
# most ~1032:1.
_PNG_TEXT_MAX = 64 * _MIB
_PNG_TEXT_CHUNK_MAX = _MIB
_ZLIB_MAX_RATIO = 1032
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def _estimate(kind: str, data: bytes, width: int, height: int, limits: ImageLimits) -> int:
    """Peak bytes prepare_image will allocate for this image, beyond `data` itself."""
    decoded_w, decoded_h = width, height
    decoder = 0
    # Metadata Pillow copies out of the file (EXIF, ICC, XMP, comments) is at most the file.
    copies = len(data)
    if kind == "JPEG":
        marker, _, _, sampling = _jpeg_sof(data)
        s = _draft_scale(width, height, limits.max_side, limits.draft_slack)
        decoded_w, decoded_h = math.ceil(width / s), math.ceil(height / s)
        bpp = 1 if len(sampling) == 1 else 4
        convert = _CONVERT_PLAIN if len(sampling) == 3 else _CONVERT_OPAQUE
        # Progressive and multi-scan JPEGs: libjpeg buffers every DCT coefficient of the
        # full-size image (2 B each, 64 per block per component) whatever scale it decodes
        # at. b"\xff\xda" (start of scan) never occurs inside entropy-coded data, so more than
        # one means several scans (an APP segment holding those bytes only overcounts).
        if marker in _PROGRESSIVE_SOF or data.count(b"\xff\xda") > 1:
            h_max = max(h for h, _ in sampling) or 1
            v_max = max(v for _, v in sampling) or 1
            for h, v in sampling:
                blocks_x = math.ceil(math.ceil(width * h / h_max) / 8) + h_max
                blocks_y = math.ceil(math.ceil(height * v / v_max) / 8) + v_max
                decoder += blocks_x * blocks_y * 128
        decoder += 64 * width * len(sampling)  # row buffers of the full-size MCU rows
    elif kind == "PNG":
        bpp, convert, row_bytes, text = _png_costs(data, width)
        decoder = 2 * row_bytes + text  # the decoder's previous and current row
    elif kind == "GIF":
        bpp, convert = 1, _CONVERT_ALPHA  # frame 0 stays P (or L); the LZW state is a few KB
    else:  # WEBP
        bpp, convert = 4, _CONVERT_ALPHA
        decoder = (_WEBP_BYTES_PER_PIXEL - bpp) * width * height
        copies = 2 * len(data)  # Pillow reads the whole file into one more bytes object
    decoded = decoded_w * decoded_h * bpp
    if max(decoded_w, decoded_h) > limits.max_side:
        out_w, out_h = _fit((decoded_w, decoded_h), limits.max_side)
        _, _, strip_rows = _strip_plan(decoded_w, decoded_h, out_h)
        # A strip in flight: its crop, its conversions, and the resize's intermediate.
        work = decoded_w * strip_rows * (bpp + max(convert, 4) + 4) + out_w * out_h * 4
    else:
        out_w, out_h = decoded_w, decoded_h
        work = decoded_w * decoded_h * convert
    output = out_w * out_h * _OUTPUT_BYTES_PER_PIXEL
    return decoded + decoder + work + output + copies + _FIXED_BYTES


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_costs(data: bytes, width: int) -> tuple[int, int, int, int]:
    """(decoded bytes per pixel, conversion bytes per pixel, raw bytes per row, worst-case
    text chunk memory) of a PNG."""
    _need(data, 29)
    depth, color = data[24], data[25]
    if color not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise ValueError("bad PNG colour type or bit depth")
    if color == 0:
        bpp = 2 if depth == 16 else 1  # I;16, or 1/L
    else:
        bpp = 1 if color == 3 else 4  # P, or RGB/LA/RGBA kept at 4 B/px
    text, transparency = _png_chunks(data)
    if color in (4, 6) or transparency or (color == 0 and depth == 16):
        convert = _CONVERT_ALPHA
    else:
        convert = _CONVERT_PLAIN if color == 2 else _CONVERT_OPAQUE
    row_bytes = (width * _PNG_CHANNELS[color] * depth + 7) // 8 + 1
    return bpp, convert, row_bytes, text


def _png_chunks(data: bytes) -> tuple[int, bool]:
    """Worst-case memory of the text Pillow would unpack from a PNG's chunks, and whether it
    has a tRNS chunk. Walks the chunk headers only.

    A str takes up to 4 B per character (iTXt is UTF-8, and one character beyond U+FFFF
    widens the whole string), Latin-1 text 1 B.
    """
    pos, n = 8, len(data)
    chars = wide = 0
    transparency = False
    while pos + 8 <= n:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = min(length, n - pos - 8)
        if kind == b"tEXt":
            chars += body
        elif kind in (b"zTXt", b"iCCP"):
            chars += min(_PNG_TEXT_CHUNK_MAX, body * _ZLIB_MAX_RATIO)
        elif kind == b"iTXt":
            wide += min(_PNG_TEXT_CHUNK_MAX, body * _ZLIB_MAX_RATIO)
        elif kind == b"tRNS":
            transparency = True
        elif kind == b"IEND":
            break
        pos += 12 + length
    return min(chars, _PNG_TEXT_MAX) + 4 * min(wide, _PNG_TEXT_MAX), transparency


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} > {max_pixels} px")
