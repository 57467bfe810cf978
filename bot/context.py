"""Typed access to Parley's services from handlers (PTB's custom-context pattern)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openai import AsyncOpenAI
from telegram.ext import Application, CallbackContext, ExtBot

from bot.services.albums import Albums
from bot.services.alerts import AdminAlerts
from bot.services.canary import CANARY_KEY, Canary
from bot.services.chat import ChatService
from bot.services.conversations import ConversationBackend
from bot.services.documents import DocumentService
from bot.services.evaluation import Evaluation
from bot.services.feedback import Feedback
from bot.services.finetune import FineTuner
from bot.services.forgetting import Forgetting
from bot.services.models import MODEL_KEYS, ModelRouter
from bot.services.names import Names
from bot.services.photos import PhotoService
from bot.services.voice import VoiceService
from bot.settings import Settings
from storage.interface import Store

if TYPE_CHECKING:
    from bot.replicas import Replica


@dataclass(slots=True)
class Services:
    """Everything handlers use, typed; created in post_init, closed in post_shutdown."""

    settings: Settings
    store: Store
    openai: AsyncOpenAI
    backend: ConversationBackend
    chat: ChatService
    photos: PhotoService
    documents: DocumentService
    voice: VoiceService
    albums: Albums
    finetune: FineTuner
    models: ModelRouter
    alerts: AdminAlerts
    names: Names
    forgetting: Forgetting
    feedback: Feedback
    evaluation: Evaluation
    canary: Canary
    # Clients of the trainer and serving endpoints, closed at shutdown.
    clients: list[AsyncOpenAI] = field(default_factory=list)
    background: list[asyncio.Task[None]] = field(default_factory=list)
    # With replicas (PostgreSQL and a webhook): this process's share of the chats.
    replica: Replica | None = None

    async def follow_shared_settings(self) -> None:
        """Take up what another replica may have changed since: the model in use and the
        canary (read before each update, so a switch holds from the next message on)."""
        values = await self.store.settings.get_many((*MODEL_KEYS, CANARY_KEY))  # one query
        self.models.take_up(values)
        self.canary.take_up(values.get(CANARY_KEY))


class BotData:
    """The application's bot_data: holds the services once they are started."""

    services: Services | None = None


class CustomContext(CallbackContext[ExtBot[None], dict[Any, Any], dict[Any, Any], BotData]):
    """Callback context with typed access to Parley's services."""

    @property
    def services(self) -> Services:
        services = self.bot_data.services
        if services is None:
            raise RuntimeError("services are used before post_init started them")
        return services


ParleyApp = Application[Any, CustomContext, dict[Any, Any], dict[Any, Any], BotData, Any]
