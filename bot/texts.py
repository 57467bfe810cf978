"""The bot's own words, looked up by message id in per-language catalogs (never scattered in code).

The catalogs are TOML files in `bot/locales/` (`en.toml`, `ru.toml`, `es.toml`), one flat
table of `"message.id" = "text with {placeholders}"`. English is the reference and the
fallback: a language or a key that is missing falls back to English. Nothing is read at
import time; each catalog is read on first use and cached.

    t("error.timeout")                              # English
    t("error.timeout", lang=user.language_code)     # "ru-RU" -> Russian, "xx" -> English
    t("train.summary", lang="es", examples=3, ...)  # placeholders as keywords
"""

from __future__ import annotations

import functools
import string
import tomllib
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType

DEFAULT_LANGUAGE = "en"
LANGUAGES: tuple[str, ...] = ("en", "ru", "es")

# Commands for Telegram's command menu; each has a `cmd.<name>` description in every catalog.
USER_COMMANDS: tuple[str, ...] = ("start", "help", "reset", "forget", "assistant", "id")
ADMIN_COMMANDS: tuple[str, ...] = (
    "train",
    "jobs",
    "job",
    "cancel",
    "model",
    "export",
    "stats",
    "eval",
    "canary",
    "promote",
    "rollback",
)

_FALLBACK_KEY = "error.unknown"


def normalize(language_code: str | None) -> str:
    """The supported language for a Telegram `language_code` (an IETF tag), English if none.

    "ru", "ru-RU" -> "ru"; "es", "es-419" -> "es"; "en-GB" -> "en"; None, "", "de" -> "en".
    """
    if not language_code:
        return DEFAULT_LANGUAGE
    primary = language_code.strip().replace("_", "-").split("-", 1)[0].lower()
    return primary if primary in LANGUAGES else DEFAULT_LANGUAGE


@functools.cache
def _load(lang: str) -> Mapping[str, str]:
    source = resources.files(__package__ or "bot").joinpath("locales", f"{lang}.toml")
    data = tomllib.loads(source.read_text(encoding="utf-8"))
    bad = sorted(key for key, value in data.items() if not isinstance(value, str))
    if bad:
        raise ValueError(f"locales/{lang}.toml: not plain strings (quote dotted keys): {bad}")
    return MappingProxyType(data)


def catalog(language_code: str | None = None) -> Mapping[str, str]:
    """The raw catalog (message id -> template) for a language, read on first use."""
    return _load(normalize(language_code))


# How each language groups the digits of a large number ("12,345" reads as twelve point
# three in Spanish and Russian): a no-break space there, so a group never starts a line.
_DIGIT_GROUPS: Mapping[str, str] = MappingProxyType({"en": ",", "ru": "\u00a0", "es": "\u00a0"})


class _Formatter(string.Formatter):
    """str.format, with the digits of an int's `{n:,}` field grouped as the language does."""

    def __init__(self, lang: str | None) -> None:
        self.lang = lang

    def format_field(self, value: object, format_spec: str) -> str:
        if format_spec == "," and isinstance(value, int) and not isinstance(value, bool):
            return number(value, self.lang)
        return super().format_field(value, format_spec)


def number(value: int, lang: str | None = None) -> str:
    """`value` with its digits grouped as `lang` (a language_code) does: 12,345 in English,
    12 345 (a no-break space) in Russian and Spanish."""
    return f"{value:,}".replace(",", _DIGIT_GROUPS[normalize(lang)])


def t(key: str, *, lang: str | None = None, **values: object) -> str:
    """The text for `key` in `lang` (a Telegram language_code; English when None or unknown),
    formatted with `values`. A key missing in that language falls back to English; an unknown
    key gives the generic error message. A `{n:,}` field groups its digits as `lang` does."""
    own = catalog(lang)
    english = catalog(DEFAULT_LANGUAGE)
    text = own.get(key) or english.get(key) or own.get(_FALLBACK_KEY) or english[_FALLBACK_KEY]
    return _Formatter(lang).vformat(text, (), values) if values else text


def command_descriptions(lang: str | None = None, *, admin: bool = False) -> list[tuple[str, str]]:
    """(command, description) pairs for the command menu, e.g. for setMyCommands.

    With `admin`, the admin commands follow the user ones."""
    names = USER_COMMANDS + (ADMIN_COMMANDS if admin else ())
    return [(name, t(f"cmd.{name}", lang=lang)) for name in names]


def known(key: str) -> bool:
    """Whether the catalogs have `key` (English has every key)."""
    return key in catalog(DEFAULT_LANGUAGE)


def command_help(lang: str | None = None, *, admin: bool = False) -> str:
    """The command list for /start and /help: every command of the menu (the admin ones too
    with `admin`), each with its menu description and, where it takes some, its arguments."""

    def lines(names: tuple[str, ...]) -> list[str]:
        return [
            t(
                "help.line",
                lang=lang,
                command=f"{name} {t(f'help.args.{name}', lang=lang)}"
                if known(f"help.args.{name}")
                else name,
                description=t(f"cmd.{name}", lang=lang),
            )
            for name in names
        ]

    text = "\n".join([t("commands", lang=lang), *lines(USER_COMMANDS)])
    if admin:
        text += "\n\n" + "\n".join([t("admin_commands", lang=lang), *lines(ADMIN_COMMANDS)])
    return text


def language_of(update: object) -> str:
    """The catalog language for whoever sent an update (their Telegram language_code)."""
    user = getattr(update, "effective_user", None)
    return normalize(getattr(user, "language_code", None))


def tr(update: object, key: str, **values: object) -> str:
    """`t` in the language of the user behind `update`."""
    return t(key, lang=language_of(update), **values)
