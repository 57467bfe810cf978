"""Which model answers, and where it is served: the chat endpoint or the serving endpoint.

A model fine-tuned by parley-trainer is served by the admin's vLLM or Ollama
(`SERVE_BASE_URL`), which keeps no conversations: chats routed there carry on their thread
from the dialogue log. The choice outlives restarts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import openai
from openai import AsyncOpenAI

from bot.errors import classify_model_error
from bot.services.chat import CHAT_ROUTE, SERVE_ROUTE, ChatService
from storage.interface import SettingsStore

log = logging.getLogger(__name__)

MODEL_KEY, ROUTE_KEY = "model", "model_route"
MODEL_KEYS = (MODEL_KEY, ROUTE_KEY)


@dataclass(frozen=True, slots=True)
class Catalog:
    """The models each endpoint lists; None where it could not be asked (`problem` says why)."""

    chat: list[str] | None
    serve: list[str] | None
    problem: str | None = None

    def route_of(self, name: str) -> str | None:
        """The route that serves `name` (the chat endpoint if both do); None if neither does."""
        if self.chat is not None and name in self.chat:
            return CHAT_ROUTE
        if self.serve is not None and name in self.serve:
            return SERVE_ROUTE
        return None

    @property
    def complete(self) -> bool:
        return self.problem is None


class ModelRouter:
    """The model in use and its route; `/model` and "use this model" switch through it."""

    def __init__(
        self,
        settings: SettingsStore,
        chat: ChatService,
        client: AsyncOpenAI,
        serve: AsyncOpenAI | None,
    ) -> None:
        self._settings = settings
        self._chat = chat
        self._client = client
        self._serve = serve  # None: served models live on the chat endpoint

    async def restore(self) -> None:
        """Take up the model (and route) chosen before the last restart."""
        self.take_up(await self._settings.get_many(MODEL_KEYS))

    def take_up(self, values: Mapping[str, str]) -> None:
        """Use the model stored in `values` (the bot settings MODEL_KEYS read), if any."""
        name = values.get(MODEL_KEY)
        if name:
            route = values.get(ROUTE_KEY)
            self._chat.model = name
            self._chat.route = SERVE_ROUTE if route == SERVE_ROUTE else CHAT_ROUTE

    @property
    def current(self) -> str:
        return self._chat.model

    @property
    def route(self) -> str:
        """Where the model in use is served: the chat endpoint or the serving endpoint."""
        return self._chat.route

    async def catalog(self) -> Catalog:
        """What each endpoint offers; an endpoint that can't be reached is named in `problem`."""
        chat, problem = await _list(self._client)
        serve: list[str] | None = None
        if self._serve is not None:
            serve, serve_problem = await _list(self._serve)
            problem = problem or serve_problem
        return Catalog(chat, serve, problem)

    async def switch(self, name: str, route: str = CHAT_ROUTE) -> None:
        """Answer with `name` through `route` from now on, and after restarts too."""
        await self._settings.set_many({MODEL_KEY: name, ROUTE_KEY: route})
        self._chat.model, self._chat.route = name, route


async def _list(client: AsyncOpenAI) -> tuple[list[str] | None, str | None]:
    try:
        return sorted(m.id for m in (await client.models.list()).data), None
    except openai.OpenAIError as exc:
        return None, classify_model_error(exc).kind
