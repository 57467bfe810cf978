"""PDFs made for tests and benchmarks with pypdf's writer: text pages, encrypted, bombs."""

from __future__ import annotations

import io
import zlib

from pypdf import PdfWriter
from pypdf.generic import (
    DecodedStreamObject,
    DictionaryObject,
    NameObject,
    NumberObject,
    StreamObject,
)

LINE_HEIGHT = 14


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _text_stream(lines: list[str]) -> bytes:
    ops = ["BT", "/F1 11 Tf", f"{LINE_HEIGHT} TL", "56 770 Td"]
    for line in lines:
        ops.append(f"({_escape(line)}) Tj T*")
    ops.append("ET")
    # Helvetica's standard encoding: Latin-1 covers what the tests write.
    return "\n".join(ops).encode("latin-1")


def _font(writer: PdfWriter) -> DictionaryObject:
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
            NameObject("/Encoding"): NameObject("/WinAnsiEncoding"),
        }
    )
    return DictionaryObject({NameObject("/F1"): writer._add_object(font)})


def text_pdf(pages: list[str | list[str]], *, password: str | None = None) -> bytes:
    """A PDF with one page per item: a string (one line) or a list of lines.

    With `password`, it is encrypted (RC4-128, which pypdf reads without extra libraries)
    and can't be opened without it.
    """
    writer = PdfWriter()
    fonts = _font(writer)
    for page_text in pages:
        lines = [page_text] if isinstance(page_text, str) else page_text
        page = writer.add_blank_page(595, 842)
        stream = DecodedStreamObject()
        stream.set_data(_text_stream(lines))
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
        page.compress_content_streams()  # FlateDecode, as real PDFs are
    if password is not None:
        writer.encrypt(
            user_password=password, owner_password=password + "-owner", algorithm="RC4-128"
        )
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def blank_pdf(pages: int) -> bytes:
    """A PDF of `pages` empty pages (small however many)."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(200, 200)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def flate_bomb_pdf(inflated_mb: int = 400) -> bytes:
    """A one-page PDF whose content stream is a few hundred KB of Flate data that inflates
    to `inflated_mb` MB (of spaces: valid content, nothing to draw)."""
    squeeze = zlib.compressobj(9)
    chunk = b" " * (1024 * 1024)
    packed = [squeeze.compress(chunk) for _ in range(inflated_mb)]
    packed.append(squeeze.flush())
    writer = PdfWriter()
    page = writer.add_blank_page(595, 842)
    stream = StreamObject()
    stream._data = b"".join(packed)
    stream[NameObject("/Filter")] = NameObject("/FlateDecode")
    stream[NameObject("/Length")] = NumberObject(len(stream._data))
    page[NameObject("/Contents")] = writer._add_object(stream)
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): _font(writer)})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def corrupt_pdf() -> bytes:
    """Starts like a PDF; the rest is noise (no objects, no cross-reference table)."""
    noise = bytes((i * 7919 + 13) % 251 for i in range(20_000))
    return b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + noise + b"\n%%EOF\n"
