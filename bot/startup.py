"""Start-up: every way a start can fail turned into one line that says what failed and what
to check, and the model-endpoint probe that `python -m bot` and `python -m bot check` share.

A configuration the bot refuses is a `ConfigError` from bot.settings (`load_settings`, then
`validate`, which `check` runs too): exit 2, nothing is contacted. A start that fails on the
way (Telegram refuses the token or can't be reached, the database can't be opened, a model
endpoint refuses its key, the webhook port is taken) is a `StartupError` or one of PTB's
errors, said in one line by `describe` (exit 1) once everything opened so far is closed
again. No line holds a token or a key.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

from pydantic import SecretStr
from telegram.error import NetworkError

from bot.errors import ParleyError, classify_model_error
from bot.settings import Settings

if TYPE_CHECKING:
    from bot.context import ParleyApp
    from storage.interface import Store

log = logging.getLogger(__name__)

# How long the start-up probe of a model endpoint may take; unanswered, the bot starts anyway.
PROBE_TIMEOUT = 10.0
_MAX_DETAIL = 200  # characters of a server's or library's own message kept in a line


class StartupError(ParleyError):
    """The bot cannot start; `line` says what failed and what to check (no secrets in it)."""

    def __init__(self, kind: str, line: str) -> None:
        super().__init__(kind, line)
        self.line = line

    def __str__(self) -> str:
        return self.line


def redact(text: str, settings: Settings) -> str:
    """`text` on one line, shortened, with every secret of `settings` blanked out (as the
    log filter does: URL-encoded forms and a token's secret half included)."""
    from bot.logs import RedactSecrets

    text = " ".join(RedactSecrets(settings.secrets()).redact(text).split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def describe(exc: BaseException, settings: Settings) -> str:
    """One line for whatever stopped the bot: what failed and what to check."""
    from telegram.error import InvalidToken, TelegramError

    if isinstance(exc, StartupError):
        return exc.line
    if isinstance(exc, InvalidToken):
        # PTB's own message quotes the token: never shown.
        return (
            "Telegram refused TELEGRAM_BOT_TOKEN (mistyped, or revoked with @BotFather?):"
            " copy the current token from @BotFather"
        )
    if unreachable(exc):
        return (
            f"cannot reach Telegram at {settings.telegram_api_url}"
            f" ({redact(exc.message, settings)}): check the network and TELEGRAM_API_URL"
        )
    if isinstance(exc, TelegramError):
        return f"Telegram refused a request: {redact(exc.message, settings)}"
    detail = redact(str(exc), settings)
    return (
        f"start-up failed: {type(exc).__name__}{f': {detail}' if detail else ''}"
        " (LOG_LEVEL=DEBUG logs where)"
    )


def unreachable(exc: BaseException) -> TypeGuard[NetworkError]:
    """Whether a Bot API call failed because Telegram could not be reached (or timed out).

    PTB's BadRequest is a NetworkError too, but Telegram was reached: it refused the request.
    """
    from telegram.error import BadRequest

    return isinstance(exc, NetworkError) and not isinstance(exc, BadRequest)


async def initialize(app: ParleyApp) -> None:
    """`app.initialize()` (the Bot API's getMe), leaving nothing open if it fails."""
    try:
        await app.initialize()
    except BaseException:
        # The bot's HTTP sessions are open by the time getMe fails, but PTB's
        # Application.shutdown does nothing for an application that never finished
        # initialising: shut the bot down here.
        await app.bot.shutdown()
        raise


async def open_store(settings: Settings) -> Store:
    """The database DATABASE_URL names, or a StartupError saying why it can't be opened."""
    if settings.postgres:
        return await _open_postgres(settings)
    from storage.db import DatabaseError
    from storage.db import Store as SqliteStore

    path = settings.database_path
    try:
        return await SqliteStore.open(path)
    except (OSError, DatabaseError) as exc:
        reason = str(exc)
        if isinstance(exc, OSError) and exc.strerror:  # e.g. "File exists: data"
            reason = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        raise StartupError(
            "database",
            f"cannot open the database {path} ({reason}): check DATABASE_URL, and that"
            f" this user may write to {path.parent}",
        ) from exc


async def _open_postgres(settings: Settings) -> Store:
    try:
        from storage.pg.db import DatabaseError, PgStore
    except ImportError as exc:
        raise StartupError(
            "database",
            "DATABASE_URL names a PostgreSQL database, but its driver is not installed:"
            ' pip install "parley[postgres]"',
        ) from exc
    try:
        return await PgStore.open(settings.database_url)
    except (OSError, DatabaseError) as exc:
        reason = redact((str(exc).strip().splitlines() or [type(exc).__name__])[0], settings)
        raise StartupError(
            "database",
            f"cannot use the database {settings.database_name} ({reason}): check DATABASE_URL,"
            " and that the server runs and this user may create tables there",
        ) from exc


@dataclass(frozen=True)
class Endpoint:
    """A model endpoint the bot uses: the chat API, and optionally a trainer, a server and
    the evaluation's judge."""

    label: str
    base_url: str | None  # None: the chat endpoint (OPENAI_BASE_URL, else OpenAI)
    key: SecretStr | None
    key_var: str
    url_var: str


def model_endpoints(settings: Settings) -> list[Endpoint]:
    """Every model endpoint the configuration names, the chat endpoint first."""
    endpoints = [Endpoint("OpenAI", None, None, "OPENAI_API_KEY", "OPENAI_BASE_URL")]
    if settings.fine_tune_base_url:
        endpoints.append(
            Endpoint(
                "Trainer",
                settings.fine_tune_base_url,
                settings.fine_tune_api_key,
                "FINE_TUNE_API_KEY",
                "FINE_TUNE_BASE_URL",
            )
        )
    if settings.serve_base_url:
        endpoints.append(
            Endpoint(
                "Serving",
                settings.serve_base_url,
                settings.serve_api_key,
                "SERVE_API_KEY",
                "SERVE_BASE_URL",
            )
        )
    if settings.eval_base_url:  # the judge of evaluations; unset, it is the chat endpoint
        endpoints.append(
            Endpoint(
                "Evaluation",
                settings.eval_base_url,
                settings.eval_api_key,
                "EVAL_API_KEY",
                "EVAL_BASE_URL",
            )
        )
    return endpoints


def where(settings: Settings, endpoint: Endpoint) -> str:
    return endpoint.base_url or settings.openai_base_url or "OpenAI"


def key_of(settings: Settings, endpoint: Endpoint) -> SecretStr | None:
    return settings.openai_api_key if endpoint.base_url is None else endpoint.key


async def list_models(settings: Settings, endpoint: Endpoint, *, retries: bool = True) -> set[str]:
    """The ids of the models `endpoint` lists (the OpenAI client's errors propagate)."""
    from bot.app import make_openai_client

    client = make_openai_client(settings, endpoint.base_url, endpoint.key)
    try:
        if not retries:
            client = client.with_options(max_retries=0)  # shares the transport closed below
        page = await client.models.list(timeout=min(settings.openai_timeout, PROBE_TIMEOUT))
        return {m.id for m in page.data}
    finally:
        await client.close()


def problem_words(kind: str) -> str:
    """A ModelError kind in words ("unreachable" -> "could not connect"), in English."""
    from bot.texts import known, t

    return t(f"problem.{kind}") if known(f"problem.{kind}") else t("problem.unknown")


async def check_model_keys(settings: Settings) -> list[str]:
    """One cheap call (models.list) to each model endpoint: a refused key stops the start.

    Anything else (the endpoint down, no models route) is returned as a line to log, and
    the bot starts: it answers "unavailable" until the endpoint is back, as it would if it
    went down later. The caller logs those lines once Telegram has answered, so that a
    start that fails there (offline, say) is still one line.
    """

    async def probe(endpoint: Endpoint) -> StartupError | str | None:
        try:
            await list_models(settings, endpoint, retries=False)
        except Exception as exc:
            kind = classify_model_error(exc).kind
            if kind == "auth":
                status = getattr(exc, "status_code", None)
                refused = (
                    f"refused {endpoint.key_var}"
                    if key_of(settings, endpoint) is not None
                    else f"wants a key: set {endpoint.key_var}"
                )
                return StartupError(
                    "model_key",
                    f"the model API at {where(settings, endpoint)} {refused}"
                    f"{f' (HTTP {status})' if status else ''}: check the key, and"
                    f" {endpoint.url_var}",
                )
            if kind != "not_found":  # a server without a models route is fine
                return (
                    f"{endpoint.label}: could not list models at {where(settings, endpoint)}"
                    f" ({problem_words(kind)}); starting anyway"
                )
        return None

    results = await asyncio.gather(*(probe(e) for e in model_endpoints(settings)))
    for result in results:
        if isinstance(result, StartupError):
            raise result
    return [result for result in results if isinstance(result, str)]


def log_started(app: ParleyApp, settings: Settings) -> None:
    """The line that says the bot is up: logged once it has started, not before."""
    services = app.bot_data.services
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    log.info(
        "Parley started: backend=%s model=%s database=%s, event loop: %s",
        settings.conversation_backend,
        services.models.current if services else settings.openai_model,
        settings.database_name,
        loop,
    )
