"""What users and admins read: in their language, from the catalogs, and true.

Sentiment tags in the user's language, admins really told about a refused API key (at most
once an hour), /start and /help listing every command, /stats and its chart in the admin's
language with names, and "typing" while a photo is described (tests/test_photos.py).
"""

from __future__ import annotations

import io
import os
from datetime import timedelta
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFont

from bot.services.charts import chart_font
from bot.services.feedback import CHART_TITLE_AT, Stats, render_chart
from bot.texts import ADMIN_COMMANDS, LANGUAGES, USER_COMMANDS, t
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI, Reply
from tests.stubs.telegram_server import FakeTelegram

ADMIN = 42


def _say(tg: FakeTelegram, chat_id: int, text: str, lang: str, user_id: int | None = None) -> None:
    """A private message from a user whose Telegram speaks `lang`."""
    user_id = chat_id if user_id is None else user_id
    sender = {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"}
    tg.push_message(
        chat_id, text, user_id=user_id, extra={"from": sender | {"language_code": lang}}
    )


# -- sentiment tags ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lang", "tag"), [("ru", "🙂 позитивно"), ("es", "🙂 positivo"), ("en", "🙂 positive")]
)
async def test_the_sentiment_tag_is_in_the_users_language(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, lang: str, tag: str
) -> None:
    async with running(make_settings(sentiment_backend="lexicon")):
        oai.enqueue("Great question, glad you asked!")
        _say(tg, 100, "hello", lang)
        [text] = await tg.wait_sent(100, 1)
    assert text == f"Great question, glad you asked!\n\n{tag}"


# -- a refused API key or a missing model: the admins are told, and only then is it said -----


async def test_a_wrong_api_key_tells_the_admins_once_an_hour_and_users_that_they_know(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    tg.chat(ADMIN)  # the admin has started the bot: Telegram can write to them
    settings = make_settings(openai_api_key="sk-wrong-key-0000", admin_user_ids=f"{ADMIN},43")
    async with running(settings) as app:
        services = app.bot_data.services
        assert services is not None
        await services.alerts.remember_language(ADMIN, "ru")  # as an admin command would
        tg.push_message(100, "hello")
        tg.push_message(200, "hi there")
        [first] = await tg.wait_sent(100, 1)
        [second] = await tg.wait_sent(200, 1)
        await settled(app)
        # Two users met the problem; each admin who can be reached got one message about it.
        [alert] = tg.sent_texts(ADMIN)
        assert alert == t("alert.auth", lang="ru", model=settings.openai_model)
        assert "sk-wrong" not in alert
        assert first == second == t("error.auth")
        assert "admins have been told" in first
    async with running(settings) as app:  # a restart within the hour does not tell again
        tg.push_message(100, "after a restart")
        await tg.wait_sent(100, 2)
        await settled(app)
        assert len(tg.sent_texts(ADMIN)) == 1
        services = app.bot_data.services
        assert services is not None
        later = services.alerts.clock() + timedelta(hours=1, seconds=1)
        services.alerts.clock = lambda: later
        tg.push_message(100, "an hour later")
        await tg.wait_sent(100, 3)
        await settled(app)
    assert len(tg.sent_texts(ADMIN)) == 2  # the problem went on: told again, an hour on


async def test_when_no_admin_can_be_told_users_are_not_told_they_were(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    # The admin never started the bot: Telegram has no chat to write to them in.
    async with running(make_settings(openai_api_key="sk-wrong-key-0000")):
        tg.push_message(100, "hello")
        [text] = await tg.wait_sent(100, 1)
    assert text == t("error.auth_untold")
    assert "told" not in text
    # The bot did try to tell the admin: Telegram refused, so nobody knows.
    assert any(c.params["chat_id"] == str(ADMIN) for c in tg.calls_of("sendMessage"))
    assert tg.sent_texts(ADMIN) == []


async def test_a_missing_model_is_told_to_the_admins_in_their_language(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    tg.chat(ADMIN)
    async with running(make_settings()) as app:
        services = app.bot_data.services
        assert services is not None
        await services.alerts.remember_language(ADMIN, "es")
        oai.enqueue(Reply(status=404))
        _say(tg, 100, "hola", "es")
        [text] = await tg.wait_sent(100, 1)
        await tg.wait_sent(ADMIN, 1)
    assert text == t("error.not_found", lang="es")
    [alert] = tg.sent_texts(ADMIN)
    assert alert.startswith("⚠️ El servicio del modelo no tiene el modelo")


# -- /start and /help -------------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGUAGES)
async def test_start_and_help_list_every_command_of_the_menu_and_name_no_provider(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, lang: str
) -> None:
    async with running(make_settings(conversation_backend="local", admin_user_ids=str(ADMIN))):
        _say(tg, 100, "/start", lang)
        _say(tg, 100, "/help", lang)
        start, help_ = await tg.wait_sent(100, 2)
        _say(tg, ADMIN, "/help", lang)
        [admin_help] = await tg.wait_sent(ADMIN, 1)
    for command in USER_COMMANDS:  # what Telegram's command menu offers
        assert f"/{command} " in start and f"/{command} " in help_, command
        assert f"/{command} " in admin_help
    for command in ADMIN_COMMANDS:
        assert f"/{command}" not in help_ and f"/{command} " in admin_help, command
    assert "OpenAI" not in start  # the local backend may run any model, anywhere
    assert "{" not in start + help_ + admin_help


# -- /stats and its chart ---------------------------------------------------------------------


def _title_band(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB").crop((0, 0, 720, 50))


def _drawn_title(text: str) -> Image.Image:
    image = Image.new("RGB", (720, 300), "white")
    ImageDraw.Draw(image).text(CHART_TITLE_AT, text, fill="black", font=chart_font(18))
    return image.crop((0, 0, 720, 50))


async def test_stats_speaks_the_admins_language_and_names_users_and_chats(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(sentiment_backend="lexicon", admin_user_ids=str(ADMIN))):
        tg.chat(-500, "supergroup", title="Book club")
        for i in range(6):
            oai.enqueue("Thanks, this is great!" if i % 2 else "Sorry, that failed badly.")
            _say(tg, 100, f"question {i}", "en")
        for i in range(4):
            oai.enqueue("Lovely, happy to help!")
            tg.push_message(
                -500, f"@Parley_Test_Bot club question {i}", user_id=7007, chat_type="supergroup"
            )
        await tg.wait_sent(100, 6)
        await tg.wait_sent(-500, 4)
        tg.chat(ADMIN)
        _say(tg, ADMIN, "/stats", "ru")
        [report] = await tg.wait_sent(ADMIN, 1)
        await tg.wait_for(lambda: bool(tg.calls_of("sendPhoto")))
    assert report.startswith(t("stats.title", lang="ru"))
    assert "Ответы бота:" in report and "🙂 позитивно: " in report
    assert "positive" not in report and "Bot replies" not in report
    # Names where Telegram gives them (with the id, which /train chat=ID takes); a group
    # member who never started the bot stays an id.
    assert "User100 (100): " in report and "Book club (-500): " in report
    assert "7007: " in report and "(7007)" not in report
    [photo] = tg.calls_of("sendPhoto")
    assert photo.params["caption"] == t("stats.chart_caption", lang="ru")
    png = [data for method, _, data in tg.uploads if method == "sendPhoto"][-1]
    band = _title_band(png)
    assert (
        ImageChops.difference(band, _drawn_title(t("stats.chart_title", lang="ru"))).getbbox()
        is None
    )
    assert ImageChops.difference(band, _drawn_title(t("stats.chart_title"))).getbbox() is not None


def test_chart_words_are_drawn_with_a_font_that_has_their_letters() -> None:
    font = chart_font(18)
    if not isinstance(font, ImageFont.FreeTypeFont) and os.environ.get("CI") != "true":
        pytest.skip("no system font with Cyrillic (e.g. apt install fonts-dejavu-core)")

    def glyph(text: str) -> tuple[tuple[int, int], bytes]:
        mask = font.getmask(text)
        return mask.size, bytes(mask)

    missing = glyph("\uffff")  # a character no font has: the "tofu" box
    for text in ("Ж", "Я", "ñ", "é"):
        assert glyph(text) != missing, text


@pytest.mark.parametrize("lang", LANGUAGES)
def test_the_chart_in_every_language_keeps_its_bars_clear_of_the_row_titles(lang: str) -> None:
    counts = {"positive": 6, "neutral": 3, "negative": 1}
    no_reactions: dict[int, int] = {1: 0, 0: 0, -1: 0}
    stats = Stats({"assistant": counts, "user": counts}, {}, no_reactions, no_reactions)
    image = Image.open(io.BytesIO(render_chart(stats, lang))).convert("RGB")
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(
        draw.textlength(t(key, lang=lang), font=chart_font(18))
        for key in ("stats.replies", "stats.user_messages")
    )
    # Between the end of the longest title and the bars: nothing but white.
    gap: Any = image.crop((20 + int(widest) + 2, 70, 20 + int(widest) + 18, 70 + 56))
    assert gap.getextrema() == ((255, 255), (255, 255), (255, 255))
    # The legend's last word ends inside the picture.
    edge: Any = image.crop((700, 250, 720, 300))
    assert edge.getextrema() == ((255, 255), (255, 255), (255, 255))


# -- /assistant ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["ru", "es"])
async def test_the_built_in_profile_is_named_in_the_users_language(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, lang: str
) -> None:
    async with running(make_settings()):
        _say(tg, 100, "/assistant", lang)
        [listing] = await tg.wait_sent(100, 1)
        [(_, button, _)] = tg.buttons(100)
        name = t("assistant.default_title", lang=lang)
        assert f"• {name} (default)" in listing and button == name
        assert "Default" not in listing
        _say(tg, 100, "/assistant default", lang)
        [_, switched] = await tg.wait_sent(100, 2)
    assert switched == t("assistant.switched", lang=lang, name=name)
