"""A stand-in Telegram Bot API server: long polling, messages, drafts, files, injected faults.

It keeps per-chat state, records every call, and checks each call against the Bot API spec
(method known, required fields present, no unknown fields, types right) plus Telegram's own
limits that the spec only states in prose (text length). A violation is recorded and
answered with a 400, as Telegram would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.stubs.entities import check_entities
from tests.stubs.rich_markdown import read_rich
from tests.stubs.specs import INPUT_FILE, TelegramSpec

BOT_USER = {
    "id": 777000111,
    "is_bot": True,
    "first_name": "Parley",
    "username": "parley_test_bot",
    "can_join_groups": True,
    "can_read_all_group_messages": False,
    "supports_inline_queries": False,
}


def private_text_update(update_id: int, chat_id: int, message_id: int, text: str) -> dict[str, Any]:
    """A raw update: a text message from a user in their private chat (as Telegram sends it)."""
    return {
        "update_id": update_id,
        "message": {
            "message_id": message_id,
            "date": int(time.time()),
            "text": text,
            "chat": {"id": chat_id, "type": "private", "first_name": "U"},
            "from": {"id": chat_id, "is_bot": False, "first_name": "U"},
        },
    }


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float = field(default_factory=time.monotonic)
    status: int | None = None  # the HTTP status the stand-in answered with
    answered_at: float | None = None  # when that answer was ready (after any latency)


@dataclass
class Fault:
    status: int
    description: str
    retry_after: int | None = None


class FakeTelegram:
    """State and handlers of the stand-in server; start() binds it to 127.0.0.1:<free port>."""

    def __init__(self, token: str, spec: TelegramSpec | None) -> None:
        self.token = token
        self.spec = spec
        self.calls: list[Call] = []
        self.violations: list[str] = []
        self.chats: dict[int, dict[str, Any]] = {}
        self.files: dict[str, tuple[str, bytes]] = {}
        self.faults: dict[str, deque[Fault]] = {}
        self.latency: dict[str, float] = {}
        self.allowed_updates: list[str] | None = None
        # This share of sendMessage calls fails at random (seeded): 429 or 502.
        self.send_fault_rate = 0.0
        self.rng = random.Random(0)
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}  # what the bot sent, as now
        self.uploads: list[tuple[str, str, bytes]] = []  # (method, field, bytes) of file parts
        # Rich messages (Bot API 10.1): refused with this status while set (400: Telegram
        # won't take them; 404: a Bot API server older than 10.1, which lacks the methods).
        self.refuse_rich: int | None = None
        # HTML tags a rich call is refused for with a 400 (a server that won't take them).
        self.refuse_rich_tags: set[str] = set()
        self.rich_markdown: dict[tuple[int, int], str] = {}  # what each rich message was sent as
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.url = ""

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._handle_file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._closing = True  # release long polls the bot abandoned, so shutdown is quick
        await self._notify()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what tests inject ------------------------------------------------------------------

    def chat(
        self,
        chat_id: int,
        chat_type: str = "private",
        *,
        title: str | None = None,
        is_forum: bool = False,
    ) -> dict[str, Any]:
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = f"User{chat_id}"
        else:
            chat["title"] = title or f"Group {chat_id}"
        if is_forum:
            chat["is_forum"] = True
        self.chats[chat_id] = chat
        return chat

    def next_message_id(self, chat_id: int) -> int:
        return next(self._message_ids.setdefault(chat_id, itertools.count(1)))

    def push_update(self, update: dict[str, Any], *, validate: bool = True) -> dict[str, Any]:
        """Queue a raw update (given without update_id); it is checked against the spec.

        `validate=False` lets a test send what the spec doesn't know (future update types).
        """
        update = {"update_id": next(self._update_ids), **update}
        if self.spec is not None and validate:
            self.violations += [
                f"injected Update: {v}" for v in self.spec.validate_object("Update", update)
            ]
        self._updates.append(update)
        asyncio.get_running_loop().create_task(self._notify())
        return update

    def push_message(
        self,
        chat_id: int,
        text: str | None = None,
        *,
        user_id: int | None = None,
        chat_type: str = "private",
        topic_id: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Queue a message from a user; returns the message object."""
        chat = self.chats.get(chat_id) or self.chat(chat_id, chat_type)
        user_id = user_id if user_id is not None else (chat_id if chat_id > 0 else 1001)
        message: dict[str, Any] = {
            "message_id": self.next_message_id(chat_id),
            "date": int(time.time()),
            "chat": chat,
            "from": {
                "id": user_id,
                "is_bot": False,
                "first_name": f"User{user_id}",
                "language_code": "en",
            },
        }
        if text is not None:
            message["text"] = text
            entities = []
            if text.startswith("/"):
                command = text.split()[0]
                entities.append({"type": "bot_command", "offset": 0, "length": utf16_len(command)})
            # Telegram marks @mentions as entities; the bot relies on them in groups.
            for word in text.split():
                if word.startswith("@") and len(word) > 1:
                    offset = utf16_len(text[: text.index(word)])
                    entities.append(
                        {"type": "mention", "offset": offset, "length": utf16_len(word)}
                    )
            if entities:
                message["entities"] = entities
        if topic_id is not None:
            message["message_thread_id"] = topic_id
            message["is_topic_message"] = True
        message.update(extra or {})
        self.push_update({"message": message})
        return message

    def push_photo(
        self,
        chat_id: int,
        data: bytes,
        *,
        caption: str | None = None,
        media_group_id: str | None = None,
        as_document: str | None = None,
        file_size: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Queue a photo (or, with `as_document=<mime type>`, an image file) from a user.

        `file_size` overrides what Telegram reports, e.g. to claim a file is too big.
        """
        n = len(self.files) + 1
        file_id = f"file{n}"
        self.add_file(file_id, data, f"photos/file_{n}.bin")
        size = file_size if file_size is not None else len(data)
        extra: dict[str, Any] = {}
        if as_document:
            extra["document"] = {
                "file_id": file_id,
                "file_unique_id": f"u{file_id}",
                "file_name": f"image{n}",
                "mime_type": as_document,
                "file_size": size,
            }
        else:
            thumb_id = f"thumb{n}"
            self.add_file(thumb_id, data, f"photos/thumb_{n}.bin")
            extra["photo"] = [
                {
                    "file_id": thumb_id,
                    "file_unique_id": f"u{thumb_id}",
                    "width": 90,
                    "height": 68,
                    "file_size": min(size, 2000),
                },
                {
                    "file_id": file_id,
                    "file_unique_id": f"u{file_id}",
                    "width": 1280,
                    "height": 960,
                    "file_size": size,
                },
            ]
        if caption is not None:
            extra["caption"] = caption
        if media_group_id is not None:
            extra["media_group_id"] = media_group_id
        return self.push_message(chat_id, extra=extra, **kwargs)

    def push_voice(
        self,
        chat_id: int,
        data: bytes,
        *,
        kind: str = "voice",
        duration: int = 3,
        mime_type: str | None = None,
        file_name: str | None = None,
        file_size: int | None = None,
        caption: str | None = None,
        extra: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Queue a recording from a user: a voice note (OGG/Opus as Telegram records them),
        an audio file (`kind="audio"`) or a video note (`kind="video_note"`).

        `file_size` overrides what Telegram reports, e.g. to claim a file is too big.
        """
        n = len(self.files) + 1
        file_id = f"{kind}{n}"
        self.add_file(file_id, data, f"{kind}s/file_{n}.bin")
        size = file_size if file_size is not None else len(data)
        media: dict[str, Any] = {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "duration": duration,
            "file_size": size,
        }
        if kind == "voice":
            media["mime_type"] = mime_type or "audio/ogg"
        elif kind == "audio":
            if mime_type:
                media["mime_type"] = mime_type
            if file_name:
                media["file_name"] = file_name
        elif kind == "video_note":
            media["length"] = 384
        else:
            raise ValueError(f"not a recording kind: {kind}")
        fields: dict[str, Any] = {kind: media, **(extra or {})}
        if caption is not None:
            fields["caption"] = caption
        return self.push_message(chat_id, extra=fields, **kwargs)

    def push_document(
        self,
        chat_id: int,
        data: bytes,
        file_name: str | None,
        mime_type: str | None,
        *,
        caption: str | None = None,
        media_group_id: str | None = None,
        file_size: int | None = None,
        extra: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Queue a file sent as a document (a PDF, a text file...) from a user.

        `file_size` overrides what Telegram reports, e.g. to claim a file is too big;
        `file_name` or `mime_type` None leaves the field out, as some clients do; `extra`
        adds fields to the message (e.g. reply_to_message).
        """
        file_id = f"doc{len(self.files) + 1}"
        self.add_file(file_id, data, f"documents/{file_id}.bin")
        document: dict[str, Any] = {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "file_size": file_size if file_size is not None else len(data),
        }
        if file_name is not None:
            document["file_name"] = file_name
        if mime_type is not None:
            document["mime_type"] = mime_type
        fields: dict[str, Any] = {"document": document}
        if caption is not None:
            fields["caption"] = caption
            # Telegram marks @mentions in captions too; the bot relies on them in groups.
            mentions = [
                {
                    "type": "mention",
                    "offset": utf16_len(caption[: caption.index(w)]),
                    "length": utf16_len(w),
                }
                for w in caption.split()
                if w.startswith("@") and len(w) > 1
            ]
            if mentions:
                fields["caption_entities"] = mentions
        if media_group_id is not None:
            fields["media_group_id"] = media_group_id
        return self.push_message(chat_id, extra={**fields, **(extra or {})}, **kwargs)

    def add_file(self, file_id: str, data: bytes, path: str | None = None) -> None:
        self.files[file_id] = (path or f"files/{file_id}", data)

    def fail_next(
        self,
        method: str,
        status: int = 429,
        *,
        retry_after: int | None = 1,
        times: int = 1,
        description: str | None = None,
    ) -> None:
        """Make the next `times` calls of `method` fail like Telegram does."""
        text = description or (
            f"Too Many Requests: retry after {retry_after}" if status == 429 else "Bad Gateway"
        )
        queue = self.faults.setdefault(method, deque())
        queue.extend(
            Fault(status, text, retry_after if status == 429 else None) for _ in range(times)
        )

    # -- what tests read --------------------------------------------------------------------

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def sent_texts(self, chat_id: int) -> list[str]:
        """Texts of the messages delivered to a chat (failed attempts excluded), in order."""
        return [
            c.params["text"]
            for c in self.calls
            if c.method == "sendMessage" and c.status == 200 and int(c.params["chat_id"]) == chat_id
        ]

    def rich_sent(self, chat_id: int) -> list[str]:
        """The Markdown of the rich messages delivered to a chat, in order."""
        return [md for (cid, _), md in sorted(self.rich_markdown.items()) if cid == chat_id]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate()` holds after some call; fail the test on timeout."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def wait_sent(self, chat_id: int, count: int = 1, timeout: float = 10.0) -> list[str]:
        await self.wait_for(lambda: len(self.sent_texts(chat_id)) >= count, timeout)
        return self.sent_texts(chat_id)

    @property
    def pending_updates(self) -> int:
        return len(self._updates)

    # -- the server -------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _read_params(self, request: web.Request) -> tuple[dict[str, Any], bool]:
        if request.content_type == "application/json":
            body = await request.json() if request.can_read_body else {}
            return dict(body or {}), False
        form = await request.post()
        params: dict[str, Any] = {}
        for name, value in form.items():
            if isinstance(value, str):
                params[name] = value
            else:
                params[name] = INPUT_FILE
                self.uploads.append((request.match_info["method"], name, value.file.read()))
        params.update({k: v for k, v in request.query.items() if k not in params})
        return params, True

    async def _handle_method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params, form_encoded = await self._read_params(request)
        call = Call(method, params)
        self.calls.append(call)
        response = await self._answer(call, form_encoded)
        call.status, call.answered_at = response.status, time.monotonic()
        await self._notify()
        return response

    async def _answer(self, call: Call, form_encoded: bool) -> web.Response:
        method, params = call.method, call.params
        if method in ("sendMessage", "sendMessageDraft", "editMessageText") and params.get(
            "entities"
        ):
            # Telegram answers "can't parse entities" for these; the bot must never cause it.
            problems = check_entities(params.get("text", ""), json.loads(params["entities"]))
            if problems:
                self.violations += [f"{method}: {p}" for p in problems]
                return _error(400, f"Bad Request: can't parse entities: {problems[0]}")
        if self.spec is not None:
            problems = self.spec.validate_call(method, params, form_encoded=form_encoded)
            if problems:
                self.violations += problems
                return _error(400, f"Bad Request: {problems[0]}")
        if delay := self.latency.get(method):
            await asyncio.sleep(delay)
        queue = self.faults.get(method)
        if queue:
            fault = queue.popleft()
            return _error(fault.status, fault.description, fault.retry_after)
        if method == "sendMessage" and self.rng.random() < self.send_fault_rate:
            if self.rng.random() < 0.5:
                return _error(429, "Too Many Requests: retry after 1", 1)
            return _error(502, "Bad Gateway")
        if method == "getUpdates":
            return await self._get_updates(params)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return _ok(True)
        return handler(params)

    async def _get_updates(self, params: dict[str, Any]) -> web.Response:
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        if "allowed_updates" in params:
            value = params["allowed_updates"]
            self.allowed_updates = json.loads(value) if isinstance(value, str) else value
        if offset:
            # Telegram forgets updates once a later offset confirms them.
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if not self._updates and timeout:
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: bool(self._updates) or self._closing),
                        min(timeout, 30),
                    )
                except TimeoutError:
                    pass
        limit = int(params.get("limit") or 100)
        return _ok(self._updates[:limit])

    def _new_message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        chat = self.chats.get(chat_id) or {"id": chat_id, "type": "private", "first_name": "?"}
        message: dict[str, Any] = {
            "message_id": self.next_message_id(chat_id),
            "date": int(time.time()),
            "chat": chat,
            "from": BOT_USER,
            **content,
        }
        if params.get("message_thread_id"):
            message["message_thread_id"] = int(params["message_thread_id"])
            message["is_topic_message"] = True
        if params.get("reply_markup"):
            message["reply_markup"] = json.loads(params["reply_markup"])
        if params.get("entities"):
            message["entities"] = json.loads(params["entities"])
        self.messages[(chat_id, message["message_id"])] = message
        return message

    def _m_getMe(self, params: dict[str, Any]) -> web.Response:
        return _ok(BOT_USER)

    def _m_setWebhook(self, params: dict[str, Any]) -> web.Response:
        # Telegram's refusal of a webhook it can't call over https.
        if not str(params.get("url", "")).startswith("https://"):
            return _error(
                400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook"
            )
        return _ok(True)

    def _m_sendMessage(self, params: dict[str, Any]) -> web.Response:
        text = params.get("text", "")
        if not text.strip():
            return self._violation("sendMessage: message text is empty")
        if utf16_len(text) > 4096:
            return self._violation(f"sendMessage: message is too long ({utf16_len(text)})")
        if int(params["chat_id"]) not in self.chats:
            return _error(400, "Bad Request: chat not found")
        return _ok(self._new_message(params, text=text))

    def _m_editMessageText(self, params: dict[str, Any]) -> web.Response:
        key = (int(params["chat_id"]), int(params["message_id"]))
        message = self.messages.get(key)
        if message is None:
            return _error(400, "Bad Request: message to edit not found")
        message["text"] = params["text"]
        message["edit_date"] = int(time.time())
        if params.get("reply_markup"):
            message["reply_markup"] = json.loads(params["reply_markup"])
        else:
            message.pop("reply_markup", None)
        return _ok(message)

    def _m_sendDocument(self, params: dict[str, Any]) -> web.Response:
        document = {
            "file_id": f"d{len(self.calls)}",
            "file_unique_id": f"ud{len(self.calls)}",
            "file_name": "upload.jsonl",
        }
        content: dict[str, Any] = {"document": document}
        if params.get("caption"):
            content["caption"] = params["caption"]
        return _ok(self._new_message(params, **content))

    def push_callback(
        self, user_id: int, chat_id: int, message_id: int, data: str, language_code: str = "en"
    ) -> dict[str, Any]:
        """Queue a press on an inline button of one of the bot's messages."""
        user = {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"}
        return self.push_update(
            {
                "callback_query": {
                    "id": f"cb{len(self.calls)}",
                    "chat_instance": f"ci{chat_id}",
                    "data": data,
                    "from": user | {"language_code": language_code},
                    "message": self.messages[(chat_id, message_id)],
                }
            }
        )

    def buttons(self, chat_id: int) -> list[tuple[int, str, str]]:
        """(message_id, text, callback_data) of every inline button now shown in a chat."""
        return [
            (mid, b["text"], b.get("callback_data", ""))
            for (cid, mid), m in self.messages.items()
            if cid == chat_id
            for row in m.get("reply_markup", {}).get("inline_keyboard", [])
            for b in row
        ]

    def texts(self, chat_id: int) -> list[str]:
        """The bot's messages in a chat as they read now (edits applied), in order."""
        return [
            m.get("text") or m.get("caption") or ""
            for (cid, _), m in sorted(self.messages.items())
            if cid == chat_id
        ]

    def _m_sendPhoto(self, params: dict[str, Any]) -> web.Response:
        photo = [
            {
                "file_id": f"p{len(self.calls)}",
                "file_unique_id": f"up{len(self.calls)}",
                "width": 720,
                "height": 300,
            }
        ]
        content: dict[str, Any] = {"photo": photo}
        if params.get("caption"):
            content["caption"] = params["caption"]
        return _ok(self._new_message(params, **content))

    def _m_sendMessageDraft(self, params: dict[str, Any]) -> web.Response:
        if utf16_len(params.get("text", "")) > 4096:
            return self._violation("sendMessageDraft: text is too long")
        chat = self.chats.get(int(params["chat_id"]))
        if chat is None or chat["type"] != "private":
            return self._violation("sendMessageDraft: drafts are for private chats only")
        if int(params["draft_id"]) == 0:
            return self._violation("sendMessageDraft: draft_id must be non-zero")
        return _ok(True)

    def _read_rich(self, method: str, params: dict[str, Any]) -> tuple[Any, web.Response | None]:
        """A rich message call's blocks, or the answer refusing it (as Telegram would)."""
        if self.refuse_rich == 404:
            return None, _error(404, "Not Found")
        if self.refuse_rich is not None:
            return None, _error(self.refuse_rich, "Bad Request: rich messages can't be sent")
        rich = params["rich_message"]
        rich = json.loads(rich) if isinstance(rich, str) else rich
        if ("html" in rich) == ("markdown" in rich):
            return None, self._violation(f"{method}: exactly one of html or markdown must be used")
        if "html" in rich:  # the bot has no use for it; the stand-in doesn't read it
            return None, self._violation(f"{method}: the stand-in reads rich markdown only")
        if any(f"<{tag}>" in rich["markdown"] for tag in self.refuse_rich_tags):
            return None, _error(400, "Bad Request: can't parse rich message")
        blocks, problems = read_rich(rich["markdown"], draft=method == "sendRichMessageDraft")
        if problems:
            return None, self._violation(f"{method}: {problems[0]}")
        return blocks, None

    def _m_sendRichMessage(self, params: dict[str, Any]) -> web.Response:
        blocks, refusal = self._read_rich("sendRichMessage", params)
        if refusal is not None:
            return refusal
        if int(params["chat_id"]) not in self.chats:
            return _error(400, "Bad Request: chat not found")
        message = self._new_message(params, rich_message={"blocks": blocks})
        rich = params["rich_message"]
        rich = json.loads(rich) if isinstance(rich, str) else rich
        self.rich_markdown[(message["chat"]["id"], message["message_id"])] = rich["markdown"]
        if self.spec is not None:  # the stand-in's own reading must make a valid Message
            problems = self.spec.validate_object("Message", message)
            self.violations += [f"stand-in: {v}" for v in problems]
        return _ok(message)

    def _m_sendRichMessageDraft(self, params: dict[str, Any]) -> web.Response:
        _, refusal = self._read_rich("sendRichMessageDraft", params)
        if refusal is not None:
            return refusal
        chat = self.chats.get(int(params["chat_id"]))
        if chat is None or chat["type"] != "private":
            return self._violation("sendRichMessageDraft: drafts are for private chats only")
        if int(params["draft_id"]) == 0:
            return self._violation("sendRichMessageDraft: draft_id must be non-zero")
        return _ok(True)

    def _m_getChat(self, params: dict[str, Any]) -> web.Response:
        """A ChatFullInfo for a chat the stand-in knows (one a test made or a user wrote in)."""
        chat = self.chats.get(int(params["chat_id"]))
        if chat is None:
            return _error(400, "Bad Request: chat not found")
        info: dict[str, Any] = {
            **chat,
            "accent_color_id": 0,
            "max_reaction_count": 11,
            "accepted_gift_types": {
                "unlimited_gifts": True,
                "limited_gifts": True,
                "unique_gifts": True,
                "premium_subscription": True,
                "gifts_from_channels": True,
            },
        }
        if self.spec is not None:
            self.violations += [
                f"getChat answer: {v}" for v in self.spec.validate_object("ChatFullInfo", info)
            ]
        return _ok(info)

    def _m_getFile(self, params: dict[str, Any]) -> web.Response:
        file_id = params["file_id"]
        if file_id not in self.files:
            return _error(400, "Bad Request: invalid file_id")
        path, data = self.files[file_id]
        return _ok(
            {
                "file_id": file_id,
                "file_unique_id": f"u{file_id}",
                "file_size": len(data),
                "file_path": path,
            }
        )

    def _violation(self, problem: str) -> web.Response:
        self.violations.append(problem)
        return _error(400, f"Bad Request: {problem}")

    async def _handle_file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        path = request.match_info["path"]
        for stored_path, data in self.files.values():
            if stored_path == path:
                return web.Response(body=data, content_type="application/octet-stream")
        return web.Response(status=404)


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _error(status: int, description: str, retry_after: int | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return web.json_response(body, status=status)
