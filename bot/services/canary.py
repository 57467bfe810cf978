"""After the switch: a canary sends a share of the chats to a candidate model, and the
dialogue log tells whether it does better.

Which chats: a chat (with its forum topic) falls in a bucket from 0 to 100 by a hash of
its key and the canary's salt; those below the share get the candidate. The same chat
always lands in the same bucket, so it keeps its model from one message to the next and
across restarts. A chat never changes model mid-thread: the canary takes a chat at the
start of a conversation (its first message, or the first after /reset), and a conversation
under way keeps the model it began with, also when the share changes (each conversation
goes by the share in force when it began: raising it only adds conversations, lowering it
leaves those under way on the candidate). A conversation is the chain of threads a chat
carries across endpoints (a photo on the chat endpoint, a served candidate's local
history), from the thread /reset last opened. Only ending the canary moves a conversation:
/promote moves every chat to the candidate, /rollback every chat back, as /model does.
The canary (model, route, shares, salt, start) is a bot setting: it outlives restarts
until /promote or /rollback ends it.

Whether it does better: per model (as the bot asked for it) since the canary started,
from the log: replies with a positive and with a negative reaction, negative follow-ups
(the user's next message in the thread tagged negative), failed turns, latency and tokens,
each with its 95% interval and the number of turns behind it. A difference is called only
when the two intervals separate; otherwise the comparison says roughly how many more
replies it would take at the differences seen so far.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import asdict, dataclass

from bot.domain import ChatKey, ModelFigures, utcnow
from bot.services.intervals import Interval, mean_interval, more_needed, separated, wilson
from bot.services.models import ModelRouter
from storage.interface import EvalStore, SettingsStore

log = logging.getLogger(__name__)

CANARY_KEY = "canary"


@dataclass(frozen=True, slots=True)
class CanaryState:
    model: str
    route: str
    percent: float  # share of chats now, 0 < percent <= 100
    salt: str
    started_at: str
    # Each share in force and since when, oldest first (the first: the canary's start): a
    # conversation goes by the one in force when it began.
    shares: tuple[tuple[float, str], ...] = ()

    def share_at(self, began: str | None) -> float:
        """The share for a conversation that began at `began` (None: one beginning now)."""
        share = self.percent
        if began is not None:
            for percent, since in self.shares:
                if since <= began:
                    share = percent
        return share


def bucket(key: ChatKey, salt: str) -> float:
    """Where a chat falls, in [0, 100): the same for the same chat and salt, always."""
    digest = hashlib.sha256(f"{salt}:{key.chat_id}:{key.topic_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


@dataclass(frozen=True, slots=True)
class Metric:
    """One figure for both models: the model in use (`current`) and the candidate."""

    name: str  # positive, negative, negative_followups, errors, latency, tokens
    share: bool  # a share (shown as %) or a mean
    current: Interval
    candidate: Interval

    @property
    def called(self) -> str | None:
        """higher / lower (the candidate's) once the intervals separate; None before."""
        if not separated(self.current, self.candidate):
            return None
        return "higher" if self.candidate.value > self.current.value else "lower"

    @property
    def more_needed(self) -> int | None:
        """Roughly how many more turns would separate the intervals (see intervals.py)."""
        return more_needed(self.current, self.candidate)


@dataclass(frozen=True, slots=True)
class Comparison:
    state: CanaryState
    current_model: str
    metrics: list[Metric]


def _metrics(f: ModelFigures) -> dict[str, tuple[bool, Interval]]:
    return {
        "positive": (True, wilson(f.positive, f.replies)),
        "negative": (True, wilson(f.negative, f.replies)),
        "negative_followups": (True, wilson(f.negative_followups, f.followups)),
        "errors": (True, wilson(f.errors, f.turns)),
        "latency": (False, mean_interval(f.latency_n, f.latency_sum, f.latency_squares)),
        "tokens": (False, mean_interval(f.tokens_n, f.tokens_sum, f.tokens_squares)),
    }


class Canary:
    """The canary in force (if any): routing, start, promote, rollback, comparison."""

    def __init__(self, settings: SettingsStore, evals: EvalStore, models: ModelRouter) -> None:
        self._settings = settings
        self._evals = evals
        self._models = models
        self.state: CanaryState | None = None
        self._taken: str | None = None  # the stored form last taken up

    async def restore(self) -> None:
        """Take up the canary in force before the last restart."""
        self.take_up(await self._settings.get(CANARY_KEY))

    def take_up(self, raw: str | None) -> None:
        """Use the canary stored as `raw` (the bot setting CANARY_KEY); none if empty."""
        if raw is not None and raw == self._taken:
            return  # unchanged since last read (replicas read it before every update)
        self._taken = raw
        if not raw:
            self.state = None  # none, or stopped (by another replica, say)
            return
        try:
            data = json.loads(raw)
            shares = data.pop("shares", None) or [(data["percent"], data["started_at"])]
            self.state = CanaryState(
                **data, shares=tuple((float(p), str(since)) for p, since in shares)
            )
        except (ValueError, TypeError, KeyError):
            self.state = None
            log.error("the stored canary is unreadable; no canary runs")

    async def pick(self, key: ChatKey) -> tuple[str, str] | None:
        """The candidate's model and route for a chat's turn in the canary, else None: the
        chat is in the share in force when its conversation began, after the canary's start."""
        state = self.state
        if state is None:
            return None
        place = bucket(key, state.salt)
        if place >= max(percent for percent, _ in state.shares or ((state.percent, ""),)):
            return None  # in no share the canary ever had: no need to look further
        began = await self._evals.conversation_began(key)
        if began is not None and began < state.started_at:
            return None  # a conversation under way when the canary started keeps its model
        if place >= state.share_at(began):
            return None
        return state.model, state.route

    async def start(self, model: str, route: str, percent: float) -> CanaryState:
        """Send `percent` of the chats to `model`. The same model again keeps its chats
        (and its start); the new share applies to conversations beginning from now on.
        Another model ends the canary in force (its conversations go back to the model in
        use) and starts a new one."""
        if not 0 < percent <= 100:
            raise ValueError("percent must be in (0, 100]")
        old, now = self.state, utcnow()
        if old is not None and old.model == model and old.route == route:
            shares = old.shares or ((old.percent, old.started_at),)
            if percent != old.percent:
                shares = (*shares, (percent, now))
            state = CanaryState(model, route, percent, old.salt, old.started_at, shares)
        else:
            salt = secrets.token_hex(8)
            state = CanaryState(model, route, percent, salt, now, ((percent, now),))
        await self._settings.set(CANARY_KEY, json.dumps(asdict(state)))
        self.state = state
        return state

    async def promote(self) -> CanaryState | None:
        """Make the candidate everyone's model and end the canary; what it was, or None."""
        state = self.state
        if state is None:
            return None
        await self._models.switch(state.model, state.route)
        await self._end()
        return state

    async def rollback(self) -> CanaryState | None:
        """End the canary: every chat back on the model in use; what it was, or None."""
        state = self.state
        if state is not None:
            await self._end()
        return state

    async def _end(self) -> None:
        # An empty value is "no canary"; the setting's row keeps when it ended.
        await self._settings.set(CANARY_KEY, "")
        self.state = None

    async def compare(self) -> Comparison | None:
        """Both models' figures since the canary started; None with no canary."""
        state = self.state
        if state is None:
            return None
        current = self._models.current
        figures = await self._evals.model_figures([current, state.model], state.started_at)
        mine = _metrics(figures.get(current, ModelFigures()))
        theirs = _metrics(figures.get(state.model, ModelFigures()))
        metrics = [
            Metric(name, share, interval, theirs[name][1])
            for name, (share, interval) in mine.items()
        ]
        return Comparison(state, current, metrics)
