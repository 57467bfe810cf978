"""Web search: a profile turns on OpenAI's built-in tool; the answer's sources become links."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from bot.services.profiles import ProfileError, load_profiles
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_responses import ResponseChecker
from tests.stubs.openai_server import API_KEY, FakeOpenAI, Reply
from tests.stubs.rich_markdown import plain
from tests.stubs.telegram_server import FakeTelegram
from tests.test_cli import _env

PROFILES = """
[profiles.researcher]
title = "Researcher"
instructions = "Search the web and cite your sources."
tools = ["web_search"]
"""

INSEE = "https://www.insee.fr/fr/statistiques/1893198?utm_source=openai"
WIKI = "https://en.wikipedia.org/wiki/Paris"
ANSWER = f"Paris has about 2.1 million inhabitants ([insee.fr]({INSEE}))."
# The stand-in model links a cited page its text doesn't, at the end, as OpenAI's models do.
SAID = f"{ANSWER} ([en.wikipedia.org]({WIKI}))"
CITED = Reply(
    ANSWER,
    citations=((INSEE, "Populations légales 2022 - Insee"), (WIKI, "Paris - Wikipedia")),
)


def _profiles(tmp_path: Path) -> str:
    path = tmp_path / "profiles.toml"
    path.write_text(PROFILES)
    return str(path)


async def test_a_web_search_answer_keeps_its_sources_as_links(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    oai.enqueue("No search here.", CITED)
    async with running(make_settings(profiles_file=_profiles(tmp_path))) as app:
        tg.push_message(100, "hi", user_id=100)
        await tg.wait_sent(100, 1)
        tg.push_message(100, "/assistant researcher", user_id=100)
        await tg.wait_sent(100, 2)
        tg.push_message(100, "How many people live in Paris?", user_id=100)
        await tg.wait_sent(100, 3)
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        logged = await store.fetch_all("SELECT role, content FROM messages ORDER BY id")
    plain_call, searched = oai.calls
    assert "tools" not in plain_call.body  # only the profile turns it on
    assert searched.body["tools"] == [{"type": "web_search"}]
    assert searched.instructions == "Search the web and cite your sources."

    # The answer, then its sources: each page once, titled, a link to it.
    call = tg.calls_of("sendMessage")[-1]
    text = call.params["text"]
    assert text == (
        "Paris has about 2.1 million inhabitants (insee.fr). (en.wikipedia.org)\n\n"
        "Sources\n1. Populations légales 2022 - Insee\n2. Paris - Wikipedia"
    )
    links = [
        (text[e["offset"] : e["offset"] + e["length"]], e["url"])
        for e in json.loads(call.params["entities"])
        if e["type"] == "text_link"
    ]
    assert links == [
        ("insee.fr", INSEE),  # the model's own inline citations
        ("en.wikipedia.org", WIKI),
        ("Populations légales 2022 - Insee", INSEE),
        ("Paris - Wikipedia", WIKI),
    ]
    # The log and the thread keep the model's text: the list is shown, not remembered.
    assert logged[-1] == ("assistant", SAID)
    conversation = oai.conversations[searched.conversation]  # type: ignore[index]
    kept = conversation["items"][-1]["content"][0]["text"]
    assert kept == SAID and "Sources" not in kept


async def test_a_web_search_answer_with_a_table_lists_its_sources_in_a_collapsible_block(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    table = f"| City | People |\n|---|---|\n| Paris | 2.1 M |\n\nFrom [Wikipedia]({WIKI})."
    oai.enqueue(Reply(table, citations=((WIKI, "Paris - Wikipedia"),)))
    async with running(make_settings(profiles_file=_profiles(tmp_path))):
        tg.push_message(100, "/assistant researcher", user_id=100)
        await tg.wait_sent(100, 1)
        tg.push_message(100, "Paris in a table", user_id=100)
        await tg.wait_for(lambda: len(tg.rich_sent(100)) == 1)
    [message] = [m for m in tg.messages.values() if "rich_message" in m]
    blocks = message["rich_message"]["blocks"]
    assert [b["type"] for b in blocks] == ["table", "paragraph", "details"]
    assert plain(blocks[1]["text"]) == "From Wikipedia."
    details = blocks[2]
    assert details["summary"] == "Sources"
    [item] = details["blocks"][0]["items"]
    assert item["blocks"][0]["text"] == {"type": "url", "text": "Paris - Wikipedia", "url": WIKI}


def test_profile_tools_are_checked_and_refused_on_the_local_backend(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(PROFILES)
    profiles = load_profiles(path, "default instructions", "openai")
    assert profiles["researcher"].tools == ("web_search",)
    assert profiles["default"].tools == ()
    with pytest.raises(ProfileError, match=r"researcher: tools \['web_search'\] need"):
        load_profiles(path, "default instructions", "local")
    path.write_text('[profiles.x]\ntools = ["code_interpreter"]\n')
    with pytest.raises(ProfileError, match="tools"):
        load_profiles(path, "default instructions", "openai")


def test_a_web_search_profile_stops_a_local_backend_bot_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(
            TELEGRAM_BOT_TOKEN="1:x",
            OPENAI_BASE_URL="http://127.0.0.1:9/v1",
            CONVERSATION_BACKEND="local",
            PROFILES_FILE=_profiles(tmp_path),
        ),
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "PROFILES_FILE" in result.stderr and "CONVERSATION_BACKEND=openai" in result.stderr


async def test_the_stand_ins_web_search_stream_is_what_the_spec_describes(
    oai: FakeOpenAI, shared: Path
) -> None:
    """The bot is tested against this stream, so it must be OpenAI's, event for event."""
    checker = ResponseChecker(shared / "specs" / "openai-openapi.json")
    oai.enqueue(CITED)
    body = {
        "model": "gpt-5.4-mini",
        "input": "hi",
        "stream": True,
        "tools": [{"type": "web_search"}],
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    events = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{oai.url}/responses", json=body, headers=headers) as resp:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert kinds.index("response.web_search_call.searching") < kinds.index(
        "response.output_text.delta"
    )
    assert kinds.count("response.output_text.annotation.added") == 2
    # Every event the answer and its search are made of (the response snapshots around them
    # carry the stand-in's usage, whose shape is older than this spec's and not at issue).
    snapshots = ("response.created", "response.in_progress", "response.completed")
    problems = [
        p
        for e in events
        if e["type"] not in snapshots
        for p in checker.validate_object("ResponseStreamEvent", e)
    ]
    assert problems == []
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["web_search_call", "message"]
    text = final["output"][1]["content"][0]["text"]
    for note in final["output"][1]["content"][0]["annotations"]:
        assert text[note["start_index"] : note["end_index"]].endswith(f"]({note['url']})")
