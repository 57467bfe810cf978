"""`python -m bot check`: validate the configuration as the bot does at start, reach
Telegram and the model endpoints, look at the database (without creating or changing it);
one line per check, exit 0 or 1."""

from __future__ import annotations

import asyncio
from pathlib import Path

from telegram import Bot
from telegram.error import InvalidToken, TelegramError
from telegram.request import HTTPXRequest

from bot.errors import classify_model_error
from bot.settings import ConfigError, Settings, load_settings, validate
from bot.startup import (
    Endpoint,
    key_of,
    list_models,
    model_endpoints,
    problem_words,
    redact,
    unreachable,
)
from storage.db import inspect

Result = tuple[bool, str]

OPENAI_API = "https://api.openai.com/v1"  # where the OpenAI client goes without a base URL


async def _telegram(settings: Settings) -> Result:
    api = settings.telegram_api_url
    request = HTTPXRequest(connect_timeout=10, read_timeout=10)
    bot = Bot(
        settings.telegram_bot_token.get_secret_value(),
        base_url=f"{api}/bot",
        base_file_url=f"{api}/file/bot",
        request=request,
        get_updates_request=HTTPXRequest(),
    )
    try:
        async with bot:
            return True, f"Telegram: reached {api} as @{bot.username}"
    except InvalidToken:
        return False, "Telegram: TELEGRAM_BOT_TOKEN was rejected (check it with @BotFather)"
    except TelegramError as exc:
        if unreachable(exc):
            return False, (
                f"Telegram: could not reach {api} ({exc.message}): check the network and"
                " TELEGRAM_API_URL"
            )
        return False, f"Telegram: {api} refused getMe ({exc.message})"


async def _endpoint(
    settings: Settings, endpoint: Endpoint, wanted: tuple[tuple[str, str], ...]
) -> list[Result]:
    """List an endpoint's models and say whether each (setting, model) in `wanted` is there."""
    at = endpoint.base_url or settings.openai_base_url or OPENAI_API
    if at == OPENAI_API and key_of(settings, endpoint) is None:  # nothing to ask OpenAI with
        return [(False, f"{endpoint.label}: not asked, {endpoint.key_var} is not set")]
    try:
        models = await list_models(settings, endpoint)
    except Exception as exc:
        kind = classify_model_error(exc).kind
        hint = {
            "auth": f"check {endpoint.key_var}",
            "not_found": f"check {endpoint.url_var}: is it the API's root, often ending in /v1?",
            "unreachable": f"check the network and {endpoint.url_var}",
            "timeout": f"check the network and {endpoint.url_var}",
        }.get(kind)
        said = f"{problem_words(kind)}{f' ({hint})' if hint else ''}"
        return [(False, f"{endpoint.label}: could not list models at {at}: {said}")]
    results: list[Result] = [(True, f"{endpoint.label}: reached {at}, {len(models)} models")]
    for name, model in wanted:
        ok = model in models
        results.append((ok, f"{name} {model} is {'available' if ok else 'not available there'}"))
    return results


async def _models(settings: Settings) -> list[Result]:
    """The chat endpoint (with the chat and vision models), the trainer (with
    FINE_TUNE_BASE_MODEL among its base models), the serving endpoint and the evaluation's
    judge (with EVAL_JUDGE_MODEL), as configured."""
    wanted = {
        "OpenAI": (("OPENAI_MODEL", settings.openai_model),
                   ("OPENAI_VISION_MODEL", settings.vision_model)),
        "Trainer": (("FINE_TUNE_BASE_MODEL", settings.fine_tune_base_model),),
        "Evaluation": (("EVAL_JUDGE_MODEL", settings.eval_judge_model),),
    }  # fmt: skip
    reports = await asyncio.gather(
        *(_endpoint(settings, e, wanted.get(e.label, ())) for e in model_endpoints(settings))
    )
    return [result for report in reports for result in report]


async def _database(settings: Settings) -> Result:
    """Whether the bot can open its database, without creating or changing it."""
    if settings.postgres:
        return await inspect_postgres(settings)
    return await asyncio.to_thread(inspect_database, settings.database_path)


async def inspect_postgres(settings: Settings) -> Result:
    """Connect to the PostgreSQL database and read its schema version; change nothing."""
    name = settings.database_name
    try:
        from storage.pg.db import inspect as inspect_pg
    except ImportError:
        return False, (
            f"Database: {name} is PostgreSQL, but its driver is not installed"
            ' (pip install "parley[postgres]")'
        )
    state = await inspect_pg(settings.database_url)
    if state.problem == "unreachable":
        detail = redact(state.detail, settings)
        return False, f"Database: cannot connect to {name} ({detail}): check DATABASE_URL"
    if state.problem == "unreadable":
        return False, f"Database: {name} cannot be read ({redact(state.detail, settings)})"
    if state.problem == "foreign":
        return False, (
            f"Database: {name} holds tables that are not Parley's: give Parley a database"
            " (or schema) of its own"
        )
    if state.problem == "newer":
        return False, (
            f"Database: {name} has schema {state.version}, newer than this version of Parley"
            f" knows ({state.latest})"
        )
    if not state.exists:
        return True, f"Database: {name} is empty; the bot creates its tables when it starts"
    pending = f", {state.pending} migrations to apply at start" if state.pending else ""
    return True, f"Database: {name} (schema {state.version}{pending})"


def inspect_database(path: Path) -> Result:
    """Look at the database read-only: its schema, or whether it can be created."""
    state = inspect(path)
    if state.problem == "cannot_create":
        return False, (
            f"Database: cannot create {path}: {state.detail} is not a folder this user may"
            " write to (check DATABASE_URL)"
        )
    if not state.exists:
        return True, f"Database: {path} does not exist yet; the bot creates it when it starts"
    if state.problem == "not_a_file":
        return False, f"Database: {path} is not a file (check DATABASE_URL)"
    if state.problem == "not_writable":
        return False, f"Database: {path} or its folder is not writable by this user"
    if state.problem == "unreadable":
        return False, f"Database: {path} cannot be read ({state.detail})"
    if state.problem == "foreign":
        return False, f"Database: {path} is not a Parley database (check DATABASE_URL)"
    if state.problem == "newer":
        return False, (
            f"Database: {path} has schema {state.version}, newer than this version of Parley"
            f" knows ({state.latest})"
        )
    pending = f", {state.pending} migrations to apply at start" if state.pending else ""
    return True, f"Database: {path} (schema {state.version}{pending})"


async def run_checks(settings: Settings) -> list[Result]:
    """Every check, the configuration first; the same validation the bot runs at start."""
    try:
        validate(settings)
    except ConfigError as exc:
        config: Result = (False, f"Configuration: {exc.for_a_deployer()}")
    else:
        backend = f"backend {settings.conversation_backend}, model {settings.openai_model}"
        config = (True, f"Configuration: valid ({backend})")
    telegram, models, database = await asyncio.gather(
        _telegram(settings), _models(settings), _database(settings)
    )
    return [config, telegram, *models, database]


def main() -> int:
    """Print one line per check; 0 if everything is fine, 1 otherwise."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"✗ Configuration: {exc.for_a_deployer()}")
        return 1
    results = asyncio.run(run_checks(settings))
    for ok, line in results:
        print(f"{'✓' if ok else '✗'} {redact(line, settings)}")
    return 0 if all(ok for ok, _ in results) else 1
