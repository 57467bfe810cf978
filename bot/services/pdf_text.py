"""A PDF's text, read by pypdf in a process of its own: bounded in time, memory and work.

A PDF is a program of sorts: streams that inflate a thousandfold, page trees that refer to
themselves, fonts and forms to decode. pypdf bounds most of that work itself (its
`Configuration` limits, e.g. 75 MB out of one Flate stream); what is left is bounded by
running it here, in a child process the bot starts for each file, that limits its own
address space and CPU time (RLIMIT_AS, RLIMIT_CPU) and is killed if it outlives the
bot's deadline. A hostile file costs that process, never the bot.

    python -I bot/services/pdf_text.py MAX_PAGES MAX_CHARS MEMORY_MB CPU_SECONDS < file.pdf

prints one JSON object: {"pages": N, "texts": [...]} with the text of pages 1, 2, ...
until MAX_CHARS characters were read (or all pages were; the last one read is cut there),
or {"refused": REASON}.

This file imports nothing from the bot: it runs as a plain script, by path, so it works
however the bot was installed, and it is handed no environment (no tokens, no keys).
"""

from __future__ import annotations

import io
import json
import logging
import sys
from dataclasses import dataclass

# Why a PDF was refused (each has a `document.<reason>` message in the catalogs).
ENCRYPTED = "encrypted"
CORRUPT = "corrupt"
TOO_MANY_PAGES = "too_many_pages"
TOO_COSTLY = "too_costly"  # a compression bomb, or more memory or time than allowed


@dataclass(frozen=True, slots=True)
class PdfText:
    pages: int  # pages in the document
    texts: list[str]  # the text of pages 1..len(texts), in order


class PdfRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def extract(data: bytes, *, max_pages: int, max_chars: int) -> PdfText:
    """The text of a PDF's pages in order, until `max_chars` characters were read.

    Raises PdfRefused: ENCRYPTED (a password is needed), CORRUPT (not a readable PDF),
    TOO_MANY_PAGES (more than `max_pages`), TOO_COSTLY (a limit of pypdf's was reached:
    a compression bomb, or a structure too large to walk).
    """
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        # pypdf tries the empty password itself: a file any viewer opens without asking
        # reads; one that needs a password (or a cipher pypdf has no library for) doesn't.
        count = len(reader.pages)
        if count > max_pages:
            raise PdfRefused(TOO_MANY_PAGES)
        texts: list[str] = []
        read = 0
        for page in reader.pages:
            if read >= max_chars:
                break
            # No more than max_chars in all: one page holding megabytes of text would
            # otherwise travel whole to the bot, which parses this output on its event loop.
            text = page.extract_text()[: max_chars - read]
            texts.append(text)
            read += len(text)
        return PdfText(count, texts)
    except PdfRefused:
        raise
    except (FileNotDecryptedError, DependencyError) as exc:
        raise PdfRefused(ENCRYPTED) from exc
    except (LimitReachedError, MemoryError, RecursionError) as exc:
        raise PdfRefused(TOO_COSTLY) from exc
    except Exception as exc:  # pypdf on broken input raises most anything
        raise PdfRefused(CORRUPT) from exc


def _limit(memory_mb: int, cpu_seconds: int) -> None:
    import resource

    memory = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # The soft limit sends SIGXCPU (which ends the process); the hard one a second later SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))


def main(argv: list[str]) -> int:
    max_pages, max_chars, memory_mb, cpu_seconds = (int(a) for a in argv)
    logging.disable(logging.CRITICAL)  # pypdf's warnings about broken files are noise here
    data = sys.stdin.buffer.read()
    if sys.platform.startswith("linux"):
        _limit(memory_mb, cpu_seconds)
    try:
        result: dict[str, object] = {
            "pages": (pdf := extract(data, max_pages=max_pages, max_chars=max_chars)).pages,
            "texts": pdf.texts,
        }
    except PdfRefused as exc:
        result = {"refused": exc.reason}
    # ASCII JSON: text with a lone surrogate (pypdf passes them on) still travels.
    sys.stdout.buffer.write(json.dumps(result).encode("ascii"))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
