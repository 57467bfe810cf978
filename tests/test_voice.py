"""Voice notes, audio files and video notes end to end: transcribed through the stand-in
OpenAI server (each request checked against the OpenAPI spec), quoted, answered in the
chat's thread in both backends; limits refused before any download or model call."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bot.context import ParleyApp
from bot.services.formatting import utf16_len
from bot.settings import Settings
from bot.texts import t
from tests.conftest import TOKEN, SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI, Transcript
from tests.stubs.telegram_server import BOT_USER, FakeTelegram

MB = 1024 * 1024
HEARD = "🎙 I heard:\n"
ADMIN = 42


def ogg_opus(seed: int = 0) -> bytes:
    """Bytes laid out like a Telegram voice note: an OGG page carrying an Opus header."""
    page = b"OggS\x00\x02" + bytes(20) + b"\x01\x13OpusHead\x01\x01\x38\x01\x80\xbb\x00\x00"
    return page + bytes((seed + i) % 256 for i in range(2000))


def mp4(seed: int = 0) -> bytes:
    return b"\x00\x00\x00\x18ftypmp42" + bytes((seed + i) % 256 for i in range(3000))


def mp3() -> bytes:
    return b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(i % 256 for i in range(3000))


def sent_messages(tg: FakeTelegram, chat_id: int) -> list[dict[str, Any]]:
    """The bot's delivered sendMessage calls to a chat, with entities decoded."""
    out = []
    for call in tg.calls_of("sendMessage"):
        if call.status == 200 and int(call.params["chat_id"]) == chat_id:
            params = dict(call.params)
            params["entities"] = json.loads(params.get("entities") or "[]")
            params["reply_parameters"] = json.loads(params.get("reply_parameters") or "null")
            out.append(params)
    return out


@pytest.mark.parametrize(
    ("backend", "model"),
    [("openai", None), ("local", "Systran/faster-whisper-small")],
    ids=["openai", "local-server"],
)
async def test_voice_note_is_transcribed_quoted_answered_and_followed_up(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    backend: str,
    model: str | None,
) -> None:
    overrides: dict[str, Any] = {"conversation_backend": backend}
    if model is not None:  # a local server names its own models, through the same base URL
        overrides["transcribe_model"] = model
        oai.transcribe_models = {model}
    async with running(make_settings(**overrides)) as app:
        oai.enqueue_transcript("What is the capital of France?")
        oai.enqueue("Paris.")
        audio = ogg_opus()
        tg.push_voice(100, audio, duration=4)
        assert await tg.wait_sent(100, 2) == [
            f"{HEARD}What is the capital of France?",
            "Paris.",
        ]
        tg.push_message(100, "And of Spain?")
        await tg.wait_sent(100, 3)
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        kinds = await store.fetch_all("SELECT input_kind FROM turns ORDER BY id")
        said = await store.fetch_all("SELECT content FROM messages WHERE role = 'user' ORDER BY id")
    quote = sent_messages(tg, 100)[0]
    assert quote["entities"] == [
        {
            "type": "blockquote",
            "offset": utf16_len(HEARD),
            "length": len("What is the capital of France?"),
        }
    ]
    # Telegram's OGG/Opus goes as it is, named so the API knows its format.
    [heard] = oai.transcriptions
    assert heard.model == (model or "gpt-transcribe")
    assert (heard.filename, heard.content_type, heard.data) == ("voice.ogg", "audio/ogg", audio)
    assert set(heard.fields) == {"model", "file"}
    follow_up = oai.calls[-1]
    assert follow_up.api == ("responses" if backend == "openai" else "chat")
    assert follow_up.transcript == [
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Spain?"),
    ]
    assert kinds == [("voice",), ("text",)]
    assert said == [("What is the capital of France?",), ("And of Spain?",)]


async def test_long_transcript_is_quoted_collapsed_and_answered_in_full(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    long = " ".join(f"sentence number {i} of a long ramble." for i in range(40))
    oai.enqueue_transcript(long)
    oai.enqueue("Noted.")
    tg.push_voice(100, ogg_opus(), duration=90)
    assert (await tg.wait_sent(100, 2))[1] == "Noted."
    [quote, _] = sent_messages(tg, 100)
    assert quote["text"] == HEARD + long
    assert quote["entities"] == [
        {"type": "expandable_blockquote", "offset": utf16_len(HEARD), "length": len(long)}
    ]
    assert oai.calls[0].last_user_text == long


async def test_transcript_longer_than_a_message_is_quoted_in_parts(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    words = " ".join(f"word{i}" for i in range(1000))  # 7,889 characters: two messages
    oai.enqueue_transcript(words)
    oai.enqueue("That was long.")
    tg.push_voice(100, ogg_opus(), duration=300)
    texts = await tg.wait_sent(100, 3)
    assert texts[-1] == "That was long."
    quotes = sent_messages(tg, 100)[:-1]
    assert len(quotes) == 2 and quotes[0]["text"].startswith(HEARD)
    assert all(q["entities"][0]["type"] == "expandable_blockquote" for q in quotes)
    shown = " ".join(q["text"].removeprefix(HEARD) for q in quotes)
    assert shown.split() == words.split()
    assert oai.calls[0].last_user_text == words  # the model hears all of it


async def test_empty_transcript_is_said_and_the_model_is_not_asked(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    oai.enqueue_transcript("  \n ")
    tg.push_voice(100, ogg_opus(), duration=2)
    [text] = await tg.wait_sent(100, 1)
    assert "couldn't make out any words" in text
    assert len(oai.transcriptions) == 1 and oai.calls == []
    tg.push_message(100, "still there?")
    assert (await tg.wait_sent(100, 2))[1] == "echo: still there?"
    await settled(bot)
    store = bot.bot_data.services.store  # type: ignore[union-attr]
    assert await store.fetch_all("SELECT input_kind FROM turns") == [("text",)]


REFUSALS = {
    # Over the transcription API's 25 MB (the stand-in counts as a self-hosted Bot API
    # server, which downloads any size): refused from the size Telegram declares.
    "audio-too-big": (
        dict(kind="audio", file_name="talk.mp3", mime_type="audio/mpeg", file_size=30 * MB),
        {},
        "I can transcribe files up to 25 MB",
    ),
    "too-long": (dict(duration=61), {"voice_max_seconds": 60}, "up to 60 seconds"),
    "unsupported-format": (
        dict(kind="audio", file_name="song.wma", mime_type="audio/x-ms-wma"),
        {},
        "MP3, M4A, OGG, WAV, FLAC, WebM and MP4",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
async def test_recordings_over_the_limits_are_refused_before_any_download(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, case: str
) -> None:
    push, overrides, expected = REFUSALS[case]
    async with running(make_settings(**overrides)):
        tg.push_voice(100, mp3() if push.get("kind") == "audio" else ogg_opus(), **push)  # type: ignore[arg-type]
        [text] = await tg.wait_sent(100, 1)
        assert expected in text
        assert tg.calls_of("getFile") == [] and oai.transcriptions == [] and oai.calls == []
        tg.push_message(100, "still there?")
        assert (await tg.wait_sent(100, 2))[1] == "echo: still there?"


async def test_a_file_telegram_wont_hand_out_is_refused_as_too_big(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    # Telegram's getFile refuses files over 20 MB, whatever size the message declared.
    tg.fail_next("getFile", 400, description="Bad Request: file is too big")
    tg.push_voice(100, mp3(), kind="audio", file_name="talk.mp3", mime_type="audio/mpeg")
    [text] = await tg.wait_sent(100, 1)
    assert "too big" in text
    assert oai.transcriptions == [] and oai.calls == []


@pytest.mark.parametrize(
    ("transcript", "expected"),
    [
        (Transcript(status=500), "couldn't transcribe that recording just now"),
        (Transcript(status=429), "too many requests"),
    ],
    ids=["server-error", "rate-limited"],
)
async def test_failed_transcription_gets_a_short_reply_and_the_chat_goes_on(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp, transcript: Transcript, expected: str
) -> None:
    oai.enqueue_transcript(transcript)
    tg.push_voice(100, ogg_opus(), duration=2)
    [text] = await tg.wait_sent(100, 1)
    assert expected in text and "Error" not in text
    assert oai.calls == []
    tg.push_voice(100, ogg_opus(1), duration=2)  # the next one works
    assert (await tg.wait_sent(100, 3))[1:] == [
        f"{HEARD}Hello, this is a voice note.",
        "echo: Hello, this is a voice note.",
    ]


@pytest.mark.parametrize("admin_reachable", [True, False], ids=["told", "untold"])
async def test_a_server_without_the_transcription_model_is_explained_and_the_admins_alerted(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, admin_reachable: bool
) -> None:
    if admin_reachable:
        tg.chat(ADMIN)  # an admin who started the bot: Telegram can write to them
    async with running(make_settings(transcribe_model="no-such-model")):
        tg.push_voice(100, ogg_opus(), duration=2)
        [first] = await tg.wait_sent(100, 1)
        tg.push_voice(100, ogg_opus(1), duration=2)  # within the hour: no second alert
        second = (await tg.wait_sent(100, 2))[1]
    assert "can't transcribe recordings with my current setup" in first
    expected = t("voice.unavailable" if admin_reachable else "voice.unavailable_untold")
    assert first == second == expected
    tries = [c for c in tg.calls_of("sendMessage") if int(c.params["chat_id"]) == ADMIN]
    assert len(tries) == 1  # one attempt, reached or not
    if admin_reachable:
        [alert] = tg.sent_texts(ADMIN)
        assert alert == t("alert.transcribe_not_found", model="no-such-model")
        assert "TRANSCRIBE_MODEL" in alert and "no-such-model" in alert
    else:
        assert tg.sent_texts(ADMIN) == []
    assert [c.model for c in oai.transcriptions] == ["no-such-model"] * 2 and oai.calls == []


async def test_video_notes_and_audio_files_are_transcribed_in_their_formats(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    note = mp4()
    oai.enqueue_transcript("hi from a video note", "hola, esto es audio")
    tg.push_voice(100, note, kind="video_note", duration=10)
    await tg.wait_sent(100, 2)
    music = mp4(7)
    tg.push_voice(
        100,
        music,
        kind="audio",
        file_name="Recording 12.M4A",
        mime_type="audio/mp4",
        caption="translate this to English",
    )
    texts = await tg.wait_sent(100, 4)
    assert texts[2] == f"{HEARD}hola, esto es audio"
    first, second = oai.transcriptions
    assert (first.filename, first.content_type, first.data) == ("video_note.mp4", "video/mp4", note)
    assert (second.filename, second.content_type, second.data) == (
        "audio.m4a",
        "audio/mp4",
        music,
    )
    # The caption says what to do with the recording; both reach the model.
    assert oai.calls[-1].last_user_text == "translate this to English\n\nhola, esto es audio"


async def test_audio_sent_as_a_file_is_transcribed_not_refused_as_a_document(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    # Telegram's apps send a WAV (or FLAC) file as a document, not as audio.
    wav = b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(i % 256 for i in range(2000))
    oai.enqueue_transcript("minutes of the meeting")
    oai.enqueue("Noted.")
    tg.push_document(100, wav, "meeting.wav", "audio/x-wav", caption="summarize")
    assert await tg.wait_sent(100, 2) == [f"{HEARD}minutes of the meeting", "Noted."]
    [heard] = oai.transcriptions
    assert (heard.filename, heard.content_type, heard.data) == ("audio.wav", "audio/wav", wav)
    assert oai.calls[-1].last_user_text == "summarize\n\nminutes of the meeting"
    # One the transcription API can't read gets the voice refusal, not a document's.
    tg.push_document(100, b"0&\xb2u" + bytes(100), "song.wma", "audio/x-ms-wma")
    assert (await tg.wait_sent(100, 3))[-1] == t("voice.unsupported_format")
    assert len(oai.transcriptions) == 1


async def test_in_groups_a_voice_note_replying_to_the_bot_is_addressed_to_it(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    group = -100200
    tg.chat(group, "group")
    tg.push_message(group, f"@{BOT_USER['username']} hello", user_id=7)
    await tg.wait_sent(group, 1)
    bots_message = next(m for (c, _), m in tg.messages.items() if c == group)
    tg.push_voice(group, ogg_opus(), duration=2, user_id=7)  # not addressed: ignored
    oai.enqueue_transcript("what did I just say?")
    voice = tg.push_voice(
        group,
        ogg_opus(1),
        duration=2,
        user_id=7,
        extra={"reply_to_message": bots_message},
    )
    texts = await tg.wait_sent(group, 3)
    assert texts[1:] == [f"{HEARD}what did I just say?", "echo: what did I just say?"]
    assert len(oai.transcriptions) == 1  # the unaddressed one was never downloaded
    # Both the quote and the answer reply to the voice note.
    replies = [m["reply_parameters"]["message_id"] for m in sent_messages(tg, group)[1:]]
    assert replies == [voice["message_id"], voice["message_id"]]
    # A caption that mentions the bot addresses it too; the mention is not part of the question.
    mention = f"@{BOT_USER['username']}"
    oai.enqueue_transcript("is it raining?")
    tg.push_voice(
        group,
        ogg_opus(2),
        duration=2,
        user_id=7,
        caption=f"{mention} answer briefly",
        extra={"caption_entities": [{"type": "mention", "offset": 0, "length": len(mention)}]},
    )
    await tg.wait_sent(group, 5)
    assert oai.calls[-1].last_user_text == "answer briefly\n\nis it raining?"


async def test_audio_files_sent_together_are_each_transcribed_and_answered_in_order(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(album_wait=0.3)) as app:
        oai.enqueue_transcript("first recording", "second recording")
        oai.enqueue("one", "two")
        parts = [
            tg.push_voice(
                100,
                mp3(),
                kind="audio",
                file_name=f"{name}.mp3",
                mime_type="audio/mpeg",
                extra={"media_group_id": "a1"},
            )
            for name in ("a", "b")
        ]
        assert await tg.wait_sent(100, 4) == [
            f"{HEARD}first recording",
            "one",
            f"{HEARD}second recording",
            "two",
        ]
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        turns = await store.fetch_all("SELECT user_message_id, input_kind FROM turns ORDER BY id")
    assert len(oai.transcriptions) == 2
    assert turns == [(part["message_id"], "voice") for part in parts]
    assert oai.calls[-1].transcript == [
        ("user", "first recording"),
        ("assistant", "one"),
        ("user", "second recording"),
    ]


async def test_train_summary_counts_transcribed_turns(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    for chat in range(200, 210):  # ten text conversations: enough for a job
        tg.push_message(chat, f"question number {chat}")
    oai.enqueue_transcript("tell me a joke")
    tg.push_voice(100, ogg_opus(), duration=2)
    await tg.wait_sent(100, 2)
    tg.push_message(100, "another one")
    await tg.wait_sent(100, 3)
    for chat in range(200, 210):
        await tg.wait_sent(chat, 1)
    await settled(bot)
    tg.chat(ADMIN)
    tg.push_message(ADMIN, "/train", user_id=ADMIN)
    await tg.wait_for(lambda: any(b[2].startswith("ft:start:") for b in tg.buttons(ADMIN)))
    summary = tg.texts(ADMIN)[-1]
    assert "Examples: 11 " in summary
    assert "Turns from transcribed voice messages: 1" in summary  # not the text turns


def test_voice_size_limit_is_telegrams_download_limit_or_the_models() -> None:
    def limit(url: str) -> int:
        settings = Settings(_env_file=None, telegram_bot_token=TOKEN, telegram_api_url=url)  # type: ignore[call-arg]
        return settings.voice_max_bytes

    assert limit("https://api.telegram.org") == 20 * MB
    assert 24 * MB < limit("http://127.0.0.1:8081") < 25 * MB  # self-hosted: the API's 25 MB


async def test_a_recording_of_no_length_is_heard_or_called_empty(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp
) -> None:
    """Duration 0 is what some clients declare: the recording itself decides."""
    oai.enqueue_transcript("short and sweet")
    tg.push_voice(100, ogg_opus(), duration=0)
    assert await tg.wait_sent(100, 2) == [f"{HEARD}short and sweet", "echo: short and sweet"]
    tg.push_voice(100, b"", duration=0)  # nothing in it at all
    assert (await tg.wait_sent(100, 3))[2] == t("voice.empty_file")
    assert len(oai.transcriptions) == 1 and len(oai.calls) == 1
    await settled(bot)
    store = bot.bot_data.services.store  # type: ignore[union-attr]
    assert await store.fetch_all("SELECT input_kind FROM turns") == [("voice",)]


@pytest.mark.parametrize("admin_reachable", [True, False], ids=["told", "untold"])
async def test_a_refused_key_alerts_the_admins_and_says_whether_they_know(
    tg: FakeTelegram, oai: FakeOpenAI, bot: ParleyApp, admin_reachable: bool
) -> None:
    if admin_reachable:
        tg.chat(ADMIN)  # an admin who started the bot: Telegram can write to them
    oai.enqueue_transcript(Transcript(status=401))
    tg.push_voice(100, ogg_opus(), duration=2)
    [text] = await tg.wait_sent(100, 1)
    assert text == t("error.auth" if admin_reachable else "error.auth_untold")
    if admin_reachable:
        [alert] = tg.sent_texts(ADMIN)
        model = bot.bot_data.services.voice.transcriber.model  # type: ignore[union-attr]
        assert alert == t("alert.auth", model=model)
    assert oai.calls == []
