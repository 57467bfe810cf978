"""Parley's configuration: one typed settings object, read once from the environment or `.env`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# About four Telegram messages of text; with LOCAL_HISTORY_TOKENS' default it fits a 16k context.
DEFAULT_MAX_ANSWER_TOKENS = 4096
DEFAULT_ANSWER_DEADLINE = 180.0

DEFAULT_INSTRUCTIONS = (
    "You are Parley, a helpful assistant in a Telegram chat. Answer clearly and concisely, "
    "in the language the user writes in. Use short paragraphs; Markdown is fine."
)


class Settings(BaseSettings):
    """Every setting, named exactly as its environment variable (case-insensitive)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    telegram_bot_token: SecretStr
    telegram_api_url: str = "https://api.telegram.org"

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-5.4-mini"
    openai_timeout: float = Field(default=60.0, gt=0)
    openai_max_retries: int = Field(default=2, ge=0, le=10)
    # Every answer is bounded: at most MAX_ANSWER_TOKENS tokens (the model's output cap; the
    # bot also stops reading well past it should a server ignore the cap, and says so under
    # an answer that was cut), and done within ANSWER_DEADLINE seconds however slowly the
    # stream trickles (OPENAI_TIMEOUT bounds each read, not the whole answer).
    max_answer_tokens: int = Field(default=DEFAULT_MAX_ANSWER_TOKENS, ge=16, le=1_000_000)
    answer_deadline: float = Field(default=DEFAULT_ANSWER_DEADLINE, gt=0, le=3600)

    # Photos: the vision model (unset: the chat model), the longest side sent to it, how long
    # to wait for the rest of an album, and the largest file the bot downloads (unset: 20 MB,
    # Telegram's limit; 50 MB with a self-hosted Bot API server).
    openai_vision_model: str | None = None
    image_max_side: int = Field(default=2048, ge=256, le=8192)
    album_wait: float = Field(default=1.0, ge=0, le=10)
    image_max_mb: float | None = Field(default=None, gt=0, le=200)

    # Documents (PDFs; plain text, Markdown, CSV, JSON, source files): the largest file
    # downloaded (unset: Telegram's 20 MB; 50 MB with a self-hosted Bot API server), the most
    # pages a PDF and characters a text file may have, and the tokens of document text sent
    # to a model that reads text (the local backend; text files always), the rest cut with a
    # note. A PDF is read in a child process limited to DOCUMENT_PARSE_SECONDS (wall clock)
    # and DOCUMENT_PARSE_MEMORY_MB (address space).
    document_max_mb: float | None = Field(default=None, gt=0, le=200)
    document_max_pages: int = Field(default=100, ge=1, le=10_000)
    document_max_chars: int = Field(default=2_000_000, ge=1_000)
    document_max_tokens: int = Field(default=8_000, ge=100)
    document_parse_seconds: float = Field(default=30.0, gt=0, le=600)
    document_parse_memory_mb: int = Field(default=512, ge=128, le=65_536)

    # Voice notes, audio files and video notes: transcribed with TRANSCRIBE_MODEL through the
    # chat endpoint's /audio/transcriptions (a local server offering it works the same), then
    # answered as text. Longer recordings are refused before anything is downloaded.
    transcribe_model: str = "gpt-transcribe"
    voice_max_seconds: int = Field(default=600, ge=1, le=24 * 3600)

    assistant_instructions: str = DEFAULT_INSTRUCTIONS
    # Optional TOML file of assistant profiles (see bot/services/profiles.py).
    profiles_file: Path | None = None
    conversation_backend: Literal["openai", "local"] = "openai"
    # Budget for the history the local backend sends, in estimated tokens
    # (see bot/services/tokens.py).
    local_history_tokens: int = Field(default=12_000, ge=500)

    # Sentiment tags: "model" (structured output, lexicon fallback), "lexicon" (offline), "off".
    # Unset means "model": a model API is always configured.
    sentiment_backend: Literal["model", "lexicon", "off"] = "model"
    # A cheap classifier model; unset: gpt-5.4-nano on OpenAI, the chat model on other servers.
    sentiment_model: str | None = None
    sentiment_timeout: float = Field(default=3.0, gt=0, le=60)

    admin_user_ids: Annotated[frozenset[int], NoDecode] = frozenset()
    # Optional allow-lists: when either is set, only those users, or anyone in those chats,
    # may use the bot (admins always may). Others get a short refusal and cause no model call.
    allowed_user_ids: Annotated[frozenset[int], NoDecode] = frozenset()
    allowed_chat_ids: Annotated[frozenset[int], NoDecode] = frozenset()
    # Messages per user per day (UTC) answered by the model; 0 means no limit. Admins exempt.
    daily_message_limit: int = Field(default=0, ge=0)
    # In groups: answer only when mentioned, replied to or commanded ("mention"), or every
    # message the bot receives ("all"; with privacy mode on Telegram sends only those anyway).
    group_trigger: Literal["mention", "all"] = "mention"

    # Fine-tuning: the base model, how often unfinished jobs are checked, epochs, the suffix
    # OpenAI puts in the fine-tuned model's name.
    fine_tune_base_model: str = "gpt-4.1-mini-2025-04-14"
    job_poll_interval: float = Field(default=60.0, ge=0.05)
    fine_tune_epochs: int = Field(default=3, ge=1, le=50)
    fine_tune_suffix: str = Field(default="parley", pattern=r"^[a-zA-Z0-9_-]{1,40}$")
    # A trainer of one's own (parley-trainer, speaking OpenAI's fine-tuning API); unset: the
    # chat endpoint's fine-tuning API, as before. Jobs started elsewhere are still followed.
    fine_tune_base_url: str | None = None
    fine_tune_api_key: SecretStr | None = None
    # Where models trained there are served (vLLM, Ollama); unset: the chat endpoint. Chats
    # routed there keep their history in the bot (as with the local backend).
    serve_base_url: str | None = None
    serve_api_key: SecretStr | None = None
    # Evaluating a fine-tuned model before the switch (bot/services/evaluation.py): /train
    # keeps EVAL_TEST_SHARE of the conversations (the most recent, at most EVAL_TEST_MAX; none
    # below EVAL_TEST_MIN) out of training as a test split; a judge model compares the answers
    # of the model in use and the candidate. EVAL_BASE_URL/EVAL_API_KEY: any OpenAI-compatible
    # endpoint for the judge (unset: the chat endpoint). Its model calls and users' turns in
    # flight stay under EVAL_CONCURRENCY together (users' turns first; the evaluation takes
    # what is left); when users keep that full for EVAL_YIELD_SECONDS, the evaluation goes
    # on one call at a time, so a busy bot still finishes it.
    eval_judge_model: str = "gpt-5.4"
    eval_base_url: str | None = None
    eval_api_key: SecretStr | None = None
    eval_test_share: float = Field(default=0.1, ge=0, lt=1)
    eval_test_max: int = Field(default=200, ge=0, le=10_000)
    eval_test_min: int = Field(default=5, ge=1)
    eval_concurrency: int = Field(default=4, ge=1, le=64)
    eval_yield_seconds: float = Field(default=1.0, ge=0, le=600)

    # Webhook mode: with WEBHOOK_URL set (the public https URL Telegram should call), the bot
    # serves it on WEBHOOK_LISTEN:WEBHOOK_PORT instead of polling, with /healthz beside it.
    # WEBHOOK_SECRET is checked on every request; unset, a random one is made at each start.
    webhook_url: str | None = None
    webhook_listen: str = "0.0.0.0"
    webhook_port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port
    webhook_secret: SecretStr | None = None
    # Liveness for containers (bot/health.py): while the bot runs and its storage takes
    # updates, it touches this file every few seconds; `python -m bot.health` checks its age.
    heartbeat_file: Path | None = None

    # sqlite:///path (the default: one process, embedded) or postgresql://user@host/db (one
    # process, or several replicas with a webhook). With PostgreSQL, DATA_DIR holds the
    # datasets /train builds (with SQLite they go beside the database file).
    database_url: str = "sqlite:///data/parley.sqlite3"
    data_dir: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # Streaming: minimum seconds between two draft updates of one reply (Telegram throttles edits).
    draft_interval: float = Field(default=0.8, ge=0.05)
    # Answers with a table or a formula go out as rich messages (Bot API 10.1) unless off;
    # Telegram refusing them also turns them off for an hour (see replies.RichMessages).
    rich_messages: bool = True
    # Drafts and "typing..." are skipped while this many are already under way, or while the
    # event loop runs more than PROGRESS_SHED_LAG seconds late (0: never for lag): replies first.
    # PROGRESS_MAX_IN_FLIGHT=0 turns progress off altogether.
    progress_max_in_flight: int = Field(default=16, ge=0)
    progress_shed_lag: float = Field(default=0.1, ge=0)
    # Outgoing Telegram rate limits for the bot as a whole (bot/ratelimit.py with PostgreSQL,
    # PTB's AIORateLimiter otherwise); 429s are retried regardless.
    # 0 turns a limit off, e.g. for a self-hosted Bot API server or a benchmark.
    telegram_max_rate: float = Field(default=30.0, ge=0)  # requests per second, whole bot
    telegram_group_rate: float = Field(default=20.0, ge=0)  # messages per minute per group
    telegram_max_retries: int = Field(default=3, ge=0, le=10)
    # How many updates may be processed at once across all chats (one per chat at a time).
    max_concurrent_updates: int = Field(default=4096, ge=1)
    # "auto": uvloop where it is installed (Linux, macOS), else asyncio's own loop.
    event_loop: Literal["auto", "asyncio"] = "auto"
    # An update whose handling started this many times without finishing (the bot crashed
    # on it, or a stop cut it off) is set aside instead of being replayed again.
    max_update_attempts: int = Field(default=3, ge=1, le=100)
    # On SIGTERM: replies in flight get this long to finish (the rest stay in the inbox for
    # the next start); the process exits within it whatever state storage is in.
    shutdown_grace: float = Field(default=8.0, ge=1, le=600)

    @field_validator("admin_user_ids", "allowed_user_ids", "allowed_chat_ids", mode="before")
    @classmethod
    def _parse_ids(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.replace(";", ",").split(",") if p.strip()]
            try:
                return frozenset(int(p) for p in parts)
            except ValueError:
                raise ValueError("must be comma-separated numeric Telegram ids") from None
        return value

    @field_validator("telegram_bot_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("is empty")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _secret_chars(cls, value: SecretStr | None) -> SecretStr | None:
        # Telegram's rule for secret_token: 1-256 characters A-Z, a-z, 0-9, _ and -.
        if value is not None and not re.fullmatch(
            r"[A-Za-z0-9_-]{1,256}", value.get_secret_value()
        ):
            raise ValueError("must be 1-256 characters of A-Z, a-z, 0-9, _ and -")
        return value

    @field_validator(
        "telegram_api_url",
        "openai_base_url",
        "fine_tune_base_url",
        "serve_base_url",
        "eval_base_url",
    )
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("fine_tune_base_url", "serve_base_url", "eval_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not re.match(r"https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL, e.g. http://gpu-box:8400/v1")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        if value.startswith(("postgresql://", "postgres://")):
            if not urlsplit(value).hostname and "host=" not in value:
                raise ValueError("must name the PostgreSQL server: postgresql://user@host/db")
            return value
        if not value.startswith("sqlite:///"):
            raise ValueError(
                "must look like sqlite:///relative/path, sqlite:////absolute/path or"
                " postgresql://user@host:5432/database"
            )
        if value.removeprefix("sqlite:///") in ("", ":memory:"):
            raise ValueError("must name a database file (the log must survive restarts)")
        return value

    @property
    def postgres(self) -> bool:
        """Whether DATABASE_URL names a PostgreSQL database (else a SQLite file)."""
        return self.database_url.startswith(("postgresql://", "postgres://"))

    @property
    def database_path(self) -> Path:
        """The SQLite file named by DATABASE_URL (`sqlite:///rel` or `sqlite:////abs`)."""
        return Path(self.database_url.removeprefix("sqlite:///"))

    @property
    def database_name(self) -> str:
        """The database as logs may show it: the file, or the server and database without
        user or password."""
        if not self.postgres:
            return str(self.database_path)
        parts = urlsplit(self.database_url)
        port = f":{parts.port}" if parts.port else ""
        return f"postgresql://{parts.hostname or ''}{port}{parts.path}"

    @property
    def datasets_dir(self) -> Path:
        """Where /train writes the datasets it builds."""
        if self.data_dir is not None:
            return self.data_dir / "datasets"
        return (Path("data") if self.postgres else self.database_path.parent) / "datasets"

    @property
    def vision_model(self) -> str:
        return self.openai_vision_model or self.openai_model

    @property
    def image_max_bytes(self) -> int:
        """Largest image file to download: Telegram's 20 MB unless a self-hosted server is used."""
        if self.image_max_mb is not None:
            return int(self.image_max_mb * 1024 * 1024)
        official = self.telegram_api_url == "https://api.telegram.org"
        return (20 if official else 50) * 1024 * 1024

    @property
    def voice_max_bytes(self) -> int:
        """Largest recording to transcribe: the transcription API's 25 MB (less room for the
        form's other fields), and Telegram's 20 MB download limit unless self-hosted."""
        model_limit = 25 * 1024 * 1024 - 16 * 1024
        if self.telegram_api_url == "https://api.telegram.org":
            return min(model_limit, 20 * 1024 * 1024)
        return model_limit

    @property
    def document_max_bytes(self) -> int:
        """Largest document to download: Telegram's 20 MB unless a self-hosted server is used."""
        if self.document_max_mb is not None:
            return int(self.document_max_mb * 1024 * 1024)
        official = self.telegram_api_url == "https://api.telegram.org"
        return (20 if official else 50) * 1024 * 1024

    @property
    def uses_openai(self) -> bool:
        """True when requests go to OpenAI itself rather than a compatible server."""
        return self.openai_base_url is None or "api.openai.com" in self.openai_base_url

    @property
    def effective_sentiment_model(self) -> str:
        """SENTIMENT_MODEL, else a cheap OpenAI model, else (other servers) the chat model."""
        if self.sentiment_model:
            return self.sentiment_model
        return "gpt-5.4-nano" if self.uses_openai else self.openai_model

    def secrets(self) -> list[str]:
        """Every secret this configuration holds, for the log filter to hide."""
        held = (
            self.telegram_bot_token,
            self.openai_api_key,
            self.webhook_secret,
            self.fine_tune_api_key,
            self.serve_api_key,
            self.eval_api_key,
        )
        found = [s.get_secret_value() for s in held if s is not None and s.get_secret_value()]
        if self.postgres and (password := urlsplit(self.database_url).password):
            found.append(password)
        return found

    def is_admin(self, user_id: int | None) -> bool:
        return user_id is not None and user_id in self.admin_user_ids

    def may_use(self, user_id: int | None, chat_id: int | None) -> bool:
        """Whether the allow-lists let this user, in this chat, use the bot."""
        if not self.allowed_user_ids and not self.allowed_chat_ids:
            return True
        if self.is_admin(user_id):
            return True
        return (user_id is not None and user_id in self.allowed_user_ids) or (
            chat_id is not None and chat_id in self.allowed_chat_ids
        )


class ConfigError(Exception):
    """Configuration is missing or invalid; the message names the variables, one line."""

    def for_a_deployer(self) -> str:
        """The message, and where settings come from when one is missing and no .env is here
        (the usual first-run slip: the .env file is in another folder)."""
        text = str(self)
        if "is not set" in text and not Path(".env").is_file():
            text += f" (no .env file in {Path.cwd()}: set it there or in the environment)"
        return text


def load_settings(**overrides: object) -> Settings:
    """Read settings once, turning pydantic's report into a one-line error naming each variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]).upper() if err["loc"] else "configuration"
            if err["type"] == "missing":
                problems.append(f"{name} is not set")
            else:
                problems.append(f"{name} {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("; ".join(problems)) from None


def validate(settings: Settings) -> None:
    """Checks beyond single variables; a ConfigError naming the variables if one fails.

    The bot runs these before it starts and `python -m bot check` reports them, so a
    configuration `check` calls valid is one the bot accepts.
    """
    from bot.services.profiles import ProfileError, load_profiles

    problems = []
    if settings.openai_api_key is None and settings.openai_base_url is None:
        problems.append(
            "OPENAI_API_KEY is not set"
            " (or set OPENAI_BASE_URL for a local OpenAI-compatible server)"
        )
    if settings.postgres and settings.webhook_url and settings.webhook_secret is None:
        problems.append(
            "WEBHOOK_SECRET is not set: with PostgreSQL and a webhook, every replica must"
            " check the same secret"
        )
    try:
        load_profiles(
            settings.profiles_file, settings.assistant_instructions, settings.conversation_backend
        )
    except ProfileError as exc:
        problems.append(f"PROFILES_FILE: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))
