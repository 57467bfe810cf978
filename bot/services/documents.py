"""Documents: PDFs and text files (Markdown, CSV, JSON, source code...) join the chat's thread.

The caption is the question; without one the bot asks the model for a short summary and
says so under the answer. A file is picked by its MIME type and extension and refused by
the size Telegram declares before anything is downloaded. Then:

* A PDF is read by pypdf in a child process of its own (`bot.services.pdf_text`), bounded
  in time, memory and work: an encrypted, corrupt, page-heavy or compression-bomb PDF gets
  a short refusal and costs the bot nothing. On the `openai` backend the PDF itself goes to
  the model (a Responses `input_file`: its text and page images); elsewhere its text does.
* A text file is decoded (UTF-8, a BOM's encoding, else chardet's guess) in a
  worker thread.

Text sent to a model is cut to DOCUMENT_MAX_TOKENS (shared by a message's files), and the
text says what was cut, to the model and, under the answer, to the user.

What the log keeps of a document turn is its text form: a header naming the file (and its
pages), the text as far as the budget goes with the note of what was cut, then the
question. That is what the local backend sent, and what a rebuilt conversation or a
dataset needs to make sense of the answer; the PDF's bytes are not kept. The turn's
`input_kind` is "document". A refused file leaves nothing in the log.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import chardet
from telegram import Bot, Message
from telegram.constants import ChatAction
from telegram.error import TelegramError

from bot.addressing import strip_mention
from bot.domain import ChatKey, utf8_safe
from bot.services import pdf_text
from bot.services.chat import ChatService, Incoming
from bot.services.conversations import InputFile
from bot.services.photos import DOWNLOAD_COPIES, TURN_COPIES, Hold, MemoryBudget
from bot.services.replies import send_text
from bot.services.tokens import estimate_tokens
from bot.texts import t

log = logging.getLogger(__name__)

MIB = 1024 * 1024

PDF_MIME = "application/pdf"
TEXT_MIME = "text/plain"
# MIME types of text besides text/*, as Telegram clients label files.
TEXT_MIME_TYPES = frozenset(
    {
        "application/json",
        "application/x-ndjson",
        "application/ld+json",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/sql",
        "application/csv",
        "application/javascript",
        "application/x-javascript",
        "application/typescript",
        "application/x-sh",
        "application/x-shellscript",
        "application/x-python",
        "application/x-python-code",
        "application/x-httpd-php",
        "application/x-perl",
        "application/x-ruby",
        "application/x-tex",
        "application/x-subrip",
    }
)
# Extensions of text files, for those a client labels application/octet-stream.
TEXT_EXTENSIONS = frozenset(
    {
        # text, markup, data
        *(".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".org", ".tex", ".log"),
        *(".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".geojson", ".xml", ".html", ".htm"),
        *(".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".properties", ".srt", ".vtt"),
        # source code
        *(".py", ".pyi", ".ipynb", ".js", ".mjs", ".cjs", ".ts", ".tsx", ".jsx", ".vue"),
        *(".java", ".kt", ".kts", ".scala", ".groovy", ".gradle", ".go", ".rs", ".swift"),
        *(".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cs", ".fs", ".m", ".mm"),
        *(".rb", ".php", ".pl", ".pm", ".lua", ".r", ".jl", ".dart", ".ex", ".exs", ".erl"),
        *(".hs", ".clj", ".elm", ".ml", ".nim", ".zig", ".sol", ".svelte", ".css", ".scss"),
        *(".sh", ".bash", ".zsh", ".fish", ".ps1", ".bat", ".cmd", ".sql", ".graphql"),
        *(".proto", ".tf", ".hcl", ".nix", ".cmake", ".mk", ".diff", ".patch"),
    }
)
TEXT_NAMES = frozenset({"dockerfile", "makefile", "readme", "license", "gemfile", "procfile"})

# Text files: bytes given to charset detection when a file is not UTF-8.
SNIFF_BYTES = 256 * 1024
# A chunk this far into a file with a NUL byte is binary, whatever its name says.
BINARY_PROBE = 8192
# Documents being downloaded and read at once, across all chats: each takes a core.
READERS = 2
DOWNLOADS = 4
HELD_BYTES = 48 * MIB
# PDFs sent to the model as files, counted TURN_COPIES times (the bytes, their base64,
# the JSON request): a few ordinary ones at once, a 20 MB one alone.
TURN_BYTES = 64 * MIB
# The longest file name shown to the model and kept in the log.
MAX_NAME = 120

PDF_WORKER = Path(pdf_text.__file__).resolve()


@dataclass(frozen=True, slots=True)
class DocumentLimits:
    max_bytes: int = 20 * MIB  # per file, and for a message's files together
    max_pages: int = 100
    max_chars: int = 2_000_000  # a text file's characters
    max_tokens: int = 8000  # a message's document text sent to a model that reads text
    parse_seconds: float = 30.0  # one PDF's reading, wall clock
    parse_memory_mb: int = 512  # the reading process's address space


class DocumentRejected(Exception):
    """A file the bot won't read; `key` names the user-facing explanation."""

    def __init__(self, key: str, **values: object) -> None:
        super().__init__(key)
        self.key = key
        self.values = values


@dataclass(frozen=True, slots=True)
class DocumentRef:
    file_id: str
    size: int | None
    name: str
    kind: str  # "pdf" | "text"


@dataclass(frozen=True, slots=True)
class ReadDocument:
    """A document as the model gets it: the file (PDFs for a backend that takes files),
    and its text form; `cut` is the user's note of what its text form left out."""

    file: InputFile
    cut: str | None


def document_kind(name: str, mime_type: str) -> str | None:
    """ "pdf", "text", or None (a kind the bot doesn't read), by MIME type and extension."""
    mime = mime_type.split(";", 1)[0].strip().lower()
    path = PurePosixPath(name.lower())
    if mime == PDF_MIME or path.suffix == ".pdf":
        return "pdf"
    if mime.startswith("image/"):
        return None
    if mime.startswith("text/") or mime in TEXT_MIME_TYPES:
        return "text"
    if path.suffix in TEXT_EXTENSIONS or path.name in TEXT_NAMES:
        return "text"
    return None


# Control characters (C0, C1), line and paragraph separators, and the bidirectional marks,
# embeddings, overrides and isolates that would make a name read otherwise than it is
# ("invoice\u202efdp.exe" shows as "invoiceexe.pdf").
_NAME_JUNK = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]+")


def clean_name(name: str | None, kind: str, lang: str | None = None) -> str:
    """A file name fit to show a model and keep: no control characters, not too long, and
    a PDF's ends in .pdf (the Responses API tells file types by name). A file sent without
    a name is called what `lang` (a language_code) calls one: "document.pdf", "документ.txt"."""
    cleaned = _NAME_JUNK.sub(" ", utf8_safe(name or "")).strip()
    cleaned = cleaned.replace("/", "_").replace("\\", "_")[:MAX_NAME].strip()
    if kind == "pdf" and not cleaned.lower().endswith(".pdf"):
        return f"{cleaned or t('document.unnamed', lang=lang)}.pdf"
    return cleaned or f"{t('document.unnamed', lang=lang)}.txt"


def decode_text(data: bytes) -> str:
    """A text file's text: by its BOM, else UTF-8, else chardet's guess (from its first
    SNIFF_BYTES; it tells the legacy Cyrillic and Western code pages apart even in a line of
    text), else UTF-8 with undecodable bytes replaced."""
    for bom, codec in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            return data.decode(codec, "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    guess = chardet.detect(data, max_bytes=SNIFF_BYTES, prefer_superset=True, compat_names=False)
    if guess["encoding"]:
        try:
            return data.decode(guess["encoding"], "replace")
        except LookupError:
            pass
    return data.decode("utf-8", "replace")


def fit(text: str, budget: int) -> str:
    """The longest start of `text` whose estimate is within `budget` tokens, ended at a line
    break where one is near (in the last fifth)."""
    if estimate_tokens(text) <= budget:
        return text
    # No more than four characters a token ever fit (ASCII's rate in the estimate).
    low, high = 0, min(len(text), max(budget, 0) * 4)
    while low < high:
        mid = (low + high + 1) // 2
        if estimate_tokens(text[:mid]) <= budget:
            low = mid
        else:
            high = mid - 1
    kept = text[:low]
    newline = kept.rfind("\n")
    if newline > len(kept) * 4 // 5:
        kept = kept[:newline]
    return kept


def read_text_file(data: bytes, limits: DocumentLimits, budget: int) -> tuple[str, int, int]:
    """(text within `budget`, its length, the whole text's length) of a text file.

    Raises DocumentRejected: not text (NUL bytes), empty, or longer than max_chars.
    """
    text = decode_text(data)
    if "\x00" in text[:BINARY_PROBE]:
        raise DocumentRejected("document.unsupported")
    text = utf8_safe(text.replace("\x00", ""))
    if not text.strip():
        raise DocumentRejected("document.empty")
    if len(text) > limits.max_chars:
        raise DocumentRejected("document.too_long", limit=limits.max_chars)
    kept = fit(text, budget)
    return kept.rstrip(), len(kept), len(text)


def fit_pages(texts: Sequence[str], budget: int, lang: str | None) -> tuple[str, int, bool]:
    """(text, last page in it, whether all of `texts` fitted) of a PDF's pages within
    `budget` tokens: each page with text under its `[Page N]` mark, the last one maybe in
    part. Empty pages are left out; no text at all gives ""."""
    kept: list[str] = []
    last = spent = 0
    for number, page_text in enumerate(texts, 1):
        if not page_text.strip():
            continue
        part = f"{t('document.page', lang=lang, number=number)}\n{page_text.strip()}"
        piece = fit(part, budget - spent)
        if piece.strip():
            kept.append(piece)
            spent += estimate_tokens(piece)
            last = number
        if len(piece) < len(part):
            return "\n\n".join(kept), last, False
    return "\n\n".join(kept), last, True


def _question(messages: Sequence[Message], username: str | None) -> str | None:
    """The caption that asks about the files (the first one), without the bot's @mention."""
    for message in messages:
        if message.caption and message.caption.strip():
            text = strip_mention(message.caption, username).strip()
            if not username or text.lower() != f"@{username.lower()}":
                return text
    return None


def _percent(part: int, whole: int) -> int:
    return max(1, min(99, part * 100 // max(whole, 1)))


class DocumentService:
    """Turns document messages (one, or an album of files) into one turn of the chat's thread."""

    def __init__(
        self,
        chat: ChatService,
        limits: DocumentLimits,
        *,
        readers: int = READERS,
        downloads: int = DOWNLOADS,
        held_bytes: int = HELD_BYTES,
        turn_bytes: int = TURN_BYTES,
    ) -> None:
        self.chat = chat
        self.limits = limits
        self._readers = asyncio.Semaphore(readers)
        self._downloads = asyncio.Semaphore(downloads)
        self.held = MemoryBudget(max(held_bytes, DOWNLOAD_COPIES * limits.max_bytes))
        self.turns = MemoryBudget(turn_bytes)

    @property
    def limit_mb(self) -> int:
        return max(1, self.limits.max_bytes // MIB)

    def pick(self, message: Message, lang: str | None = None) -> DocumentRef:
        """The file to fetch, checked by kind and by the size Telegram declares; a file
        without a name is named in `lang`."""
        doc = message.document
        if doc is None:
            raise DocumentRejected("document.unsupported")
        kind = document_kind(doc.file_name or "", doc.mime_type or "")
        if kind is None:
            raise DocumentRejected("document.unsupported")
        if doc.file_size is not None and doc.file_size > self.limits.max_bytes:
            raise DocumentRejected("document.too_large", limit=self.limit_mb)
        if doc.file_size == 0:
            raise DocumentRejected("document.empty")
        name = clean_name(doc.file_name, kind, lang)
        return DocumentRef(doc.file_id, doc.file_size, name, kind)

    async def answer(
        self,
        bot: Bot,
        key: ChatKey,
        chat_type: str,
        user_id: int | None,
        messages: Sequence[Message],
        lang: str | None = None,
    ) -> None:
        """Read the message's file(s) and ask the model about them in the chat's thread."""
        first = messages[0]
        reply_to = None if chat_type == "private" else first.message_id
        # Checked before anything is downloaded: a refused file costs nothing.
        probe = Incoming(key, chat_type, user_id, first.message_id, text="", lang=lang)
        if await self.chat.already_answered(probe) or await self.chat.refuse_over_limit(bot, probe):
            return
        refs: list[DocumentRef] = []
        refusals: list[DocumentRejected] = []
        for message in messages:
            try:
                refs.append(self.pick(message, lang))
            except DocumentRejected as exc:
                refusals.append(exc)
        if sum(r.size or 0 for r in refs) > self.limits.max_bytes:
            refusals += [DocumentRejected("document.too_large", limit=self.limit_mb)] * len(refs)
            refs = []
        if not refs:
            await self._refuse(bot, key, refusals, 0, reply_to, lang)
            return
        as_files = await self.chat.takes_files(key)
        try:
            await bot.send_chat_action(
                key.chat_id, ChatAction.TYPING, message_thread_id=key.topic_id or None
            )
        except TelegramError:
            pass  # only a progress hint
        # The budget is the message's: the files whose text is sent share it.
        texts = sum(1 for r in refs if not (as_files and r.kind == "pdf")) or 1
        budget = max(1, self.limits.max_tokens // texts)
        async with AsyncExitStack() as stack:
            if as_files:  # the PDFs' bytes travel with the turn
                pdf_bytes = sum(r.size or self.limits.max_bytes for r in refs if r.kind == "pdf")
                await stack.enter_async_context(self.turns.hold(TURN_COPIES * pdf_bytes))
            read: list[ReadDocument] = []
            for ref in refs:  # one at a time: a message's files never take every reader
                try:
                    read.append(await self._read(bot, ref, as_files, budget, lang))
                except DocumentRejected as exc:
                    refusals.append(exc)
            if refusals:
                await self._refuse(bot, key, refusals, len(read), reply_to, lang)
            if not read:
                return
            question = _question(messages, bot.username)
            notes = [d.cut for d in read if d.cut]
            if question is None:
                many = len(read) > 1
                question = t("document.summarize_many" if many else "document.summarize", lang=lang)
                notes.insert(0, t("document.summarized", lang=lang))
            await self.chat.answer(
                bot,
                Incoming(
                    key=key,
                    chat_type=chat_type,
                    user_id=user_id,
                    message_id=first.message_id,
                    text=question,
                    lang=lang,
                    kind="document",
                    files=tuple(d.file for d in read),
                    notes=tuple(notes),
                ),
            )

    async def _refuse(
        self,
        bot: Bot,
        key: ChatKey,
        refusals: list[DocumentRejected],
        answered: int,
        reply_to: int | None,
        lang: str | None,
    ) -> None:
        text = t(refusals[0].key, lang=lang, **refusals[0].values)
        if answered:
            text = t("document.some_skipped", lang=lang, count=len(refusals), reason=text)
        await send_text(bot, key, text, reply_to=reply_to)

    async def _read(
        self, bot: Bot, ref: DocumentRef, as_file: bool, budget: int, lang: str | None
    ) -> ReadDocument:
        size = ref.size if ref.size is not None else self.limits.max_bytes
        async with self.held.hold(DOWNLOAD_COPIES * size) as held:
            async with self._downloads:
                data = await self._download(bot, ref, held)
            held.shrink(len(data))
            if not data:
                raise DocumentRejected("document.empty")
            async with self._readers:
                if ref.kind == "pdf":
                    return await self._read_pdf(ref, data, as_file, budget, lang)
                kept, length, total = await held.run(read_text_file, data, self.limits, budget)
        header = t("document.header", lang=lang, name=ref.name)
        if length >= total:
            return ReadDocument(InputFile(ref.name, TEXT_MIME, b"", f"{header}\n\n{kept}"), None)
        percent = _percent(length, total)
        note = t("document.cut_text_note", lang=lang, percent=percent)
        text = f"{header}\n\n{kept}\n\n{note}"
        return ReadDocument(
            InputFile(ref.name, TEXT_MIME, b"", text),
            t("document.cut_text", lang=lang, name=ref.name, percent=percent),
        )

    async def _read_pdf(
        self, ref: DocumentRef, data: bytes, as_file: bool, budget: int, lang: str | None
    ) -> ReadDocument:
        # Pages are read until they hold enough text for the budget in any script (a token
        # is at most four characters), and a little more to tell where the text was cut.
        pages, texts = await self._extract(data, budget * 4 + 64)
        header = t("document.header_pages", lang=lang, name=ref.name, pages=pages)
        body, last, fitted = await asyncio.to_thread(
            fit_pages, texts, budget - estimate_tokens(header), lang
        )
        whole = fitted and len(texts) == pages
        mime, sent = PDF_MIME, data if as_file else b""
        # A model given the PDF itself reads more than the log keeps of it when its text
        # was cut, or when it has none (a scan): such a turn makes no training example.
        partial = bool(sent) and not (whole and body)
        if not body:
            if whole and not as_file:
                raise DocumentRejected("document.no_text")
            # The model sees the pages themselves (scans included); the log says so.
            body = t("document.no_text_layer", lang=lang)
        if whole:
            text = f"{header}\n\n{body}"
            return ReadDocument(InputFile(ref.name, mime, sent, text, partial), None)
        last = max(last, 1)
        note = t("document.cut_pages_note", lang=lang, last=last, pages=pages)
        text = f"{header}\n\n{body}\n\n{note}"
        # A model that takes the PDF itself reads it whole: the user hears of no cut then.
        cut = None
        if not as_file:
            cut = t("document.cut_pages", lang=lang, name=ref.name, last=last, pages=pages)
        return ReadDocument(InputFile(ref.name, mime, sent, text, partial), cut)

    async def _extract(self, data: bytes, max_chars: int) -> tuple[int, list[str]]:
        """(pages, texts of the first pages) from the PDF reader process; DocumentRejected."""
        limits = self.limits
        args = (limits.max_pages, max_chars, limits.parse_memory_mb, int(limits.parse_seconds) + 1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",  # isolated: no PYTHON* variables, no user site, no script dir imports
            str(PDF_WORKER),
            *map(str, args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={},  # no tokens or keys
        )
        try:
            async with asyncio.timeout(limits.parse_seconds):
                out, _ = await proc.communicate(data)
        except TimeoutError:
            log.info("a PDF took longer than %g s to read: refused", limits.parse_seconds)
            raise DocumentRejected("document.too_costly") from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
        try:
            result = json.loads(out) if proc.returncode == 0 else None
        except ValueError:
            result = None
        if not isinstance(result, dict):
            # Killed by its own limits (memory, CPU time) or crashed: too much work either way.
            log.info("the PDF reader ended with %s: refused", proc.returncode)
            raise DocumentRejected("document.too_costly")
        if "refused" in result:
            reason = str(result["refused"])
            log.info("PDF refused: %s", reason)
            values = {"limit": limits.max_pages} if reason == pdf_text.TOO_MANY_PAGES else {}
            raise DocumentRejected(f"document.{reason}", **values)
        pages, texts = result.get("pages"), result.get("texts")
        if not isinstance(pages, int) or not isinstance(texts, list):
            raise DocumentRejected("document.too_costly")
        if pages == 0:
            raise DocumentRejected("document.empty")
        return pages, [utf8_safe(str(x)) for x in texts]

    async def _download(self, bot: Bot, ref: DocumentRef, held: Hold) -> bytes:
        try:
            tg_file = await bot.get_file(ref.file_id)
            if tg_file.file_size is not None:
                if tg_file.file_size > self.limits.max_bytes:
                    raise DocumentRejected("document.too_large", limit=self.limit_mb)
                held.shrink(DOWNLOAD_COPIES * tg_file.file_size)
            buf = await tg_file.download_as_bytearray()
        except TelegramError as exc:
            # Past 20 MB, getFile answers "file is too big" (a size the message didn't declare).
            if "too big" in str(exc).lower():
                raise DocumentRejected("document.too_large", limit=self.limit_mb) from exc
            log.warning("document download failed: %s", type(exc).__name__)
            raise DocumentRejected("document.download_failed") from exc
        if len(buf) > self.limits.max_bytes:
            raise DocumentRejected("document.too_large", limit=self.limit_mb)
        data = bytes(buf)
        del buf
        return data
