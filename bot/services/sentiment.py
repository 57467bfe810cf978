"""Sentiment tags for bot replies: off, naive keywords, offline VADER lexicon, or the model."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Literal, Protocol, cast, get_args

import openai
from openai.types.chat import ChatCompletionMessageParam
from openai.types.chat.completion_create_params import ResponseFormat
from openai.types.responses import ResponseTextConfigParam
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from bot.texts import t

__all__ = [
    "ChatModelAnalyzer",
    "FallbackAnalyzer",
    "KeywordAnalyzer",
    "Label",
    "LexiconAnalyzer",
    "ModelAnalyzer",
    "OffAnalyzer",
    "Sentiment",
    "SentimentAnalyzer",
    "SentimentError",
    "SentimentUnavailable",
    "build_analyzer",
    "format_tag",
]

logger = logging.getLogger(__name__)

Label = Literal["positive", "neutral", "negative"]
LABELS: tuple[Label, ...] = get_args(Label)

_EMOJI: dict[Label, str] = {"positive": "🙂", "neutral": "😐", "negative": "🙁"}

# VADER's standard compound thresholds.
_POS_THRESHOLD = 0.05
_NEG_THRESHOLD = -0.05

# VADER's cost grows with the square of a text's word count (it re-lowercases the whole
# word list for every word), so longer texts are scored in chunks of about this size
# and their compounds averaged by length (VADER is built for sentence-sized text anyway).
_CHUNK_CHARS = 400
_SENTENCE_END = re.compile(r"(?<=[.!?…\n])\s+")

# Past this length a call would hold the event loop for more than about a millisecond
# (see bench/sentiment_bench.py), so it goes to a worker thread instead.
_INLINE_MAX_CHARS = 600

_MODEL_MAX_INPUT_CHARS = 4000

# VADER scores an emoji through the words of its CLDR name, which misreads common chat
# reactions ("thumbs up" and "pouting face" have no lexicon words; "fire" is negative).
# Valences on VADER's -4..4 word scale, set from the emoji's conventional chat meaning.
_EMOJI_VALENCE: dict[str, float] = {
    "👍": 1.9,
    "👏": 1.9,
    "🙌": 1.9,
    "💯": 1.9,
    "🤩": 2.5,
    "🔥": 1.5,
    "💪": 1.5,
    "🙏": 1.0,
    "✅": 1.0,
    "😉": 1.0,
    "👎": -1.9,
    "😡": -2.5,
    "🤬": -2.8,
    "😤": -1.5,
    "💔": -2.0,
    "😔": -1.5,
    "🙄": -1.0,
    "🤮": -2.0,
    "🤢": -1.5,
    "💩": -1.5,
    "❌": -1.0,
}


class SentimentError(Exception):
    """The sentiment backend failed or answered something unusable."""


class SentimentUnavailable(SentimentError):
    """The backend can't classify here at all (e.g. the server refuses structured output).

    Unlike other failures this one does not pass: the caller stops asking.
    """


@dataclass(frozen=True, slots=True)
class Sentiment:
    label: Label
    score: float  # -1.0 .. 1.0, signed (compound-style)
    source: str  # "model" | "lexicon" | "keywords" | "off"


def format_tag(s: Sentiment, lang: str | None = None) -> str:
    """Render a sentiment as a short tag in the reader's language, e.g. "🙂 positive"."""
    return f"{_EMOJI[s.label]} {t(f'sentiment.{s.label}', lang=lang)}"


def _label_for(score: float) -> Label:
    if score >= _POS_THRESHOLD:
        return "positive"
    if score <= _NEG_THRESHOLD:
        return "negative"
    return "neutral"


class SentimentAnalyzer(Protocol):
    name: str

    async def analyze(self, text: str) -> Sentiment | None: ...


class OffAnalyzer:
    """Tagging disabled."""

    name = "off"

    async def analyze(self, text: str) -> Sentiment | None:
        return None


class KeywordAnalyzer:
    """Deliberately naive floor for the benchmark: English substring counts, no negation."""

    name = "keywords"
    POSITIVE = (
        "good",
        "great",
        "love",
        "thank",
        "happy",
        "glad",
        "nice",
        "excellent",
        "awesome",
        "wonderful",
        "perfect",
        "enjoy",
    )
    NEGATIVE = (
        "bad",
        "terrible",
        "awful",
        "hate",
        "sad",
        "sorry",
        "angry",
        "wrong",
        "fail",
        "broken",
        "worst",
        "problem",
    )

    async def analyze(self, text: str) -> Sentiment | None:
        low = text.lower()
        pos = sum(low.count(w) for w in self.POSITIVE)
        neg = sum(low.count(w) for w in self.NEGATIVE)
        score = (pos - neg) / (pos + neg) if pos + neg else 0.0
        return Sentiment(_label_for(score), score, self.name)


@functools.cache
def shared_vader() -> SentimentIntensityAnalyzer:
    """The process-wide VADER analyzer, built on first use (parses its lexicon files)."""
    vader = SentimentIntensityAnalyzer()
    # VADER appends an emoji's name without a trailing space, gluing it to the next word.
    vader.emojis = {e: f" {desc} " for e, desc in vader.emojis.items()}
    for emoji, valence in _EMOJI_VALENCE.items():
        vader.emojis[emoji] = f" {emoji} "
        vader.lexicon[emoji] = valence
    return vader


def _chunks(text: str) -> list[str]:
    """Split text into pieces of at most about _CHUNK_CHARS, at sentence ends if possible."""
    if len(text) <= _CHUNK_CHARS:
        return [text]
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        pieces.extend([sentence] if len(sentence) <= _CHUNK_CHARS else sentence.split())
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > _CHUNK_CHARS:
            chunks.append(current)
            current = piece
        else:
            current = f"{current} {piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


class LexiconAnalyzer:
    """Offline VADER: English words, negation, and emoji (emoji in any language)."""

    name = "lexicon"

    def __init__(self) -> None:
        self._vader = shared_vader()

    def score(self, text: str) -> Sentiment:
        """Synchronous scoring; CPU-bound, roughly linear in len(text)."""
        chunks = _chunks(text)
        total = sum(len(c) for c in chunks) or 1
        compound = (
            sum(float(self._vader.polarity_scores(c)["compound"]) * len(c) for c in chunks) / total
        )
        return Sentiment(_label_for(compound), compound, self.name)

    async def analyze(self, text: str) -> Sentiment | None:
        if len(text) <= _INLINE_MAX_CHARS:
            return self.score(text)
        return await asyncio.to_thread(self.score, text)


_INSTRUCTIONS = (
    "Classify the overall sentiment of the user's text, in whatever language it is "
    "written. Answer with label positive, neutral or negative, and score from -1.0 "
    "(most negative) to 1.0 (most positive), near 0 for neutral."
)

_SCHEMA_NAME = "sentiment"
_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": list(LABELS)},
        "score": {"type": "number"},
    },
    "required": ["label", "score"],
    "additionalProperties": False,
}

_TEXT_FORMAT: ResponseTextConfigParam = {
    "format": {"type": "json_schema", "name": _SCHEMA_NAME, "strict": True, "schema": _SCHEMA}
}


def _parse(raw: str | None) -> Sentiment:
    """The model's JSON answer as a Sentiment; SentimentError if it is unusable."""
    # Messages name the defect only: the output may echo the user's text.
    try:
        data = json.loads(raw or "")
    except ValueError as exc:
        raise SentimentError("model output is not JSON") from exc
    if not isinstance(data, dict):
        raise SentimentError("model output is not a JSON object")
    label, score = data.get("label"), data.get("score")
    if label not in LABELS:
        raise SentimentError("model label outside the enum")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise SentimentError("model score is not a finite number")
    return Sentiment(label, max(-1.0, min(1.0, float(score))), "model")


class ModelAnalyzer:
    """Asks an OpenAI model via the Responses API with a strict JSON schema."""

    name = "model"

    def __init__(self, client: openai.AsyncOpenAI, model: str, timeout: float) -> None:
        self.client = client
        self.model = model
        self.timeout = timeout

    async def analyze(self, text: str) -> Sentiment | None:
        try:
            response = await self.client.responses.create(
                model=self.model,
                instructions=_INSTRUCTIONS,
                input=text[:_MODEL_MAX_INPUT_CHARS],
                text=_TEXT_FORMAT,
                store=False,
                timeout=self.timeout,
            )
            raw = response.output_text
        except openai.OpenAIError as exc:
            raise SentimentError(f"model request failed: {type(exc).__name__}") from exc
        return _parse(raw)


# What Chat Completions servers accept for structured output, in the order they are tried.
# OpenAI's own form first: vLLM, Ollama, LM Studio and llama.cpp's llama-server take it.
# llama-cpp-python's server knows only "text" and "json_object" (with a "schema", which it
# turns into a grammar) and answers json_schema with a 500 naming response_format.
_CHAT_FORMATS: tuple[ResponseFormat, ...] = (
    {
        "type": "json_schema",
        "json_schema": {"name": _SCHEMA_NAME, "strict": True, "schema": _SCHEMA},
    },
    # "schema" is the llama.cpp servers' addition to OpenAI's json_object.
    cast(ResponseFormat, {"type": "json_object", "schema": _SCHEMA}),
)

# Errors that say the server has no such route or feature: they won't pass with time.
_MISSING_STATUSES = frozenset({404, 405, 501})
# Errors that refuse the request; a refusal of the format names it (a 400 for a prompt over
# the context size, say, does not, and the next reply may be shorter).
_REFUSING_STATUSES = frozenset({400, 422, 500})
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema", "grammar")


def _refuses_format(exc: openai.OpenAIError) -> bool:
    """Whether an error says this server can't give this structured output, now or later."""
    if not isinstance(exc, openai.APIStatusError):
        return False  # timeouts, connection errors: passing
    if exc.status_code in _MISSING_STATUSES:
        return True
    if exc.status_code not in _REFUSING_STATUSES:
        return False  # 401, 403, 429, 502, 503: not about the format
    said = f"{exc.message} {json.dumps(exc.body, default=str)}".lower()
    return any(word in said for word in _FORMAT_WORDS)


class ChatModelAnalyzer:
    """Asks the model via Chat Completions with `response_format`: for OpenAI-compatible servers.

    Servers that serve only Chat Completions (llama.cpp, vLLM, Ollama: the `local` backend's)
    answer the Responses API with 404. A server that refuses one form of structured output
    is asked with the next (`_CHAT_FORMATS`); one that refuses them all is not asked again:
    `SentimentUnavailable`.
    """

    name = "model"

    def __init__(self, client: openai.AsyncOpenAI, model: str, timeout: float) -> None:
        self.client = client
        self.model = model
        self.timeout = timeout
        self._format = 0  # index into _CHAT_FORMATS of the form this server takes

    @property
    def response_format(self) -> ResponseFormat | None:
        """The form of structured output asked for now; None once the server refused all."""
        return _CHAT_FORMATS[self._format] if self._format < len(_CHAT_FORMATS) else None

    async def analyze(self, text: str) -> Sentiment | None:
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": _INSTRUCTIONS},
            {"role": "user", "content": text[:_MODEL_MAX_INPUT_CHARS]},
        ]
        while (index := self._format) < len(_CHAT_FORMATS):
            try:
                completion = await self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    response_format=_CHAT_FORMATS[index],
                    timeout=self.timeout,
                )
            except openai.OpenAIError as exc:
                if not _refuses_format(exc):
                    raise SentimentError(f"model request failed: {type(exc).__name__}") from exc
                self._refused(index, getattr(exc, "status_code", None))
                continue
            choice = completion.choices[0] if completion.choices else None
            try:
                return _parse(choice.message.content if choice is not None else None)
            except SentimentError:
                if index == 0:
                    raise  # strict json_schema: a bad answer is the model's, and passes
                # A server may take json_object and ignore its schema: every answer would
                # then be unusable.
                self._refused(index, None)
                raise SentimentUnavailable("the server does not keep to the schema") from None
        raise SentimentUnavailable("the server refuses structured output")

    def _refused(self, index: int, status: int | None) -> None:
        """Move past a refused form once, however many requests in flight saw it refused."""
        if self._format != index:
            return
        self._format = index + 1
        if self._format < len(_CHAT_FORMATS):  # the last refusal is the caller's to report
            logger.info(
                "sentiment: the server refused response_format %s (HTTP %s); trying %s",
                _CHAT_FORMATS[index]["type"],
                status,
                _CHAT_FORMATS[self._format]["type"],
            )


class FallbackAnalyzer:
    """Runs the primary within a deadline; on failure or timeout uses the fallback.

    A primary that is unavailable for good (`SentimentUnavailable`) is not asked again: one
    warning, then the fallback answers every text.
    """

    def __init__(
        self, primary: SentimentAnalyzer, fallback: SentimentAnalyzer, timeout: float
    ) -> None:
        self.name = primary.name
        self.primary = primary
        self.fallback = fallback
        self.timeout = timeout
        self.given_up = False

    async def analyze(self, text: str) -> Sentiment | None:
        if not self.given_up:
            try:
                async with asyncio.timeout(self.timeout):
                    return await self.primary.analyze(text)
            except SentimentUnavailable as exc:
                if not self.given_up:  # requests in flight may all find out
                    self.given_up = True
                    logger.warning(
                        "sentiment backend %s is unavailable (%s); using %s from now on",
                        self.primary.name,
                        exc,
                        self.fallback.name,
                    )
            except (SentimentError, openai.OpenAIError, TimeoutError) as exc:
                logger.warning(
                    "sentiment backend %s failed (%s: %s); using %s",
                    self.primary.name,
                    type(exc).__name__,
                    exc,
                    self.fallback.name,
                )
        return await self.fallback.analyze(text)


def build_analyzer(
    backend: Literal["model", "lexicon", "off"],
    *,
    client: openai.AsyncOpenAI | None,
    model: str,
    timeout: float,
    conversation_backend: Literal["openai", "local"] = "openai",
) -> SentimentAnalyzer:
    """Build the analyzer for a configured backend; call once at start-up and reuse it.

    The model is asked the way the conversation backend asks it: the Responses API on
    `openai`, Chat Completions on `local` (servers that copy only that part of the API).
    """
    if backend == "off":
        return OffAnalyzer()
    if backend == "lexicon":
        return LexiconAnalyzer()
    if backend == "model":
        if client is None:
            logger.warning("sentiment backend model has no OpenAI client; using lexicon")
            return LexiconAnalyzer()
        kind = ChatModelAnalyzer if conversation_backend == "local" else ModelAnalyzer
        return FallbackAnalyzer(kind(client, model, timeout), LexiconAnalyzer(), timeout)
    raise ValueError(f"unknown sentiment backend: {backend!r}")
