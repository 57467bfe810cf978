"""Reading and checking the chat JSONL that jobs train on.

The bot builds OpenAI's chat fine-tuning format: one `{"messages": [...]}` object a line, roles
system/user/assistant, string content (or a list of text parts), optionally `"weight": 0|1` on
assistant messages. Files arrive over HTTP from clients we do not control, so reading is
bounded: a line over `MAX_LINE_BYTES` is refused before it is parsed, JSON nesting is capped by
the parser's recursion limit, and the number of examples by `max_examples`.

Checking is blocking (file reads, tokenizing); the service runs it with `asyncio.to_thread`.
The first problem wins, reported as a short reason that names the line, the way OpenAI reports
a bad training file.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

# Generous for text (a 32k-token example is ~130 KB, or ~800 KB with every character escaped);
# the cap is there so one hostile line cannot take the memory.
MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_EXAMPLES = 100_000
ROLES = ("system", "user", "assistant")

# For base models without a chat template: ChatML turns, each ended by the model's own EOS, so
# a base model learns to stop without new tokens; `{% generation %}` marks what is trained.
# Saved with the adapter, so inference renders prompts the same way.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

Message = dict[str, Any]


class DataError(ValueError):
    """A training file the trainer cannot use; the message is short and safe to show."""


@dataclass(frozen=True)
class FileCheck:
    """The outcome of `validate_file`: counts of the valid examples read, or the first error."""

    examples: int
    tokens: int
    error: str | None


@dataclass(frozen=True, slots=True)
class Example:
    """One example and the line it came from (1-based), so later errors can name the line."""

    line: int
    messages: list[Message]


def too_long(line: int, tokens: int, limit: int) -> str:
    """The reason for an example over the sequence limit, in the same words everywhere."""
    return f"line {line}: {tokens:,} tokens, over the {limit:,} limit"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines as text, with their numbers; refuses long and non-UTF-8 lines."""
    with path.open("rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(f"line {number}: longer than {MAX_LINE_BYTES:,} bytes")
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"line {number}: not UTF-8") from None
            if text.strip():
                yield number, text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _content(line: int, index: int, content: Any) -> str:
    """The message's text; a list of parts must be text parts only (no images here)."""
    where = f"line {line}: message {index}"
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        pieces: list[str] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind in ("image_url", "input_image", "image"):
                raise DataError(f"{where}: image parts are not supported by this trainer")
            elif kind == "text":
                raise DataError(f"{where}: a text part without text")
            else:
                raise DataError(f"{where}: unknown content part {_short(kind)}")
        text = "".join(pieces)
    elif content is None:
        raise DataError(f"{where}: no content")
    else:
        raise DataError(f"{where}: content must be a string or a list of text parts")
    if not text.strip():
        raise DataError(f"{where}: empty content")
    try:
        text.encode("utf-8")  # JSON can spell lone surrogates ("\ud800"); tokenizers choke
    except UnicodeEncodeError:
        raise DataError(f"{where}: invalid Unicode (a lone surrogate)") from None
    return text


def _messages(line: int, text: str) -> list[Message]:
    """Parse and normalise one line to [{"role", "content": str, ("weight")}]."""
    try:
        example = json.loads(text)
    except RecursionError:
        raise DataError(f"line {line}: JSON nested too deeply") from None
    except ValueError:  # JSONDecodeError, and ints over the digit limit
        raise DataError(f"line {line}: not JSON") from None
    if not isinstance(example, dict):
        raise DataError(f"line {line}: not a JSON object")
    raw = example.get("messages")
    if not isinstance(raw, list) or not raw:
        raise DataError(f'line {line}: no "messages" list')
    messages: list[Message] = []
    trained = False
    for index, message in enumerate(raw, 1):
        if not isinstance(message, dict):
            raise DataError(f"line {line}: message {index} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"line {line}: unknown role {_short(role)}")
        if message.get("tool_calls") or message.get("function_call"):
            raise DataError(f"line {line}: tool calls are not supported by this trainer")
        normal: Message = {"role": role, "content": _content(line, index, message.get("content"))}
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                raise DataError(f"line {line}: weight on a {role} message")
            if type(weight) is not int or weight not in (0, 1):
                raise DataError(f"line {line}: weight must be 0 or 1")
            normal["weight"] = weight
        if role == "assistant" and normal.get("weight", 1):
            trained = True
        messages.append(normal)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"line {line}: no assistant message")
    if not trained:
        raise DataError(f"line {line}: every assistant message has weight 0")
    return messages


def iter_examples(path: Path, *, max_examples: int = MAX_EXAMPLES) -> Iterator[Example]:
    """Each example with its line number; raises DataError at the first bad line.

    OSError (a missing or unreadable file) is the caller's to handle.
    """
    count = 0
    for line, text in _lines(path):
        count += 1
        if count > max_examples:
            raise DataError(f"over {max_examples:,} examples")
        yield Example(line, _messages(line, text))


def load_examples(path: Path, *, max_examples: int = MAX_EXAMPLES) -> list[list[Message]]:
    """The messages lists of a file; raises DataError if any line is bad, or there are none."""
    examples = [e.messages for e in iter_examples(path, max_examples=max_examples)]
    if not examples:
        raise DataError("empty file")
    return examples


def estimate_tokens(messages: list[Message]) -> int:
    """A tokenizer-free estimate: about four characters a token, plus a few per message."""
    return sum(len(m["content"]) // 4 + 4 for m in messages)


@lru_cache(maxsize=4)
def _tokenizer(path: str) -> tuple[Any, threading.Lock]:
    # Loading takes a while and the service checks many files against the same base model.
    # The lock: a fast tokenizer's Rust core may refuse ("Already borrowed") calls from two
    # threads at once, and to_thread calls can overlap.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path), threading.Lock()


def token_counter(tokenizer_path: str) -> Callable[[list[Message]], int]:
    """Count an example's tokens the way training will render it: through the chat template."""
    from jinja2 import TemplateError

    tokenizer, lock = _tokenizer(tokenizer_path)
    template = None if tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE

    def count(messages: list[Message]) -> int:
        try:
            with lock:
                encoded = tokenizer.apply_chat_template(
                    messages, chat_template=template, tokenize=True, return_dict=True
                )
        except TemplateError as exc:  # e.g. Gemma's: "System role not supported"
            raise DataError(f"the chat template refuses it ({exc})") from None
        return len(encoded["input_ids"])

    return count


def validate_file(
    path: Path, *, tokenizer_path: str | None, max_seq_len: int, max_examples: int = MAX_EXAMPLES
) -> FileCheck:
    """Check a training or validation file; counts, or the first problem as a short reason.

    With `tokenizer_path` (the base model's directory or Hub id) tokens are counted exactly
    through its chat template; without it they are estimated (`estimate_tokens`).
    """
    count = token_counter(tokenizer_path) if tokenizer_path else estimate_tokens
    examples = tokens = 0
    try:
        for example in iter_examples(path, max_examples=max_examples):
            try:
                n = count(example.messages)
            except DataError as exc:
                raise DataError(f"line {example.line}: {exc}") from None
            if n > max_seq_len:
                raise DataError(too_long(example.line, n, max_seq_len))
            examples += 1
            tokens += n
    except DataError as exc:
        return FileCheck(examples, tokens, str(exc))
    except OSError as exc:
        return FileCheck(examples, tokens, f"cannot read the file: {exc.strerror or exc}")
    if not examples:
        return FileCheck(0, 0, "empty file")
    return FileCheck(examples, tokens, None)
