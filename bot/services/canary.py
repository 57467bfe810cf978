"""After the switch: a canary sends a share of the chats to a candidate model, and the
dialogue log tells whether it does better.

Which chats: a chat (with its forum topic) falls in a bucket from 0 to 100 by a hash of
its key and the canary's salt; those below the share get the candidate. The same chat
always lands in the same bucket, so it keeps its model from one message to the next and
across restarts; raising the share only adds chats. The canary (model, route, share,
salt, start) is a bot setting: it outlives restarts until /promote or /rollback ends it.

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

from bot.services.intervals import Interval, mean_interval, more_needed, separated, wilson
from bot.services.models import ModelRouter
from storage.db import ChatKey, Store, utcnow
from storage.evals import EvalStore, ModelFigures

log = logging.getLogger(__name__)

CANARY_KEY = "canary"


@dataclass(frozen=True, slots=True)
class CanaryState:
    model: str
    route: str
    percent: float  # share of chats, 0 < percent <= 100
    salt: str
    started_at: str


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

    def __init__(self, store: Store, evals: EvalStore, models: ModelRouter) -> None:
        self._store = store
        self._evals = evals
        self._models = models
        self.state: CanaryState | None = None

    async def restore(self) -> None:
        """Take up the canary in force before the last restart."""
        raw = await self._store.get_setting(CANARY_KEY)
        if not raw:
            return
        try:
            self.state = CanaryState(**json.loads(raw))
        except (ValueError, TypeError):
            log.error("the stored canary is unreadable; no canary runs")

    def pick(self, key: ChatKey) -> tuple[str, str] | None:
        """The candidate's model and route for a chat in the canary's share, else None."""
        state = self.state
        if state is None or bucket(key, state.salt) >= state.percent:
            return None
        return state.model, state.route

    async def start(self, model: str, route: str, percent: float) -> CanaryState:
        """Send `percent` of the chats to `model`. The same model again keeps its chats
        (and its start): a larger share only adds chats."""
        if not 0 < percent <= 100:
            raise ValueError("percent must be in (0, 100]")
        old = self.state
        if old is not None and old.model == model and old.route == route:
            state = CanaryState(model, route, percent, old.salt, old.started_at)
        else:
            state = CanaryState(model, route, percent, secrets.token_hex(8), utcnow())
        await self._store.set_setting(CANARY_KEY, json.dumps(asdict(state)))
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
        await self._store.set_setting(CANARY_KEY, "")
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
