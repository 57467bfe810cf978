"""Photos end to end: captions, albums, image documents, follow-ups in both backends, bad input."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from bot.context import ParleyApp
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram


def jpeg(width: int = 3000, height: int = 2000, color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "JPEG", quality=80)
    return out.getvalue()


def png_rgba(width: int = 800, height: int = 600) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 128, 255, 128)).save(out, "PNG")
    return out.getvalue()


def png_bomb(side: int = 60_000) -> bytes:
    """A tiny PNG whose header declares side x side pixels (never decodable in memory)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def webp_bomb(side: int = 4500) -> bytes:
    """A lossless single-colour WebP: tiny on disk, 16 B per pixel to decode with Pillow."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), "red").save(out, "WEBP", lossless=True)
    return out.getvalue()


def long_gif(frames: int = 1200) -> bytes:
    # Every frame differs, or Pillow merges identical frames into one.
    images = [Image.new("RGB", (4, 4), (i % 256, (i * 7) % 256, 0)) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:], duration=20)
    return out.getvalue()


async def test_photo_with_caption_is_answered_by_the_vision_model(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(openai_vision_model="gpt-5.4")) as app:
        tg.push_photo(100, jpeg(), caption="What colour is this?")
        [text] = await tg.wait_sent(100, 1)
        assert text == "echo: What colour is this?"
        [call] = oai.calls
        assert call.model == "gpt-5.4"  # OPENAI_VISION_MODEL
        assert call.image_info == [("JPEG", 2048, 1365)] or call.image_info[0][1] <= 2048
        fmt, width, height = call.image_info[0]
        assert fmt == "JPEG" and max(width, height) <= 2048 and width > height
        part = call.body["input"][0]["content"][1]
        assert part["type"] == "input_image" and part["image_url"].startswith(
            "data:image/jpeg;base64,"
        )
        # The bot is about to write about the photo, not to send one: "typing…" from the start.
        actions = [c.params["action"] for c in tg.calls_of("sendChatAction")]
        assert actions and set(actions) == {"typing"}
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        rows = await store.fetch_all(
            "SELECT t.model, i.mime_type, i.width, i.height, length(i.data) FROM turns t"
            " JOIN turn_images ti ON ti.turn_id = t.id JOIN images i ON i.sha256 = ti.sha256"
        )
    assert rows == [("gpt-5.4", "image/jpeg", width, height, rows[0][4])] and rows[0][4] > 0


async def test_photo_without_caption_asks_for_a_description(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    tg.push_photo(100, jpeg(400, 300))
    assert await tg.wait_sent(100, 1) == ["echo: Describe this image."]
    assert oai.calls[0].image_info == [("JPEG", 400, 300)]  # small images are not upscaled


async def test_album_becomes_one_turn_with_all_images(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(album_wait=0.3)) as app:
        colors = ["red", "green", "blue"]
        for i, color in enumerate(colors):
            tg.push_photo(
                100,
                jpeg(640, 480, color),
                media_group_id="album1",
                caption="Which is greenest?" if i == 1 else None,
            )
        [text] = await tg.wait_sent(100, 1)
        assert text == "echo: Which is greenest?"
        await settled(app)
        assert len(app.bot_data.services.albums) == 0  # type: ignore[union-attr]
    [call] = oai.calls
    assert len(call.image_info) == 3


async def test_image_document_png_is_converted_and_answered(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    tg.push_photo(100, png_rgba(), as_document="image/png", caption="what is it?")
    assert await tg.wait_sent(100, 1) == ["echo: what is it?"]
    assert oai.calls[0].image_info == [("JPEG", 800, 600)]


@pytest.mark.parametrize("backend", ["openai", "local"])
async def test_follow_up_question_sees_the_image(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, backend: str
) -> None:
    async with running(make_settings(conversation_backend=backend)):
        oai.enqueue("A red car parked on a street.")
        tg.push_photo(100, jpeg(1024, 768), caption="What is in the picture?")
        await tg.wait_sent(100, 1)
        tg.push_message(100, "and what colour is the car?")
        await tg.wait_sent(100, 2)
    follow_up = oai.calls[-1]
    assert follow_up.transcript == [
        ("user", "What is in the picture?"),
        ("assistant", "A red car parked on a street."),
        ("user", "and what colour is the car?"),
    ]
    assert follow_up.image_info == [("JPEG", 1024, 768)]  # the image is still in the thread


async def test_the_same_image_is_stored_once(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    data = jpeg(500, 500)
    tg.push_photo(100, data, caption="one")
    await tg.wait_sent(100, 1)
    tg.push_photo(100, data, caption="two")
    await tg.wait_sent(100, 2)
    await settled(bot)
    store = bot.bot_data.services.store  # type: ignore[union-attr]
    assert await store.fetch_all("SELECT COUNT(*) FROM images") == [(1,)]
    assert await store.fetch_all("SELECT COUNT(*) FROM turn_images") == [(2,)]


BAD_INPUTS = {
    "too-big": (
        dict(data=jpeg(100, 100), as_document="image/jpeg", file_size=25 * 1024 * 1024),
        "too big for me: I can download files up to 20 MB",
    ),
    "not-an-image": (
        dict(data=b"hello, I am text" * 20, as_document="image/png"),
        "doesn't look like an image",
    ),
    "truncated": (
        dict(data=jpeg(1000, 800)[:3000], as_document="image/jpeg"),
        "cut off or damaged",
    ),
    "empty": (dict(data=b"", as_document="image/jpeg"), "empty"),
    "bomb": (dict(data=png_bomb(), as_document="image/png"), "too many pixels"),
    "long-animation": (dict(data=long_gif(), as_document="image/gif"), "animation is too long"),
    "tiff": (
        dict(data=b"II*\x00" + b"\x00" * 100, as_document="image/tiff"),
        "JPEG, PNG, WebP and GIF",
    ),
    # 1.4 KB, under the pixel limit, and ~550 MB to decode: refused from its header.
    "webp-bomb": (
        dict(data=webp_bomb(), as_document="image/webp"),
        "too much memory to unpack",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
async def test_bad_images_get_a_clear_reply_and_no_model_call(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp, case: str
) -> None:
    kwargs, expected = BAD_INPUTS[case]
    data = kwargs.pop("data")
    tg.push_photo(100, data, **kwargs)  # type: ignore[arg-type]
    [text] = await tg.wait_sent(100, 1)
    assert expected in text
    assert oai.calls == []
    tg.push_message(100, "still there?")  # the bot is still up and the chat still works
    assert (await tg.wait_sent(100, 2))[1] == "echo: still there?"
    await settled(bot)
    store = bot.bot_data.services.store  # type: ignore[union-attr]
    assert await store.fetch_all("SELECT COUNT(*) FROM images") == [(0,)]


async def test_a_photo_too_big_to_download_falls_back_to_a_smaller_size(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    msg = tg.push_photo(100, jpeg(90, 68), file_size=25 * 1024 * 1024)
    assert await tg.wait_sent(100, 1) == ["echo: Describe this image."]
    [get_file] = tg.calls_of("getFile")
    assert get_file.params["file_id"] == msg["photo"][0]["file_id"]  # the size within 20 MB


async def test_failed_download_is_explained(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    tg.fail_next("getFile", 400, description="Bad Request: file is temporarily unavailable")
    tg.push_photo(100, jpeg(200, 200))
    [text] = await tg.wait_sent(100, 1)
    assert "couldn't download" in text and oai.calls == []


async def test_album_with_one_bad_image_answers_about_the_rest(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(album_wait=0.3)):
        tg.push_photo(100, jpeg(300, 300), media_group_id="g2", caption="compare")
        tg.push_photo(100, b"broken", as_document="image/jpeg", media_group_id="g2")
        tg.push_photo(100, jpeg(300, 300, "blue"), media_group_id="g2")
        texts = await tg.wait_sent(100, 2)
    assert texts[0].startswith("I skipped 1 of the images") and texts[1] == "echo: compare"
    assert len(oai.calls[0].image_info) == 2
