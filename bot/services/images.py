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
4. ``Image.open`` restricted to the sniffed format (reads the header only), re-check the size
   Pillow reports, the format and the frame count (PNG/WebP/MPO declare it in the header).
5. JPEG draft mode (libjpeg DCT scaling by 1/2, 1/4, 1/8) when the image will be downscaled,
   then decode the first frame only, resize (Lanczos), apply EXIF orientation on the small
   image, flatten alpha onto white, convert to RGB, re-encode with no metadata.

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
    "ImageLimits",
    "ImageRejected",
    "PreparedImage",
    "RejectReason",
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

    def __post_init__(self) -> None:
        for name in ("max_side", "max_pixels", "max_bytes", "max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageLimits.{name} must be >= 1")
        if not 1 <= self.quality <= 100:
            raise ValueError("ImageLimits.quality must be in 1..100")
        if self.output_format not in ("JPEG", "WEBP"):
            raise ValueError("ImageLimits.output_format must be 'JPEG' or 'WEBP'")
        if not 0.0 <= self.draft_slack < 0.5:
            raise ValueError("ImageLimits.draft_slack must be in [0, 0.5)")


DEFAULT_LIMITS = ImageLimits()

_MIME = {"JPEG": "image/jpeg", "WEBP": "image/webp"}
_WHITE = (255, 255, 255)

# Errors Pillow's parsers/decoders raise on malformed input.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


class _Truncated(Exception):
    pass


def prepare_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> PreparedImage:
    """Validate, normalise and re-encode one image. Raises ``ImageRejected``."""
    if not data:
        raise ImageRejected("empty", "no bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes > {limits.max_bytes}")
    data = bytes(data)  # accept bytearray/memoryview; freeze the content we parse

    max_pixels = limits.max_pixels
    pillow_limit = Image.MAX_IMAGE_PIXELS  # read only; never written here
    if pillow_limit is not None:
        max_pixels = min(max_pixels, pillow_limit)

    kind = _sniff(data)
    width, height, gif_frames = _header_info(kind, data, limits.max_frames)
    _check_pixels(width, height, max_pixels)
    if gif_frames > limits.max_frames:
        raise ImageRejected("too_many_frames", f"> {limits.max_frames} frames")

    try:
        if kind == "PNG":
            # Image.verify() only does real work for PNG (chunk CRCs, IEND present); Pillow's
            # PNG decoder does not check CRCs. For JPEG/GIF/WebP it is a no-op: the decode of
            # frame 0 below (strict about truncation) is the verification. verify() leaves the
            # image unusable, hence the second open (header only, cheap).
            with Image.open(io.BytesIO(data), formats=[kind]) as probe:
                probe.verify()
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
    # A broken EXIF block is not a reason to refuse the picture.
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        orientation = 1

    img: Image.Image = _to_resizable_mode(im)
    if max(img.size) > max_side:
        # BICUBIC: 41 dB PSNR against LANCZOS on a 4000x3000 -> 2048 resize, ~25% faster.
        # Pillow widens the kernel with the scale factor, so this is antialiased.
        img = img.resize(_fit(img.size, max_side), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if orientation in _ORIENTATION_OPS:
        img = img.transpose(_ORIENTATION_OPS[orientation])
    img = _to_rgb(img)

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


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _apply_draft(im: ImageFile.ImageFile, max_side: int, slack: float) -> None:
    """Ask libjpeg to decode at 1/2, 1/4 or 1/8 scale if the result is still big enough."""
    w, h = im.size
    longest = max(w, h)
    if longest <= max_side:
        return
    floor_side = max_side * (1.0 - slack)
    for s in (8, 4, 2):
        if math.ceil(longest / s) >= floor_side:
            # Pillow picks the largest s' in {8,4,2,1} with s' <= min(w // tw, h // th).
            im.draft("RGB", (max(1, w // s), max(1, h // s)))
            return


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
            _need(data, pos + 7)
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            if width == 0 or height == 0:  # height 0 = DNL-defined; nobody uses it
                raise ValueError("zero dimension")
            return width, height
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


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} > {max_pixels} px")
