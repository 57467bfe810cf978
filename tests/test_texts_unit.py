"""The message catalogs (bot/locales/*.toml) and the lookup in bot/texts.py."""

from __future__ import annotations

import re
import string
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from bot import texts
from bot.texts import ADMIN_COMMANDS, LANGUAGES, USER_COMMANDS, catalog, normalize, t

OTHER_LANGUAGES = [lang for lang in LANGUAGES if lang != "en"]
EN = catalog("en")

# Keys other modules call today or will call; they must keep existing with these placeholders.
REQUIRED: dict[str, set[str]] = {
    "start": {"commands"},
    "help": {"commands"},
    "commands": set(),
    "admin_commands": set(),
    "image.too_large": {"limit"},
    "image.some_skipped": {"count", "reason"},
    "train.summary": {
        "description",
        "examples",
        "train",
        "validation",
        "tokens",
        "model",
        "where",
        "cost",
        "dropped",
        "redacted",
    },
    "train.too_few": {"examples", "needed", "missing"},
    "train.left_out": {"dropped"},
    "alert.auth": {"model"},
    "alert.not_found": {"model"},
    "help.line": {"command", "description"},
    "job.live": {"job_id", "model", "status"},
    "train.cost_gpu": {"minutes"},
    "train.cost_gpu_unknown": {"model"},
    "train.refused": {"reason"},
    "job.dataset": {"description", "tokens"},
    "job.error": {"error"},
    "job.loss_caption": {"job_id"},
    "train.started": {"job_id", "model"},
    "train.failed_to_start": {"kind"},
    "train.bad_args": {"arg"},
    "job.cancelled": {"job_id", "status"},
    "job.failed": {"job_id", "error"},
    "model.available": {"models"},
    "export.caption": {"examples", "description"},
    "forget.done": {"count"},
    "error.unknown": set(),
    "access.denied": set(),
    "limit.reached": {"limit"},
    "assistant.list": {"profiles", "current"},
    "assistant.switched": {"name"},
    "assistant.unknown": {"name"},
    "group.hint": set(),
}
ERROR_KINDS = [
    "rate_limited",
    "timeout",
    "unreachable",
    "interrupted",
    "server_error",
    "auth",
    "not_found",
    "bad_request",
    "empty_answer",
    "unknown",
]
IMAGE_KINDS = [
    "too_large",
    "empty",
    "not_an_image",
    "truncated",
    "unsupported_format",
    "too_many_pixels",
    "too_many_frames",
    "download_failed",
]


def fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def commands_in(template: str) -> list[str]:
    return sorted(re.findall(r"/[a-z]+\b", template))


def test_locale_files_are_exactly_the_supported_languages() -> None:
    folder = resources.files("bot").joinpath("locales")
    found = {entry.name.removesuffix(".toml") for entry in folder.iterdir()}
    found = {name for name in found if not name.startswith(("_", "."))}
    assert found == set(LANGUAGES)


def test_required_keys_keep_their_placeholders() -> None:
    for key, expected in REQUIRED.items():
        assert fields(EN[key]) == expected, key
    for kind in ERROR_KINDS:
        assert f"error.{kind}" in EN
    for kind in IMAGE_KINDS:
        assert f"image.{kind}" in EN


def test_english_matches_the_original_wording() -> None:
    assert t("error.timeout") == "The model took too long to answer. Please try again."
    assert t("access.denied") == "Sorry, this bot is private."
    assert t("limit.reached", limit=20) == (
        "You've reached today's limit of 20 messages. It resets at midnight UTC."
    )
    assert t("assistant.list", profiles="a\nb", current="a") == (
        "Assistant profiles:\na\nb\n\nCurrent: a. Choose one:"
    )


@pytest.mark.parametrize("lang", OTHER_LANGUAGES)
def test_catalog_has_exactly_the_english_keys(lang: str) -> None:
    keys = set(catalog(lang))
    assert not set(EN) - keys, f"missing in {lang}"
    assert not keys - set(EN), f"unknown in {lang}"


@pytest.mark.parametrize("lang", OTHER_LANGUAGES)
def test_translations_keep_placeholders_commands_and_emoji(lang: str) -> None:
    own = catalog(lang)
    for key, english in EN.items():
        assert fields(own[key]) == fields(english), f"{lang}:{key}"
        assert commands_in(own[key]) == commands_in(english), f"{lang}:{key}"
        emoji = {ch for ch in english if ord(ch) >= 0x2600}
        assert emoji <= set(own[key]), f"{lang}:{key}"
        assert own[key].strip(), f"{lang}:{key}"
        assert own[key].count("\n\n") == english.count("\n\n"), f"{lang}:{key}: paragraphs"


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_template_formats_with_dummy_values(lang: str) -> None:
    for key, template in catalog(lang).items():
        names = fields(template)
        assert "lang" not in names, f"{lang}:{key}: a placeholder can't be called lang"
        # Ints work for every format spec used ({tokens:,}) and for plain {name} too.
        text = t(key, lang=lang, **dict.fromkeys(names, 1234), unused="extra values are ignored")
        assert "{" not in text and "}" not in text, f"{lang}:{key}"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("ru", "ru"),
        ("ru-RU", "ru"),
        ("RU", "ru"),
        ("ru_RU", "ru"),
        ("es", "es"),
        ("es-419", "es"),
        ("es-ES", "es"),
        ("en", "en"),
        ("en-GB", "en"),
        ("en-US", "en"),
        ("de", "en"),
        ("uk", "en"),
        ("pt-BR", "en"),
        ("", "en"),
        (None, "en"),
        ("-", "en"),
    ],
)
def test_normalize(code: str | None, expected: str) -> None:
    assert normalize(code) == expected


def test_lookup_by_language_code() -> None:
    assert t("error.timeout", lang="ru-RU") == catalog("ru")["error.timeout"]
    assert t("error.timeout", lang="es-419") == catalog("es")["error.timeout"]
    assert t("job.status", lang="es", job_id="ft-1", status="running") == (
        "Trabajo de ajuste fino ft-1: running."
    )
    summary = t("train.summary", lang="ru", **dict.fromkeys(REQUIRED["train.summary"], 12345))
    assert summary.startswith("Датасет готов (12345).") and "около 12\u00a0345" in summary


@pytest.mark.parametrize(
    ("lang", "expected"),
    [
        ("en", "1,234,567 / 89"),
        ("ru", "1\u00a0234\u00a0567 / 89"),
        ("es", "1\u00a0234\u00a0567 / 89"),
    ],
)
def test_large_numbers_are_grouped_as_the_language_does(lang: str, expected: str) -> None:
    """'12,345' reads as twelve point three in Spanish and Russian: a {n:,} field is
    grouped with a no-break space there, with commas in English."""
    assert t("stats.tokens", lang=lang, total=1234567, week=89).endswith(expected)
    assert texts.number(1234567, lang) == expected.split(" / ")[0]
    # Only ints are grouped; other values and format specs are as str.format has them.
    assert t("job.line", lang=lang, job_id="ft-{1}", status="x", model=1.5, age=None) == (
        "ft-{1}: x, 1.5, None"
    )


def test_without_lang_is_english() -> None:
    for key, template in EN.items():
        if not fields(template):
            assert t(key) == template
            assert t(key, lang=None) == template


@pytest.mark.parametrize("code", ["de", "zh-hans", "xx", "", None])
def test_unknown_languages_fall_back_to_english(code: str | None) -> None:
    assert t("error.timeout", lang=code) == EN["error.timeout"]
    assert t("forget.done", lang=code, count=3) == EN["forget.done"].format(count=3)


def test_missing_key_falls_back_to_english_then_generic_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    partial = {k: v for k, v in catalog("ru").items() if k != "error.timeout"}
    real = texts.catalog
    monkeypatch.setattr(
        texts, "catalog", lambda code=None: partial if normalize(code) == "ru" else real(code)
    )
    assert t("error.timeout", lang="ru") == EN["error.timeout"]
    assert t("no.such.key", lang="ru") == partial["error.unknown"]
    assert t("no.such.key") == EN["error.unknown"]


@pytest.mark.parametrize("lang", LANGUAGES)
def test_command_descriptions_fit_telegram(lang: str) -> None:
    admin_menu = texts.command_descriptions(lang, admin=True)
    assert [name for name, _ in admin_menu] == list(USER_COMMANDS + ADMIN_COMMANDS)
    assert texts.command_descriptions(lang) == admin_menu[: len(USER_COMMANDS)]
    for name, description in admin_menu:
        # BotCommand: command 1-32 chars of a-z, 0-9, _; description 1-256 chars.
        assert re.fullmatch(r"[a-z0-9_]{1,32}", name)
        assert 1 <= len(description) <= 256, f"{lang}:{name}"
        assert description == description.strip() and "\n" not in description
        assert not fields(catalog(lang)[f"cmd.{name}"]), f"{lang}:{name}"


def test_nothing_is_read_at_import() -> None:
    code = "import bot.texts as m; print(m._load.cache_info().currsize)"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert done.stdout.strip() == "0"


def test_catalogs_are_read_lazily_and_cached() -> None:
    texts._load.cache_clear()
    assert texts._load.cache_info().currsize == 0
    first = catalog("es-419")
    assert catalog("es") is first
    assert texts._load.cache_info().currsize == 1
