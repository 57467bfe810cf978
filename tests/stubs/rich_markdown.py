"""How the stand-in Telegram reads a rich message's Markdown (Bot API 10.1).

Telegram parses `rich_message.markdown` itself: GitHub-flavoured Markdown with $inline$ and
$$display$$ LaTeX, plus a few HTML tags (Bot API, "Rich Markdown style"). The stand-in reads
it with pulldown-cmark (through pyromark) into the `RichMessage` blocks a `Message` carries,
so a test sees what the user would (a table's cells, a formula), and it reports what Telegram
refuses: a message over the documented limits, and HTML tags that rich messages don't know.
This is not the bot's own conversion (bot/services/formatting.py), written independently.
"""

from __future__ import annotations

import re
from typing import Any

import pyromark

# Bot API, "Rich Message Limits".
MAX_TEXT = 32_768  # characters of text, formula sources included
MAX_BLOCKS = 500  # blocks, nested ones, list items and table rows included
MAX_DEPTH = 16  # levels of nested blocks and formatting
MAX_COLUMNS = 20  # columns of a table

# The tags of the rich HTML style (each RichBlock and RichText type names its tag).
KNOWN_TAGS = frozenset(
    "p h1 h2 h3 h4 h5 h6 pre code footer hr tg-math-block tg-math a ul ol li blockquote"
    " aside cite tg-collage tg-slideshow table tr td th caption details summary tg-map video"
    " audio img figure figcaption b strong i em u ins s strike del tg-spoiler sub sup mark br"
    " tg-emoji tg-time tg-reference tg-thinking".split()
)
DRAFT_ONLY_TAGS = frozenset({"tg-thinking"})  # RichBlockThinking: "only in sendRichMessageDraft"

_OPTIONS = (
    pyromark.Options.ENABLE_TABLES
    | pyromark.Options.ENABLE_STRIKETHROUGH
    | pyromark.Options.ENABLE_TASKLISTS
    | pyromark.Options.ENABLE_MATH
)
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9-]*)")
_SUMMARY = re.compile(r"<summary>(.*?)</summary>", re.DOTALL | re.IGNORECASE)
_ALIGN = {"Left": "left", "Center": "center", "Right": "right"}
_INLINE = {"Emphasis": "italic", "Strong": "bold", "Strikethrough": "strikethrough"}


class _Block(dict[str, Any]):
    """A block (as opposed to inline rich text) among a container's items."""


class _Node:
    def __init__(self, kind: str, attrs: Any = None) -> None:
        self.kind = kind
        self.attrs = attrs
        self.items: list[Any] = []


def read_rich(markdown: str, *, draft: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """The blocks `markdown` renders as, and why Telegram would refuse it (empty: it takes it)."""
    reader = _Reader(draft)
    problems = reader.read(markdown)
    return reader.root.items, problems


def _text(items: list[Any]) -> Any:
    """Inline items as one RichText: a string, one object, or a list of them."""
    merged: list[Any] = []
    for item in items:
        if isinstance(item, tuple):  # a display formula inside other text
            item = item[1]
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        else:
            merged.append(item)
    if not merged:
        return ""
    return merged[0] if len(merged) == 1 else merged


def plain(text: Any) -> str:
    """A RichText's characters, formula sources included."""
    if isinstance(text, str):
        return text
    if isinstance(text, list):
        return "".join(plain(t) for t in text)
    if isinstance(text, dict):
        return plain(text.get("text", text.get("expression", "")))
    return ""


class _Reader:
    def __init__(self, draft: bool) -> None:
        self.draft = draft
        self.root = _Node("root")
        self.stack = [self.root]
        self.blocks = 0
        self.deepest = 0
        self.chars = 0
        self.problems: list[str] = []

    def read(self, markdown: str) -> list[str]:
        if not markdown.strip():
            return ["rich message is empty"]
        for event in pyromark.events(markdown, options=_OPTIONS):
            self._event(event)
        while len(self.stack) > 1:  # an unclosed <details>
            self._close_details()
        if self.chars > MAX_TEXT:
            self.problems.append(f"rich message text is too long ({self.chars} characters)")
        if self.blocks > MAX_BLOCKS:
            self.problems.append(f"rich message has too many blocks ({self.blocks})")
        if self.deepest > MAX_DEPTH:
            self.problems.append(f"rich message is nested too deeply ({self.deepest})")
        return self.problems

    # -- events -------------------------------------------------------------------------------

    def _event(self, event: Any) -> None:
        top = self.stack[-1]
        if event == "Rule":
            self._block({"type": "divider"})
        elif event in ("SoftBreak", "HardBreak"):
            top.items.append("\n" if event == "HardBreak" else " ")
        elif not isinstance(event, dict):
            return
        elif "Start" in event:
            start = event["Start"]
            kind = start if isinstance(start, str) else next(iter(start))
            self.stack.append(_Node(kind, None if isinstance(start, str) else start[kind]))
            self.deepest = max(self.deepest, len(self.stack) - 1)
        elif "End" in event:
            self._end(self.stack.pop())
        elif "Text" in event:
            self._chars(event["Text"])
            top.items.append(event["Text"])
        elif "Code" in event:
            self._chars(event["Code"])
            top.items.append({"type": "code", "text": event["Code"]})
        elif "InlineMath" in event or "DisplayMath" in event:
            formula = event.get("InlineMath", event.get("DisplayMath"))
            self._chars(formula)
            math = {"type": "mathematical_expression", "expression": formula}
            top.items.append(math if "InlineMath" in event else ("display", math))
        elif "InlineHtml" in event:
            self._tags(event["InlineHtml"])
            if re.fullmatch(r"<br\s*/?>", event["InlineHtml"].strip(), re.IGNORECASE):
                top.items.append("\n")
        elif "Html" in event:
            top.items.append(event["Html"])
        elif "TaskListMarker" in event:
            top.attrs = {"checked": event["TaskListMarker"]}

    def _chars(self, text: str) -> None:
        self.chars += len(text)

    def _tags(self, html: str) -> None:
        for closing, name in _TAG.findall(html):
            name = name.lower()
            if closing:
                continue
            if name not in KNOWN_TAGS:
                self.problems.append(f"rich message has an unsupported tag <{name}>")
            elif name in DRAFT_ONLY_TAGS and not self.draft:
                self.problems.append(f"<{name}> may be used only in sendRichMessageDraft")

    def _block(self, block: dict[str, Any]) -> None:
        self.blocks += 1
        self.stack[-1].items.append(_Block(block))

    def _blocks_of(self, node: _Node) -> list[dict[str, Any]]:
        """A container's blocks; loose inline content (a tight list item's) as a paragraph."""
        out: list[dict[str, Any]] = []
        inline: list[Any] = []
        for item in node.items:
            if isinstance(item, _Block):
                if inline:
                    out.append(_Block(type="paragraph", text=_text(inline)))
                    inline = []
                out.append(item)
            else:
                inline.append(item)
        if any(plain(_text([i])).strip() for i in inline):
            out.append(_Block(type="paragraph", text=_text(inline)))
        return out

    def _end(self, node: _Node) -> None:
        kind = node.kind
        if kind in _INLINE:
            self.stack[-1].items.append({"type": _INLINE[kind], "text": _text(node.items)})
        elif kind == "Link":
            link = {"type": "url", "text": _text(node.items), "url": node.attrs["dest_url"]}
            self.stack[-1].items.append(link)
        elif kind == "Image":
            self.stack[-1].items.append(_text(node.items))
        elif kind == "Paragraph":
            display = [i for i in node.items if isinstance(i, tuple)]
            if display and len(display) == len([i for i in node.items if str(i).strip()]):
                for _, math in display:  # a paragraph of display formulas: formula blocks
                    self._block(math)
            else:
                self._block({"type": "paragraph", "text": _text(node.items)})
        elif kind == "Heading":
            size = int(str(node.attrs["level"]).lstrip("H"))
            self._block({"type": "heading", "text": _text(node.items), "size": size})
        elif kind == "CodeBlock":
            code = "".join(i for i in node.items if isinstance(i, str))
            block: dict[str, Any] = {"type": "pre", "text": code}
            fenced = node.attrs.get("Fenced") if isinstance(node.attrs, dict) else None
            if fenced:
                block["language"] = fenced.split()[0]
            self._block(block)
        elif kind == "BlockQuote":
            self._block({"type": "blockquote", "blocks": self._blocks_of(node)})
        elif kind == "List":
            first = node.attrs
            items = []
            for n, item in enumerate(node.items):
                label = f"{first + n}." if isinstance(first, int) else "•"
                items.append({"label": label, **item})
            self._block({"type": "list", "items": items})
        elif kind == "Item":
            item: dict[str, Any] = {"blocks": self._blocks_of(node)}
            if isinstance(node.attrs, dict) and "checked" in node.attrs:
                item["has_checkbox"] = True
                item["is_checked"] = node.attrs["checked"]
            self.blocks += 1
            self.stack[-1].items.append(item)
        elif kind == "Table":
            alignments = node.attrs or ()
            if len(alignments) > MAX_COLUMNS:
                self.problems.append(f"table has too many columns ({len(alignments)})")
            rows = []
            for header, cells in node.items:
                rows.append(
                    [
                        {
                            "text": _text(cell),
                            "is_header": header,
                            "align": _ALIGN.get(
                                alignments[i] if i < len(alignments) else "", "left"
                            ),
                            "valign": "middle",
                        }
                        for i, cell in enumerate(cells)
                    ]
                )
            self._block({"type": "table", "cells": rows, "is_bordered": True})
        elif kind in ("TableHead", "TableRow"):
            self.blocks += 1
            self.stack[-1].items.append((kind == "TableHead", node.items))
        elif kind == "TableCell":
            self.stack[-1].items.append(node.items)
        elif kind == "HtmlBlock":
            self._html_block("".join(i for i in node.items if isinstance(i, str)))
        else:  # footnotes and the rest: their content as it stands
            self.stack[-1].items.extend(node.items)

    def _html_block(self, html: str) -> None:
        self._tags(html)
        opening = re.search(r"<details[\s>]", html, re.IGNORECASE)
        closing = re.search(r"</details>", html, re.IGNORECASE)
        if opening and not (closing and closing.start() > opening.start()):
            summary = _SUMMARY.search(html)
            node = _Node("details", summary.group(1).strip() if summary else "")
            self._chars(node.attrs)
            self.stack.append(node)
            self.deepest = max(self.deepest, len(self.stack) - 1)
        elif closing and not opening and self.stack[-1].kind == "details":
            self._close_details()

    def _close_details(self) -> None:
        node = self.stack.pop()
        self._block({"type": "details", "summary": node.attrs, "blocks": self._blocks_of(node)})
