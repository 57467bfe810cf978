"""The bot's domain types: what services, handlers and storage speak of (chat keys, threads,
turns, fine-tuning jobs, evaluations), and the small helpers they share.

Storage builds and reads these; nothing here knows about a database.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

# A message's sentiment as stored: (label, score, source).
SentimentRow = tuple[str, float, str]

# Why a turn stays out of every dataset (dataset_exclusions.reason; the catalogs' reason.*):
# it quoted a user who ran /forget, or it is a document turn whose model read the file
# itself (a PDF as a Responses input_file) while the log keeps only part of its text.
QUOTES_FORGOTTEN = "quotes_forgotten_user"
DOCUMENT_CUT = "document_cut"


def utcnow() -> str:
    """Current UTC time as sortable ISO 8601 text with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_safe(text: str) -> str:
    """`text` with lone UTF-16 surrogates replaced (U+FFFD), so UTF-8 can carry and store it.

    JSON can escape half of a surrogate pair ("\\ud800"), and Telegram and model servers
    do deliver such text; Python decodes it into a str that SQLite, Telegram's API and the
    model's API all refuse. A pair that arrived as two escapes is joined into its character.
    """
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@dataclass(frozen=True, slots=True)
class ChatKey:
    """Identifies one assistant thread's home: a chat, plus the topic in forum chats."""

    chat_id: int
    topic_id: int = 0

    def __str__(self) -> str:
        return f"{self.chat_id}/{self.topic_id}" if self.topic_id else str(self.chat_id)


# Where updates that belong to no chat are ordered (none of the kinds the bot asks for).
NO_CHAT = ChatKey(0, 0)


@dataclass(frozen=True, slots=True)
class Lane:
    """Where an update is handled in order: its chat (thread home), and its album if any."""

    chat: ChatKey
    media_group: str | None = None


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    """An update waiting in a shared inbox (PostgreSQL) for the replica that holds its chat."""

    update_id: int
    payload: str
    attempts: int
    media_group: str | None
    age: float  # seconds since it arrived, by the database's clock


@dataclass(frozen=True, slots=True)
class Thread:
    id: int
    key: ChatKey
    backend: str
    conversation_id: str | None


@dataclass(frozen=True, slots=True)
class StoredImage:
    """A prepared image as the model saw it; stored once per content hash."""

    sha256: str
    mime_type: str
    width: int
    height: int
    data: bytes


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    role: str
    content: str
    images: tuple[StoredImage, ...] = ()


@dataclass(slots=True)
class JobRecord:
    """A fine-tuning job as the bot keeps it (it outlives the trainer's API being reachable)."""

    job_id: str
    trainer: str
    base_model: str
    training_file: str | None
    validation_file: str | None
    train_examples: int
    validation_examples: int
    tokens: int
    started_by: int
    description: str
    status: str
    created_at: str
    updated_at: str
    fine_tuned_model: str | None = None
    error: str | None = None
    notified_status: str | None = None
    notice_message_id: int | None = None  # the admin's message that follows the job (migration 12)
    # The /train options its dataset was built from; None for jobs started before migration 12.
    dataset_since: str | None = None
    dataset_chat_id: int | None = None
    dataset_photos: bool | None = None


@dataclass(slots=True)
class TurnRecord:
    """Everything logged about one turn: the user's message and the answer (or the failure)."""

    thread_id: int | None
    key: ChatKey
    chat_type: str
    user_id: int | None
    user_message_id: int | None
    user_text: str
    model: str
    instructions: str
    started_at: str
    status: str = "ok"
    error_kind: str | None = None
    assistant_text: str | None = None
    response_id: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: int | None = None
    reply_message_ids: Sequence[int] = field(default_factory=tuple)
    images: Sequence[StoredImage] = field(default_factory=tuple)
    input_kind: str = "text"  # text, photo, voice (transcribed) or document
    requested_model: str | None = None  # the model asked for (`model`: the one that answered)
    user_sentiment: SentimentRow | None = None
    reply_sentiment: SentimentRow | None = None
    finished_at: str = field(default_factory=utcnow)
    excluded: str | None = None  # why the turn stays out of every dataset (dataset_exclusions)


class QuoteFinder(Protocol):
    """Where a text quotes the messages of the user being forgotten."""

    def learn(self, text: str) -> None:
        """Take in one of the forgotten user's messages."""

    def redact(self, text: str) -> str | None:
        """`text` with every quote of the learned messages replaced; None if it has none."""


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What /forget deleted from the store."""

    messages: int  # the user's logged messages
    quoting_turns: int  # other people's turns that quoted them: redacted, out of datasets
    conversations: int  # server-side conversations that held them, queued for deletion


@dataclass(frozen=True, slots=True)
class EvalItem:
    """One test-split item: the context (chat messages up to a user's message) and the
    answer the bot gave then."""

    id: int
    position: int
    messages: list[dict[str, str]]
    reference: str


@dataclass(frozen=True, slots=True)
class EvalRun:
    id: int
    job_id: str
    size: int
    current_model: str
    current_route: str
    candidate_model: str
    candidate_route: str
    judge_model: str
    requested_by: int
    status: str  # running | done
    created_at: str
    finished_at: str | None


@dataclass(slots=True)
class EvalResult:
    """One item's outcome in a run. `outcome` is the candidate's: win, loss, tie or error."""

    item_id: int
    outcome: str
    error: str | None = None
    current_answer: str | None = None
    current_latency_ms: int | None = None
    current_tokens: int | None = None
    candidate_answer: str | None = None
    candidate_latency_ms: int | None = None
    candidate_tokens: int | None = None
    verdict_ab: str | None = None  # the judge, with the model in use shown as answer a
    confidence_ab: str | None = None
    reason_ab: str | None = None
    verdict_ba: str | None = None  # ... with the candidate shown as answer a
    confidence_ba: str | None = None
    reason_ba: str | None = None


@dataclass(frozen=True, slots=True)
class ModelFigures:
    """Sums over one model's turns (as the bot asked for it) since a moment: the raw
    material of the canary's shares and means."""

    turns: int = 0
    errors: int = 0
    replies: int = 0
    positive: int = 0  # replies with at least one positive reaction
    negative: int = 0  # ... with at least one negative reaction
    followups: int = 0  # replies the user wrote again after (with a sentiment tag)
    negative_followups: int = 0  # ... tagged negative
    latency_n: int = 0
    latency_sum: float = 0.0
    latency_squares: float = 0.0
    tokens_n: int = 0
    tokens_sum: float = 0.0
    tokens_squares: float = 0.0


@dataclass(slots=True)
class LoggedTurn:
    """One turn of the log as a dataset build reads it (storage.dataset.DatasetSnapshot.turns).

    `status` is the turn's status, except "cut" for an answer stopped at the length cap.
    """

    id: int
    thread_id: int | None  # None: a turn that had no thread (a conversation of its own)
    user_id: int | None
    status: str
    instructions_id: int | None
    has_images: bool
    user_text: str | None = None
    user_sentiment: str | None = None
    assistant_text: str | None = None
    voice: bool = False  # the user's words are a transcribed recording


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """A stored image's metadata, without its bytes."""

    sha256: str
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class DatabaseState:
    """What `python -m bot check` learns about the database without opening it for writing
    (storage.db.inspect). `problem`: why the bot could not use it, as a code:
    "cannot_create", "not_a_file", "not_writable", "unreadable" (`detail` says why),
    "foreign" (not a Parley database), "newer" (a schema this version does not know)."""

    exists: bool
    version: int = 0  # the schema's migration number (0: none yet)
    latest: int = 0  # the newest migration this version of Parley has
    problem: str | None = None
    detail: str = ""  # the folder for cannot_create, the error for unreadable

    @property
    def pending(self) -> int:
        return max(self.latest - self.version, 0)
