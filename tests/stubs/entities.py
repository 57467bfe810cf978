"""Validation of message entities as Telegram applies it, for the stand-in Bot API server.

`check_entities(text, entities)` takes the JSON-decoded `entities` parameter of sendMessage,
editMessageText or sendMessageDraft and returns every violation found (empty list: valid).

Rules (Bot API "MessageEntity" and "Formatting options"):

- `type` is one of the documented entity types;
- `offset` and `length` are integers, in UTF-16 code units, `offset >= 0`, `length > 0`,
  `offset + length` within the text, and neither end falls inside a surrogate pair;
- `text_link` has a non-empty `url`, `text_mention` a `user` with an `id`, `custom_emoji`
  a `custom_emoji_id`; `language`, where given, is a string on a `pre` entity;
- two entities either nest or are disjoint (no partial overlap), and nesting follows the
  Bot API: bold/italic/underline/strikethrough/spoiler may contain and be part of anything
  except that code and pre contain nothing; block quotes don't nest; the other entities
  (links, mentions, code, ...) don't contain each other.
"""

from __future__ import annotations

from array import array
from enum import Enum
from typing import Any

ENTITY_TYPES = frozenset(
    {
        "mention",
        "hashtag",
        "cashtag",
        "bot_command",
        "url",
        "email",
        "phone_number",
        "bold",
        "italic",
        "underline",
        "strikethrough",
        "spoiler",
        "blockquote",
        "expandable_blockquote",
        "code",
        "pre",
        "text_link",
        "text_mention",
        "custom_emoji",
        "date_time",  # Bot API 10.x (listed in shared/specs/telegram-bot-api.json)
    }
)
SPLITTABLE = frozenset({"bold", "italic", "underline", "strikethrough", "spoiler"})
BLOCKS = frozenset({"blockquote", "expandable_blockquote"})
CODE = frozenset({"code", "pre"})


def utf16_units(text: str) -> array[int]:
    """The text as UTF-16 code units (lone surrogates count as one unit)."""
    units = array("H")
    units.frombytes(text.encode("utf-16-le", "surrogatepass"))
    return units


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _may_contain(outer: str, inner: str) -> bool:
    if outer in CODE:
        return False
    if outer in SPLITTABLE:
        return True
    if outer in BLOCKS:
        return inner not in BLOCKS
    return inner in SPLITTABLE


def _nesting_ok(a: str, a_range: tuple[int, int], b: str, b_range: tuple[int, int]) -> bool:
    """a contains b (a_range covers b_range); equal ranges may nest either way."""
    if a_range == b_range:
        return _may_contain(a, b) or _may_contain(b, a)
    return _may_contain(a, b)


def check_entities(text: str, entities: list[dict[str, Any]]) -> list[str]:
    """Every way in which `entities` would be rejected for `text`; empty when they are valid."""
    if not isinstance(text, str):
        return [f"text is {type(text).__name__}, not a string"]
    if not isinstance(entities, list):
        return [f"entities is {type(entities).__name__}, not an array"]
    units = utf16_units(text)
    total = len(units)
    problems: list[str] = []
    spans: list[tuple[int, int, str, int]] = []  # (start, end, type, index)

    def inside_pair(pos: int) -> bool:
        return (
            0 < pos < total
            and 0xD800 <= units[pos - 1] <= 0xDBFF
            and 0xDC00 <= units[pos] <= 0xDFFF
        )

    for i, ent in enumerate(entities):
        where = f"entity {i}"
        if not isinstance(ent, dict):
            problems.append(f"{where}: not an object")
            continue
        kind = ent.get("type")
        if isinstance(kind, Enum):  # PTB's MessageEntityType, if given an undumped to_dict()
            kind = kind.value
        offset, length = ent.get("offset"), ent.get("length")
        where = f"entity {i} ({kind!r} at {offset!r}+{length!r})"
        ok = True
        if kind not in ENTITY_TYPES:
            problems.append(f"{where}: unknown type")
            ok = False
        if not _is_int(offset) or not _is_int(length):
            problems.append(f"{where}: offset and length must be integers")
            continue
        assert isinstance(offset, int) and isinstance(length, int)
        if offset < 0:
            problems.append(f"{where}: negative offset")
            ok = False
        if length <= 0:
            problems.append(f"{where}: length must be positive")
            ok = False
        if offset + length > total:
            problems.append(f"{where}: ends at {offset + length}, beyond the text ({total} units)")
            ok = False
        if inside_pair(offset):
            problems.append(f"{where}: starts inside a surrogate pair")
            ok = False
        if inside_pair(offset + length):
            problems.append(f"{where}: ends inside a surrogate pair")
            ok = False
        if kind == "text_link":
            url = ent.get("url")
            if not isinstance(url, str) or not url.strip():
                problems.append(f"{where}: text_link without url")
                ok = False
        if kind == "text_mention":
            user = ent.get("user")
            if not isinstance(user, dict) or not _is_int(user.get("id")):
                problems.append(f"{where}: text_mention without user.id")
                ok = False
        if kind == "custom_emoji" and not isinstance(ent.get("custom_emoji_id"), str):
            problems.append(f"{where}: custom_emoji without custom_emoji_id")
            ok = False
        if "language" in ent and ent["language"] is not None:
            if kind != "pre":
                problems.append(f"{where}: language is only for pre")
                ok = False
            elif not isinstance(ent["language"], str):
                problems.append(f"{where}: language must be a string")
                ok = False
        if ok:
            spans.append((offset, offset + length, str(kind), i))

    # Nesting: walk in (start, -end) order keeping the chain of open entities.
    spans.sort(key=lambda s: (s[0], -s[1], s[3]))
    stack: list[tuple[int, int, str, int]] = []
    for span in spans:
        start, end, kind, index = span
        while stack and stack[-1][1] <= start:
            stack.pop()
        if stack and stack[-1][1] < end:
            top = stack[-1]
            problems.append(
                f"entity {index} ({kind} {start}..{end}) partially overlaps "
                f"entity {top[3]} ({top[2]} {top[0]}..{top[1]})"
            )
        else:
            for outer in stack:
                if not _nesting_ok(outer[2], (outer[0], outer[1]), kind, (start, end)):
                    problems.append(
                        f"entity {index} ({kind} {start}..{end}) may not be nested in "
                        f"entity {outer[3]} ({outer[2]} {outer[0]}..{outer[1]})"
                    )
        stack.append(span)
    return problems
