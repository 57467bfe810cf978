"""`python -m bot check`: validate the configuration and reach both APIs; report, exit 0 or 1."""

from __future__ import annotations

import asyncio

from pydantic import SecretStr
from telegram import Bot
from telegram.error import InvalidToken, TelegramError
from telegram.request import HTTPXRequest

from bot.errors import classify_model_error
from bot.settings import ConfigError, Settings, load_settings
from storage.db import Store

Result = tuple[bool, str]


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
        return False, f"Telegram: could not reach {api} ({type(exc).__name__})"


async def _endpoint(
    settings: Settings,
    label: str,
    base_url: str | None,
    key: SecretStr | None,
    key_var: str,
    wanted: tuple[tuple[str, str], ...],
) -> list[Result]:
    """List an endpoint's models and say whether each (setting, model) in `wanted` is there."""
    from bot.app import make_openai_client

    client = make_openai_client(settings, base_url, key)
    where = base_url or settings.openai_base_url or "OpenAI"
    try:
        models = {m.id for m in (await client.models.list(timeout=10)).data}
    except Exception as exc:
        kind = classify_model_error(exc).kind
        hint = f" (check {key_var})" if kind == "auth" else ""
        return [(False, f"{label}: could not list models at {where}: {kind}{hint}")]
    finally:
        await client.close()
    results: list[Result] = [(True, f"{label}: reached {where}, {len(models)} models")]
    for name, model in wanted:
        ok = model in models
        results.append((ok, f"{name} {model} is {'available' if ok else 'not available there'}"))
    return results


async def _openai(settings: Settings) -> list[Result]:
    wanted = (("OPENAI_MODEL", settings.openai_model),
              ("OPENAI_VISION_MODEL", settings.vision_model))  # fmt: skip
    return await _endpoint(settings, "OpenAI", None, None, "OPENAI_API_KEY", wanted)


async def _own_endpoints(settings: Settings) -> list[Result]:
    """The trainer (with FINE_TUNE_BASE_MODEL among its base models) and the serving endpoint."""
    results: list[Result] = []
    if settings.fine_tune_base_url:
        results += await _endpoint(
            settings,
            "Trainer",
            settings.fine_tune_base_url,
            settings.fine_tune_api_key,
            "FINE_TUNE_API_KEY",
            (("FINE_TUNE_BASE_MODEL", settings.fine_tune_base_model),),
        )
    if settings.serve_base_url:
        results += await _endpoint(
            settings,
            "Serving",
            settings.serve_base_url,
            settings.serve_api_key,
            "SERVE_API_KEY",
            (),
        )
    return results


async def _database(settings: Settings) -> Result:
    try:
        store = await Store.open(settings.database_path)
    except Exception as exc:
        return False, f"Database: cannot open {settings.database_path} ({type(exc).__name__})"
    try:
        version = await store.schema_version()
    finally:
        await store.close()
    return True, f"Database: {settings.database_path} (schema {version})"


async def run_checks(settings: Settings) -> list[Result]:
    telegram, openai, own, database = await asyncio.gather(
        _telegram(settings), _openai(settings), _own_endpoints(settings), _database(settings)
    )
    backend = f"backend {settings.conversation_backend}, model {settings.openai_model}"
    return [(True, f"Configuration: valid ({backend})"), telegram, *openai, *own, database]


def main() -> int:
    """Print one line per check; 0 if everything is fine, 1 otherwise."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"✗ Configuration: {exc}")
        return 1
    results = asyncio.run(run_checks(settings))
    for ok, line in results:
        print(f"{'✓' if ok else '✗'} {line}")
    return 0 if all(ok for ok, _ in results) else 1
