"""Unit tests for bot.services.sentiment (the model path runs against a local HTTP server)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web

from bot.services.sentiment import (
    ChatModelAnalyzer,
    FallbackAnalyzer,
    KeywordAnalyzer,
    LexiconAnalyzer,
    ModelAnalyzer,
    OffAnalyzer,
    Sentiment,
    SentimentError,
    SentimentUnavailable,
    _chunks,
    build_analyzer,
    format_tag,
)
from tests.conftest import local_http

# --- lexicon ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Thank you so much, this is wonderful and works great!", "positive"),
        ("This is terrible, I hate it and it keeps failing.", "negative"),
        ("The meeting is on Tuesday at 3pm in room 204.", "neutral"),
    ],
)
async def test_lexicon_clear_english(text: str, label: str) -> None:
    result = await LexiconAnalyzer().analyze(text)
    assert result is not None
    assert result.label == label
    assert result.source == "lexicon"
    assert -1.0 <= result.score <= 1.0


async def test_lexicon_negation() -> None:
    result = await LexiconAnalyzer().analyze("This is not good.")
    assert result is not None
    assert result.label != "positive"
    assert result.score < 0


@pytest.mark.parametrize(("text", "label"), [("👍🔥", "positive"), ("😡", "negative")])
async def test_lexicon_emoji_only(text: str, label: str) -> None:
    result = await LexiconAnalyzer().analyze(text)
    assert result is not None
    assert result.label == label


async def test_lexicon_emoji_glued_to_words() -> None:
    result = await LexiconAnalyzer().analyze("ok👍thanks")
    assert result is not None
    assert result.label == "positive"


async def test_lexicon_long_text_is_chunked_and_threaded() -> None:
    text = "I really love this, it is a wonderful result. " * 60  # ~2,800 chars
    result = await LexiconAnalyzer().analyze(text)
    assert result is not None
    assert result.label == "positive"
    chunks = _chunks(text)
    assert len(chunks) > 1
    assert all(len(c) <= 400 for c in chunks)


def test_chunks_split_unpunctuated_text_at_words() -> None:
    chunks = _chunks("word " * 500)
    assert len(chunks) > 1
    assert all(len(c) <= 400 for c in chunks)
    assert " ".join(chunks).split() == ["word"] * 500


def test_lexicon_analyzers_share_one_vader() -> None:
    assert LexiconAnalyzer()._vader is LexiconAnalyzer()._vader


# --- tags, keywords, off ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "tag"),
    [("positive", "🙂 positive"), ("neutral", "😐 neutral"), ("negative", "🙁 negative")],
)
def test_format_tag(label: Any, tag: str) -> None:
    assert format_tag(Sentiment(label, 0.0, "lexicon")) == tag


async def test_keywords_are_naive() -> None:
    kw = KeywordAnalyzer()
    goodbye = await kw.analyze("goodbye")
    not_good = await kw.analyze("not good")
    assert goodbye is not None and goodbye.label == "positive"
    assert not_good is not None and not_good.label == "positive"
    assert goodbye.source == "keywords"


async def test_off_returns_none() -> None:
    assert await OffAnalyzer().analyze("anything") is None


# --- fallback --------------------------------------------------------------------------


class _FailingAnalyzer:
    name = "model"

    async def analyze(self, text: str) -> Sentiment | None:
        raise SentimentError("model label outside the enum")


class _SlowAnalyzer:
    name = "model"

    async def analyze(self, text: str) -> Sentiment | None:
        await asyncio.sleep(30)
        return Sentiment("negative", -1.0, "model")


async def test_fallback_on_sentiment_error(caplog: pytest.LogCaptureFixture) -> None:
    secret = "I love this secret plan"
    analyzer = FallbackAnalyzer(_FailingAnalyzer(), LexiconAnalyzer(), timeout=1.0)
    assert analyzer.name == "model"
    with caplog.at_level(logging.WARNING, logger="bot.services.sentiment"):
        result = await analyzer.analyze(secret)
    assert result is not None
    assert result.source == "lexicon"
    assert result.label == "positive"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert secret not in caplog.text


async def test_fallback_on_timeout() -> None:
    analyzer = FallbackAnalyzer(_SlowAnalyzer(), LexiconAnalyzer(), timeout=0.05)
    result = await analyzer.analyze("Thanks, that's great!")
    assert result is not None
    assert result.source == "lexicon"


# --- build_analyzer --------------------------------------------------------------------


async def test_build_analyzer_choices() -> None:
    assert isinstance(build_analyzer("off", client=None, model="m", timeout=1.0), OffAnalyzer)
    lex = build_analyzer("lexicon", client=None, model="m", timeout=1.0)
    assert isinstance(lex, LexiconAnalyzer)
    no_client = build_analyzer("model", client=None, model="m", timeout=1.0)
    assert isinstance(no_client, LexiconAnalyzer)

    client = openai.AsyncOpenAI(api_key="test", base_url="http://127.0.0.1:9/v1")
    try:
        built = build_analyzer("model", client=client, model="gpt-test", timeout=2.5)
        assert isinstance(built, FallbackAnalyzer)
        assert built.name == "model"
        assert isinstance(built.primary, ModelAnalyzer)
        assert built.primary.model == "gpt-test"
        assert built.primary.timeout == 2.5
        assert built.timeout == 2.5
        assert isinstance(built.fallback, LexiconAnalyzer)
        # The local backend's servers speak Chat Completions only; OpenAI's, Responses.
        local = build_analyzer(
            "model", client=client, model="m", timeout=1.0, conversation_backend="local"
        )
        assert isinstance(local, FallbackAnalyzer)
        assert isinstance(local.primary, ChatModelAnalyzer)
        openai_backend = build_analyzer(
            "model", client=client, model="m", timeout=1.0, conversation_backend="openai"
        )
        assert isinstance(openai_backend, FallbackAnalyzer)
        assert isinstance(openai_backend.primary, ModelAnalyzer)
    finally:
        await client.close()

    with pytest.raises(ValueError):
        build_analyzer("bogus", client=None, model="m", timeout=1.0)  # type: ignore[arg-type]


# --- model against a real HTTP server --------------------------------------------------


def _response_json(model: str, output_text: str) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": "resp_0123456789abcdef",
        "object": "response",
        "created_at": now,
        "completed_at": now,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": "Classify the sentiment.",
        "max_output_tokens": None,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_0123456789abcdef",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": output_text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "json_schema", "name": "sentiment", "strict": True}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": 42,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 12,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 54,
        },
        "user": None,
        "metadata": {},
    }


class FakeOpenAI:
    """State of the local /v1/responses endpoint: what it answers and what it received."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.output_text = '{"label":"negative","score":-0.7}'

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if self.status != 200:
            error = {"message": "boom", "type": "server_error", "param": None, "code": None}
            return web.json_response({"error": error}, status=self.status)
        return web.json_response(_response_json(body["model"], self.output_text))


@pytest.fixture
async def fake_openai() -> AsyncIterator[tuple[FakeOpenAI, openai.AsyncOpenAI]]:
    fake = FakeOpenAI()
    app = web.Application()
    app.router.add_post("/v1/responses", fake.handle)
    async with local_http(app) as url:
        client = openai.AsyncOpenAI(api_key="test", base_url=f"{url}/v1", max_retries=0)
        try:
            yield fake, client
        finally:
            await client.close()


async def test_model_analyzer_parses_response(
    fake_openai: tuple[FakeOpenAI, openai.AsyncOpenAI],
) -> None:
    fake, client = fake_openai
    result = await ModelAnalyzer(client, "gpt-test", timeout=5.0).analyze("Das ist furchtbar.")
    assert result == Sentiment("negative", -0.7, "model")

    (body,) = fake.requests
    assert body["model"] == "gpt-test"
    assert body["input"] == "Das ist furchtbar."
    assert body["instructions"]
    assert body["store"] is False
    fmt = body["text"]["format"]
    assert fmt["type"] == "json_schema"
    assert fmt["name"] == "sentiment"
    assert fmt["strict"] is True
    schema = fmt["schema"]
    assert schema["properties"]["label"]["enum"] == ["positive", "neutral", "negative"]
    assert schema["properties"]["score"] == {"type": "number"}
    assert schema["required"] == ["label", "score"]
    assert schema["additionalProperties"] is False


async def test_model_analyzer_truncates_and_clamps(
    fake_openai: tuple[FakeOpenAI, openai.AsyncOpenAI],
) -> None:
    fake, client = fake_openai
    fake.output_text = '{"label":"positive","score":3.5}'
    result = await ModelAnalyzer(client, "gpt-test", timeout=5.0).analyze("x" * 50_000)
    assert result == Sentiment("positive", 1.0, "model")
    assert 0 < len(fake.requests[0]["input"]) < 50_000


@pytest.mark.parametrize(
    "output_text",
    ['{"label":"ecstatic","score":0.9}', "not json", '["positive", 1]', '{"label":"neutral"}'],
)
async def test_model_analyzer_rejects_bad_output(
    fake_openai: tuple[FakeOpenAI, openai.AsyncOpenAI], output_text: str
) -> None:
    fake, client = fake_openai
    fake.output_text = output_text
    with pytest.raises(SentimentError):
        await ModelAnalyzer(client, "gpt-test", timeout=5.0).analyze("Great!")


async def test_model_server_error_is_sentiment_error(
    fake_openai: tuple[FakeOpenAI, openai.AsyncOpenAI],
) -> None:
    fake, client = fake_openai
    fake.status = 500
    with pytest.raises(SentimentError) as info:
        await ModelAnalyzer(client, "gpt-test", timeout=5.0).analyze("Great!")
    assert isinstance(info.value.__cause__, openai.InternalServerError)


async def test_model_server_error_falls_back_to_lexicon(
    fake_openai: tuple[FakeOpenAI, openai.AsyncOpenAI],
) -> None:
    fake, client = fake_openai
    fake.status = 500
    analyzer = build_analyzer("model", client=client, model="gpt-test", timeout=5.0)
    result = await analyzer.analyze("Thanks, this is wonderful!")
    assert result is not None
    assert result.source == "lexicon"
    assert result.label == "positive"
    assert len(fake.requests) == 1


# --- the Chat Completions variant (the local backend's servers) ------------------------


class FakeChatServer:
    """A local /v1/chat/completions endpoint: refuses some response_format types, or answers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.refuse: dict[str, tuple[int, dict[str, Any]]] = {}  # format type -> (status, body)
        self.content = '{"label":"negative","score":-0.7}'

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        refusal = self.refuse.get(body["response_format"]["type"])
        if refusal is not None:
            return web.json_response(refusal[1], status=refusal[0])
        message = {"role": "assistant", "content": self.content, "refusal": None}
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {"index": 0, "finish_reason": "stop", "logprobs": None, "message": message}
                ],
            }
        )


@pytest.fixture
async def chat_server() -> AsyncIterator[tuple[FakeChatServer, openai.AsyncOpenAI]]:
    fake = FakeChatServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    async with local_http(app) as url:
        client = openai.AsyncOpenAI(api_key="test", base_url=f"{url}/v1", max_retries=0)
        try:
            yield fake, client
        finally:
            await client.close()


def _error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None}}


# llama-cpp-python's server: its request model knows "text" and "json_object" only.
LLAMA_CPP_PYTHON_REFUSAL = (
    500,
    _error_body("1 validation error for CreateChatCompletionRequest\nresponse_format.type"),
)


async def test_chat_analyzer_asks_with_a_strict_json_schema(
    chat_server: tuple[FakeChatServer, openai.AsyncOpenAI],
) -> None:
    fake, client = chat_server
    analyzer = ChatModelAnalyzer(client, "llama3", timeout=5.0)
    assert await analyzer.analyze("Das ist furchtbar.") == Sentiment("negative", -0.7, "model")
    (body,) = fake.requests
    assert body["model"] == "llama3"
    assert body["messages"][0]["role"] == "system" and body["messages"][0]["content"]
    assert body["messages"][1] == {"role": "user", "content": "Das ist furchtbar."}
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "sentiment" and fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == ["positive", "neutral", "negative"]
    assert schema["required"] == ["label", "score"] and schema["additionalProperties"] is False
    # The same limits as the Responses variant: input truncated, score clamped.
    fake.content = '{"label":"positive","score":3.5}'
    assert await analyzer.analyze("x" * 50_000) == Sentiment("positive", 1.0, "model")
    assert 0 < len(fake.requests[1]["messages"][1]["content"]) < 50_000


@pytest.mark.parametrize(
    "content",
    ['{"label":"ecstatic","score":0.9}', "not json", '["positive", 1]', '{"label":"neutral"}'],
)
async def test_chat_analyzer_rejects_bad_output_and_asks_again_next_time(
    chat_server: tuple[FakeChatServer, openai.AsyncOpenAI], content: str
) -> None:
    fake, client = chat_server
    fake.content = content
    analyzer = ChatModelAnalyzer(client, "llama3", timeout=5.0)
    for _ in range(2):
        with pytest.raises(SentimentError) as info:
            await analyzer.analyze("Great!")
        assert not isinstance(info.value, SentimentUnavailable)
    assert [b["response_format"]["type"] for b in fake.requests] == ["json_schema"] * 2


async def test_chat_analyzer_moves_to_json_object_with_a_schema_when_json_schema_is_refused(
    chat_server: tuple[FakeChatServer, openai.AsyncOpenAI], caplog: pytest.LogCaptureFixture
) -> None:
    fake, client = chat_server
    fake.refuse["json_schema"] = LLAMA_CPP_PYTHON_REFUSAL
    analyzer = ChatModelAnalyzer(client, "llama3", timeout=5.0)
    with caplog.at_level(logging.INFO, logger="bot.services.sentiment"):
        for _ in range(3):
            assert await analyzer.analyze("Schrecklich.") == Sentiment("negative", -0.7, "model")
    kinds = [b["response_format"]["type"] for b in fake.requests]
    assert kinds == ["json_schema", "json_object", "json_object", "json_object"]
    assert fake.requests[-1]["response_format"]["schema"]["required"] == ["label", "score"]
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.INFO


async def test_chat_analyzer_gives_up_when_json_object_ignores_the_schema(
    chat_server: tuple[FakeChatServer, openai.AsyncOpenAI],
) -> None:
    fake, client = chat_server
    fake.refuse["json_schema"] = (404, {"detail": "Not Found"})
    fake.content = '{"sentiment": "bad"}'  # JSON, but not the schema's
    analyzer = ChatModelAnalyzer(client, "llama3", timeout=5.0)
    with pytest.raises(SentimentUnavailable):
        await analyzer.analyze("Great!")
    with pytest.raises(SentimentUnavailable):
        await analyzer.analyze("Great!")
    assert len(fake.requests) == 2 and analyzer.response_format is None


@pytest.mark.parametrize(
    ("status", "body", "refusal"),
    [
        (404, {"detail": "Not Found"}, True),
        (501, _error_body("Not implemented"), True),
        (400, _error_body("response_format type 'json_schema' is not supported"), True),
        (400, _error_body("Either json_schema or grammar can be specified, not both"), True),
        (422, {"detail": [{"loc": ["body", "response_format", "type"], "msg": "x"}]}, True),
        LLAMA_CPP_PYTHON_REFUSAL + (True,),
        # Failures that pass, or that have nothing to do with the format: asked again.
        (400, _error_body("the request exceeds the available context size"), False),
        (500, _error_body("CUDA error: out of memory"), False),
        (429, _error_body("response_format: too many requests"), False),
        (401, _error_body("invalid api key"), False),
        (503, _error_body("Loading model"), False),
    ],
)
async def test_which_errors_count_as_refusing_structured_output(
    chat_server: tuple[FakeChatServer, openai.AsyncOpenAI],
    status: int,
    body: dict[str, Any],
    refusal: bool,
) -> None:
    fake, client = chat_server
    fake.refuse = {"json_schema": (status, body), "json_object": (status, body)}
    analyzer = ChatModelAnalyzer(client, "llama3", timeout=5.0)
    with pytest.raises(SentimentError) as info:
        await analyzer.analyze("Great!")
    assert isinstance(info.value, SentimentUnavailable) is refusal
    assert len(fake.requests) == (2 if refusal else 1)


class _UnavailableAnalyzer:
    name = "model"

    def __init__(self) -> None:
        self.calls = 0

    async def analyze(self, text: str) -> Sentiment | None:
        self.calls += 1
        await asyncio.sleep(0)  # requests in flight together all learn it
        raise SentimentUnavailable("the server refuses structured output")


async def test_fallback_stops_asking_an_unavailable_primary_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    primary = _UnavailableAnalyzer()
    analyzer = FallbackAnalyzer(primary, LexiconAnalyzer(), timeout=1.0)
    with caplog.at_level(logging.WARNING, logger="bot.services.sentiment"):
        together = await asyncio.gather(*(analyzer.analyze("Thanks, great!") for _ in range(2)))
        later = [await analyzer.analyze("Thanks, great!") for _ in range(3)]
    assert all(r is not None and r.source == "lexicon" for r in together + later)
    assert primary.calls == 2  # the two in flight together; none after
    assert len(caplog.records) == 1 and "from now on" in caplog.records[0].getMessage()
