"""Markdown -> Telegram entities: rendering, splitting, and the entity checker of the stand-in."""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import pytest
from telegram import MessageEntity

from bot.services import formatting
from bot.services.formatting import Formatted, plain_parts, render, render_parts, utf16_len
from tests.stubs.entities import check_entities

LIMIT = 4096

SPECIAL = "<>&*_[]()~`#+-=|{}.!\\"

CASES: dict[str, str] = {
    "empty": "",
    "whitespace": "  \n\n \t ",
    "plain": "Hello, world.",
    "unbalanced_bold": "**unbalanced bold and *half italic",
    "stray_backticks": "a stray ` backtick and `` two and ```",
    "unclosed_fence": "Here:\n\n```python\ndef f():\n    return 1\n",
    "html_like": "HTML <b>bold</b> <script>alert(1)</script> x < y > z, a <= b, <br/>",
    "html_block": "<div>\nhidden?\n</div>\n\n<details><summary>S</summary>body</details>",
    "identifiers": "snake_case_name, __init__, __main__, _private, a_b_c, CONSTANT_NAME",
    "math_asterisks": "2*3*4 = 24, a*b*c and 2 * 3 * 4, x**2 + y**2",
    "url_parentheses": (
        "see [Foo](https://en.wikipedia.org/wiki/Foo_(bar)) and "
        "https://en.wikipedia.org/wiki/Foo_(bar) and <https://example.com/a_b>"
    ),
    "bad_links": "[rel](foo/bar) [empty]() [js](javascript:alert(1)) [dom](example.com/x)",
    "nested_lists": "- a\n  - b\n    - c\n      1. d\n      2. e\n- f\n\n1. one\n2. two",
    "table": "| Name | Value |\n|---|---:|\n| `a` | **1** |\n| b_c | 2*3 |\n| 😀 | ✓ |",
    "headings": "# H1\n## H2 **bold**\n### H3\n#### H4\n##### H5\n###### H6\ntext",
    "blockquotes": "> quote\n> > nested **bold**\n> ```\n> code\n> ```\n\nafter",
    "long_quote": "> " + "quoted words " * 40,
    "emoji": "😀 **bold 😀👍🏽** _it 👨‍👩‍👧_ `c😀de` 🇺🇦🇺🇦 [l😀nk](https://x.org)",
    "astral_math": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 **𝕓𝕠𝕝𝕕** _𝒾𝓉𝒶𝓁𝒾𝒸_",
    "rtl": "مرحبا **بالعالم** و _שלום_ `code` עולם",
    "bold_in_italic": "*italic **bold-in-italic** still italic* and ***both***",
    "code_specials": f"inline `` {SPECIAL} `` and\n\n```\n{SPECIAL}\n```",
    "code_in_link": "[`code link`](https://x.org) **`bold code`**",
    "strike_spoiler": "~approx~ ~~strike~~ ||spoiler|| $10 and $20",
    "latex": r"Euler: \(e^{i\pi} + 1 = 0\) and $x^2$",
    "rule_and_breaks": "a  \nb\\\nc\n\n---\n\nd\r\ne\r\n\r\nf",
    "image": "![alt text](https://example.com/x.png) end",
    "lone_surrogates": "\ud83d\ude00 pair as two code points, lone \ud800 here",
    "tasks": "- [x] done\n- [ ] todo",
    "footnote_like": "text[^1]\n\n[^1]: note",
    "indented_code": "para\n\n    indented code\n    more\n\nafter",
    "renders_to_nothing": "```",
    "many_backticks": "`" * 5000,
    "link_definition_only": "[ref]: https://example.com",
    "fence_with_info": "```python title='x.py' {1,2}\nprint(1)\n```",
}


def _long_code_block(chars: int = 10_000) -> str:
    lines: list[str] = []
    i = 0
    while sum(len(line) + 1 for line in lines) < chars:
        lines.append(f"    value_{i} = compute(x[{i}], *args, **kw)  # <>&*_[]~`|{{}}")
        i += 1
    return "```python\n" + "\n".join(lines) + "\n```"


def _mixed_answer(chars: int = 20_000, seed: int = 7) -> str:
    rng = random.Random(seed)
    blocks = [
        "## Section **{n}**",
        "Some *italic*, **bold**, `code_{n}`, ~~gone~~ and a [link](https://example.com/{n}).",
        "- item {n} with **bold _nested_ text**\n  - sub item 😀\n- another snake_case_{n}",
        "1. first\n2. second\n3. third 🇺🇦",
        "> a quote line {n}\n> with two lines",
        "```js\nconst x{n} = a*b*c; // <>&\nconsole.log(`${{x{n}}}`);\n```",
        "| a | b |\n|---|---|\n| {n} | 2*3 |",
        "Math: 2*3*4 = 24, __init__, <b>tag</b>, مرحبا بالعالم 👨‍👩‍👧.",
        " ".join(["word"] * 60) + " {n}",
    ]
    out: list[str] = []
    n = 0
    while sum(len(b) + 2 for b in out) < chars:
        out.append(rng.choice(blocks).format(n=n))
        n += 1
    return "\n\n".join(out)


def _dicts(entities: tuple[MessageEntity, ...]) -> list[dict[str, Any]]:
    """What the server receives: PTB's serialisation, JSON round-tripped."""
    return json.loads(json.dumps([e.to_dict() for e in entities]))


def _styled(formatted: Formatted) -> list[tuple[str, frozenset[tuple[str, str | None]]]]:
    """Each non-whitespace character with the set of (type, url/language) covering it."""
    text = formatted.text
    starts: list[int] = []
    unit = 0
    for ch in text:
        starts.append(unit)
        unit += 2 if ord(ch) > 0xFFFF else 1
    styles: list[set[tuple[str, str | None]]] = [set() for _ in text]
    index_of = {u: i for i, u in enumerate(starts)}
    for e in formatted.entities:
        extra = e.url or e.language
        kind = str(e.type)
        if kind == "expandable_blockquote":  # a split long quote may be short in one part
            kind = "blockquote"
        first, last = index_of[e.offset], index_of.get(e.offset + e.length, len(text))
        for i in range(first, last):
            styles[i].add((kind, extra))
    return [(ch, frozenset(s)) for ch, s in zip(text, styles, strict=True) if not ch.isspace()]


def _assert_valid(markdown: str, limit: int = LIMIT) -> list[Formatted]:
    whole = render(markdown)
    assert check_entities(whole.text, _dicts(whole.entities)) == []
    parts = render_parts(markdown, limit)
    for part in parts:
        assert part.text.strip(), "empty or whitespace-only part"
        assert utf16_len(part.text) <= limit
        assert check_entities(part.text, _dicts(part.entities)) == [], part
        assert all(e.length > 0 for e in part.entities)
    # Text preserved, modulo whitespace trimmed at cuts.
    joined = "".join(p.text for p in parts)
    assert "".join(joined.split()) == "".join(whole.text.split())
    # Formatting preserved: an entity crossing a cut is continued in the next part.
    joined_styles = [c for part in parts for c in _styled(part)]
    assert joined_styles == _styled(whole)
    # Code blocks that fit in one part stay whole in one part.
    for e in whole.entities:
        if e.type == "pre" and e.length <= limit:
            code = _slice(whole, e)
            holders = [
                p for p in parts for pe in p.entities if pe.type == "pre" and _slice(p, pe) == code
            ]
            assert len(holders) >= 1, f"code block split: {code[:60]!r}"
    return parts


def _slice(formatted: Formatted, entity: MessageEntity) -> str:
    data = formatted.text.encode("utf-16-le", "surrogatepass")
    piece = data[2 * entity.offset : 2 * (entity.offset + entity.length)]
    return piece.decode("utf-16-le", "surrogatepass").strip()


@pytest.mark.parametrize("name", sorted(CASES))
def test_edge_cases_render_valid_entities(name: str) -> None:
    _assert_valid(CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_edge_cases_split_small(name: str) -> None:
    """The same cases with a tiny limit, so that every construct gets cut somewhere."""
    _assert_valid(CASES[name], limit=24)


def test_empty_input_gives_no_parts() -> None:
    assert render("") == Formatted("", ())
    assert render_parts("") == []
    assert render_parts(" \n\n ") == []
    assert plain_parts("") == []


def test_markup_that_renders_to_nothing_is_shown_as_written() -> None:
    assert render("```").text == "```"
    assert [p.text for p in render_parts("[ref]: https://example.com")] == [
        "[ref]: https://example.com"
    ]


def test_common_markup() -> None:
    f = render("# Title\n\nSome **bold** and *italic* with `x<y>` and [a](https://a.org).")
    kinds = {(str(e.type), e.url) for e in f.entities}
    assert ("bold", None) in kinds and ("italic", None) in kinds
    assert ("code", None) in kinds and ("text_link", "https://a.org") in kinds
    assert f.text.startswith("Title\n")  # heading: bold (and underlined), no emoji prefix
    assert "**" not in f.text and "`" not in f.text


def test_chat_text_is_not_taken_for_markup() -> None:
    f = render(CASES["html_like"])
    assert "<b>bold</b>" in f.text and "<script>alert(1)</script>" in f.text
    assert "hidden?" in render(CASES["html_block"]).text
    f = render(CASES["math_asterisks"])
    assert "2*3*4 = 24" in f.text and "a*b*c" in f.text
    assert not any(e.type == "italic" for e in f.entities)
    f = render(CASES["identifiers"])
    assert "snake_case_name, __init__, __main__" in f.text
    assert not f.entities


def test_autolinks_are_left_alone() -> None:
    f = render("<https://x.org/__init__/a*b> and 2*3")
    assert f.text == "https://x.org/__init__/a*b and 2*3"
    assert [e.url for e in f.entities] == ["https://x.org/__init__/a*b"]


def test_unsafe_links_lose_only_the_link() -> None:
    f = render(CASES["bad_links"])
    assert f.text == "rel empty js dom"
    assert [(str(e.type), e.url) for e in f.entities] == [("text_link", "https://example.com/x")]


def test_url_with_parentheses() -> None:
    f = render(CASES["url_parentheses"])
    urls = [e.url for e in f.entities if e.type == "text_link"]
    assert "https://en.wikipedia.org/wiki/Foo_(bar)" in urls
    assert "https://en.wikipedia.org/wiki/Foo_(bar)" in f.text


def test_nested_blockquotes_are_flattened() -> None:
    f = render(CASES["blockquotes"])
    quotes = [e for e in f.entities if "blockquote" in str(e.type)]
    assert len(quotes) == 1


def test_code_specials_survive() -> None:
    f = render(CASES["code_specials"])
    codes = [_slice(f, e) for e in f.entities if e.type in ("code", "pre")]
    assert codes == [SPECIAL, SPECIAL]


def test_unclosed_fence_is_code() -> None:
    f = render(CASES["unclosed_fence"])
    pre = [e for e in f.entities if e.type == "pre"]
    assert len(pre) == 1 and pre[0].language == "python"
    assert _slice(f, pre[0]) == "def f():\n    return 1"


def test_utf16_offsets_with_astral_characters() -> None:
    f = render("😀 **b😀**")
    assert f.text == "😀 b😀"
    (bold,) = f.entities
    assert (bold.offset, bold.length) == (3, 3)


def test_table_is_monospace() -> None:
    f = render(CASES["table"])
    (pre,) = [e for e in f.entities if e.type == "pre"]
    assert "Name" in _slice(f, pre) and "|" in _slice(f, pre)


def test_long_code_block_is_split_with_language() -> None:
    markdown = "Intro.\n\n" + _long_code_block(10_000) + "\n\nOutro."
    parts = _assert_valid(markdown)
    assert len(parts) >= 3
    pres = [e for p in parts for e in p.entities if e.type == "pre"]
    assert len(pres) >= 3 and all(e.language == "python" for e in pres)
    # Cut at line ends: every piece of code starts with a whole, indented line.
    for p in parts:
        for e in p.entities:
            if e.type == "pre":
                piece = p.text.encode("utf-16-le")[2 * e.offset : 2 * (e.offset + e.length)]
                assert piece.decode("utf-16-le").startswith("    value_")


def test_fitting_code_block_moves_to_next_part() -> None:
    code = "```sh\n" + "\n".join(f"echo line {i}" for i in range(200)) + "\n```"
    markdown = "word " * 700 + "\n\n" + code + "\n\n" + "tail " * 10
    assert len(code) < LIMIT
    parts = _assert_valid(markdown)
    holders = [p for p in parts if any(e.type == "pre" for e in p.entities)]
    assert len(holders) == 1
    (pre,) = [e for e in holders[0].entities if e.type == "pre"]
    assert pre.language == "sh" and _slice(holders[0], pre).count("\n") == 199


def test_long_mixed_answer() -> None:
    parts = _assert_valid(_mixed_answer(20_000))
    assert len(parts) >= 5
    assert all(utf16_len(p.text) > 1000 for p in parts[:-1])  # no needlessly tiny parts


def test_very_long_input() -> None:
    _assert_valid(_mixed_answer(50_000, seed=3))
    _assert_valid("x" * 50_000)  # one huge word: hard cuts
    _assert_valid("😀" * 30_000)  # astral characters: never split a surrogate pair


def test_cuts_prefer_paragraphs_then_lines_then_words() -> None:
    para = "alpha beta gamma delta " * 20
    parts = render_parts((para.strip() + "\n\n") * 3, limit=1000)
    assert [p.text for p in parts] == [para.strip() + "\n\n" + para.strip(), para.strip()]
    parts = render_parts(("word " * 100).strip(), limit=101)
    assert all(p.text.split() == ["word"] * len(p.text.split()) for p in parts)
    assert all(not p.text.startswith(" ") and not p.text.endswith(" ") for p in parts)


def test_entity_crossing_a_cut_is_split() -> None:
    parts = render_parts("**" + ("bold words " * 30).strip() + "**", limit=100)
    assert len(parts) >= 3
    for p in parts:
        assert [(str(e.type), e.offset, e.length) for e in p.entities] == [
            ("bold", 0, utf16_len(p.text))
        ]


def test_hard_cut_keeps_emoji_sequences() -> None:
    family = "👨‍👩‍👧"
    parts = render_parts(family * 50, limit=40)
    for p in parts:
        assert p.text.startswith("👨") and p.text.endswith("👧")


def test_plain_parts() -> None:
    parts = plain_parts("**not markup** " * 1000, limit=500)
    assert all(not p.entities and utf16_len(p.text) <= 500 for p in parts)
    assert "".join("".join(p.text for p in parts).split()) == "".join(
        ("**not markup** " * 1000).split()
    )


def test_converter_failure_falls_back_to_plain_text(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(formatting.telegramify_markdown, "convert", broken)
    secret = "**secret answer text**"
    with caplog.at_level(logging.WARNING, logger="bot.services.formatting"):
        parts = render_parts(secret * 300)
        whole = render(secret)
    assert all(not p.entities for p in parts)
    assert "".join(p.text for p in parts).replace(" ", "") == (secret * 300).replace(" ", "")
    assert whole == Formatted(secret, ())
    assert caplog.records and all(r.levelno == logging.WARNING for r in caplog.records)
    assert "secret" not in caplog.text


def test_ptb_entities_serialize_to_what_the_checker_accepts() -> None:
    f = render(CASES["emoji"] + "\n\n```py\nx = 1\n```")
    dicts = _dicts(f.entities)
    assert {d["type"] for d in dicts} >= {"bold", "italic", "code", "pre", "text_link"}
    assert check_entities(f.text, dicts) == []
    assert check_entities(f.text, [e.to_dict() for e in f.entities]) == []  # enum types too
    pre = next(d for d in dicts if d["type"] == "pre")
    assert pre["language"] == "py"


# --- the checker itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "entities", "fragment"),
    [
        ("hello", [{"type": "shout", "offset": 0, "length": 1}], "unknown type"),
        ("hello", [{"type": "bold", "offset": -1, "length": 2}], "negative offset"),
        ("hello", [{"type": "bold", "offset": 1, "length": 0}], "length must be positive"),
        ("hello", [{"type": "bold", "offset": 3, "length": 3}], "beyond the text"),
        ("hello", [{"type": "bold", "offset": "1", "length": 2}], "integers"),
        ("hello", [{"type": "text_link", "offset": 0, "length": 2}], "without url"),
        ("hello", [{"type": "text_mention", "offset": 0, "length": 2}], "without user"),
        ("hello", [{"type": "bold", "offset": 0, "length": 2, "language": "py"}], "only for pre"),
        ("😀x", [{"type": "bold", "offset": 1, "length": 2}], "starts inside a surrogate"),
        ("😀x", [{"type": "bold", "offset": 0, "length": 1}], "ends inside a surrogate"),
        ("😀", [{"type": "bold", "offset": 0, "length": 3}], "beyond the text"),
        (
            "hello world",
            [
                {"type": "bold", "offset": 0, "length": 7},
                {"type": "italic", "offset": 3, "length": 5},
            ],
            "partially overlaps",
        ),
        (
            "hello",
            [
                {"type": "code", "offset": 0, "length": 5},
                {"type": "bold", "offset": 1, "length": 2},
            ],
            "may not be nested",
        ),
        (
            "hello",
            [
                {"type": "blockquote", "offset": 0, "length": 5},
                {"type": "blockquote", "offset": 1, "length": 2},
            ],
            "may not be nested",
        ),
        (
            "hello",
            [
                {"type": "text_link", "offset": 0, "length": 5, "url": "https://a.org"},
                {"type": "code", "offset": 0, "length": 5},
            ],
            "may not be nested",
        ),
        ("hello", ["bold"], "not an object"),
    ],
)
def test_checker_finds_violations(text: str, entities: list[Any], fragment: str) -> None:
    problems = check_entities(text, entities)
    assert problems and any(fragment in p for p in problems), problems


def test_checker_accepts_valid_entities() -> None:
    text = "😀 bold italic code link"
    entities: list[dict[str, Any]] = [
        {"type": "bold", "offset": 0, "length": 7},
        {"type": "italic", "offset": 3, "length": 4},
        {"type": "bold", "offset": 15, "length": 4},
        {"type": "code", "offset": 15, "length": 4},
        {"type": "pre", "offset": 20, "length": 4, "language": "text"},
        {"type": "blockquote", "offset": 0, "length": 24},
        {"type": "date_time", "offset": 8, "length": 6, "unix_time": 0},
    ]
    assert check_entities(text, entities) == []
    assert check_entities("", []) == []


# --- property test ----------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

TOKENS = [
    "word", "snake_case", "__init__", "2*3", "x", "مرحبا", "שלום", "😀", "👍🏽", "👨‍👩‍👧", "🇺🇦",
    "𝕓", "*", "**", "***", "_", "__", "`", "``", "```", "```py\n", "~", "~~", "||", "[", "]",
    "](", "(", ")", "](https://e.org/a_(b))", "<b>", "</b>", "<", ">", "> ", "- ", "* ", "1. ",
    "# ", "## ", "|", "|---|", "---", "\\", "$", "&amp;", "https://e.org/x", "\n", "\n\n",
    " ", "  ", "\t", "    ", "\r\n", "\ud800",
]  # fmt: skip


@hypothesis.settings(max_examples=300, deadline=None, database=None)
@hypothesis.given(
    tokens=st.lists(st.sampled_from(TOKENS) | st.text(max_size=6), max_size=120),
    limit=st.integers(min_value=8, max_value=300),
)
def test_random_markdown_keeps_invariants(tokens: list[str], limit: int) -> None:
    _assert_valid("".join(tokens), limit)
