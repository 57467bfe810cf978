"""Turn the logged dialogues into a validated OpenAI chat fine-tuning dataset.

`build_dataset` is synchronous (file IO, regexes): the bot runs it through `asyncio.to_thread`.
It reads the log through a `storage.dataset.DatasetSnapshot` that the store's `dataset` part
opens (one consistent snapshot while the bot keeps writing), and streams it:

* the turns one at a time, in order of conversation, then turn; nothing holds the whole log;
* in memory at a time: the current thread's open window (bounded by `max_tokens_per_example`),
  one look-ahead turn, and small sets -- opted-out user ids, ids of turns whose reactions sum to
  a negative value (one aggregate query), ids of turns /forget left out (they quoted a user who
  ran it), the instructions texts seen so far -- plus the
  de-duplication set, which holds one 16-byte BLAKE2b digest per written example (~100 bytes per
  example with Python's set overhead: ~5 MB for 50,000 examples);
* image bytes are read only when the example that carries them is serialised.

Examples are written to a temporary file in `out_dir`, then split into `train.jsonl` and
`validation.jsonl` (each also written to a temporary file and moved into place with
`os.replace`), so a reader never sees a half-written file and a failure leaves none behind.

With a test split (`DatasetOptions.test_share`), the most recent conversations go to neither
file: each gives one evaluation item in `test.jsonl` (bot/services/evaluation.py). Nor do the
conversations an earlier job kept as its test split: they stay unseen for good.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import blake2b
from pathlib import Path
from typing import Any

from bot.domain import LoggedTurn
from bot.services.tokens import MESSAGE_OVERHEAD
from storage.interface import DatasetSnapshot, DatasetSource

TRAIN_FILE = "train.jsonl"
VALIDATION_FILE = "validation.jsonl"
TEST_FILE = "test.jsonl"  # the test split: see DatasetOptions.test_share

ROLES = frozenset({"system", "user", "assistant"})
_IMAGE_URL_PREFIXES = ("data:image/", "https://", "http://")

# Training price in USD per 1M tokens, from https://openai.com/api/pricing/ (fine-tuning).
# Prices change: this is an estimate for the admin, not a quote. Unknown model -> no estimate.
TRAINING_PRICE_PER_1M: dict[str, float] = {
    "gpt-4.1-2025-04-14": 25.00,
    "gpt-4.1-mini-2025-04-14": 5.00,
    "gpt-4.1-nano-2025-04-14": 1.50,
    "gpt-4o-2024-08-06": 25.00,
    "gpt-4o-mini-2024-07-18": 3.00,
    "gpt-3.5-turbo-0125": 8.00,
}
_ALIASES = {
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
}

# OpenAI's image cost: 85 tokens plus 170 per 512-px tile (the formula ThreadStore.history uses).
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
# An image part whose size is unknown (validate_example on someone else's example): the
# high-detail maximum -- OpenAI scales into 2048x2048, then the short side to 768 px: 2x4 tiles.
IMAGE_UNKNOWN_TOKENS = IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * 8


def image_tokens(width: int, height: int) -> int:
    tiles = ((max(width, 1) + 511) // 512) * ((max(height, 1) + 511) // 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


# -- options and report ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatasetOptions:
    since: str | None = None  # ISO-8601 (UTC if no offset); only turns started at/after it
    chat_id: int | None = None  # only this chat
    include_photos: bool = False  # photo turns as vision examples (else they are left out)
    max_tokens_per_example: int = 65_536
    validation_fraction: float = 0.1  # 0 -> no validation file
    min_examples: int = 10  # OpenAI's minimum
    epochs: int = 3  # for the cost estimate
    # The test split: this share of the conversations (threads), the most recent ones, kept
    # out of both files whole, at most `test_max`; fewer than `test_min` -> none at all (a
    # handful of items can't tell two models apart, and would only cost training data).
    # Each gives one evaluation item in test.jsonl: its last window's context up to the
    # last user message, and the answer the bot gave then.
    test_share: float = 0.0
    test_max: int = 200
    test_min: int = 5


TOO_FEW = "too_few"  # a problem: fewer examples than a job needs


@dataclass(slots=True)
class DatasetReport:
    examples: int = 0
    train_examples: int = 0
    validation_examples: int = 0
    tokens: int = 0  # estimated training tokens in all examples (one epoch)
    # Why turns (or, for duplicate/invalid:*, whole examples) were left out.
    dropped: Counter[str] = field(default_factory=Counter)
    redactions: Counter[str] = field(default_factory=Counter)  # email, phone, card
    train_path: Path | None = None
    validation_path: Path | None = None
    estimated_cost_usd: float | None = None  # tokens * epochs * price; None when unknown
    voice_turns: int = 0  # turns in the examples whose user message was transcribed audio
    # Blocking problems, as codes: "too_few" (fewer than `needed` examples).
    problems: list[str] = field(default_factory=list)
    needed: int = 0  # the examples a job needs at least (DatasetOptions.min_examples)
    test_conversations: int = 0  # conversations held out as the test split
    test_items: int = 0  # evaluation items written to test.jsonl (text-only ones)
    test_path: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def training_price_per_1m(base_model: str) -> float | None:
    """The training price of a base model (or of a fine-tuned model's base), if known."""
    name = base_model.strip()
    if name.startswith("ft:"):  # ft:gpt-4.1-mini-2025-04-14:org::id -> its base model
        name = name.split(":")[1]
    name = _ALIASES.get(name, name)
    return TRAINING_PRICE_PER_1M.get(name)


# -- redaction ------------------------------------------------------------------------------

_EMAIL = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")
# A run of digits with single separators (space, dash, dot) and parenthesised area codes,
# optionally after "+"; not glued to letters/digits on either side.
_NUMBER = re.compile(  # the lookahead first lets the engine skip non-candidates quickly
    r"(?=[+(\d])(?<![\w+])(?:\+[ ]?)?(?:\(\d{1,5}\)|\d)(?:[ .\-]?(?:\(\d{1,5}\)|\d))*(?!\w)"
)
_DATE = re.compile(r"(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_GROUPS = re.compile(r"\d+")
_DIGIT = re.compile(r"\d")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _classify_number(candidate: str) -> str | None:
    """'card', 'phone' or None (keep) for one candidate digit run."""
    digits = "".join(_GROUPS.findall(candidate))
    n = len(digits)
    if n < 7:
        return None  # years, prices, short numbers
    plus = candidate.startswith("+")
    groups = _GROUPS.findall(candidate)
    if (
        not plus
        and 13 <= n <= 19
        and "(" not in candidate
        and "." not in candidate
        and luhn_ok(digits)
    ):
        return "card"
    if n > 15:  # E.164 allows at most 15 digits: a long non-card number is kept
        return None
    if plus:
        return "phone"
    if _DATE.fullmatch(candidate) or _IPV4.fullmatch(candidate):
        return None
    if len(groups) == 1:
        # An unformatted run: national numbers like 89161234567 are common in chats; shorter
        # runs are order numbers, amounts, ids.
        return "phone" if 10 <= n <= 12 else None
    if all(len(g) == 4 and g[:2] in ("19", "20") for g in groups):
        return None  # year ranges and lists: 1999-2005, 2025 2026
    if len(groups[0]) < 3 and all(len(g) == 3 for g in groups[1:]):
        return None  # thousands separators: 1 000 000, 12.500.000
    if sum(len(g) == 1 for g in groups) > 1:
        return None  # lists of small numbers: 1 2 3 4 5 6 7
    return "phone"


def redact(text: str) -> tuple[str, Counter[str]]:
    """Replace e-mail addresses, phone numbers and payment card numbers; count each kind.

    Cards: 13-19 digits (spaces/dashes allowed) passing the Luhn check. Phones: "+" and 7-15
    digits, or formatted groups (555-1234, (555) 123-4567, 8 916 123-45-67) of 7-15 digits, or
    a bare run of 10-12 digits; dates, IPv4 addresses, years, year ranges, thousands-grouped
    amounts and numbers under 7 digits are kept.
    """
    text, counts = _redact(text)
    return text, Counter(counts)


def _redact(text: str) -> tuple[str, dict[str, int] | None]:
    """redact() without a Counter per call (None when nothing was found): the builder's path."""
    counts: dict[str, int] = {}
    if "@" in text:

        def email(_m: re.Match[str]) -> str:
            counts["email"] = counts.get("email", 0) + 1
            return "[email]"

        text = _EMAIL.sub(email, text)

    if _DIGIT.search(text):

        def number(m: re.Match[str]) -> str:
            candidate = m.group(0)
            kind = _classify_number(candidate)
            if kind is None:
                return candidate
            counts[kind] = counts.get(kind, 0) + 1
            return f"[{kind}]"

        text = _NUMBER.sub(number, text)
    return text, counts or None


# A URL's query: from "?" up to a space, a fragment, a bracket or a quote (a Markdown link's
# closing parenthesis included). Each "?" starts at most one match, and matches never
# overlap: linear in the text, whatever it holds.
_QUERY = re.compile(r"\?([^\s?#<>\"'()\[\]]*)")
_URL_LOOKBACK = 2048  # characters before a query searched for its URL's "://"


def strip_tracking(text: str) -> str:
    """`text` with the utm_* parameters taken out of its URLs' queries (a web search's
    citations carry ?utm_source=openai: what the model wrote, not what a model should learn
    to write), and the "?" of a query left empty. Punctuation ending a sentence stays."""
    if "utm_" not in text:
        return text

    def clean(m: re.Match[str]) -> str:
        query = m.group(1)
        if "utm_" not in query.lower():
            return m.group(0)
        words = text[max(0, m.start() - _URL_LOOKBACK) : m.start()].split()
        if not words or "://" not in words[-1]:
            return m.group(0)  # a question mark, not a URL's query
        body = query.rstrip(".,;:!")
        params = [p for p in body.split("&") if p]
        kept = [p for p in params if not p.lower().startswith("utm_")]
        if len(kept) == len(params):
            return m.group(0)
        return ("?" + "&".join(kept) if kept else "") + query[len(body) :]

    return _QUERY.sub(clean, text)


def fast_estimate_tokens(text: str) -> int:
    """Exactly bot.services.tokens.estimate_tokens, computed in C instead of a Python loop.

    estimate_tokens counts characters below U+0080 one by one; encoding to ASCII with errors
    ignored keeps exactly those characters. tests/test_dataset_unit.py checks the two agree.
    """
    ascii_chars = len(text) if text.isascii() else len(text.encode("ascii", "ignore"))
    return MESSAGE_OVERHEAD + (ascii_chars + 3) // 4 + (len(text) - ascii_chars)


# -- validation -----------------------------------------------------------------------------


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return fast_estimate_tokens(content)
    total = MESSAGE_OVERHEAD
    for part in content:
        if part.get("type") == "text":
            total += fast_estimate_tokens(part["text"]) - MESSAGE_OVERHEAD
        else:
            total += IMAGE_UNKNOWN_TOKENS
    return total


def _content_rule(role: str, content: Any) -> str | None:
    if isinstance(content, str):
        return None if content.strip() else "empty_content"
    if not isinstance(content, list):
        return "content_type"
    if not content:
        return "empty_content"
    if role != "user":
        return "content_type"  # images (content parts) are only allowed in user messages
    for part in content:
        if not isinstance(part, dict):
            return "content_type"
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str) or not text.strip():
                return "empty_content"
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or not url.startswith(_IMAGE_URL_PREFIXES):
                return "image_url"
        else:
            return "content_type"
    return None


def validate_example(example: dict, max_tokens: int, *, tokens: int | None = None) -> str | None:
    """Check an example against OpenAI's chat fine-tuning format; the failed rule or None.

    Rules: "messages" (a non-empty list of objects), "role" (system/user/assistant),
    "empty_content" (missing or blank content), "content_type" (content is a string, or for
    user messages a list of text/image_url parts), "image_url" (a data:image/ or http(s) URL),
    "no_assistant" (at least one assistant message), "too_long" (estimated tokens > max_tokens).
    `tokens`: the example's token count if the caller knows it (the builder does, from the
    images' sizes); otherwise it is estimated, an image part counting at the high-detail maximum.
    """
    if not isinstance(example, dict):
        return "messages"
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages"
    has_assistant = False
    for message in messages:
        if not isinstance(message, dict):
            return "messages"
        role = message.get("role")
        if role not in ROLES:
            return "role"
        content = message.get("content")
        if content is None:
            return "empty_content"
        rule = _content_rule(role, content)
        if rule:
            return rule
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        return "no_assistant"
    if tokens is None:
        tokens = sum(_content_tokens(m["content"]) for m in messages)
    if tokens > max_tokens:
        return "too_long"
    return None


# -- reading the log ------------------------------------------------------------------------


@dataclass(slots=True)
class _Kept:
    user: str
    assistant: str
    images: tuple[tuple[str, str], ...]  # (sha256, mime_type)
    tokens: int
    redactions: Counter[str] | None
    voice: bool = False


@dataclass(slots=True)
class _Window:
    instructions_id: int | None = None
    tokens: int = 0  # the system message included
    turns: list[_Kept] = field(default_factory=list)
    turn_ids: list[int] = field(default_factory=list)
    held_out: bool = False  # a window of a test-split conversation: never in either file


# A /forget that commits while a dataset is built makes it stale: built again, this often.
MAX_BUILDS = 3


def _normalise_since(since: str | None) -> str | None:
    """Stored times are datetime.isoformat() in UTC with milliseconds; compare like with like."""
    if since is None:
        return None
    moment = datetime.fromisoformat(since.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


# -- the builder ----------------------------------------------------------------------------


class _Builder:
    def __init__(self, log: DatasetSnapshot, options: DatasetOptions, out, test_out=None) -> None:
        self.log = log
        self.options = options
        self.out = out
        self.report = DatasetReport()
        self.seen: set[bytes] = set()
        # The test split: held-out conversations, the digests of their windows (a training
        # example identical to one is left out too), and the current one's last window.
        self.test_out = test_out
        self.held = self._held_threads()
        self.report.test_conversations = len(self.held)
        # The conversations earlier jobs kept as their test splits stay unseen for good.
        self.held_before = log.earlier_test_conversations() - self.held
        self.test_digests: set[bytes] = set()
        self.test_last: tuple[list[dict[str, Any]], list[int]] | None = None
        self.test_thread: int | None = None
        self.instructions: dict[int | None, tuple[str, int]] = {}
        self.window = _Window()
        self.opted_out = log.opted_out_users()
        # Turns left out for good, with the reason (those that quoted a forgotten user).
        self.excluded: dict[int, str] = log.exclusions()
        self.negative = log.negative_turns()

    def _system(self, instructions_id: int | None) -> tuple[str, int]:
        found = self.instructions.get(instructions_id)
        if found is None:
            text = self.log.instructions(instructions_id)
            found = (text, fast_estimate_tokens(text) if text.strip() else 0)
            self.instructions[instructions_id] = found
        return found

    def run(self) -> None:
        o = self.options
        pending: LoggedTurn | None = None
        for turn in self.log.turns(_normalise_since(o.since), o.chat_id):
            if pending is not None:
                # A turn without a thread is a conversation of its own.
                same = pending.thread_id is not None and pending.thread_id == turn.thread_id
                self._place(pending, negative_followup=same and turn.user_sentiment == "negative")
                if not same:
                    self._flush()
                    self._test_item()
            pending = turn
        if pending is not None:
            self._place(pending, negative_followup=False)
        self._flush()
        self._test_item()

    def _held_threads(self) -> set[int]:
        """The test split: the most recently active conversations (see DatasetOptions)."""
        o = self.options
        if o.test_share <= 0 or o.test_max <= 0:
            return set()
        since = _normalise_since(o.since)
        k = min(o.test_max, round(self.log.conversation_count(since, o.chat_id) * o.test_share))
        if k < max(o.test_min, 1):
            return set()
        return self.log.recent_conversations(since, o.chat_id, k)

    def _test_item(self) -> None:
        """Write the item of the test-split conversation just read (its last window), if any."""
        last, self.test_last = self.test_last, None
        if last is None or self.test_out is None:
            return
        messages, turn_ids = last
        if any(not isinstance(m["content"], str) for m in messages):
            return  # the evaluation replays text: a context with photos gives no item
        item = {
            "conversation": self.test_thread,
            "turns": turn_ids,
            "messages": messages[:-1],
            "reference": messages[-1]["content"],
        }
        self.test_out.write(json.dumps(item, ensure_ascii=False, separators=(",", ":")))
        self.test_out.write("\n")
        self.report.test_items += 1

    def _reason(self, turn: LoggedTurn, negative_followup: bool) -> str | None:
        if turn.user_id is not None and turn.user_id in self.opted_out:
            return "opted_out"
        if (excluded := self.excluded.get(turn.id)) is not None:
            return excluded
        if turn.thread_id is not None and turn.thread_id in self.held_before:
            return "test_split_earlier"
        if turn.status == "cut":
            return "cut_off"  # delivered, but stopped at the length cap: not a model answer
        if turn.status != "ok":
            return "failed"
        if turn.id in self.negative:
            return "negative_reaction"
        if negative_followup:
            return "negative_followup"
        if turn.has_images and not self.options.include_photos:
            return "photo_turn"
        if not turn.assistant_text or not turn.assistant_text.strip():
            return "empty"
        if not turn.has_images and (not turn.user_text or not turn.user_text.strip()):
            return "empty"
        return None

    def _place(self, turn: LoggedTurn, *, negative_followup: bool) -> None:
        reason = self._reason(turn, negative_followup)
        if reason is not None:
            self.report.dropped[reason] += 1
            self._flush()  # a left-out turn breaks the window: later context would be wrong
            return
        user, user_counts = _redact(strip_tracking(turn.user_text or ""))
        assistant, assistant_counts = _redact(strip_tracking(turn.assistant_text or ""))
        counts: Counter[str] | None = None
        if user_counts or assistant_counts:
            counts = Counter(user_counts or {})
            counts.update(assistant_counts or {})
        tokens = fast_estimate_tokens(user) + fast_estimate_tokens(assistant)
        images: tuple[tuple[str, str], ...] = ()
        if turn.has_images:
            infos = self.log.turn_images(turn.id)
            images = tuple((i.sha256, i.mime_type) for i in infos)
            tokens += sum(image_tokens(i.width, i.height) for i in infos)
        _text, system_tokens = self._system(turn.instructions_id)
        limit = self.options.max_tokens_per_example
        if system_tokens + tokens > limit:
            self.report.dropped["too_long"] += 1
            self._flush()
            return
        kept = _Kept(user, assistant, images, tokens, counts, turn.voice)
        w = self.window
        if w.turns and (w.instructions_id != turn.instructions_id or w.tokens + tokens > limit):
            self._flush()
            w = self.window
        if not w.turns:
            w.instructions_id, w.tokens = turn.instructions_id, system_tokens
            w.held_out = turn.thread_id is not None and turn.thread_id in self.held
            if w.held_out:
                self.test_thread = turn.thread_id
        w.turns.append(kept)
        w.turn_ids.append(turn.id)
        w.tokens += tokens

    def _data_url(self, sha: str, mime: str) -> str:
        data = base64.b64encode(self.log.image_data(sha)).decode("ascii")
        return f"data:{mime};base64,{data}"

    def _flush(self) -> None:
        w = self.window
        if not w.turns:
            return
        self.window = _Window()
        system, _tokens = self._system(w.instructions_id)
        messages: list[dict[str, Any]] = []
        if system.strip():
            messages.append({"role": "system", "content": system})
        for turn in w.turns:
            content: Any = turn.user
            if turn.images:
                content = [{"type": "text", "text": turn.user}] if turn.user.strip() else []
                content += [
                    {"type": "image_url", "image_url": {"url": self._data_url(sha, mime)}}
                    for sha, mime in turn.images
                ]
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": turn.assistant})
        example = {"messages": messages}
        rule = validate_example(example, self.options.max_tokens_per_example, tokens=w.tokens)
        if rule is not None:
            self.report.dropped[f"invalid:{rule}"] += 1
            return
        line = json.dumps(example, ensure_ascii=False, separators=(",", ":"))
        digest = _digest(line)
        if w.held_out:
            self.test_digests.add(digest)
            self.test_last = (messages, list(w.turn_ids))
            return
        if digest in self.test_digests:
            self.report.dropped["test_split_twin"] += 1
            return
        if digest in self.seen:
            self.report.dropped["duplicate"] += 1
            return
        self.seen.add(digest)
        self.out.write(line)
        self.out.write("\n")
        r = self.report
        r.examples += 1
        r.tokens += w.tokens
        r.voice_turns += sum(turn.voice for turn in w.turns)
        for turn in w.turns:
            if turn.redactions:
                r.redactions.update(turn.redactions)


def _digest(line: str) -> bytes:
    return blake2b(line.encode("utf-8"), digest_size=16).digest()


def _validation_count(n: int, fraction: float, min_examples: int) -> int:
    """How many examples go to validation: round(n * fraction), at least 1 when fraction > 0
    and n >= 2, but never taking the training file below `min_examples` when it has them."""
    if fraction <= 0 or n < 2:
        return 0
    k = min(n - 1, max(1, round(n * fraction)))
    if n >= min_examples:
        k = min(k, n - min_examples)
    return max(k, 0)


def _check_options(o: DatasetOptions) -> None:
    if not 0 <= o.validation_fraction < 1:
        raise ValueError("validation_fraction must be in [0, 1)")
    if not 0 <= o.test_share < 1 or o.test_max < 0 or o.test_min < 0:
        raise ValueError("test_share must be in [0, 1), test_max and test_min >= 0")
    if o.max_tokens_per_example <= 0 or o.min_examples < 0 or o.epochs <= 0:
        raise ValueError("max_tokens_per_example and epochs must be positive")


def _temp(out_dir: Path, name: str):
    return tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=out_dir, prefix=f".{name}.", suffix=".tmp", delete=False
    )


def _commit(handle, target: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(handle.name, target)


def build_dataset(
    source: DatasetSource, out_dir: Path, options: DatasetOptions, *, base_model: str
) -> DatasetReport:
    """Build train.jsonl / validation.jsonl in `out_dir` from the dialogue log (`source`:
    the store's `dataset` part, which opens snapshots of it).

    Files are written even when the report has problems (too few examples), so an admin can
    look at them; with no examples at all nothing is written and stale files are removed.

    A /forget that commits meanwhile (the snapshot still held the words it deleted, and it
    removes dataset folders, this one included) makes the build start over.
    """
    _check_options(options)
    out_dir = Path(out_dir)
    for attempt in range(1, MAX_BUILDS + 1):
        generation = source.forget_generation()
        try:
            report = _build(source, out_dir, options)
        except OSError:
            if attempt == MAX_BUILDS or source.forget_generation() == generation:
                raise
            continue
        if source.forget_generation() == generation:
            break
    else:
        raise DatasetStale(f"/forget ran during each of {MAX_BUILDS} builds")

    report.needed = options.min_examples
    if report.examples < options.min_examples:
        report.problems.append(TOO_FEW)
    price = training_price_per_1m(base_model)
    if price is not None:
        report.estimated_cost_usd = round(report.tokens * options.epochs * price / 1_000_000, 4)
    return report


class DatasetStale(RuntimeError):
    """The log kept being forgotten from while the dataset was built."""


def _build(source: DatasetSource, out_dir: Path, options: DatasetOptions) -> DatasetReport:
    """One build of the files from one snapshot of the log (see build_dataset)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    temps: list[Any] = []
    try:
        with source.snapshot() as log:  # one snapshot for every read below
            everything = _temp(out_dir, "examples")
            temps.append(everything)
            tests = _temp(out_dir, "test")
            temps.append(tests)
            builder = _Builder(log, options, everything, tests)
            builder.run()
        report = builder.report
        everything.close()
        test_target = out_dir / TEST_FILE
        if report.test_items:
            _commit(tests, test_target)
            report.test_path = test_target
        else:
            test_target.unlink(missing_ok=True)
        # An example identical to a held-out window (written before that window was read)
        # goes to neither file: the test split must be unseen, word for word.
        twins = builder.seen & builder.test_digests
        builder.seen -= twins
        report.examples -= len(twins)
        if twins:
            report.dropped["test_split_twin"] += len(twins)

        n = report.examples
        k = _validation_count(n, options.validation_fraction, options.min_examples)
        # Deterministic split: the k examples with the smallest digests are validation.
        validation = set(heapq.nsmallest(k, builder.seen)) if k else set()
        builder.seen.clear()
        train_target, validation_target = out_dir / TRAIN_FILE, out_dir / VALIDATION_FILE
        if n:
            train = _temp(out_dir, "train")
            temps.append(train)
            val = _temp(out_dir, "validation") if k else None
            if val is not None:
                temps.append(val)
            with open(everything.name, encoding="utf-8") as written:
                for line in written:
                    if twins and _digest(line[:-1]) in twins:
                        example = json.loads(line)
                        report.tokens -= sum(
                            _content_tokens(m["content"]) for m in example["messages"]
                        )
                        continue
                    if validation and _digest(line[:-1]) in validation:
                        assert val is not None
                        val.write(line)
                        report.validation_examples += 1
                    else:
                        train.write(line)
                        report.train_examples += 1
            if val is not None:
                _commit(val, validation_target)
                report.validation_path = validation_target
            _commit(train, train_target)
            report.train_path = train_target
        if report.train_path is None:
            train_target.unlink(missing_ok=True)
        if report.validation_path is None:
            validation_target.unlink(missing_ok=True)  # no stale file from an earlier run
    finally:
        for handle in temps:
            handle.close()
            Path(handle.name).unlink(missing_ok=True)
    return report
