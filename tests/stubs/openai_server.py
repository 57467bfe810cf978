"""A stand-in OpenAI API server: conversations, streamed responses, chat completions, models.

The model is scripted: tests enqueue replies (text, an error status, latency, a stream cut
halfway); with the queue empty it echoes the user's last words, so concurrent tests can tell
answers apart. Every request body is checked against the OpenAPI spec; conversations keep
their items so a test can see what the model was shown.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.stubs.specs import UPLOAD_FILE, OpenAISpec

API_KEY = "sk-test-parley-0123456789abcdef"
JUDGE_SCHEMA = "verdict"  # the evaluation's judge asks for structured output by this name


@dataclass
class ModelCall:
    """What the model was asked: the API used, and everything it was shown, in order."""

    api: str  # "responses" | "chat"
    model: str
    instructions: str | None
    transcript: list[tuple[str, str]]  # (role, text) incl. history and the new input
    images: list[str]  # image URLs in the new input
    conversation: str | None
    body: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    # Every image the model was shown (history included), decoded: (format, width, height).
    image_info: list[tuple[str, int, int]] = field(default_factory=list)
    # Every file (Responses `input_file`) the model was shown, history included, decoded:
    # (filename, its text as the stand-in reads it: a PDF's pages, a text file's text).
    files: list[tuple[str, str]] = field(default_factory=list)

    @property
    def last_user_text(self) -> str:
        return next((text for role, text in reversed(self.transcript) if role == "user"), "")


@dataclass
class Reply:
    """One scripted model answer (or failure)."""

    text: str | Callable[[ModelCall], str] | None = None
    status: int = 200
    delay: float = 0.0
    cut_after: int | None = None  # drop the connection after this many deltas
    chunk_words: int = 1
    chunk_delay: float = 0.0  # seconds between deltas
    hold: asyncio.Event | None = None  # the answer waits until the test sets this
    # How a Responses stream ends after its deltas: "completed", "incomplete" (output cap
    # hit), "failed" (response.failed with `code`) or "error" (an `error` event with `code`).
    end: str = "completed"
    code: str = "server_error"
    # After its deltas the stream stalls instead of ending: a keep-alive byte (an SSE comment
    # line) every `drip` seconds, for ever, so no single read ever times out.
    drip: float = 0.0
    # A web search: the (url, title) pages the answer cites. With the request's web_search
    # tool the response starts with a web_search_call, and its text carries a url_citation
    # annotation for each page (a page the text doesn't link yet is linked at its end).
    citations: tuple[tuple[str, str], ...] = ()


# Transcription models OpenAI lists (whisper-1 and the gpt-4o ones until 2027-02-26).
TRANSCRIBE_MODELS = frozenset(
    {
        "gpt-transcribe",
        "gpt-4o-transcribe",
        "gpt-4o-mini-transcribe",
        "gpt-4o-mini-transcribe-2025-12-15",
        "gpt-4o-transcribe-diarize",
        "whisper-1",
    }
)
TRANSCRIBE_MAX_BYTES = 25 * 1024 * 1024  # the API's request limit
DEFAULT_TRANSCRIPT = "Hello, this is a voice note."


@dataclass
class Transcript:
    """One scripted transcription result (or failure)."""

    text: str = DEFAULT_TRANSCRIPT
    status: int = 200
    delay: float = 0.0


@dataclass
class TranscriptionCall:
    """One transcription request as it arrived: the model, the file part, the form fields."""

    model: str
    filename: str
    content_type: str
    data: bytes
    fields: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None


class FakeOpenAI:
    def __init__(self, spec: OpenAISpec | None, api_key: str = API_KEY) -> None:
        self.spec = spec
        self.api_key = api_key
        self.script: deque[Reply] = deque()
        self.latency = 0.0  # added to every model call
        # With the script empty, this share of model calls fails at random (seeded): a 429,
        # a 500, an answer slower than `fault_delay`, or a stream cut halfway.
        self.fault_rate = 0.0
        self.fault_delay = 2.0
        self.rng = random.Random(0)
        self.faults_injected: list[str] = []
        self.calls: list[ModelCall] = []
        self.requests: list[tuple[str, str, Any]] = []
        self.violations: list[str] = []
        self.conversations: dict[str, dict[str, Any]] = {}
        self.in_flight: dict[str, int] = {}
        self.max_in_flight_per_conversation = 0
        # Structured-output requests (a json_schema text format on Responses, a response_format
        # on Chat Completions), e.g. sentiment, have their own script so they never take a
        # chat answer; empty, a word rule labels the text.
        self.classify_script: deque[Reply] = deque()
        self.classify_calls: list[dict[str, Any]] = []  # refused ones included
        # The evaluation's judge: structured-output requests whose schema is named "verdict"
        # (Responses `text.format` or Chat Completions `response_format`). `judge` is given
        # the two answers it is shown (answer_a, answer_b) and returns the verdict object, or
        # a Reply whose status is an error; unset, the longer answer wins. Each call is kept
        # in `judge_calls` as (answer_a, answer_b, the request body). `latency` applies.
        self.judge: Callable[[str, str], dict[str, Any] | Reply] | None = None
        self.judge_calls: list[tuple[str, str, dict[str, Any]]] = []
        # Answers by model when the script is empty, keyed by the model's name or a prefix
        # of it ("ft:"): a candidate model that answers differently from the model in use.
        self.answers_by_model: dict[str, Callable[[ModelCall], str]] = {}
        # Chat Completions' response_format types this server refuses, and with what status:
        # 400 as vLLM or LM Studio, 500 as llama-cpp-python's server (whose response_format
        # knows only "text" and "json_object", the latter with an optional "schema"), 422 as
        # a FastAPI server that validates its request models.
        self.refused_formats: set[str] = set()
        self.refusal_status = 400
        # False: there is no Responses API at all; POST /v1/responses answers FastAPI's
        # 404 {"detail": "Not Found"}, as llama-cpp-python's and vLLM's servers do.
        self.responses_api = True
        # Fine-tuning: uploaded files, jobs, and how jobs move (one status per poll).
        self.files: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.job_plan = ["validating_files", "queued", "running", "succeeded"]
        self.job_failure: str | None = None  # a job fails with this when it would succeed
        self.fine_tuning_forbidden = False  # job creation answers 403, as it now does for most
        self.fine_tuned_models: list[str] = []
        self.fine_tuning_down = False  # every fine-tuning route answers 503
        # Extra fields of listed models, e.g. the throughput parley-trainer reports.
        self.model_extras: dict[str, dict[str, Any]] = {}
        # Chat Completions as other servers refuse an output cap: fields refused outright
        # (OpenAI's reasoning models refuse "max_tokens"), and a context length that prompt
        # (about four characters a token) plus cap may not exceed (vLLM's 400).
        self.refused_cap_fields: set[str] = set()
        self.context_length: int | None = None
        # Transcription (POST /audio/transcriptions): scripted transcripts, taken in order
        # (DEFAULT_TRANSCRIPT when none is queued), and every request as it arrived.
        self.transcripts: deque[Transcript] = deque()
        self.transcriptions: list[TranscriptionCall] = []
        self.transcribe_models = set(TRANSCRIBE_MODELS)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def enqueue(self, *replies: Reply | str) -> None:
        self.script.extend(r if isinstance(r, Reply) else Reply(r) for r in replies)

    def enqueue_transcript(self, *transcripts: Transcript | str) -> None:
        self.transcripts.extend(
            t if isinstance(t, Transcript) else Transcript(t) for t in transcripts
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/v1/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- routing ----------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        path = "/" + request.match_info["path"]
        body: Any = None
        upload: bytes | None = None
        upload_meta: tuple[str, str] = ("", "")  # the file part's filename and content type
        if request.can_read_body and request.content_type == "application/json":
            body = await request.json()
        elif request.can_read_body and request.content_type == "multipart/form-data":
            body = {}
            for name, value in (await request.post()).items():
                if isinstance(value, str):
                    body[name] = value
                else:
                    body[name] = UPLOAD_FILE
                    upload = value.file.read()
                    upload_meta = (value.filename or "", value.content_type or "")
        self.requests.append((request.method, path, body))
        if self.spec is not None:
            problems = self.spec.validate_request(
                request.method, path, body, content_type=request.content_type or "application/json"
            )
            if problems:
                self.violations += problems
                return _error(400, "; ".join(problems[:3]), "invalid_request_error", None)
        parts = path.strip("/").split("/")
        if request.method == "POST" and parts == ["responses"]:
            if not self.responses_api:
                return web.json_response({"detail": "Not Found"}, status=404)
            return await self._responses(request, body)
        if request.method == "POST" and parts == ["chat", "completions"]:
            return await self._chat(request, body)
        if parts[0] == "conversations":
            return self._conversations(request.method, parts[1:], body)
        if request.method == "GET" and parts == ["models"]:
            return web.json_response(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": m,
                            "object": "model",
                            "created": 1_700_000_000,
                            "owned_by": "openai",
                            **self.model_extras.get(m, {}),
                        }
                        for m in (
                            "gpt-5.4-mini",
                            "gpt-5.4-nano",
                            "gpt-4.1-mini",
                            *self.fine_tuned_models,
                        )
                    ],
                }
            )
        if request.method == "POST" and parts == ["audio", "transcriptions"]:
            return await self._transcribe(body, upload or b"", *upload_meta)
        if request.method == "POST" and parts == ["files"]:
            return self._upload(body, upload or b"")
        if parts[:2] == ["fine_tuning", "jobs"]:
            return self._fine_tuning(request.method, parts[2:], body)
        return _error(
            404, f"Unknown request URL: {request.method} {path}", "invalid_request_error", None
        )

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):04d}{uuid.uuid4().hex[:12]}"

    # -- conversations ----------------------------------------------------------------------

    def _conversations(self, method: str, parts: list[str], body: Any) -> web.Response:
        if not parts and method == "POST":
            conv = {
                "id": self._new_id("conv"),
                "object": "conversation",
                "created_at": int(time.time()),
                "metadata": (body or {}).get("metadata") or {},
                "items": [
                    _as_item(i, self._new_id("msg")) for i in (body or {}).get("items") or []
                ],
            }
            self.conversations[conv["id"]] = conv
            return web.json_response(_public(conv))
        conv = self.conversations.get(parts[0]) if parts else None
        if conv is None:
            return _error(404, "Conversation not found", "invalid_request_error", None)
        if len(parts) == 1 and method == "GET":
            return web.json_response(_public(conv))
        if len(parts) == 1 and method == "DELETE":
            del self.conversations[conv["id"]]
            return web.json_response(
                {"id": conv["id"], "object": "conversation.deleted", "deleted": True}
            )
        if len(parts) == 2 and parts[1] == "items" and method == "GET":
            return web.json_response(
                {
                    "object": "list",
                    "data": conv["items"],
                    "has_more": False,
                    "first_id": None,
                    "last_id": None,
                }
            )
        return _error(405, "Method not allowed", "invalid_request_error", None)

    # -- files and fine-tuning --------------------------------------------------------------

    def _upload(self, body: dict[str, Any], data: bytes) -> web.Response:
        file_id = self._new_id("file")
        problems = _check_training_file(data) if body.get("purpose") == "fine-tune" else []
        self.violations += [f"uploaded {file_id}: {p}" for p in problems]
        self.files[file_id] = {"data": data, "purpose": body.get("purpose"), "problems": problems}
        return web.json_response(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": "upload.jsonl",
                "purpose": body.get("purpose"),
                "status": "processed",
                "expires_at": None,
                "status_details": None,
            }
        )

    def _fine_tuning(self, method: str, parts: list[str], body: Any) -> web.Response:
        if self.fine_tuning_down:
            return _status_error(503)
        if not parts and method == "POST":
            if self.fine_tuning_forbidden:
                return _error(
                    403,
                    "Fine-tuning is not available for your organization.",
                    "invalid_request_error",
                    "fine_tuning_not_available",
                )
            for key in ("training_file", "validation_file"):
                if body.get(key) and body[key] not in self.files:
                    return _error(400, f"File {body[key]} not found", "invalid_request_error", None)
            job_id = self._new_id("ftjob")
            now = int(time.time())
            self.jobs[job_id] = {
                "id": job_id,
                "object": "fine_tuning.job",
                "created_at": now,
                "error": None,
                "fine_tuned_model": None,
                "finished_at": None,
                "model": body["model"],
                "organization_id": "org-test",
                "result_files": [],
                "seed": 42,
                "status": self.job_plan[0],
                "trained_tokens": None,
                "training_file": body["training_file"],
                "validation_file": body.get("validation_file"),
                "hyperparameters": {
                    "n_epochs": 3,
                    "batch_size": 1,
                    "learning_rate_multiplier": 1.0,
                },
                "method": body.get("method"),
                "metadata": body.get("metadata"),
                "suffix": body.get("suffix"),
                "estimated_finish": None,
                "integrations": [],
                "_events": [_event(now, "info", f"Created fine-tuning job: {job_id}")],
                "_checkpoints": [],
            }
            return web.json_response(_public_job(self.jobs[job_id]))
        if not parts and method == "GET":
            return web.json_response(
                {
                    "object": "list",
                    "has_more": False,
                    "data": [_public_job(self._advance(j)) for j in reversed(self.jobs.values())],
                }
            )
        job = self.jobs.get(parts[0])
        if job is None:
            return _error(404, "Job not found", "invalid_request_error", None)
        if len(parts) == 1 and method == "GET":
            return web.json_response(_public_job(self._advance(job)))
        if parts[1:] == ["cancel"] and method == "POST":
            if job["status"] not in ("succeeded", "failed", "cancelled"):
                job["status"] = "cancelled"
                job["_events"].append(_event(int(time.time()), "info", "Job cancelled"))
            return web.json_response(_public_job(job))
        if parts[1:] == ["events"]:
            return web.json_response(
                {"object": "list", "has_more": False, "data": list(reversed(job["_events"]))}
            )
        if parts[1:] == ["checkpoints"]:
            return web.json_response(
                {
                    "object": "list",
                    "has_more": False,
                    "first_id": None,
                    "last_id": None,
                    "data": job["_checkpoints"],
                }
            )
        return _error(404, "Unknown fine-tuning route", "invalid_request_error", None)

    def _advance(self, job: dict[str, Any]) -> dict[str, Any]:
        """Each look at an unfinished job moves it one step along `job_plan`."""
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        now = int(time.time())
        step = self.job_plan[min(self.job_plan.index(job["status"]) + 1, len(self.job_plan) - 1)]
        training = self.files[job["training_file"]]
        if training["problems"] or (step == "succeeded" and self.job_failure):
            job["status"], job["finished_at"] = "failed", now
            message = "; ".join(training["problems"]) or self.job_failure
            job["error"] = {
                "code": "invalid_training_file" if training["problems"] else "job_failed",
                "message": message,
                "param": "training_file",
            }
        elif step == "succeeded":
            job["status"], job["finished_at"] = "succeeded", now
            job["fine_tuned_model"] = f"ft:{job['model']}:parley:{job['suffix']}:{job['id'][-6:]}"
            job["trained_tokens"] = len(training["data"]) // 4 * 3
            self.fine_tuned_models.append(job["fine_tuned_model"])
            job["_checkpoints"] = [
                {
                    "id": f"ftckpt_{n}",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": now,
                    "fine_tuning_job_id": job["id"],
                    "step_number": n * 10,
                    "fine_tuned_model_checkpoint": f"{job['fine_tuned_model']}:ckpt-step-{n * 10}",
                    "metrics": {"step": n * 10, "train_loss": round(2.0 / n, 3)},
                }
                for n in (1, 2, 3, 4)
            ]
        else:
            job["status"] = step
        job["_events"].append(
            _event(
                now,
                "info" if job["status"] != "failed" else "error",
                f"Job status: {job['status']}",
            )
        )
        return job

    # -- transcription ----------------------------------------------------------------------

    def _next_transcript(self, call: TranscriptionCall) -> Transcript:
        return self.transcripts.popleft() if self.transcripts else Transcript(DEFAULT_TRANSCRIPT)

    async def _transcribe(
        self, body: dict[str, Any], data: bytes, filename: str, content_type: str
    ) -> web.Response:
        """POST /audio/transcriptions (multipart, already checked against the spec)."""
        call = TranscriptionCall(body["model"], filename, content_type, data, dict(body))
        self.transcriptions.append(call)
        try:
            if len(data) > TRANSCRIBE_MAX_BYTES:  # the bot must refuse these itself
                self.violations.append(f"transcription: {len(data)} bytes is over 25 MB")
                return _error(
                    413, "Maximum content size limit exceeded.", "invalid_request_error", None
                )
            if body["model"] not in self.transcribe_models:
                return _error(
                    404,
                    f"The model `{body['model']}` does not exist or you do not have access to it.",
                    "invalid_request_error",
                    "model_not_found",
                )
            if problem := _audio_problem(filename, data):
                return _error(400, problem, "invalid_request_error", "invalid_value")
            script = self._next_transcript(call)
            if script.delay:
                await asyncio.sleep(script.delay)
            if script.status != 200:
                return _status_error(script.status)
            if body.get("response_format") == "text":
                return web.Response(text=script.text, content_type="text/plain")
            audio_tokens, output_tokens = len(data) // 1000 + 1, len(script.text) // 4 + 1
            usage = {
                "type": "tokens",
                "input_tokens": audio_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                "output_tokens": output_tokens,
                "total_tokens": audio_tokens + output_tokens,
            }
            return web.json_response({"text": script.text, "usage": usage})
        finally:
            call.finished = time.monotonic()

    # -- the model --------------------------------------------------------------------------

    def _random_fault(self) -> Reply | None:
        if self.rng.random() >= self.fault_rate:
            return None
        kind = self.rng.choice(["429", "500", "timeout", "cut"])
        self.faults_injected.append(kind)
        return {
            "429": Reply(status=429),
            "500": Reply(status=500),
            "timeout": Reply(delay=self.fault_delay),
            "cut": Reply("this answer is cut off before it ends", cut_after=3),
        }[kind]

    def _next_reply(self, call: ModelCall) -> tuple[Reply, str]:
        reply = self.script.popleft() if self.script else (self._random_fault() or Reply())
        text = reply.text
        if callable(text):
            text = text(call)
        rule = next((r for k, r in self.answers_by_model.items() if call.model.startswith(k)), None)
        if text is None and rule is not None:
            text = rule(call)
        if text is None:
            text = f"echo: {call.last_user_text}"
        return reply, text

    def _check_images(self, call: ModelCall, urls: list[str]) -> str | None:
        """Decode every image the model is sent, as the real API would; a problem, or None."""
        for url in urls:
            problem = _decode_image(url)
            if isinstance(problem, str):
                self.violations.append(f"{call.api}: {problem}")
                return problem
            call.image_info.append(problem)
        return None

    def _check_files(self, call: ModelCall, parts: list[dict[str, Any]]) -> str | None:
        """Read every file the model is sent, as the real API would; a problem, or None."""
        for part in parts:
            problem = _decode_file(part)
            if isinstance(problem, str):
                self.violations.append(f"{call.api}: {problem}")
                return problem
            call.files.append(problem)
        return None

    async def _model_call(self, call: ModelCall) -> tuple[Reply, str]:
        self.calls.append(call)
        if call.conversation:
            n = self.in_flight.get(call.conversation, 0) + 1
            self.in_flight[call.conversation] = n
            self.max_in_flight_per_conversation = max(self.max_in_flight_per_conversation, n)
        reply, text = self._next_reply(call)
        await asyncio.sleep(self.latency + reply.delay)
        if reply.hold is not None:
            await reply.hold.wait()
        return reply, text

    def _delta_sent(self, text: str, n: int) -> None:
        """Hook: delta `n` of the answer `text` was just written (the benchmark times it)."""

    def _done(self, call: ModelCall) -> None:
        call.finished = time.monotonic()
        if call.conversation:
            self.in_flight[call.conversation] -= 1

    async def _classification(self, body: dict[str, Any], text: str) -> web.Response | str:
        """A structured-output answer (scripted, else the word rule's), or the scripted error."""
        self.classify_calls.append(body)
        reply = self.classify_script.popleft() if self.classify_script else Reply()
        await asyncio.sleep(reply.delay)
        if reply.hold is not None:
            await reply.hold.wait()
        if reply.status != 200:
            return _status_error(reply.status)
        return reply.text if isinstance(reply.text, str) else json.dumps(_word_rule(text))

    async def _classify(self, body: dict[str, Any]) -> web.Response:
        text = (
            body.get("input")
            if isinstance(body.get("input"), str)
            else json.dumps(body.get("input"))
        )
        answer = await self._classification(body, text or "")
        if isinstance(answer, web.Response):
            return answer
        item = {
            "id": self._new_id("msg"),
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": answer, "annotations": [], "logprobs": []}],
        }
        return web.json_response(
            _response_obj(
                self._new_id("resp"),
                body,
                None,
                "completed",
                [item],
                {
                    "input_tokens": 10,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 5,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 15,
                },
            )
        )

    async def _responses(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if ((body.get("text") or {}).get("format") or {}).get("type") == "json_schema":
            if body["text"]["format"].get("name") == JUDGE_SCHEMA:
                return await self._judge_responses(body)
            return await self._classify(body)
        conv_ref = body.get("conversation")
        conv_id = conv_ref if isinstance(conv_ref, str) else (conv_ref or {}).get("id")
        conv = self.conversations.get(conv_id) if conv_id else None
        if conv_id and conv is None:
            return _error(
                404, f"Conversation with id '{conv_id}' not found.", "invalid_request_error", None
            )
        new_items = [_as_item(i, self._new_id("msg")) for i in _input_items(body.get("input"))]
        history = conv["items"] if conv else []
        call = ModelCall(
            api="responses",
            model=body["model"],
            instructions=body.get("instructions"),
            transcript=[_item_text(i) for i in history + new_items],
            images=[
                p["image_url"]
                for i in new_items
                for p in i.get("content", [])
                if isinstance(p, dict) and p.get("type") == "input_image"
            ],
            conversation=conv_id,
            body=body,
        )
        all_images = [
            p["image_url"]
            for i in history + new_items
            for p in i.get("content", [])
            if isinstance(p, dict) and p.get("type") == "input_image"
        ]
        if problem := self._check_images(call, all_images):
            return _error(
                400, f"Invalid image: {problem}", "invalid_request_error", "invalid_image"
            )
        all_files = [
            p
            for i in history + new_items
            for p in i.get("content", [])
            if isinstance(p, dict) and p.get("type") == "input_file"
        ]
        if problem := self._check_files(call, all_files):
            return _error(400, f"Invalid file: {problem}", "invalid_request_error", "invalid_file")
        try:
            reply, text = await self._model_call(call)
            if reply.status != 200:
                return _status_error(reply.status)
            response_id = self._new_id("resp")
            message_id = self._new_id("msg")
            text, searches, notes = self._web_search(body, call, reply, text)
            output_item = {
                "id": message_id,
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": text, "annotations": notes, "logprobs": []}
                ],
            }
            usage = _usage(call, text)
            output = [*searches, output_item]
            final = _response_obj(response_id, body, conv_id, "completed", output, usage)
            if conv is not None and reply.cut_after is None and reply.end == "completed":
                conv["items"] += new_items + [output_item]
            if not body.get("stream"):
                return web.json_response(final)
            return await self._stream_response(request, reply, text, final, output_item, searches)
        finally:
            self._done(call)

    def _web_search(
        self, body: dict[str, Any], call: ModelCall, reply: Reply, text: str
    ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
        """What a reply's citations stand for: the text, linking every page it cites, the
        web_search_call output items and the url_citation annotations (none without any)."""
        if not reply.citations:
            return text, [], []
        tools = [t.get("type") for t in body.get("tools") or () if isinstance(t, dict)]
        if not {"web_search", "web_search_2025_08_26", "web_search_preview"} & set(tools):
            self.violations.append("responses: a web search was scripted, but no tool allows it")
            return text, [], []
        notes = []
        for url, title in reply.citations:
            link = f"]({url})"
            if link not in text:
                host = url.split("/")[2] if "://" in url else url
                text += f" ([{host}]({url}))"
            end = text.index(link) + len(link)
            start = text.rindex("[", 0, end - len(link))
            notes.append(
                {
                    "type": "url_citation",
                    "url": url,
                    "title": title,
                    "start_index": start,
                    "end_index": end,
                }
            )
        search = {
            "id": self._new_id("ws"),
            "type": "web_search_call",
            "status": "completed",
            "action": {
                "type": "search",
                "query": call.last_user_text,
                "sources": [{"type": "url", "url": url} for url, _ in reply.citations],
            },
        }
        return text, [search], notes

    async def _stream_response(
        self,
        request: web.Request,
        reply: Reply,
        text: str,
        final: dict[str, Any],
        item: dict[str, Any],
        searches: list[dict[str, Any]] | None = None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        seq = itertools.count()

        async def send(kind: str, **data: Any) -> None:
            payload = {"type": kind, "sequence_number": next(seq), **data}
            await resp.write(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode())

        pending = {**final, "status": "in_progress", "output": [], "usage": None}
        await send("response.created", response=pending)
        await send("response.in_progress", response=pending)
        for index, search in enumerate(searches or ()):  # the web search, before the answer
            ws = {"item_id": search["id"], "output_index": index}
            added = {**search, "status": "in_progress", "action": {"type": "search"}}
            await send("response.output_item.added", output_index=index, item=added)
            for stage in ("in_progress", "searching", "completed"):
                await send(f"response.web_search_call.{stage}", **ws)
            await send("response.output_item.done", output_index=index, item=search)
        index = len(searches or ())
        ref = {"item_id": item["id"], "output_index": index}
        await send(
            "response.output_item.added",
            output_index=index,
            item={**item, "status": "in_progress", "content": []},
        )
        await send(
            "response.content_part.added",
            **ref,
            content_index=0,
            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        )
        for n, delta in enumerate(_chunks(text, reply.chunk_words)):
            if reply.cut_after is not None and n >= reply.cut_after:
                _drop(request)
                return resp
            await send(
                "response.output_text.delta", **ref, content_index=0, delta=delta, logprobs=[]
            )
            self._delta_sent(text, n)
            await asyncio.sleep(reply.chunk_delay)
        if reply.drip:
            await _drip(resp, reply.drip)
            return resp
        if reply.end == "error":
            await send("error", code=reply.code, message="The model failed.", param=None)
            await resp.write_eof()
            return resp
        if reply.end in ("failed", "incomplete"):
            ended = {**final, "status": reply.end, "output": [{**item, "status": "incomplete"}]}
            if reply.end == "failed":
                ended["error"] = {"code": reply.code, "message": "The model failed."}
            else:
                ended["incomplete_details"] = {"reason": "max_output_tokens"}
            await send(f"response.{reply.end}", response=ended)
            await resp.write_eof()
            return resp
        notes = item["content"][0]["annotations"]
        for n, note in enumerate(notes):
            await send(
                "response.output_text.annotation.added",
                **ref,
                content_index=0,
                annotation_index=n,
                annotation=note,
            )
        await send("response.output_text.done", **ref, content_index=0, text=text, logprobs=[])
        await send(
            "response.content_part.done",
            **ref,
            content_index=0,
            part={"type": "output_text", "text": text, "annotations": notes, "logprobs": []},
        )
        await send("response.output_item.done", output_index=index, item=item)
        await send("response.completed", response=final)
        await resp.write_eof()
        return resp

    async def _verdict(self, body: dict[str, Any], shown: Any) -> web.Response | str:
        """The judge's verdict on the two answers in `shown` (the evaluation's JSON input)."""
        try:
            pair = json.loads(shown) if isinstance(shown, str) else {}
            answer_a, answer_b = str(pair["answer_a"]), str(pair["answer_b"])
        except (ValueError, KeyError, TypeError):
            self.violations.append("judge: the input is not the evaluation's JSON")
            return _error(400, "unexpected judge input", "invalid_request_error", None)
        self.judge_calls.append((answer_a, answer_b, body))
        await asyncio.sleep(self.latency)
        if self.judge is not None:
            verdict = self.judge(answer_a, answer_b)
        else:
            longer = "a" if len(answer_a) > len(answer_b) else "b"
            winner = "tie" if len(answer_a) == len(answer_b) else longer
            verdict = {"winner": winner, "confidence": "medium", "reason": "the fuller answer"}
        if isinstance(verdict, Reply):
            await asyncio.sleep(verdict.delay)
            if verdict.hold is not None:
                await verdict.hold.wait()
            if verdict.status != 200:
                return _status_error(verdict.status)
            return verdict.text if isinstance(verdict.text, str) else ""
        return json.dumps(verdict)

    async def _judge_responses(self, body: dict[str, Any]) -> web.Response:
        answer = await self._verdict(body, body.get("input"))
        if isinstance(answer, web.Response):
            return answer
        item = {
            "id": self._new_id("msg"),
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": answer, "annotations": [], "logprobs": []}],
        }
        usage = {
            "input_tokens": 200,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 30,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 230,
        }
        return web.json_response(
            _response_obj(self._new_id("resp"), body, None, "completed", [item], usage)
        )

    async def _judge_chat(self, body: dict[str, Any]) -> web.Response:
        shown = next(
            (m.get("content") for m in reversed(body["messages"]) if m["role"] == "user"), ""
        )
        answer = await self._verdict(body, shown)
        if isinstance(answer, web.Response):
            return answer
        base = {"id": self._new_id("chatcmpl"), "created": int(time.time()), "model": body["model"]}
        usage = {"prompt_tokens": 200, "completion_tokens": 30, "total_tokens": 230}
        return web.json_response(_chat_completion(base, answer, usage))

    async def _chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if (body.get("response_format") or {}).get("type") in ("json_schema", "json_object"):
            schema = body["response_format"].get("json_schema") or {}
            if schema.get("name") == JUDGE_SCHEMA:
                return await self._judge_chat(body)
            return await self._classify_chat(body)
        transcript, images = [], []
        for m in body["messages"]:
            content = m.get("content")
            if isinstance(content, list):
                transcript.append((m["role"], "".join(p.get("text", "") for p in content)))
                if m is body["messages"][-1]:
                    images = [
                        p["image_url"]["url"] for p in content if p.get("type") == "image_url"
                    ]
            else:
                transcript.append((m["role"], content or ""))
        system = [text for role, text in transcript if role in ("system", "developer")]
        all_images = [
            p["image_url"]["url"]
            for m in body["messages"]
            if isinstance(m.get("content"), list)
            for p in m["content"]
            if p.get("type") == "image_url"
        ]
        call = ModelCall(
            api="chat",
            model=body["model"],
            instructions=system[0] if system else None,
            transcript=[(r, t) for r, t in transcript if r not in ("system", "developer")],
            images=images,
            conversation=None,
            body=body,
        )
        if problem := self._check_images(call, all_images):
            return _error(
                400, f"Invalid image: {problem}", "invalid_request_error", "invalid_image"
            )
        if refused := self._refuse_cap(body, transcript):
            return refused
        try:
            reply, text = await self._model_call(call)
            if reply.status != 200:
                return _status_error(reply.status)
            completion_id = self._new_id("chatcmpl")
            usage = _usage(call, text)
            chat_usage = {
                "prompt_tokens": usage["input_tokens"],
                "completion_tokens": usage["output_tokens"],
                "total_tokens": usage["total_tokens"],
            }
            base = {"id": completion_id, "created": int(time.time()), "model": body["model"]}
            if not body.get("stream"):
                return web.json_response(_chat_completion(base, text, chat_usage))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(data: dict[str, Any]) -> None:
                await resp.write(
                    b"data: "
                    + json.dumps({**base, "object": "chat.completion.chunk", **data}).encode()
                    + b"\n\n"
                )

            await send(
                {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ]
                }
            )
            for n, delta in enumerate(_chunks(text, reply.chunk_words)):
                if reply.cut_after is not None and n >= reply.cut_after:
                    _drop(request)
                    return resp
                await send(
                    {"choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]}
                )
                await asyncio.sleep(reply.chunk_delay)
            if reply.drip:
                await _drip(resp, reply.drip)
                return resp
            # end="incomplete": the output cap was hit, as Chat Completions says it.
            finish = "length" if reply.end == "incomplete" else "stop"
            await send({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                await send({"choices": [], "usage": chat_usage})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self._done(call)

    def _refuse_cap(
        self, body: dict[str, Any], transcript: list[tuple[str, str]]
    ) -> web.Response | None:
        """A 400 for an output cap this server refuses (see `refused_cap_fields`), or None."""
        for name in ("max_tokens", "max_completion_tokens"):
            if name in body and name in self.refused_cap_fields:
                other = "max_completion_tokens" if name == "max_tokens" else "max_tokens"
                message = (
                    f"Unsupported parameter: '{name}' is not supported with this model."
                    f" Use '{other}' instead."
                )
                error = {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": name,
                    "code": "unsupported_parameter",
                }
                return web.json_response({"error": error}, status=400)
        cap = body.get("max_tokens") or body.get("max_completion_tokens")
        prompt = sum(len(text) for _, text in transcript) // 4 + 1
        if self.context_length is not None and cap and prompt + cap > self.context_length:
            return _error(
                400,
                f"This model's maximum context length is {self.context_length} tokens. However,"
                f" you requested {prompt + cap} tokens ({prompt} in the messages, {cap} in the"
                " completion). Please reduce the length of the messages or completion.",
                "BadRequestError",
                None,
            )
        return None

    async def _classify_chat(self, body: dict[str, Any]) -> web.Response:
        """Structured output through Chat Completions: what the local backend's servers offer."""
        kind = body["response_format"]["type"]
        if kind in self.refused_formats:
            self.classify_calls.append(body)
            return _format_refusal(self.refusal_status, kind)
        text = next(
            (m.get("content") for m in reversed(body["messages"]) if m["role"] == "user"), ""
        )
        answer = await self._classification(body, text if isinstance(text, str) else "")
        if isinstance(answer, web.Response):
            return answer
        base = {
            "id": self._new_id("chatcmpl"),
            "created": int(time.time()),
            "model": body["model"],
        }
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        return web.json_response(_chat_completion(base, answer, usage))


# -- helpers ----------------------------------------------------------------------------------


def _event(created_at: int, level: str, message: str) -> dict[str, Any]:
    return {
        "id": f"ftevent-{uuid.uuid4().hex[:10]}",
        "object": "fine_tuning.job.event",
        "created_at": created_at,
        "level": level,
        "message": message,
        "type": "message",
    }


def _public_job(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if not k.startswith("_")}


def _check_training_file(data: bytes) -> list[str]:
    """OpenAI's documented chat fine-tuning format rules, line by line."""
    problems: list[str] = []
    lines = data.decode("utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            example = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"line {n}: not JSON")
            continue
        messages = example.get("messages") if isinstance(example, dict) else None
        if not isinstance(messages, list) or not messages:
            problems.append(f"line {n}: no messages list")
            continue
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                problems.append(f"line {n}: unknown role {m.get('role')!r}")
            content = m.get("content")
            if not content or (isinstance(content, str) and not content.strip()):
                problems.append(f"line {n}: empty content")
        if not any(m.get("role") == "assistant" for m in messages):
            problems.append(f"line {n}: no assistant message")
    return problems


def _decode_image(url: str) -> tuple[str, int, int] | str:
    """(format, width, height) of a data-URL image, or what is wrong with it."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    if not url.startswith("data:image/") or ";base64," not in url:
        return f"not a base64 data URL: {url[:40]!r}"
    mime, payload = url[5:].split(";base64,", 1)
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            image.load()
            fmt, (width, height) = image.format or "?", image.size
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        return f"undecodable image: {type(exc).__name__}"
    if f"image/{fmt.lower()}" != mime:
        return f"declared {mime} but is {fmt}"
    if max(width, height) > 2048:
        return f"image is {width}x{height}; the bot should send at most 2048 px"
    return fmt, width, height


# How each format the transcription API reads begins (mp4 and m4a: "ftyp" at offset 4).
_AUDIO_MAGIC: dict[str, tuple[bytes, ...]] = {
    "ogg": (b"OggS",),
    "flac": (b"fLaC",),
    "wav": (b"RIFF",),
    "webm": (b"\x1a\x45\xdf\xa3",),
    "mp3": (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"),
}
_AUDIO_MAGIC["mpeg"] = _AUDIO_MAGIC["mpga"] = _AUDIO_MAGIC["mp3"]
_AUDIO_MAGIC["oga"] = _AUDIO_MAGIC["ogg"]


def _audio_problem(filename: str, data: bytes) -> str | None:
    """Why the transcription API would refuse this file (format by extension, then by
    content, as the real one reads it), or None."""
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if ext not in ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm"):
        return (
            "Invalid file format. Supported formats: "
            "['flac', 'm4a', 'mp3', 'mp4', 'mpeg', 'mpga', 'oga', 'ogg', 'wav', 'webm']"
        )
    matches = data[4:8] == b"ftyp" if ext in ("mp4", "m4a") else data.startswith(_AUDIO_MAGIC[ext])
    if not matches:
        return "Audio file might be corrupted or unsupported"
    return None


def _decode_file(part: dict[str, Any]) -> tuple[str, str] | str:
    """(filename, text) of an `input_file` part sent inline, or what is wrong with it.

    The bot sends files as `file_data`, a base64 data URL, with a `filename` (the API tells
    file types by name); a PDF must be one the API can read (not encrypted, not broken).
    """
    import base64
    import binascii
    import io

    from pypdf import PdfReader

    name, url = part.get("filename"), part.get("file_data")
    if part.get("file_id") or part.get("file_url"):
        return "the bot sends files inline (file_data), not by id or URL"
    if not isinstance(name, str) or not name.strip():
        return "an input_file needs a filename"
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        return f"file_data is not a base64 data URL: {str(url)[:40]!r}"
    mime, payload = url[5:].split(";base64,", 1)
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error:
        return "file_data is not valid base64"
    if name.lower().endswith(".pdf") != (mime == "application/pdf"):
        return f"{name!r} sent as {mime}"
    if mime != "application/pdf":
        return name, data.decode("utf-8", "replace")
    try:
        reader = PdfReader(io.BytesIO(data))
        text = "\n".join(page.extract_text() for page in reader.pages)
    except Exception as exc:
        return f"unreadable PDF {name!r}: {type(exc).__name__}"
    return name, text


def _word_rule(text: str) -> dict[str, Any]:
    """The stand-in classifier: a few words decide (real models are not this naive)."""
    lowered = text.lower()
    if any(w in lowered for w in ("terrible", "hate", "awful", "sorry", "bad")):
        return {"label": "negative", "score": -0.8}
    if any(w in lowered for w in ("great", "love", "thanks", "wonderful", "glad")):
        return {"label": "positive", "score": 0.8}
    return {"label": "neutral", "score": 0.0}


async def _drip(resp: web.StreamResponse, every: float) -> None:
    """Keep a stream open without ending it: a keep-alive comment line every `every` s."""
    try:
        while True:
            await asyncio.sleep(every)
            await resp.write(b":\n")
    except (ConnectionError, RuntimeError):
        return  # the client hung up


def _drop(request: web.Request) -> None:
    """Cut the connection mid-stream, as a network failure would."""
    if request.transport is not None:
        request.transport.abort()


def _chunks(text: str, words: int) -> list[str]:
    pieces = text.split(" ")
    out = [" ".join(pieces[i : i + words]) for i in range(0, len(pieces), words)]
    return [p if i == 0 else " " + p for i, p in enumerate(out)]


def _input_items(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        ]
    return list(value)


def _as_item(item: dict[str, Any], item_id: str) -> dict[str, Any]:
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "input_text", "text": content}]
    return {
        "id": item_id,
        "type": item.get("type", "message"),
        "status": "completed",
        "role": item.get("role", "user"),
        "content": content or [],
    }


def _item_text(item: dict[str, Any]) -> tuple[str, str]:
    text = "".join(p.get("text", "") for p in item.get("content", []) if isinstance(p, dict))
    return item.get("role", "user"), text


def _usage(call: ModelCall, text: str) -> dict[str, Any]:
    seen = sum(len(t) for _, t in call.transcript) + len(call.instructions or "")
    input_tokens, output_tokens = seen // 4 + 1, len(text) // 4 + 1
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _response_obj(
    response_id: str,
    body: dict[str, Any],
    conv_id: str | None,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": body["model"],
        "output": output,
        "usage": usage,
        "instructions": body.get("instructions"),
        "conversation": {"id": conv_id} if conv_id else None,
        "error": None,
        "incomplete_details": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": body.get("tools") or [],
        "temperature": 1.0,
        "top_p": 1.0,
        "text": body.get("text") or {"format": {"type": "text"}},
        "truncation": "disabled",
        "store": body.get("store", True),
        "background": False,
    }


def _chat_completion(base: dict[str, Any], text: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        **base,
        "object": "chat.completion",
        "usage": usage,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": text, "refusal": None},
            }
        ],
    }


def _format_refusal(status: int, kind: str) -> web.Response:
    """How OpenAI-compatible servers refuse a response_format they don't support."""
    if status == 500:  # llama-cpp-python: its request model's error, wrapped as a 500
        message = (
            "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n"
            f"  Input should be 'text' or 'json_object' [type=literal_error, input_value='{kind}']"
        )
        return _error(500, message, "internal_server_error", None)
    if status == 422:  # FastAPI's own validation error
        detail = {
            "type": "literal_error",
            "loc": ["body", "response_format", "type"],
            "msg": "Input should be 'text' or 'json_object'",
            "input": kind,
        }
        return web.json_response({"detail": [detail]}, status=422)
    if status == 404:
        return web.json_response({"detail": "Not Found"}, status=404)
    # vLLM's shape, with the status as the code.
    message = f"response_format type {kind!r} is not supported by this server"
    return web.json_response(
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}},
        status=status,
    )


def _public(conv: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in conv.items() if k != "items"}


def _error(status: int, message: str, kind: str, code: str | None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status
    )


def _status_error(status: int) -> web.Response:
    if status == 429:
        resp = _error(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded")
        resp.headers["retry-after-ms"] = "10"
        return resp
    if status == 403:
        return _error(403, "You are not allowed to do this.", "invalid_request_error", None)
    return _error(
        status, "The server had an error while processing your request.", "server_error", None
    )
