"""A draft is rendered from the end of the answer only: its cost does not grow with the answer.

`MarkdownTail` keeps the last few thousand characters of a growing Markdown text and which
code fence is open where they start. These check what a draft then shows; the CPU figures
are bench/run.py's ("draft render").
"""

from __future__ import annotations

import random

import pytest

from bot.services.formatting import TEXT_LIMIT, MarkdownTail, render_parts


def _answer(size: int, seed: int = 7) -> str:
    """Markdown like a long answer: paragraphs, emphasis, lists and long code blocks."""
    rng = random.Random(seed)
    words = "the quick **brown** fox jumps over `lazy` dogs and *then* some".split()
    blocks: list[str] = []
    length = 0
    while length < size:
        kind = rng.randrange(6)
        if kind == 0:
            body = "\n".join(f"x = {i}  # line {i}" for i in range(rng.randrange(5, 400)))
            block = f"```python\n{body}\n```"
        elif kind == 1:
            block = "\n".join(f"- item {i} with `code`" for i in range(rng.randrange(2, 9)))
        else:
            block = " ".join(rng.choice(words) for _ in range(rng.randrange(20, 120)))
        blocks.append(block)
        length += len(block) + 2
    return "\n\n".join(blocks)


def _stream(tail: MarkdownTail, text: str, piece: int = 5) -> None:
    for i in range(0, len(text), piece):
        tail.append(text[i : i + piece])


@pytest.mark.parametrize("size", [0, 10, 1000, TEXT_LIMIT])
def test_a_short_answer_is_shown_whole(size: int) -> None:
    text = _answer(10_000)[:size]
    tail = MarkdownTail()
    _stream(tail, text)
    assert tail.view() == text


@pytest.mark.parametrize("size", [TEXT_LIMIT + 1, 20_000, 300_000])
def test_a_long_answers_draft_ends_as_the_whole_answer_does(size: int) -> None:
    text = _answer(size + 5000)[:size]
    tail = MarkdownTail()
    _stream(tail, text)
    view = tail.view()
    # A bounded view (a window, plus a reopened code fence at most)...
    assert len(view) <= TEXT_LIMIT + 80
    # ...formatted as the whole answer is where it ends: same text, same entities.
    whole, drafted = render_parts(text)[-1], render_parts(view)[-1]
    n = min(len(whole.text), len(drafted.text), 1000)
    assert drafted.text[-n:] == whole.text[-n:]
    cut = len(whole.text) - n, len(drafted.text) - n
    kinds = [
        sorted((e.type, e.offset - c, e.length) for e in part.entities if e.offset >= c)
        for part, c in ((whole, cut[0]), (drafted, cut[1]))
    ]
    assert kinds[0] == kinds[1]


def test_a_view_inside_a_long_code_block_reopens_its_fence() -> None:
    code = "\n".join(f"print({i})" for i in range(5000))
    text = f"Here it is:\n\n```python\n{code}"  # still being written: the fence is open
    tail = MarkdownTail()
    _stream(tail, text, piece=7)
    view = tail.view()
    assert view.startswith("```python\n") and view.endswith("print(4999)")
    [part] = render_parts(view)[-1:]
    assert [e.type for e in part.entities] == ["pre"] and part.entities[0].language == "python"


def test_a_closed_fence_is_not_reopened() -> None:
    text = "```\ncode\n```\n\n" + "plain words " * 2000
    tail = MarkdownTail()
    _stream(tail, text)
    assert not tail.view().startswith("```")


def test_one_endless_line_is_cut_mid_line() -> None:
    text = "word" * 100_000
    tail = MarkdownTail()
    _stream(tail, text, piece=100)
    assert tail.view() == text[-TEXT_LIMIT:]
