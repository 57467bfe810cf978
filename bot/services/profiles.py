"""Assistant profiles: what the retired Assistants API called assistants, as a config file.

PROFILES_FILE (TOML) names profiles, each with instructions, model, temperature, whether
it looks at images, and the built-in tools it may use (OpenAI backend only):

    [profiles.coder]
    title = "Code reviewer"
    instructions = "You review code..."
    model = "gpt-5.4"
    temperature = 0.2
    vision = false
    tools = ["web_search"]

A "default" profile always exists, built from the settings. Each chat (or forum topic)
picks one with /assistant; the choice is stored, and switching starts a new thread.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bot.domain import ChatKey
from storage.interface import SettingsStore

DEFAULT = "default"
DEFAULT_TITLE = "Default"  # shown in the reader's language (assistant.default_title)


class _ProfileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=64)
    instructions: str | None = Field(default=None, min_length=1, max_length=32_000)
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    vision: bool = True
    # Built-in tools of the Responses API the model may call; web search is the one offered.
    tools: list[Literal["web_search"]] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    title: str
    instructions: str
    model: str | None  # None: the bot's model (so /model applies)
    temperature: float | None
    vision: bool
    tools: tuple[str, ...] = ()  # built-in tools of the Responses API, e.g. "web_search"


class ProfileError(ValueError):
    """PROFILES_FILE can't be used; the message says where and why, in one line."""


def load_profiles(
    path: Path | None, default_instructions: str, backend: str = "openai"
) -> dict[str, Profile]:
    """The profiles in `path` plus "default"; raises ProfileError on any problem.

    `backend` is the conversation backend: a profile with tools needs "openai", as only the
    Responses API runs them; on "local" it is refused here, not at its first question.
    """
    profiles = {
        DEFAULT: Profile(DEFAULT, DEFAULT_TITLE, default_instructions, None, None, True),
    }
    if path is None:
        return profiles
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path} is not valid TOML: {exc}") from None
    table = data.get("profiles")
    if not isinstance(table, dict) or set(data) - {"profiles"}:
        raise ProfileError(f"{path} must contain only [profiles.NAME] tables")
    for name, raw in table.items():
        if not name.replace("_", "").replace("-", "").isalnum() or len(name) > 32:
            raise ProfileError(f"profile name {name!r} must be letters, digits, _ or -")
        try:
            spec = _ProfileSpec.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ProfileError(f"profile {name}: {where} {first['msg']}") from None
        if spec.tools and backend != "openai":
            raise ProfileError(
                f"profile {name}: tools {spec.tools} need CONVERSATION_BACKEND=openai"
                f" (the {backend} backend's Chat Completions servers have no built-in tools)"
            )
        base = profiles.get(name)
        profiles[name] = Profile(
            name=name,
            title=spec.title or (base.title if base else name),
            instructions=spec.instructions or default_instructions,
            model=spec.model,
            temperature=spec.temperature,
            vision=spec.vision,
            tools=tuple(dict.fromkeys(spec.tools)),
        )
    return profiles


class Profiles:
    """The configured profiles and each chat's choice (stored, so it survives restarts)."""

    def __init__(self, settings: SettingsStore, profiles: dict[str, Profile]) -> None:
        self.settings = settings
        self.all = profiles

    async def for_chat(self, key: ChatKey) -> Profile:
        name = await self.settings.chat_profile(key)
        # A profile removed from the file falls back to the default rather than failing.
        return self.all.get(name or DEFAULT, self.all[DEFAULT])

    async def choose(self, key: ChatKey, name: str) -> Profile:
        profile = self.all[name]  # KeyError for unknown names: the caller says so
        await self.settings.set_chat_profile(key, name)
        return profile
