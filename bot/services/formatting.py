"""Model Markdown -> Telegram text + message entities, split into sendable parts.

The model writes Markdown; Telegram is sent plain text plus ``MessageEntity`` objects (never a
``parse_mode`` string), so a message can never fail with "can't parse entities".

The conversion itself is done by ``telegramify-markdown`` (pulldown-cmark underneath, via
``pyromark``). Around it this module:

- pre-escapes what chat text rarely means as markup (HTML-looking tags, which the parser
  would silently drop; ``2*3*4``; Python dunder names such as ``__init__``);
- sanitises the entities (drops unsafe link targets, nested block quotes, entities inside
  code, anything that would overlap illegally, zero-length entities);
- splits the result into parts of at most ``limit`` UTF-16 code units at paragraph, line or
  word boundaries, clipping every entity into the parts it covers, never splitting a code
  block that fits in one part.

Offsets and lengths are UTF-16 code units throughout, as Telegram counts them.
"""

from __future__ import annotations

import bisect
import html
import itertools
import logging
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pyromark
import telegramify_markdown
from telegram import MessageEntity
from telegramify_markdown import converter as _converter

log = logging.getLogger(__name__)

TEXT_LIMIT = 4096

__all__ = [
    "TEXT_LIMIT",
    "Formatted",
    "MarkdownTail",
    "escape_rich",
    "link_list",
    "needs_rich",
    "plain_parts",
    "render",
    "render_parts",
    "rich_fits",
    "rich_link_list",
    "to_rich",
    "utf16_len",
]


@dataclass(frozen=True, slots=True)
class Formatted:
    """Plain text plus the entities that format it (offsets in UTF-16 code units)."""

    text: str
    entities: tuple[MessageEntity, ...]


def utf16_len(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units (an astral character counts 2)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


# --- converter configuration ------------------------------------------------------------------


def _make_config() -> telegramify_markdown.RenderConfig:
    config = telegramify_markdown.RenderConfig.isolated()  # never touch the library's global
    symbols = config.markdown_symbol
    for level in range(1, 7):  # headings: bold (+ underline for H1/H2), no emoji prefix
        setattr(symbols, f"heading_level_{level}", "")
    symbols.unordered_list_item = "•"
    return config


_CONFIG = _make_config()
# The parser options the converter uses, to find code exactly as it will (fallback: its 1.4 set).
_OPTIONS = getattr(
    _converter,
    "STANDARD_OPTIONS",
    pyromark.Options.ENABLE_TABLES
    | pyromark.Options.ENABLE_STRIKETHROUGH
    | pyromark.Options.ENABLE_TASKLISTS
    | pyromark.Options.ENABLE_MATH,
)

# --- input preparation ------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
# What chat text rarely means as markup, found in one pass outside code:
# - "<" that would start an HTML tag, comment or declaration (the parser drops those, text and
#   all), unless preceded by an odd number of backslashes; CommonMark autolinks
#   (<https://...>, <a@b.c>) are matched first and kept as they are;
# - a single "*" between two letters or digits: arithmetic (2*3*4) or a glob, not emphasis;
# - Python dunder names (__init__, __main__), not bold.
_AUTOLINK = r"<(?:[A-Za-z][A-Za-z0-9+.\-]{1,31}:[^\s<>]*|[^\s<>@\\]+@[A-Za-z0-9.\-]+)>"
_PROSE = re.compile(
    rf"(?P<auto>{_AUTOLINK})"
    r"|(?<!\\)(?P<bs>(?:\\\\)*)<(?=[A-Za-z/!?])"
    r"|(?<=[^\W_])(?P<star>\*)(?=[^\W_])"
    r"|(?<![\w\\])__(?P<dunder>[a-z][a-z0-9]*(?:_[a-z0-9]+)*)__(?!\w)"
)


def _clean_surrogates(text: str) -> str:
    """Join surrogate pairs given as two code points; replace lone surrogates with U+FFFD."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _escape_match(match: re.Match[str]) -> str:
    if match.group("auto"):
        return match.group(0)
    if match.group("star"):
        return "\\*"
    dunder = match.group("dunder")
    if dunder:
        return f"\\_\\_{dunder}\\_\\_"
    return match.group("bs") + "\\<"


def _escape_prose(prose: str) -> str:
    return _PROSE.sub(_escape_match, prose)


def _needs_escaping(markdown: str) -> bool:
    return ("<" in markdown or "*" in markdown or "__" in markdown) and (
        _PROSE.search(markdown) is not None
    )


def _prepare(markdown: str) -> str:
    """Escape, outside code, the characters that chat text rarely means as markup."""
    markdown = _clean_surrogates(markdown)
    if not _needs_escaping(markdown):
        return markdown
    data = markdown.encode("utf-8")
    pieces: list[str] = []
    cursor = 0
    for payload, source_range in pyromark.events_with_range(markdown, options=_OPTIONS):
        if not isinstance(payload, dict):
            continue
        start_tag = payload.get("Start")
        is_code = (isinstance(start_tag, dict) and "CodeBlock" in start_tag) or "Code" in payload
        if not is_code:
            continue
        start, end = source_range["start"], source_range["end"]
        if start < cursor:  # defensive: ranges come in order and never overlap
            continue
        pieces.append(_escape_prose(data[cursor:start].decode("utf-8")))
        pieces.append(data[start:end].decode("utf-8"))
        cursor = end
    pieces.append(_escape_prose(data[cursor:].decode("utf-8")))
    return "".join(pieces)


# --- entity sanitising ------------------------------------------------------------------------

# (type, offset, length, url, language), offsets in UTF-16 code units
_Ent = tuple[str, int, int, str | None, str | None]

_SPLITTABLE = frozenset({"bold", "italic", "underline", "strikethrough", "spoiler"})
_BLOCK = frozenset({"blockquote", "expandable_blockquote"})
_CODE = frozenset({"code", "pre"})
_ALLOWED = _SPLITTABLE | _BLOCK | _CODE | {"text_link"}
# Containers first when two entities cover the same range.
_RANK = {"blockquote": 0, "expandable_blockquote": 0, "text_link": 2, "code": 3, "pre": 3}

_URL_SCHEME = re.compile(r"(?i)^(?:https?|ftp)://[^\s/?#]+\S*$|^mailto:[^\s@]+@\S+$")
_BARE_DOMAIN = re.compile(r"(?i)^(?:[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?\.)+[a-z]{2,63}(?:[/?#]\S*)?$")
_LANGUAGE = re.compile(r"^[A-Za-z0-9_+#.\-]{1,64}$")


def _safe_url(url: str | None) -> str | None:
    if not url:
        return None
    url = url.strip()
    if len(url) > 2048:
        return None
    if _URL_SCHEME.match(url):
        return url
    if _BARE_DOMAIN.match(url):
        return "https://" + url
    return None  # relative links, javascript:, tg://user?id=..., anchors: text only


def _safe_language(language: str | None) -> str | None:
    if not language:
        return None
    language = language.strip().split(None, 1)[0] if language.strip() else ""
    return language if _LANGUAGE.match(language) else None


def _may_contain(outer: str, inner: str) -> bool:
    if outer in _CODE:
        return False  # code and pre can contain nothing
    if outer in _SPLITTABLE:
        return True
    if outer in _BLOCK:
        return inner not in _BLOCK  # block quotes don't nest
    return inner in _SPLITTABLE  # text_link may contain bold etc., not code or another link


def _sanitize(raw: list[_Ent], total: int) -> list[_Ent]:
    """Keep only entities Telegram accepts: valid types and targets, properly nested."""
    cleaned: list[_Ent] = []
    for kind, offset, length, url, language in raw:
        if kind not in _ALLOWED:
            continue
        start, end = max(offset, 0), min(offset + length, total)
        if end <= start:
            continue
        if kind == "text_link":
            url = _safe_url(url)
            if url is None:
                continue
        language = _safe_language(language) if kind == "pre" else None
        cleaned.append((kind, start, end - start, url if kind == "text_link" else None, language))
    cleaned.sort(key=lambda e: (e[1], -e[2], _RANK.get(e[0], 1)))
    kept: list[_Ent] = []
    stack: list[_Ent] = []
    for ent in cleaned:
        kind, start, length = ent[0], ent[1], ent[2]
        end = start + length
        while stack and stack[-1][1] + stack[-1][2] <= start:
            stack.pop()
        if stack and stack[-1][1] + stack[-1][2] < end:
            continue  # partial overlap: drop the later one
        if not all(_may_contain(outer[0], kind) for outer in stack):
            continue
        if kind in _SPLITTABLE and any(o[0] == kind and o[1] + o[2] >= end for o in stack):
            continue  # bold inside bold is redundant
        kept.append(ent)
        stack.append(ent)
    return kept


# --- UTF-16 offset mapping --------------------------------------------------------------------


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


class _Offsets:
    """Maps Python string indices to UTF-16 offsets and back.

    Only characters outside the BMP differ (two code units for one character), so it is enough
    to know where they are: `_astral` holds the UTF-16 offset of each, in order.
    """

    __slots__ = ("_astral", "total")

    def __init__(self, text: str) -> None:
        self._astral = [m.start() + k for k, m in enumerate(_ASTRAL.finditer(text))]
        self.total = len(text) + len(self._astral)

    def u16(self, index: int) -> int:
        if not self._astral:
            return index
        # astral characters before `index`: those whose own index (u16 - k) is below it
        lo, hi = 0, len(self._astral)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._astral[mid] - mid < index:
                lo = mid + 1
            else:
                hi = mid
        return index + lo

    def index(self, u16: int) -> int:
        """The Python index of the character at UTF-16 offset `u16` (its start if mid-pair)."""
        return u16 - bisect.bisect_left(self._astral, u16) if self._astral else u16

    def last_index_within(self, u16: int) -> int:
        """The largest Python index whose UTF-16 offset is at most `u16`."""
        return self.index(u16)


# --- conversion -------------------------------------------------------------------------------


def _convert(markdown: str) -> tuple[str, list[_Ent]]:
    """Markdown -> (text, sanitised entities), text trimmed. May raise on converter bugs."""
    text, entities = telegramify_markdown.convert(_prepare(markdown), config=_CONFIG)
    raw: list[_Ent] = [(e.type, e.offset, e.length, e.url, e.language) for e in entities]
    offsets = _Offsets(text)
    ents = _sanitize(raw, offsets.total)
    start, end = _trim(text, 0, len(text), _pre_ranges(ents, offsets))
    if start == end:
        # Markup that renders to nothing (an empty fence, a lone link definition...) is
        # shown as written rather than dropped.
        return _clean_surrogates(markdown).strip(), []
    if (start, end) == (0, len(text)):
        return text, ents
    return text[start:end], _clip(ents, offsets.u16(start), offsets.u16(end))


def _pre_ranges(ents: list[_Ent], offsets: _Offsets) -> list[tuple[int, int, int]]:
    """(start, end, utf16 length) of every pre entity, in Python indices, sorted."""
    return [
        (offsets.index(off), offsets.index(off + length), length)
        for kind, off, length, _, _ in ents
        if kind == "pre"
    ]


def _inside(ranges: list[tuple[int, int, int]], starts: list[int], pos: int) -> int:
    """Index into `ranges` of the range with start < pos < end, or -1."""
    i = bisect.bisect_left(starts, pos) - 1
    if i >= 0 and ranges[i][0] < pos < ranges[i][1]:
        return i
    return -1


def _trim(text: str, start: int, end: int, pres: list[tuple[int, int, int]]) -> tuple[int, int]:
    """Strip whitespace at both ends; keep leading spaces that indent code in a pre."""
    while end > start and text[end - 1].isspace():
        end -= 1
    starts = [r[0] for r in pres]
    while start < end and text[start].isspace():
        if text[start] not in "\n\r" and (
            _inside(pres, starts, start) >= 0 or start in starts  # indentation of code
        ):
            break
        start += 1
    return start, end


def _clip(ents: list[_Ent], lo: int, hi: int) -> list[_Ent]:
    """Entities intersected with [lo, hi) (UTF-16), shifted to start at lo; empty ones dropped."""
    out: list[_Ent] = []
    for kind, off, length, url, language in ents:
        start, end = max(off, lo), min(off + length, hi)
        if end > start:
            out.append((kind, start - lo, end - start, url, language))
    return out


def _to_ptb(ents: list[_Ent]) -> tuple[MessageEntity, ...]:
    return tuple(
        MessageEntity(type=kind, offset=off, length=length, url=url, language=language)
        for kind, off, length, url, language in ents
    )


# --- splitting --------------------------------------------------------------------------------

_GLUE = {"\u200d", "\ufe0e", "\ufe0f", "\u20e3"}


def _breaks_cluster(text: str, pos: int) -> bool:
    """Whether cutting before text[pos] would split a character from its modifiers."""
    ch, prev = text[pos], text[pos - 1]
    return (
        ch in _GLUE
        or prev == "\u200d"
        or unicodedata.combining(ch) != 0
        or "\U0001f3fb" <= ch <= "\U0001f3ff"  # skin tones
        or ("\U0001f1e6" <= ch <= "\U0001f1ff" and "\U0001f1e6" <= prev <= "\U0001f1ff")
        or "\udc00" <= ch <= "\udfff"
    )


class _Splitter:
    def __init__(self, text: str, ents: list[_Ent], limit: int) -> None:
        self.text = text
        self.limit = limit
        self.offsets = _Offsets(text)
        self.ents = ents
        self.pres = _pre_ranges(ents, self.offsets)
        self.pre_starts = [r[0] for r in self.pres]
        # Only code blocks that fit in a part are kept whole.
        self.whole = [r for r in self.pres if r[2] <= limit]
        self.whole_starts = [r[0] for r in self.whole]

    def _last(self, kind: str, lo: int, hi: int) -> int:
        """The last allowed cut of `kind` in [lo, hi], or -1. A cut at c ends a part at c."""
        text = self.text
        while hi >= lo:
            if kind == "para":
                c = text.rfind("\n\n", lo, hi + 2)
            elif kind == "line":
                c = text.rfind("\n", lo, hi + 1)
            elif kind == "word":
                c = max(text.rfind(" ", lo, hi + 1), text.rfind("\t", lo, hi + 1))
            else:
                c = hi
                while c > lo and _breaks_cluster(text, c):
                    c -= 1
            if c < lo:
                return -1
            i = _inside(self.whole, self.whole_starts, c)
            if i < 0:
                return c
            pre_start = self.whole[i][0]
            if pre_start >= lo:
                return pre_start  # cut just before a code block that fits
            hi = pre_start - 1
        return -1

    def _cut(self, start: int) -> int:
        """Where the part starting at `start` ends (Python index)."""
        end = self.offsets.last_index_within(self.offsets.u16(start) + self.limit)
        if end >= len(self.text):
            return len(self.text)
        end = max(end, start + 1)
        half = start + (end - start) // 2
        for kind in ("para", "line", "word"):
            c = self._last(kind, max(half, start + 1), end)
            if c > start:
                return c
        for kind in ("line", "word", "hard"):
            c = self._last(kind, start + 1, end)
            if c > start:
                return c
        return end

    def parts(self) -> list[Formatted]:
        text, offsets = self.text, self.offsets
        ents = self.ents  # sorted by offset
        ent_starts = [e[1] for e in ents]
        max_end = list(itertools.accumulate((e[1] + e[2] for e in ents), max))
        first = 0
        out: list[Formatted] = []
        start = 0
        while start < len(text):
            cut = self._cut(start)
            a, b = _trim(text, start, cut, self.pres)
            if b > a:
                lo, hi = offsets.u16(a), offsets.u16(b)
                while first < len(ents) and max_end[first] <= lo:
                    first += 1
                stop = bisect.bisect_left(ent_starts, hi)
                part_ents = _clip(ents[first:stop], lo, hi)
                out.append(Formatted(text[a:b], _to_ptb(part_ents)))
            start = cut
        return out


# --- public API -------------------------------------------------------------------------------


def render(markdown: str) -> Formatted:
    """The whole reply as text + entities, with no length limit. Never raises."""
    try:
        text, ents = _convert(markdown)
    except Exception as exc:  # a converter bug must not lose the reply
        log.warning(
            "Markdown rendering failed (%s, %d chars); using plain text",
            type(exc).__name__,
            len(markdown),
        )
        text = _clean_surrogates(markdown).strip()
        return Formatted(text, ())
    return Formatted(text, _to_ptb(ents))


def render_parts(markdown: str, limit: int = TEXT_LIMIT) -> list[Formatted]:
    """The reply split into parts of at most `limit` UTF-16 code units, each with valid entities.

    Whitespace-only input gives an empty list (Telegram rejects empty messages).
    """
    if limit < 1:
        raise ValueError("limit must be positive")
    try:
        text, ents = _convert(markdown)
        return _Splitter(text, ents, limit).parts()
    except Exception as exc:  # a converter (or splitter) bug must not lose the reply
        log.warning(
            "Markdown rendering failed (%s, %d chars); sending plain text",
            type(exc).__name__,
            len(markdown),
        )
        return plain_parts(markdown, limit)


def plain_parts(text: str, limit: int = TEXT_LIMIT) -> list[Formatted]:
    """`text` as is, without entities, split like `render_parts`. The fallback."""
    if limit < 1:
        raise ValueError("limit must be positive")
    text = _clean_surrogates(text)
    return _Splitter(text, [], limit).parts()


# --- rich messages (Bot API 10.1) -------------------------------------------------------------
#
# sendRichMessage takes the answer as Markdown (`rich_message.markdown`) and Telegram renders
# it: GitHub-flavoured Markdown plus $inline$ and $$display$$ LaTeX, ||spoilers||, ==marks==,
# footnotes and a few HTML tags (<details>/<summary> for a collapsible block, <sub>, <sup>,
# <br>, ...). Entities can't show a table or a formula, so an answer with one goes out that
# way; everything else stays on entities, which every client renders the same.

# Telegram's limits on one rich message (Bot API, "Rich Message Limits").
RICH_TEXT_LIMIT = 32_768  # characters of text, formula sources included
RICH_MAX_BLOCKS = 500  # blocks, nested ones, list items and table rows included
RICH_MAX_DEPTH = 16  # levels of nested blocks and formatting
RICH_MAX_COLUMNS = 20  # columns of a table

# LaTeX's own delimiters, which models often write: \(inline\) and \[display\].
_LATEX = re.compile(r"(?<!\\)((?:\\\\)*)\\\((.+?)\\\)|(?<!\\)((?:\\\\)*)\\\[(.+?)\\\]", re.DOTALL)
# A "formula" of digits, separators and dashes between two dollar signs is money ($5-$10).
_MONEY = re.compile(r"[\d\s.,'\u2019\u2013-]*")
# The HTML tags let through to a rich message: a collapsible block and a few inline marks.
_RICH_TAGS = frozenset({"details", "summary", "br", "sub", "sup"})
_RICH_PROSE = re.compile(
    rf"(?P<auto>{_AUTOLINK})"
    r"|(?<!\\)(?P<bs>(?:\\\\)*)(?:(?P<dollar>\$)|<(?=(?P<tag>/?[A-Za-z][A-Za-z0-9-]*|[!?])))"
)
_DETAILS = re.compile(r"\s*<details[\s>]", re.IGNORECASE)
_BLOCK_STARTS = frozenset(
    {"Paragraph", "Item", "TableHead", "TableRow", "HtmlBlock", "CodeBlock", "FootnoteDefinition"}
)


def _is_math(payload: Mapping[str, object]) -> bool:
    for kind in ("InlineMath", "DisplayMath"):
        formula = payload.get(kind)
        if isinstance(formula, str):
            return kind == "DisplayMath" or _MONEY.fullmatch(formula) is None
    return False


def _latex_to_dollars(markdown: str) -> str:
    """\\(x\\) and \\[x\\] outside code as $x$ and $$x$$: the delimiters Telegram reads."""

    def swap(match: re.Match[str]) -> str:
        if match.group(2) is not None:
            formula = match.group(2).strip()
            return f"{match.group(1)}${formula}$" if formula else match.group(0)
        formula = match.group(4).strip()
        return f"{match.group(3)}$${formula}$$" if formula else match.group(0)

    if "\\(" not in markdown and "\\[" not in markdown:
        return markdown
    return _map_outside(markdown, lambda prose: _LATEX.sub(swap, prose), _is_code)


def _is_code(payload: Mapping[str, object]) -> bool:
    start = payload.get("Start")
    return (isinstance(start, dict) and "CodeBlock" in start) or "Code" in payload


def _map_outside(
    markdown: str, fn: Callable[[str], str], keep: Callable[[Mapping[str, object]], bool]
) -> str:
    """`markdown` with `fn` applied to everything outside the elements `keep` picks."""
    data = markdown.encode("utf-8")
    pieces: list[str] = []
    cursor = 0
    for payload, source_range in pyromark.events_with_range(markdown, options=_OPTIONS):
        if not isinstance(payload, dict) or not keep(payload):
            continue
        start, end = source_range["start"], source_range["end"]
        if start < cursor:  # inside an element already kept
            continue
        pieces.append(fn(data[cursor:start].decode("utf-8")))
        pieces.append(data[start:end].decode("utf-8"))
        cursor = end
    pieces.append(fn(data[cursor:].decode("utf-8")))
    return "".join(pieces)


def needs_rich(markdown: str) -> bool:
    """Whether `markdown` has what message entities can't show: a table, a formula (LaTeX,
    as $..$, $$..$$, \\(..\\) or \\[..\\]) or a collapsible <details> block."""
    if not ("|" in markdown or "$" in markdown or "\\" in markdown or "<" in markdown):
        return False  # nothing that could start a table, a formula or a tag: no parsing
    markdown = _latex_to_dollars(_clean_surrogates(markdown))
    for payload in pyromark.events(markdown, options=_OPTIONS):
        if not isinstance(payload, dict):
            continue
        start = payload.get("Start")
        if (isinstance(start, dict) and "Table" in start) or _is_math(payload):
            return True
        html = payload.get("Html", payload.get("InlineHtml"))
        if isinstance(html, str) and _DETAILS.match(html):
            return True
    return False


def _escape_rich_match(match: re.Match[str]) -> str:
    if match.group("auto"):
        return match.group(0)
    if match.group("dollar"):
        return match.group("bs") + "\\$"
    tag = (match.group("tag") or "").lstrip("/").lower()
    if tag in _RICH_TAGS:
        return match.group(0)
    return match.group("bs") + "\\<"


def _keep_in_rich(payload: Mapping[str, object]) -> bool:
    return _is_code(payload) or _is_math(payload)


def to_rich(markdown: str) -> str:
    """The model's Markdown as a rich message's: LaTeX delimiters made Telegram's, and
    outside code and formulas every other dollar sign escaped (money, not maths) and every
    HTML-looking tag but a few harmless ones escaped (shown as written, as with entities)."""
    markdown = _latex_to_dollars(_clean_surrogates(markdown).strip())
    fence = None
    for line in markdown.split("\n"):
        fence = _fence_after(line, fence)
    if fence is not None:  # an answer cut inside a code block: closed, so nothing joins it
        markdown += "\n" + re.match(r" *(`+|~+)", fence).group(1)  # type: ignore[union-attr]
    if "$" not in markdown and "<" not in markdown:
        return markdown
    return _map_outside(
        markdown, lambda prose: _RICH_PROSE.sub(_escape_rich_match, prose), _keep_in_rich
    )


def rich_fits(markdown: str) -> bool:
    """Whether `markdown` keeps within a rich message's limits (text counted as its source,
    which is never shorter than what Telegram counts)."""
    if not markdown.strip() or len(markdown) > RICH_TEXT_LIMIT:
        return False
    blocks = depth = deepest = columns = 0
    for payload in pyromark.events(markdown, options=_OPTIONS):
        if payload == "Rule":
            blocks += 1
        if not isinstance(payload, dict):
            continue
        if "DisplayMath" in payload:
            blocks += 1
        start: object = payload.get("Start")
        if start is not None:
            depth += 1
            deepest = max(deepest, depth)
            kind = start if isinstance(start, str) else next(iter(_mapping(start)), "")
            if kind in _BLOCK_STARTS or kind in ("Heading", "BlockQuote", "List", "Table"):
                blocks += 1
            if kind == "Table":
                alignments = _mapping(start).get("Table")
                columns = max(columns, len(alignments) if isinstance(alignments, tuple) else 0)
        elif "End" in payload:
            depth -= 1
    return blocks <= RICH_MAX_BLOCKS and deepest <= RICH_MAX_DEPTH and columns <= RICH_MAX_COLUMNS


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


_RICH_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def escape_rich(text: str) -> str:
    """Plain text as rich-message Markdown that shows it as written (a paragraph a line)."""
    lines = (_RICH_PUNCTUATION.sub(r"\\\1", line) for line in text.splitlines() if line.strip())
    return "\n\n".join(lines)


# --- links under an answer (a web search's sources) -------------------------------------------

MAX_LINKS = 10
_TITLE_LIMIT = 100


def _links(links: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(title, url) pairs: safe URLs only, each once, titles tidied; at most MAX_LINKS."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for title, url in links:
        safe = _safe_url(url)
        if safe is None or safe in seen:
            continue
        seen.add(safe)
        name = " ".join(_clean_surrogates(title).split()) or _host(safe)
        if len(name) > _TITLE_LIMIT:
            name = name[: _TITLE_LIMIT - 1].rstrip() + "…"
        out.append((name, safe))
        if len(out) == MAX_LINKS:
            break
    return out


def _host(url: str) -> str:
    """The host of a URL, or the URL itself."""
    match = re.match(r"(?i)^[a-z]+://([^/?#:]+)", url)
    return match.group(1) if match else url


def link_list(heading: str, links: Sequence[tuple[str, str]]) -> Formatted | None:
    """`heading` over a numbered list of links (title as a text link), in a block quote that
    folds away when long; None if no link is safe to show."""
    kept = _links(links)
    if not kept:
        return None
    text = heading
    ents = [MessageEntity("bold", 0, utf16_len(heading))]
    for n, (title, url) in enumerate(kept, 1):
        text += f"\n{n}. "
        ents.append(MessageEntity("text_link", utf16_len(text), utf16_len(title), url=url))
        text += title
    quote = MessageEntity("expandable_blockquote", 0, utf16_len(text))
    return Formatted(text, (quote, *ents))


def rich_link_list(heading: str, links: Sequence[tuple[str, str]]) -> str | None:
    """The same list as rich-message Markdown, in a collapsible block; None if no link."""
    kept = _links(links)
    if not kept:
        return None
    items = "\n".join(
        f"{n}. [{escape_rich(title)}]({_encode_url(url)})" for n, (title, url) in enumerate(kept, 1)
    )
    summary = html.escape(" ".join(heading.split()), quote=False)
    return f"<details>\n<summary>{summary}</summary>\n\n{items}\n\n</details>"


def _encode_url(url: str) -> str:
    """A URL safe inside a Markdown link's parentheses."""
    return url.replace("\\", "%5C").replace("(", "%28").replace(")", "%29").replace("<", "%3C")


# --- drafts: the end of a growing text --------------------------------------------------------

# A line that opens or closes a fenced code block (CommonMark: up to three spaces of indent,
# three or more backticks or tildes; a backtick fence's info string has no backtick).
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})([^\n]*)")


def _fence_after(line: str, fence: str | None) -> str | None:
    """The code fence open after `line` (its opening line), given the one open before it."""
    match = _FENCE.match(line)
    if match is None:
        return fence
    marker, rest = match.groups()
    if fence is None:
        if marker[0] == "`" and "`" in rest:
            return None  # inline code, not a fence
        return line.strip()
    opened = re.match(r"`+|~+", fence)
    if opened and marker[0] == opened.group()[0] and len(marker) >= len(opened.group()):
        return None if not rest.strip() else fence
    return fence


class MarkdownTail:
    """The end of a Markdown text that grows piece by piece: what a streamed draft shows.

    A draft shows the part being written. Rendering the whole text for every draft costs
    time in proportion to its length, each time: quadratic over a long answer. This keeps
    only the last two windows or so of the text, and which code fence is open where they
    start, so a `view()` costs about the same however long the text has grown. Short texts
    (up to one window) are given whole, exactly as written.
    """

    def __init__(self, window: int = TEXT_LIMIT) -> None:
        self.window = window
        self._pending: list[str] = []
        self._pending_size = 0
        self._text = ""  # the kept end of the text
        self._fence: str | None = None  # the code fence open where _text starts
        self._mid_line = False  # _text starts inside a line
        self._dropped = False

    def append(self, piece: str) -> None:
        """Add the next piece of text (cheap: the work waits for the next view)."""
        self._pending.append(piece)
        self._pending_size += len(piece)
        if self._pending_size > 4 * self.window:
            self._fold()  # what waits stays bounded too

    def _fold(self) -> None:
        """Join what is pending; drop the start beyond two windows, noting its open fence."""
        if self._pending:
            self._text += "".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
        text = self._text
        if len(text) <= 2 * self.window:
            return
        keep_from = len(text) - self.window
        cut = text.rfind("\n", keep_from - self.window, keep_from) + 1  # at a line start
        if cut == 0:
            cut = keep_from  # no line break near: mid-line
        fence = self._fence
        pos = 0
        if self._mid_line:  # the first line's start was dropped earlier: it decides nothing
            pos = text.find("\n", 0, cut) + 1 or cut
        while pos < cut:
            end = text.find("\n", pos, cut)
            if end < 0:
                break  # a line that continues past the cut
            fence = _fence_after(text[pos:end], fence)
            pos = end + 1
        self._fence = fence
        self._mid_line = text[cut - 1] != "\n"
        self._text = text[cut:]
        self._dropped = True

    def view(self) -> str:
        """The text's end, about a window of it, beginning where it reads as in the whole:
        at a paragraph outside code if one starts early enough, else at a line (with its
        code fence opened again), else mid-line."""
        self._fold()
        text = self._text
        if not self._dropped and len(text) <= self.window:
            return text
        start = max(0, len(text) - self.window)
        late = start + self.window // 2  # a paragraph starting later leaves too little
        fence = self._fence
        pos = 0
        if self._mid_line:
            pos = text.find("\n") + 1 or len(text)
        first_line: tuple[int, str | None] | None = None
        blank_before = False
        while pos < len(text):
            if pos >= start:
                if fence is None and blank_before and pos <= late:
                    return text[pos:]
                if first_line is None:
                    first_line = (pos, fence)
            end = text.find("\n", pos)
            if end < 0:
                break
            line = text[pos:end]
            fence = _fence_after(line, fence)
            blank_before = not line.strip()
            pos = end + 1
        if first_line is None:  # one line longer than the window
            at, opened = start, fence
        else:
            at, opened = first_line
        return f"{opened}\n{text[at:]}" if opened else text[at:]
