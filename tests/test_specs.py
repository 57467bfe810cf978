"""Unit tests for the spec validators used by the stand-in Telegram and OpenAI servers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from telegram import (
    Bot,
    BotCommand,
    BotCommandScopeChat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    ReplyParameters,
)
from telegram.request import BaseRequest, RequestData

from tests.stubs.specs import (
    INPUT_FILE,
    UPLOAD_FILE,
    OpenAISpec,
    TelegramSpec,
)

MESSAGE = {
    "message_id": 7,
    "date": 1700000000,
    "chat": {"id": 1, "type": "private", "first_name": "Ann"},
    "from": {"id": 1, "is_bot": False, "first_name": "Ann"},
    "text": "hi",
    "entities": [{"type": "bold", "offset": 0, "length": 2}],
}


@pytest.fixture(scope="module")
def telegram_spec(shared: Path) -> TelegramSpec:
    return TelegramSpec.load(shared / "specs" / "telegram-bot-api.json")


@pytest.fixture(scope="module")
def openai_spec(shared: Path) -> OpenAISpec:
    return OpenAISpec.load(shared / "specs" / "openai-openapi.json")


# --------------------------------------------------------------------------- Telegram


class CapturingRequest(BaseRequest):
    """A PTB request backend that records the wire form of each call instead of sending it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @property
    def read_timeout(self) -> float | None:
        """No default read timeout."""
        return None

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to tear down."""

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = None,
        write_timeout: Any = None,
        connect_timeout: Any = None,
        pool_timeout: Any = None,
    ) -> tuple[int, bytes]:
        """Record exactly the form fields and file parts HTTPXRequest would send."""
        form: dict[str, Any] = {}
        if request_data is not None:
            form.update(request_data.json_parameters)
            form.update(dict.fromkeys(request_data.multipart_data, INPUT_FILE))
        endpoint = url.rsplit("/", 1)[1]
        self.calls.append((endpoint, form))
        result: Any = True
        if endpoint.lower() in {"sendmessage", "senddocument"}:
            result = MESSAGE
        elif endpoint.lower() == "sendmediagroup":
            result = [MESSAGE]
        elif endpoint.lower() == "getupdates":
            result = []
        return 200, json.dumps({"ok": True, "result": result}).encode()


async def test_ptb_wire_format_validates(telegram_spec: TelegramSpec) -> None:
    request = CapturingRequest()
    bot = Bot("123:abc", request=request, get_updates_request=request)
    await bot.send_message(
        chat_id=1,
        text="hi",
        reply_markup=InlineKeyboardMarkup([[InlineKeyboardButton("a", callback_data="b")]]),
        reply_parameters=ReplyParameters(message_id=3),
    )
    await bot.send_message_draft(chat_id=1, draft_id=5, text="x")
    await bot.send_chat_action(1, "typing")
    await bot.set_my_commands(
        [BotCommand("start", "Start"), BotCommand("reset", "Forget")], scope=BotCommandScopeChat(5)
    )
    await bot.get_updates(offset=3, timeout=10, allowed_updates=["message"])
    await bot.send_document(chat_id=1, document=b"data", filename="d.txt")
    await bot.send_media_group(chat_id=1, media=[InputMediaPhoto(b"p1"), InputMediaPhoto(b"p2")])

    endpoints = [endpoint for endpoint, _ in request.calls]
    assert endpoints == [
        "sendMessage",
        "sendMessageDraft",
        "sendChatAction",
        "setMyCommands",
        "getUpdates",
        "sendDocument",
        "sendMediaGroup",
    ]
    for endpoint, form in request.calls:
        assert telegram_spec.validate_call(endpoint, form, form_encoded=True) == [], form
    assert request.calls[0][1]["chat_id"] == "1"
    assert request.calls[5][1]["document"] is INPUT_FILE


def _send_message(**extra: Any) -> dict[str, Any]:
    return {"chat_id": "1", "text": "hi", **extra}


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("sendMessage", _send_message(foo="1"), "sendMessage: unknown field 'foo'"),
        ("sendMessage", {"text": "hi"}, "sendMessage: missing required field 'chat_id'"),
        ("sendMessage", _send_message(disable_notification="1"), "sendMessage.disable_notif"),
        ("sendMessage", _send_message(message_thread_id="abc"), "sendMessage.message_thread_id"),
        ("sendMessage", _send_message(message_thread_id="1.5"), "sendMessage.message_thread_id"),
        ("sendFoo", {}, "sendFoo: unknown method"),
        (
            "sendMessage",
            _send_message(reply_markup='{"inline_keyboard": [[{"text": "a", "x": 1}]]}'),
            "sendMessage.reply_markup.inline_keyboard[0][0]: unknown field 'x'",
        ),
        (
            "sendMessage",
            _send_message(reply_parameters='{"message_id": "3"}'),
            "sendMessage.reply_parameters.message_id: expected Integer",
        ),
        (
            "setMyCommands",
            {"commands": '[{"command": "a", "description": "b"}]', "scope": '{"type": "chat"}'},
            "setMyCommands.scope: missing required field 'chat_id'",
        ),
        ("sendMessage", _send_message(entities="not json"), "sendMessage.entities"),
        ("sendMessage", _send_message(text=INPUT_FILE), "sendMessage.text: file upload"),
        (
            "sendMediaGroup",
            {"chat_id": "1", "media": '[{"type": "photo", "media": "attach://f1"}]'},
            "sendMediaGroup: no file part for 'attach://f1'",
        ),
    ],
)
def test_telegram_call_violations(
    telegram_spec: TelegramSpec, method: str, params: dict[str, Any], expected: str
) -> None:
    errors = telegram_spec.validate_call(method, params, form_encoded=True)
    assert any(error.startswith(expected) for error in errors), errors


def test_telegram_call_accepts_string_forms(telegram_spec: TelegramSpec) -> None:
    validate = telegram_spec.validate_call
    assert validate("SENDMESSAGE", _send_message(text="123"), form_encoded=True) == []
    assert validate("sendMessage", {"chat_id": "@chan", "text": "{}"}, form_encoded=True) == []
    assert validate("sendMessage", {"chat_id": 1, "text": "x"}, form_encoded=False) == []
    assert validate("sendMessage", {"chat_id": True, "text": "x"}, form_encoded=False) == [
        "sendMessage.chat_id: expected Integer or String, got True"
    ]


def test_telegram_objects(telegram_spec: TelegramSpec) -> None:
    assert telegram_spec.validate_object("Message", MESSAGE) == []
    update = {"update_id": 1, "message": MESSAGE}
    assert telegram_spec.validate_object("Update", update) == []
    callback = {
        "update_id": 2,
        "callback_query": {
            "id": "q",
            "from": MESSAGE["from"],
            "chat_instance": "c",
            "data": "b",
            "message": MESSAGE,
        },
    }
    assert telegram_spec.validate_object("Update", callback) == []
    reaction = {"type": "emoji", "emoji": "👍"}
    assert telegram_spec.validate_object("ReactionType", reaction) == []

    assert telegram_spec.validate_object("Update", {"update_id": "1"}) == [
        "Update.update_id: expected Integer, got '1'"
    ]
    bad_chat = {**MESSAGE, "chat": {"type": "private"}}
    assert telegram_spec.validate_object("Message", bad_chat) == [
        "Message.chat: missing required field 'id'"
    ]
    assert telegram_spec.validate_object("Message", {**MESSAGE, "date": True})
    assert telegram_spec.validate_object("Message", {**MESSAGE, "bogus": 1}) == [
        "Message: unknown field 'bogus'"
    ]
    assert telegram_spec.validate_object("ReactionType", {"type": "emoji"}) == [
        "ReactionType: missing required field 'emoji'"
    ]
    assert telegram_spec.validate_object("ReactionType", {"type": "nope"}) == [
        "ReactionType: {'type': 'nope'} is no known kind of ReactionType"
    ]
    assert telegram_spec.validate_object("ReactionTypePaid", {"type": "emoji"}) == [
        "ReactionTypePaid.type: must be 'paid', got 'emoji'"
    ]
    assert telegram_spec.validate_object("Nope", {}) == ["Nope: unknown type"]


# --------------------------------------------------------------------------- OpenAI


@dataclass
class Recorded:
    method: str
    path: str
    content_type: str
    body: Any


@pytest.fixture
async def openai_client() -> AsyncIterator[tuple[openai.AsyncOpenAI, list[Recorded]]]:
    """An SDK client pointed at a local server that records each request body."""
    recorded: list[Recorded] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        content_type = request.headers.get("Content-Type", "")
        body: Any = None
        if content_type.startswith("multipart/form-data"):
            form = await request.post()
            body = {k: v if isinstance(v, str) else UPLOAD_FILE for k, v in form.items()}
        elif request.can_read_body:
            body = await request.json()
        path = request.path.removeprefix("/v1")
        recorded.append(Recorded(request.method, path, content_type, body))
        if isinstance(body, dict) and body.get("stream"):
            return web.Response(body=b"", content_type="text/event-stream")
        return web.json_response({"id": "x", "object": "response"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = openai.AsyncOpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    try:
        yield client, recorded
    finally:
        await client.close()
        await runner.cleanup()


Call = Callable[[openai.AsyncOpenAI], Awaitable[Any]]

SDK_CALLS: dict[str, Call] = {
    "conversation": lambda c: c.conversations.create(metadata={"chat": "1"}),
    "conversation_items": lambda c: c.conversations.items.create(
        "conv_1", items=[{"type": "message", "role": "user", "content": "hi"}]
    ),
    "response_stream": lambda c: c.responses.create(
        model="gpt-5.4-mini",
        conversation="conv_1",
        instructions="x",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        stream=True,
    ),
    "response_json_schema": lambda c: c.responses.create(
        model="gpt-5.4-mini",
        input="I love it",
        text={
            "format": {
                "type": "json_schema",
                "name": "sentiment",
                "schema": {
                    "type": "object",
                    "properties": {"score": {"type": "number"}},
                    "required": ["score"],
                    "additionalProperties": False,
                },
                "strict": True,
            }
        },
        stream=False,
        store=False,
    ),
    "chat_stream": lambda c: c.chat.completions.create(
        model="gpt-5.4-mini",
        messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    ),
    "file": lambda c: c.files.create(file=("d.jsonl", b"{}\n"), purpose="fine-tune"),
    "fine_tune": lambda c: c.fine_tuning.jobs.create(
        model="gpt-4.1-mini-2025-04-14",
        training_file="file-1",
        suffix="parley",
        method={"type": "supervised"},
    ),
    "conversation_delete": lambda c: c.conversations.delete("conv_1"),
}


@pytest.mark.parametrize("name", list(SDK_CALLS))
async def test_sdk_requests_validate(
    openai_spec: OpenAISpec, openai_client: tuple[openai.AsyncOpenAI, list[Recorded]], name: str
) -> None:
    client, recorded = openai_client
    result = await SDK_CALLS[name](client)
    if isinstance(result, openai.AsyncStream):
        await result.close()
    (request,) = recorded
    errors = openai_spec.validate_request(
        request.method,
        request.path,
        request.body,
        content_type=request.content_type or "application/json",
    )
    assert errors == [], (request, errors)


RESPONSE = {"model": "gpt-5.4-mini", "input": "hi"}


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("POST", "/responses", {**RESPONSE, "bogus": 1}, "POST /responses: unknown field 'bogus'"),
        ("POST", "/responses", {**RESPONSE, "model": 5}, "POST /responses: $.model: "),
        ("POST", "/responses", {**RESPONSE, "input": 5}, "POST /responses: $.input: "),
        ("POST", "/responses", {**RESPONSE, "input": [{"role": "user", "content": 5}]}, "$.input"),
        ("POST", "/responses", None, "POST /responses: missing required request body"),
        ("POST", "/nope", {}, "POST /nope: unknown path"),
        ("PUT", "/responses", {}, "PUT /responses: method not allowed"),
        ("POST", "/fine_tuning/jobs", {"model": "m"}, "$: 'training_file' is a required property"),
        (
            "POST",
            "/conversations",
            {"metadata": {"a": 1}},
            "POST /conversations: $.metadata: {'a': 1} is not valid under any of the given schemas "
            "(closest: $.metadata.a: 1 is not of type 'string')",
        ),
        ("GET", "/conversations/conv_1", {"x": 1}, "operation takes no request body"),
    ],
)
def test_openai_violations(
    openai_spec: OpenAISpec, method: str, path: str, body: Any, expected: str
) -> None:
    errors = openai_spec.validate_request(method, path, body)
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"purpose": "fine-tune"}, "missing required field 'file'"),
        ({"file": UPLOAD_FILE, "purpose": "nope"}, "field 'purpose': 'nope' is not one of"),
        ({"file": UPLOAD_FILE, "purpose": "batch", "x": "1"}, "unknown field 'x'"),
        ({"file": "text", "purpose": "batch"}, "field 'file' must be a file upload"),
    ],
)
def test_openai_multipart_violations(openai_spec: OpenAISpec, body: Any, expected: str) -> None:
    errors = openai_spec.validate_request(
        "POST", "/files", body, content_type="multipart/form-data"
    )
    assert any(expected in error for error in errors), errors


def test_openai_paths_and_strictness(openai_spec: OpenAISpec) -> None:
    assert openai_spec.validate_request("GET", "/conversations/conv_1/items", None) == []
    assert openai_spec.validate_request("get", "/files?limit=2", None) == []
    lenient = openai_spec.validate_request(
        "POST", "/responses", {**RESPONSE, "x": 1}, strict_unknown=False
    )
    assert lenient == []
    errors = openai_spec.validate_request("POST", "/responses", RESPONSE, content_type="text/plain")
    assert errors == ["POST /responses: unsupported content type 'text/plain'"]


def test_loaders_are_cached(shared: Path) -> None:
    specs = shared / "specs"
    oa = specs / "openai-openapi.json"
    assert OpenAISpec.load(oa) is OpenAISpec.load(oa)
    tg = specs / "telegram-bot-api.json"
    assert TelegramSpec.load(tg) is TelegramSpec.load(tg)
