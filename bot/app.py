"""The application factory: builds the PTB Application and its services from Settings."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

from openai import AsyncOpenAI, DefaultAioHttpClient
from pydantic import SecretStr
from telegram import Bot, BotCommand, BotCommandScopeChat, BotCommandScopeDefault, Update
from telegram.error import TelegramError
from telegram.ext import AIORateLimiter, ApplicationBuilder
from telegram.ext import ContextTypes as PTBContextTypes

from bot.concurrency import ChatOrderedUpdateProcessor
from bot.context import BotData, CustomContext, ParleyApp, Services
from bot.domain import EvalRun, JobRecord
from bot.durability import DurableBot, Inbox, InboxSlot
from bot.health import keep_heartbeat
from bot.ratelimit import SharedRateLimiter
from bot.replicas import Replica
from bot.services.albums import Albums
from bot.services.alerts import AdminAlerts
from bot.services.canary import Canary
from bot.services.chat import CHAT_ROUTE, SERVE_ROUTE, ChatService
from bot.services.conversations import ConversationBackend, LocalHistory, OpenAIConversations
from bot.services.documents import DocumentLimits, DocumentService
from bot.services.evaluation import ChatJudge, Evaluation, Replayer, ResponsesJudge
from bot.services.feedback import Feedback
from bot.services.finetune import FineTuner
from bot.services.forgetting import Forgetting
from bot.services.held import HeldDatasets, MemoryHeldDatasets, StoredHeldDatasets
from bot.services.images import ImageLimits
from bot.services.models import ModelRouter
from bot.services.names import Names
from bot.services.photos import PhotoService
from bot.services.priority import Background
from bot.services.profiles import Profile, Profiles, load_profiles
from bot.services.replies import ProgressGate, RichMessages
from bot.services.sentiment import build_analyzer
from bot.services.trainer import JobInfo, OpenAITrainer, SelfHostedTrainer, Trainer
from bot.services.voice import Transcriber, VoiceService
from bot.settings import Settings
from bot.startup import StartupError, open_store
from bot.telegram_http import AiohttpRequest
from bot.texts import DEFAULT_LANGUAGE, LANGUAGES, command_descriptions
from handlers import (
    access,
    admin,
    assistant,
    chat,
    commands,
    documents,
    errors,
    evaluation,
    fallback,
    feedback,
    forget,
    photos,
    voice,
)
from storage.interface import Store

if TYPE_CHECKING:
    from storage.pg.db import PgStore

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
    profiles = load_profiles(
        settings.profiles_file, settings.assistant_instructions, settings.conversation_backend
    )
    store = await open_store(settings)
    try:
        return await _build_services(settings, albums, store, profiles, openai_client)
    except BaseException:
        await store.close()  # the clients made on the way have made no connection yet
        raise


async def _build_services(
    settings: Settings,
    albums: Albums,
    store: Store,
    profiles: dict[str, Profile],
    openai_client: AsyncOpenAI | None,
) -> Services:
    client = openai_client or make_openai_client(settings)
    # Clients of one's own trainer and serving endpoint; unset, the chat endpoint does both.
    extra: list[AsyncOpenAI] = []
    serve_client = None
    if settings.serve_base_url:
        serve_client = make_openai_client(settings, settings.serve_base_url, settings.serve_api_key)
        extra.append(serve_client)
    backend: ConversationBackend
    if settings.conversation_backend == "openai":
        backend = OpenAIConversations(client, store.threads, settings.local_history_tokens)
    else:
        backend = LocalHistory(client, store.threads, settings.local_history_tokens)
    sentiment = build_analyzer(
        settings.sentiment_backend,
        client=client,
        model=settings.effective_sentiment_model,
        timeout=settings.sentiment_timeout,
        conversation_backend=settings.conversation_backend,
    )
    alerts = AdminAlerts(store.settings, settings.admin_user_ids)
    chat = ChatService(
        store.threads,
        store.stats,
        backend,
        profiles=Profiles(store.settings, profiles),
        model=settings.openai_model,
        vision_model=settings.openai_vision_model,
        draft_interval=settings.draft_interval,
        sentiment=sentiment,
        daily_limit=settings.daily_message_limit,
        exempt=settings.is_admin,
        gate=ProgressGate(settings.progress_max_in_flight, settings.progress_shed_lag),
        served=LocalHistory(serve_client or client, store.threads, settings.local_history_tokens),
        max_answer_tokens=settings.max_answer_tokens,
        answer_deadline=settings.answer_deadline,
        rich=RichMessages(settings.rich_messages),
        alerts=alerts,
    )
    models = ModelRouter(store.settings, chat, client, serve_client)
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
    # Built datasets wait for their admin's "start": in memory, or with PostgreSQL in the
    # database, where any replica may get the press.
    held: HeldDatasets = MemoryHeldDatasets()
    if settings.postgres:
        held = StoredHeldDatasets(_shared_store(store).held, settings.datasets_dir)
    finetune = FineTuner(
        store.jobs,
        trainer,
        dataset=store.dataset,
        earlier=earlier,
        datasets_dir=settings.datasets_dir,
        base_model=settings.fine_tune_base_model,
        suffix=settings.fine_tune_suffix,
        epochs=settings.fine_tune_epochs,
        held=held,
    )
    evaluator, canary = await _evaluation(
        settings, store, chat, models, finetune, client, serve_client, extra
    )
    return Services(
        settings=settings,
        store=store,
        openai=client,
        backend=backend,
        chat=chat,
        photos=PhotoService(chat, limits),
        documents=DocumentService(
            chat,
            DocumentLimits(
                max_bytes=settings.document_max_bytes,
                max_pages=settings.document_max_pages,
                max_chars=settings.document_max_chars,
                max_tokens=settings.document_max_tokens,
                parse_seconds=settings.document_parse_seconds,
                parse_memory_mb=settings.document_parse_memory_mb,
            ),
        ),
        voice=VoiceService(
            chat,
            Transcriber(
                client,
                settings.transcribe_model,
                max_bytes=settings.voice_max_bytes,
                max_seconds=settings.voice_max_seconds,
            ),
        ),
        albums=albums,
        finetune=finetune,
        models=models,
        alerts=alerts,
        names=Names(),
        feedback=Feedback(store.stats),
        forgetting=Forgetting(store.forget, store.checkpoint, client, finetune),
        evaluation=evaluator,
        canary=canary,
        clients=extra,
    )


def _shared_store(store: Store) -> PgStore:
    """The PostgreSQL store, with what only it has (replicas' leases, locks, shared limits)."""
    from storage.pg.db import PgStore  # an install extra: imported only when used

    assert isinstance(store, PgStore)
    return store


async def _evaluation(
    settings: Settings,
    store: Store,
    chat: ChatService,
    models: ModelRouter,
    finetune: FineTuner,
    client: AsyncOpenAI,
    serve_client: AsyncOpenAI | None,
    extra: list[AsyncOpenAI],
) -> tuple[Evaluation, Canary]:
    """The evaluation of fine-tuned models (test splits, replays, the judge) and the canary."""
    judge_client, on_openai = client, settings.conversation_backend == "openai"
    if settings.eval_base_url:
        judge_client = make_openai_client(settings, settings.eval_base_url, settings.eval_api_key)
        extra.append(judge_client)
        on_openai = "api.openai.com" in settings.eval_base_url
    # The Responses API with a json_schema text format on OpenAI (and servers that copy
    # it, as the openai backend needs); Chat Completions' response_format elsewhere.
    judge_kind = ResponsesJudge if on_openai else ChatJudge
    evals = store.evals
    replayer = Replayer(
        {CHAT_ROUTE: client, SERVE_ROUTE: serve_client or client},
        responses_on_chat=settings.conversation_backend == "openai",
        max_tokens=settings.max_answer_tokens,
    )
    evaluator = Evaluation(
        evals,
        models,
        replayer,
        judge_kind(judge_client, settings.eval_judge_model, settings.openai_timeout),
        Background(chat.users, settings.eval_concurrency, settings.eval_yield_seconds),
    )
    finetune.test_split = (settings.eval_test_share, settings.eval_test_max, settings.eval_test_min)
    finetune.keep_test_split = evaluator.keep_test_split
    finetune.forget_test_split = evals.forget_items
    canary = Canary(store.settings, evals, models)
    await canary.restore()  # a canary in force outlives restarts
    chat.canary = canary.pick
    return evaluator, canary


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
        shared = _shared_store(services.store) if settings.postgres else None
        leads: Callable[[], Awaitable[bool]] | None = None
        resume = True
        if shared is not None:
            # PostgreSQL: other processes may share the database (bot/replicas.py).
            assert isinstance(limiter, SharedRateLimiter)
            limiter.attach(shared.rates)
            if settings.webhook_url is None and not await shared.locks.acquire("polling"):
                raise StartupError(
                    "polling",
                    "another Parley process is already polling Telegram with this database:"
                    " stop it, or run several replicas with a webhook (WEBHOOK_URL)",
                )
            leads = partial(shared.locks.acquire, "jobs")  # one process follows jobs
            resume = await leads()
        if shared is not None and settings.webhook_url is not None:
            replica = services.replica = Replica(
                shared.inbox,
                bot,
                lambda u: processor.process_update(u, app.process_update(u)),
                albums=albums,
                album_wait=settings.album_wait,
                before=services.follow_shared_settings,
                tried=inbox.remember,
            )
            slot.deliver = replica.deliver
            await inbox.purge()
            services.background.append(asyncio.create_task(replica.run()))
        else:
            # Updates a crash left unhandled go first, before anything new is fetched.
            for update in await inbox.replay(bot):
                await app.update_queue.put(update)

        async def notify(record: JobRecord, info: JobInfo) -> int | None:
            lang = await services.alerts.language_of(record.started_by)
            # A success starts the evaluation of the new model (once), said in its notice.
            run = await services.evaluation.on_success(record, info)
            testing = evaluation.running_note(run, lang) if run is not None else None
            return await admin.tell_job_status(app.bot, record, info, lang, testing)

        async def report(run: EvalRun) -> None:
            await evaluation.send_report(app.bot, services, run)

        await set_command_menus(app.bot, settings.admin_user_ids)
        # Following fine-tuning jobs resumes after a restart: unfinished ones are in the db.
        services.background.append(
            asyncio.create_task(services.finetune.run(notify, settings.job_poll_interval, leads))
        )
        # Evaluations under way when the bot stopped resume where they were.
        services.background.append(
            asyncio.create_task(services.evaluation.run(report, resume=resume))
        )
        if settings.progress_shed_lag > 0:
            services.background.append(asyncio.create_task(services.chat.gate.watch_lag()))
        if settings.heartbeat_file is not None:  # the container's liveness (bot/health.py)
            services.background.append(
                asyncio.create_task(keep_heartbeat(app, settings.heartbeat_file))
            )
        # "Parley started" is logged once polling or the webhook is up (bot/startup.py).

    async def post_stop(app: ParleyApp) -> None:
        services = app.bot_data.services
        if services is not None:
            if services.replica is not None:
                # Other replicas take its chats over now.
                await services.replica.stop(settings.shutdown_grace / 2)
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
    # Telegram's limits are the bot's, not a process's: with PostgreSQL, replicas share them
    # through the database (attached once it is open); one process keeps them in memory.
    limiter = (SharedRateLimiter if settings.postgres else AIORateLimiter)(
        overall_max_rate=settings.telegram_max_rate,
        group_max_rate=settings.telegram_group_rate,
        max_retries=settings.telegram_max_retries,
    )
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
        rate_limiter=limiter,
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
    evaluation.register(app)
    chat.register(app, settings.group_trigger)
    photos.register(app, settings.group_trigger, albums)
    documents.register(app, settings.group_trigger, albums)
    voice.register(app, settings.group_trigger, albums)
    fallback.register(app)
    errors.register(app)
    return app
