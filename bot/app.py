"""The application factory: builds the PTB Application and its services from Settings."""

from __future__ import annotations

import asyncio
import logging
import os

from openai import AsyncOpenAI, DefaultAioHttpClient
from pydantic import SecretStr
from telegram import Bot, BotCommand, BotCommandScopeChat, BotCommandScopeDefault, Update
from telegram.error import TelegramError
from telegram.ext import AIORateLimiter, ApplicationBuilder
from telegram.ext import ContextTypes as PTBContextTypes

from bot.concurrency import ChatOrderedUpdateProcessor
from bot.context import BotData, CustomContext, ParleyApp, Services
from bot.durability import DurableBot, Inbox, InboxSlot
from bot.services.albums import Albums
from bot.services.chat import ChatService
from bot.services.conversations import ConversationBackend, LocalHistory, OpenAIConversations
from bot.services.finetune import FineTuner
from bot.services.forgetting import Forgetting
from bot.services.images import ImageLimits
from bot.services.models import ModelRouter
from bot.services.photos import PhotoService
from bot.services.profiles import Profiles, load_profiles
from bot.services.replies import ProgressGate
from bot.services.sentiment import build_analyzer
from bot.services.trainer import JobInfo, OpenAITrainer, SelfHostedTrainer, Trainer
from bot.settings import Settings
from bot.telegram_http import AiohttpRequest
from bot.texts import DEFAULT_LANGUAGE, LANGUAGES, command_descriptions
from handlers import (
    access,
    admin,
    assistant,
    chat,
    commands,
    errors,
    fallback,
    feedback,
    forget,
    photos,
)
from storage.db import JobRecord, Store

log = logging.getLogger(__name__)

# Update types the bot asks Telegram for (later features extend this list).
ALLOWED_UPDATES: list[str] = [Update.MESSAGE, Update.MESSAGE_REACTION, Update.CALLBACK_QUERY]


def make_openai_client(
    settings: Settings, base_url: str | None = None, api_key: SecretStr | None = None
) -> AsyncOpenAI:
    """The OpenAI (or compatible) client; local servers get a placeholder key.

    Without `base_url` it is the chat endpoint's client; with one, the trainer's or the
    serving endpoint's, with the same timeouts and transport.
    """
    secret = api_key if base_url else settings.openai_api_key
    key = secret.get_secret_value() if secret else None
    return AsyncOpenAI(
        api_key=key or "not-needed",
        base_url=base_url or settings.openai_base_url,
        timeout=settings.openai_timeout,
        max_retries=settings.openai_max_retries,
        # The SDK's aiohttp transport (openai[aiohttp]): a streamed answer costs half the
        # CPU it does through httpx2 and httpcore (bench/http_clients.py).
        http_client=DefaultAioHttpClient(),
    )


async def start_services(
    settings: Settings, albums: Albums, openai_client: AsyncOpenAI | None = None
) -> Services:
    """Open the database (applying migrations) and build the services on top of it."""
    profiles = load_profiles(settings.profiles_file, settings.assistant_instructions)
    store = await Store.open(settings.database_path)
    client = openai_client or make_openai_client(settings)
    # Clients of one's own trainer and serving endpoint; unset, the chat endpoint does both.
    extra: list[AsyncOpenAI] = []
    serve_client = None
    if settings.serve_base_url:
        serve_client = make_openai_client(settings, settings.serve_base_url, settings.serve_api_key)
        extra.append(serve_client)
    backend: ConversationBackend
    if settings.conversation_backend == "openai":
        backend = OpenAIConversations(client, store, settings.local_history_tokens)
    else:
        backend = LocalHistory(client, store, settings.local_history_tokens)
    sentiment = build_analyzer(
        settings.sentiment_backend,
        client=client,
        model=settings.effective_sentiment_model,
        timeout=settings.sentiment_timeout,
        conversation_backend=settings.conversation_backend,
    )
    chat = ChatService(
        store,
        backend,
        profiles=Profiles(store, profiles),
        model=settings.openai_model,
        vision_model=settings.openai_vision_model,
        draft_interval=settings.draft_interval,
        sentiment=sentiment,
        daily_limit=settings.daily_message_limit,
        exempt=settings.is_admin,
        gate=ProgressGate(settings.progress_max_in_flight, settings.progress_shed_lag),
        served=LocalHistory(serve_client or client, store, settings.local_history_tokens),
        max_answer_tokens=settings.max_answer_tokens,
        answer_deadline=settings.answer_deadline,
    )
    models = ModelRouter(store, chat, client, serve_client)
    # A model chosen with /model (or "use this model") outlives restarts.
    await models.restore()
    limits = ImageLimits(max_side=settings.image_max_side, max_bytes=settings.image_max_bytes)
    openai_trainer = OpenAITrainer(client, epochs=settings.fine_tune_epochs)
    trainer: Trainer = openai_trainer
    earlier: list[Trainer] = []
    if settings.fine_tune_base_url:
        trainer_client = make_openai_client(
            settings, settings.fine_tune_base_url, settings.fine_tune_api_key
        )
        extra.append(trainer_client)
        trainer = SelfHostedTrainer(trainer_client, epochs=settings.fine_tune_epochs)
        earlier.append(openai_trainer)  # jobs started on OpenAI are still followed
    finetune = FineTuner(
        store,
        trainer,
        earlier=earlier,
        db_path=settings.database_path,
        datasets_dir=settings.database_path.parent / "datasets",
        base_model=settings.fine_tune_base_model,
        suffix=settings.fine_tune_suffix,
        epochs=settings.fine_tune_epochs,
    )
    return Services(
        settings=settings,
        store=store,
        openai=client,
        backend=backend,
        chat=chat,
        photos=PhotoService(chat, limits),
        albums=albums,
        finetune=finetune,
        models=models,
        forgetting=Forgetting(store, client, finetune),
        clients=extra,
    )


async def set_command_menus(bot: Bot, admins: frozenset[int]) -> None:
    """Commands in Telegram's menu: everyone's, per language; admins' only in their chats."""
    for lang in LANGUAGES:
        code = "" if lang == DEFAULT_LANGUAGE else lang  # "" = every other language
        await bot.set_my_commands(
            [BotCommand(c, d) for c, d in command_descriptions(lang)],
            scope=BotCommandScopeDefault(),
            language_code=code or None,
        )
        for admin_id in admins:
            try:
                await bot.set_my_commands(
                    [BotCommand(c, d) for c, d in command_descriptions(lang, admin=True)],
                    scope=BotCommandScopeChat(admin_id),
                    language_code=code or None,
                )
            except TelegramError as exc:
                # e.g. an admin who never started the bot: their chat doesn't exist yet.
                log.warning("no admin menu for %s: %s", admin_id, type(exc).__name__)


def build_application(settings: Settings, *, openai_client: AsyncOpenAI | None = None) -> ParleyApp:
    """Build the bot: nothing connects until the application is initialised and started."""
    # Opt in to PTB 23's durations (timedelta) now: PTB 22 otherwise warns on every 429.
    os.environ.setdefault("PTB_TIMEDELTA", "1")

    albums = Albums(settings.album_wait)

    async def post_init(app: ParleyApp) -> None:
        services = app.bot_data.services = await start_services(settings, albums, openai_client)
        inbox = slot.inbox = Inbox(services.store, max_attempts=settings.max_update_attempts)
        processor.attach(inbox)
        # Updates a crash left unhandled go first, before anything new is fetched.
        for update in await inbox.replay(bot):
            await app.update_queue.put(update)

        async def notify(record: JobRecord, info: JobInfo) -> None:
            lang = await services.store.get_setting(admin.notice_language_key(record.started_by))
            text, keyboard = admin.job_notice(record, info, lang)
            await app.bot.send_message(record.started_by, text, reply_markup=keyboard)

        await set_command_menus(app.bot, settings.admin_user_ids)
        # Following fine-tuning jobs resumes after a restart: unfinished ones are in the db.
        services.background.append(
            asyncio.create_task(services.finetune.run(notify, settings.job_poll_interval))
        )
        if settings.progress_shed_lag > 0:
            services.background.append(asyncio.create_task(services.chat.gate.watch_lag()))
        log.info(
            "Parley started: backend=%s model=%s database=%s",
            settings.conversation_backend,
            services.models.current,
            settings.database_path,
        )

    async def post_stop(app: ParleyApp) -> None:
        services = app.bot_data.services
        if services is not None:
            for task in services.background:
                task.cancel()
            await asyncio.gather(*services.background, return_exceptions=True)
            services.background.clear()

    async def post_shutdown(app: ParleyApp) -> None:
        services = app.bot_data.services
        if services is not None:
            app.bot_data.services = None
            await services.store.close()
            if openai_client is None:  # a client passed in belongs to the caller
                await services.openai.close()
            for client in services.clients:
                await client.close()

    api = settings.telegram_api_url
    slot = InboxSlot()
    bot = DurableBot(
        settings.telegram_bot_token.get_secret_value(),
        slot=slot,
        base_url=f"{api}/bot",
        base_file_url=f"{api}/file/bot",
        # At Telegram's ~30 requests a second, 32 connections carry answers that take up to
        # 1 s each (bot/telegram_http.py).
        request=AiohttpRequest(connection_pool_size=32, pool_timeout=30.0),
        get_updates_request=AiohttpRequest(
            connection_pool_size=1, pool_timeout=1.0, finish_sent=False
        ),
        rate_limiter=AIORateLimiter(
            overall_max_rate=settings.telegram_max_rate,
            group_max_rate=settings.telegram_group_rate,
            max_retries=settings.telegram_max_retries,
        ),
    )
    processor = ChatOrderedUpdateProcessor(settings.max_concurrent_updates, albums)
    app: ParleyApp = (
        ApplicationBuilder()
        .bot(bot)
        .context_types(PTBContextTypes(context=CustomContext, bot_data=BotData))
        .concurrent_updates(processor)
        .post_init(post_init)
        .post_stop(post_stop)
        .post_shutdown(post_shutdown)
        .build()
    )

    access.register(app)
    commands.register(app)
    admin.register(app)
    assistant.register(app)
    forget.register(app)
    feedback.register(app)
    chat.register(app, settings.group_trigger)
    photos.register(app, settings.group_trigger)
    fallback.register(app)
    errors.register(app)
    return app
