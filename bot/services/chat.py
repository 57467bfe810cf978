"""One chat turn, end to end: thread, model stream, reply delivery and the dialogue log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from telegram import Bot
from telegram.error import TelegramError

from bot.domain import DOCUMENT_CUT, ChatKey, StoredImage, TurnRecord, utcnow
from bot.errors import ModelError
from bot.services.alerts import ADMIN_PROBLEMS, AdminAlerts
from bot.services.conversations import (
    CUT_LENGTH,
    ConversationBackend,
    InputFile,
    ReplyResult,
    UserContent,
    data_url,
)
from bot.services.priority import UserTurns
from bot.services.profiles import Profiles
from bot.services.replies import Links, ProgressGate, ReplyStreamer, RichMessages, send_text
from bot.services.sentiment import Sentiment, SentimentAnalyzer, format_tag
from bot.settings import DEFAULT_ANSWER_DEADLINE, DEFAULT_MAX_ANSWER_TOKENS
from bot.texts import t
from storage.interface import StatsStore, ThreadStore

log = logging.getLogger(__name__)

# Where a model is served: the chat endpoint (OPENAI_BASE_URL, with the configured backend)
# or the serving endpoint (SERVE_BASE_URL, history kept by the bot).
CHAT_ROUTE = "chat"
SERVE_ROUTE = "serve"


@dataclass(frozen=True, slots=True)
class Incoming:
    """A user message the bot must answer, parsed out of a Telegram update."""

    key: ChatKey
    chat_type: str
    user_id: int | None
    message_id: int
    text: str
    images: Sequence[StoredImage] = field(default_factory=tuple)
    lang: str | None = None  # the user's Telegram language_code, for the bot's own words
    kind: str = ""  # text, photo, voice or document; "" = photo if it has images, else text
    files: Sequence[InputFile] = field(default_factory=tuple)  # documents, before the text
    notes: Sequence[str] = field(default_factory=tuple)  # lines under the answer (e.g. a cut)

    @property
    def private(self) -> bool:
        return self.chat_type == "private"


async def _no_canary(_key: ChatKey) -> tuple[str, str] | None:
    return None


class ChatService:
    """Answers a user message inside its chat's thread and logs the turn."""

    def __init__(
        self,
        threads: ThreadStore,
        stats: StatsStore,
        backend: ConversationBackend,
        *,
        profiles: Profiles,
        model: str,
        vision_model: str | None,
        draft_interval: float,
        sentiment: SentimentAnalyzer,
        daily_limit: int = 0,
        exempt: Callable[[int | None], bool] = lambda _user: False,
        gate: ProgressGate | None = None,
        served: ConversationBackend | None = None,
        max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS,
        answer_deadline: float = DEFAULT_ANSWER_DEADLINE,
        alerts: AdminAlerts | None = None,
        rich: RichMessages | None = None,
    ) -> None:
        # Whether answers with tables or formulas may go out as rich messages (per process).
        self.rich = rich or RichMessages()
        # Problems only an admin can fix (a refused key, a missing model) are told to them.
        self.alerts = alerts
        # Every answer is bounded in length (the model's output cap) and in time: a stream
        # that trickles never holds its chat's next message for longer than the deadline.
        self.max_answer_tokens = max_answer_tokens
        self.answer_deadline = answer_deadline
        self.gate = gate or ProgressGate()
        self.daily_limit = daily_limit
        self.exempt = exempt
        self.profiles = profiles
        self.vision_model = vision_model  # None: the same as the chat model
        self.threads = threads
        self.stats = stats
        self.backend = backend
        # Models served elsewhere (SERVE_BASE_URL: a fine-tuned adapter on vLLM or Ollama)
        # answer through a history the bot keeps; route "serve" sends text turns there.
        self.backends = {CHAT_ROUTE: backend, SERVE_ROUTE: served or backend}
        self.route = CHAT_ROUTE
        self.default_model = model
        self.sentiment = sentiment
        self.model = model
        self.draft_interval = draft_interval
        # Users' turns in flight: background model work (the evaluation) gives way to them.
        self.users = UserTurns()
        # A canary (bot/services/canary.py): the model and route of a chat's turn it sends
        # to the candidate, None for the others.
        self.canary: Callable[[ChatKey], Awaitable[tuple[str, str] | None]] = _no_canary

    async def already_answered(self, msg: Incoming) -> bool:
        """A message replayed after a crash whose answer was already logged: skip it."""
        if await self.threads.answered(msg.key.chat_id, msg.message_id):
            log.info("message %s in chat %s was already answered", msg.message_id, msg.key)
            return True
        return False

    async def over_limit(self, user_id: int | None) -> bool:
        """Whether the user has used up today's messages (UTC day; admins are exempt)."""
        if not self.daily_limit or user_id is None or self.exempt(user_id):
            return False
        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        used = await self.stats.turns_since(user_id, midnight.isoformat(timespec="milliseconds"))
        return used >= self.daily_limit

    async def refuse_over_limit(self, bot: Bot, msg: Incoming) -> bool:
        """Tell the user about the daily limit if it is reached; True if so."""
        if not await self.over_limit(msg.user_id):
            return False
        await self._tell(bot, msg, t("limit.reached", lang=msg.lang, limit=self.daily_limit))
        return True

    async def takes_files(self, key: ChatKey) -> bool:
        """Whether a chat's next turn without images goes to a backend that takes files."""
        profile = await self.profiles.for_chat(key)
        picked = None if profile.model else await self.canary(key)
        _, route = self._model_for(profile.model, False, bool(profile.tools), picked)
        return self.backends[route].takes_files

    async def answer(self, bot: Bot, msg: Incoming) -> TurnRecord | None:
        """Stream the model's answer to `msg` into its chat; the logged turn is returned."""
        if await self.already_answered(msg):
            return None
        if await self.refuse_over_limit(bot, msg):
            return None
        profile = await self.profiles.for_chat(msg.key)
        picked = None if profile.model or msg.images else await self.canary(msg.key)
        model, route = self._model_for(profile.model, bool(msg.images), bool(profile.tools), picked)
        backend = self.backends[route]
        content = UserContent(
            msg.text, tuple(data_url(i.mime_type, i.data) for i in msg.images), tuple(msg.files)
        )
        turn = TurnRecord(
            thread_id=None,
            key=msg.key,
            chat_type=msg.chat_type,
            user_id=msg.user_id,
            user_message_id=msg.message_id,
            user_text=content.full_text,  # a document's text form with it (not its bytes)
            model=model,
            requested_model=model,
            instructions=profile.instructions,
            started_at=utcnow(),
            images=tuple(msg.images),
            input_kind=msg.kind or ("photo" if msg.images else "text"),
        )
        streamer = ReplyStreamer(
            bot,
            msg.key,
            private=msg.private,
            draft_id=msg.message_id,
            reply_to=None if msg.private else msg.message_id,
            interval=self.draft_interval,
            gate=self.gate,
            rich=self.rich,
            lang=msg.lang,
        )
        # The user's own sentiment is judged while the model writes: it adds no delay. Not on
        # a local server that answers this turn itself: one with a single slot
        # (llama-cpp-python's default) cuts the answer's stream short when another request
        # arrives, so there it is judged after the answer.
        alongside = route == SERVE_ROUTE or self.backends[CHAT_ROUTE].name != "local"
        user_sentiment = asyncio.create_task(self._analyze(msg.text)) if alongside else None
        try:
            async with streamer, self.users.turn():
                try:
                    # The whole model turn, however slowly its stream trickles: OPENAI_TIMEOUT
                    # bounds each read, this the answer. What came before it is not sent.
                    async with asyncio.timeout(self.answer_deadline):
                        thread = await backend.open_thread(msg.key)
                        turn.thread_id = thread.id
                        result = await backend.run_turn(
                            thread,
                            content,
                            model=model,
                            instructions=profile.instructions,
                            temperature=profile.temperature,
                            on_delta=streamer.on_delta,
                            max_tokens=self.max_answer_tokens,
                            tools=profile.tools,
                        )
                except TimeoutError:
                    raise ModelError(
                        "timeout", f"no answer in {self.answer_deadline:g} s"
                    ) from None
                if not result.text.strip():
                    raise ModelError("empty_answer", result.response_id or "")
                _fill(turn, result)
                # The tag is metadata: shown under the reply, stored with it, and never part
                # of the text the thread (or the local history) keeps. So is the note that
                # the answer was cut at the length cap.
                tag = await self._analyze(result.text)
                turn.reply_sentiment = _row(tag)
                notes = list(msg.notes)
                if result.cut == CUT_LENGTH:
                    notes.append(t("answer.cut", lang=msg.lang))
                if tag:
                    notes.append(format_tag(tag, msg.lang))
                footer = "\n".join(notes) or None
                # A web search's sources: links under the answer, kept out of its text.
                links = Links(
                    t("answer.sources", lang=msg.lang),
                    [(source.title, source.url) for source in result.sources],
                )
                turn.reply_message_ids = await streamer.send(result.text, footer, links)
        except ModelError as exc:
            log.warning("turn failed in chat %s: %s (%s)", msg.key, exc.kind, exc.detail)
            turn.status, turn.error_kind = "failed", exc.kind
            turn.reply_message_ids = await self._tell(
                bot, msg, t(await self.error_key(bot, exc.kind, model), lang=msg.lang)
            )
        except TelegramError as exc:
            # The answer exists but could not be delivered (after the rate limiter's retries).
            log.error("could not deliver the reply in chat %s: %s", msg.key, type(exc).__name__)
            turn.status, turn.error_kind = "failed", "delivery"
        except BaseException:
            if user_sentiment is not None:  # cancelled mid-turn (shutdown): don't leave it
                user_sentiment.cancel()
            raise
        turn.user_sentiment = _row(
            await (user_sentiment if user_sentiment is not None else self._analyze(msg.text))
        )
        turn.finished_at = utcnow()
        if turn.status == "ok" and backend.takes_files:
            if any(f.data and f.partial for f in msg.files):
                # The model read the whole file; the log keeps part of its text: an example
                # made of the two would teach answers from what it doesn't show.
                turn.excluded = DOCUMENT_CUT
        await self.threads.record_turn(turn)
        return turn

    async def error_key(self, bot: Bot, kind: str, model: str) -> str:
        """The message for a failed turn. One only an admin can fix says the admins know
        only when they do (told now, or within the hour)."""
        if kind not in ADMIN_PROBLEMS:
            return f"error.{kind}"
        told = False
        if self.alerts is not None:
            try:
                told = await self.alerts.report(bot, kind, f"{kind}:{model}", model=model)
            except Exception:
                log.exception("could not alert the admins about %s", kind)
        return f"error.{kind}" if told else f"error.{kind}_untold"

    def _model_for(
        self,
        profile_model: str | None,
        images: bool,
        tools: bool = False,
        picked: tuple[str, str] | None = None,
    ) -> tuple[str, str]:
        """The model and route of a turn: a profile's model and photos stay on the chat API.

        A served fine-tune usually has no vision: photos go to the vision model (or the
        configured chat model) on the chat endpoint; the thread follows them there and back.
        A profile with tools (web search) stays there too: only the Responses API runs them.
        A turn the canary sends to the candidate (`picked`: its model and route) gets it.
        """
        if profile_model:
            return profile_model, CHAT_ROUTE
        if images:
            current = self.model if self.route == CHAT_ROUTE else self.default_model
            return self.vision_model or current, CHAT_ROUTE
        if picked is not None and (not tools or picked[1] == CHAT_ROUTE):
            return picked
        if tools and self.route != CHAT_ROUTE:
            return self.default_model, CHAT_ROUTE
        return self.model, self.route

    async def _analyze(self, text: str) -> Sentiment | None:
        """The analyzer's verdict, or None: a tag must never cost the reply itself."""
        try:
            return await self.sentiment.analyze(text)
        except Exception:
            log.exception("sentiment analysis failed")
            return None

    async def _tell(self, bot: Bot, msg: Incoming, text: str) -> list[int]:
        try:
            reply_to = None if msg.private else msg.message_id
            return await send_text(bot, msg.key, text, reply_to=reply_to)
        except TelegramError as exc:
            log.error("could not tell chat %s about an error: %s", msg.key, type(exc).__name__)
            return []


def _row(s: Sentiment | None) -> tuple[str, float, str] | None:
    return (s.label, s.score, s.source) if s else None


def _fill(turn: TurnRecord, result: ReplyResult) -> None:
    turn.assistant_text = result.text
    turn.model = result.model
    turn.response_id = result.response_id
    turn.input_tokens = result.input_tokens
    turn.output_tokens = result.output_tokens
    turn.latency_ms = result.latency_ms
    turn.error_kind = result.cut  # delivered, but cut short: "length" (the cap) or the reason
