"""The HTTP face of parley-trainer: the part of OpenAI's fine-tuning API the bot uses.

Routes (all under `/v1`, all behind `Authorization: Bearer $TRAINER_API_KEY`):
`POST /files` (multipart, purpose=fine-tune), `GET`/`DELETE /files/{id}`,
`POST /fine_tuning/jobs`, `GET /fine_tuning/jobs` (limit, after), `GET /fine_tuning/jobs/{id}`,
`POST /fine_tuning/jobs/{id}/cancel`, `GET /fine_tuning/jobs/{id}/events` and `/checkpoints`,
`GET /models` (the base models offered, and the fine-tuned models made here).

Objects have OpenAI's shapes; errors are `{"error": {"message", "type", "param", "code"}}`.
Additions: a job carries `adapter_path` (where its adapter is, once it succeeded); a
fine-tuned model in `/models` carries `parent` (its base) and `root` (its adapter directory),
as vLLM lists adapters; a base model carries `parley_tokens_per_second`, the training
throughput of its latest successful job here.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiohttp import BodyPartReader, web

from trainer.publish import Publisher, make_publisher
from trainer.scheduler import CancelError, Scheduler, model_name
from trainer.settings import Slot, TrainerSettings
from trainer.state import (
    Checkpoint,
    Event,
    FileRecord,
    Job,
    NewEvent,
    Store,
    new_id,
    now,
)

log = logging.getLogger(__name__)

OWNER = "parley-trainer"
# An extension of the base models' objects in /v1/models, read by the bot's estimate.
THROUGHPUT_FIELD = "parley_tokens_per_second"
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
_CHUNK = 1 << 20


class StartupError(Exception):
    """The service cannot start (e.g. the data directory is in use); one line for the operator."""


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


@dataclass
class Service:
    settings: TrainerSettings
    store: Store
    scheduler: Scheduler
    publisher: Publisher
    started_at: int


SETTINGS = web.AppKey("settings", TrainerSettings)
SLOTS = web.AppKey("slots", list)
SERVICE = web.AppKey("service", Service)


def build_app(settings: TrainerSettings, *, slots: list[Slot] | None = None) -> web.Application:
    """The service as an aiohttp app; its state opens on startup and closes on cleanup."""
    app = web.Application(middlewares=[_errors, _auth], client_max_size=4 * 1024 * 1024)
    app[SETTINGS] = settings
    if slots is not None:
        app[SLOTS] = slots
    app.cleanup_ctx.append(_lifespan)
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_post("/v1/fine_tuning/jobs", create_job)
    app.router.add_get("/v1/fine_tuning/jobs", list_jobs)
    app.router.add_get("/v1/fine_tuning/jobs/{job_id}", get_job)
    app.router.add_post("/v1/fine_tuning/jobs/{job_id}/cancel", cancel_job)
    app.router.add_get("/v1/fine_tuning/jobs/{job_id}/events", list_events)
    app.router.add_get("/v1/fine_tuning/jobs/{job_id}/checkpoints", list_checkpoints)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    return app


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    data_dir = settings.data_dir.resolve()
    lock = await asyncio.to_thread(_lock_data_dir, data_dir)
    try:
        store = Store(data_dir / "trainer.sqlite3")
        await store.open()
        await asyncio.to_thread(_sweep_partial_uploads, data_dir / "files")
        slots = app[SLOTS] if SLOTS in app else await asyncio.to_thread(settings.slots)
        publisher = make_publisher(settings)
        scheduler = Scheduler(settings, store, publisher, slots)
        await scheduler.start()
        app[SERVICE] = Service(settings, store, scheduler, publisher, now())
        log.info(
            "data in %s; device slots: %s; base models: %s; publishing to: %s",
            data_dir,
            ", ".join(s.name for s in slots),
            ", ".join(settings.base_models),
            settings.publish if settings.publish == "none" else settings.publish_url,
        )
        try:
            yield
        finally:
            await scheduler.stop()
            await publisher.close()
            await store.close()
    finally:
        await asyncio.to_thread(lock.close)


def _lock_data_dir(data_dir: Path) -> IO[bytes]:
    """One service per data directory: two would both run the queue."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / "trainer.lock").open("wb")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one service per directory is on the user
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StartupError(
            f"TRAINER_DATA_DIR {data_dir} is in use by another parley-trainer"
        ) from None
    return handle


def _sweep_partial_uploads(files_dir: Path) -> None:
    files_dir.mkdir(parents=True, exist_ok=True)
    for leftover in files_dir.glob("*.part"):
        leftover.unlink(missing_ok=True)


# -- middlewares ------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPNotFound:
        return error_response(
            404, f"Unknown request URL: {request.method} {request.path}", code="unknown_url"
        )
    except web.HTTPMethodNotAllowed:
        return error_response(
            405, f"Method {request.method} is not allowed for {request.path}", code=None
        )
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(
            500,
            "The server had an error while processing your request.",
            kind="server_error",
        )


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    header = request.headers.get("Authorization", "")
    if not header:
        raise ApiError(
            401,
            "You didn't provide an API key. Send it in an Authorization header:"
            " 'Authorization: Bearer YOUR_KEY' (the trainer's TRAINER_API_KEY).",
        )
    expected = b"Bearer " + request.app[SETTINGS].api_key.get_secret_value().encode()
    if not hmac.compare_digest(header.encode(), expected):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return await handler(request)


# -- objects ----------------------------------------------------------------------------------


def file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
    }


def job_object(job: Job) -> dict[str, Any]:
    hyper = {key: job.hyperparameters.get(key, "auto") for key in HYPERPARAMETERS}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": hyper,
        "model": job.model,
        "organization_id": OWNER,
        "result_files": [],
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "integrations": [],
        "seed": job.seed,
        "estimated_finish": job.estimated_finish,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "metadata": job.metadata,
        "user_provided_suffix": job.suffix,
        "adapter_path": job.adapter_path,
    }


def event_object(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": event.created_at,
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data or {},
    }


def checkpoint_object(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": checkpoint.created_at,
        "fine_tuned_model_checkpoint": checkpoint.name,
        "fine_tuning_job_id": checkpoint.job_id,
        "metrics": checkpoint.metrics,
        "step_number": checkpoint.step,
    }


def _page(data: list[dict[str, Any]], has_more: bool, ids: bool = False) -> web.Response:
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if ids:
        body["first_id"] = data[0]["id"] if data else None
        body["last_id"] = data[-1]["id"] if data else None
    return web.json_response(body)


def _limit(request: web.Request, default: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"limit must be an integer, got {raw!r}", param="limit") from None
    if value < 1:
        raise ApiError(400, "limit must be at least 1", param="limit")
    return min(value, 100)


def _service(request: web.Request) -> Service:
    return request.app[SERVICE]


async def _job_or_404(request: web.Request) -> Job:
    job_id = request.match_info["job_id"]
    job = await _service(request).store.get_job(job_id)
    if job is None:
        raise ApiError(404, f"No fine-tuning job found with id {job_id!r}", code="not_found")
    return job


# -- files ------------------------------------------------------------------------------------


async def upload_file(request: web.Request) -> web.Response:
    """POST /v1/files: a training file, streamed to disk with a size limit."""
    service = _service(request)
    if request.content_type != "multipart/form-data":
        raise ApiError(400, "Uploads must be multipart/form-data", param="file")
    file_id = new_id("file")
    files_dir = service.scheduler.file_path(file_id).parent
    partial = files_dir / f"{file_id}.part"
    purpose: str | None = None
    filename: str | None = None
    size = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue  # nested multipart: not part of this API
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                if filename is not None:
                    raise ApiError(400, "Send one file per upload", param="file")
                filename = os.path.basename(part.filename or "") or "upload.jsonl"
                size = await _save_part(part, partial, service.settings.max_file_bytes)
            else:
                await part.release()
        if filename is None:
            raise ApiError(400, "Missing the file part", param="file")
        if purpose != "fine-tune":
            raise ApiError(
                400,
                f"This trainer only takes purpose 'fine-tune' (got {purpose!r})",
                param="purpose",
            )
        await asyncio.to_thread(os.replace, partial, service.scheduler.file_path(file_id))
    finally:
        await asyncio.to_thread(partial.unlink, missing_ok=True)
    record = FileRecord(file_id, filename, size, purpose, now())
    await service.store.add_file(record)
    log.info("file %s uploaded (%d bytes)", file_id, size)
    return web.json_response(file_object(record))


async def _save_part(part: BodyPartReader, path: Path, limit: int) -> int:
    handle = await asyncio.to_thread(path.open, "wb")
    size = 0
    try:
        while chunk := await part.read_chunk(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    400,
                    f"File is too large: the limit is {limit // (1024 * 1024)} MB"
                    " (TRAINER_MAX_FILE_MB)",
                    param="file",
                    code="file_too_large",
                )
            await asyncio.to_thread(handle.write, chunk)
    finally:
        await asyncio.to_thread(handle.close)
    return size


async def _file_or_404(request: web.Request) -> FileRecord:
    file_id = request.match_info["file_id"]
    record = await _service(request).store.get_file(file_id)
    if record is None:
        raise ApiError(404, f"No such File object: {file_id}", param="id", code="not_found")
    return record


async def get_file(request: web.Request) -> web.Response:
    """GET /v1/files/{id}."""
    return web.json_response(file_object(await _file_or_404(request)))


async def delete_file(request: web.Request) -> web.Response:
    """DELETE /v1/files/{id}: jobs keep their own copy, so this never breaks one."""
    service = _service(request)
    record = await _file_or_404(request)
    await service.store.delete_file(record.id)
    await asyncio.to_thread(service.scheduler.file_path(record.id).unlink, missing_ok=True)
    return web.json_response({"id": record.id, "object": "file", "deleted": True})


# -- jobs -------------------------------------------------------------------------------------


async def create_job(request: web.Request) -> web.Response:
    """POST /v1/fine_tuning/jobs: check the request, copy its files, start validating."""
    service = _service(request)
    settings = service.settings
    body = await _json_object(request)
    model = body.get("model")
    if not isinstance(model, str) or model not in settings.base_models:
        offered = ", ".join(settings.base_models)
        raise ApiError(
            400,
            f"Model {model!r} is not available for fine-tuning here; this trainer offers: "
            f"{offered}",
            param="model",
            code="model_not_available",
        )
    training = await _input_file(service, body, "training_file", required=True)
    assert training is not None
    validation = await _input_file(service, body, "validation_file", required=False)
    hyperparameters = _hyperparameters(body)
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not 1 <= len(suffix) <= 64):
        raise ApiError(400, "suffix must be a string of 1 to 64 characters", param="suffix")
    seed = body.get("seed")
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**31 - 1:
        raise ApiError(400, "seed must be an integer from 0 to 2147483647", param="seed")
    metadata = _metadata(body.get("metadata"))
    if body.get("integrations"):
        raise ApiError(
            400,
            "Integrations are not supported by this trainer",
            param="integrations",
            code="unsupported_integration",
        )
    job_id = new_id("ftjob")
    job = Job(
        id=job_id,
        created_at=now(),
        model=model,
        training_file=training.id,
        validation_file=validation.id if validation else None,
        status="validating_files",
        hyperparameters=hyperparameters,
        suffix=suffix,
        seed=seed,
        metadata=metadata,
        model_name=model_name(model, suffix, job_id),
    )
    job_dir = service.scheduler.job_dir(job_id)
    sources = [(service.scheduler.file_path(training.id), job_dir / "train.jsonl")]
    if validation is not None:
        sources.append((service.scheduler.file_path(validation.id), job_dir / "valid.jsonl"))
    try:
        await asyncio.to_thread(_give_files, sources)
    except OSError as exc:
        await asyncio.to_thread(shutil.rmtree, job_dir, True)
        raise ApiError(
            400, f"Could not read the uploaded file: {exc.strerror}", param="training_file"
        ) from exc
    events = [NewEvent(f"Created fine-tuning job: {job_id}")]
    events.append(NewEvent(f"Validating training file: {training.id}"))
    if validation is not None:
        events.append(NewEvent(f"Validating validation file: {validation.id}"))
    await service.store.create_job(job, events)
    service.scheduler.validate_later(job)
    log.info("job %s created (%s, file %s)", job_id, model, training.id)
    return web.json_response(job_object(job))


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object")
    return body


async def _input_file(
    service: Service, body: dict[str, Any], param: str, *, required: bool
) -> FileRecord | None:
    file_id = body.get(param)
    if file_id is None and not required:
        return None
    if not isinstance(file_id, str) or not file_id:
        raise ApiError(400, f"{param} must be a file id", param=param)
    record = await service.store.get_file(file_id)
    if record is None:
        raise ApiError(400, f"Invalid file id: {file_id} (no such file)", param=param)
    if record.purpose != "fine-tune":
        raise ApiError(400, f"File {file_id} was not uploaded for fine-tuning", param=param)
    return record


def _hyperparameters(body: dict[str, Any]) -> dict[str, Any]:
    """`method.supervised.hyperparameters`, else the legacy top-level `hyperparameters`."""
    method = body.get("method")
    where = "hyperparameters"
    given: Any = body.get("hyperparameters")
    if method is not None:
        if not isinstance(method, dict):
            raise ApiError(400, "method must be an object", param="method")
        kind = method.get("type", "supervised")
        if kind != "supervised":
            raise ApiError(
                400,
                f"This trainer runs supervised fine-tuning only (method.type {kind!r})",
                param="method.type",
                code="unsupported_method",
            )
        supervised = method.get("supervised") or {}
        if not isinstance(supervised, dict):
            raise ApiError(400, "method.supervised must be an object", param="method.supervised")
        if supervised.get("hyperparameters") is not None:
            where = "method.supervised.hyperparameters"
            given = supervised["hyperparameters"]
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ApiError(400, f"{where} must be an object", param=where)
    result: dict[str, Any] = {}
    for key in HYPERPARAMETERS:
        value = given.get(key, "auto")
        if value is None or value == "auto":
            result[key] = "auto"
            continue
        if key == "learning_rate_multiplier":
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            rule = "a number above 0"
        else:
            top = 50 if key == "n_epochs" else 256
            ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top
            rule = f"an integer from 1 to {top}"
        if not ok:
            raise ApiError(400, f"{key} must be 'auto' or {rule}", param=f"{where}.{key}")
        result[key] = float(value) if key == "learning_rate_multiplier" else value
    return result


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise ApiError(
            400,
            "metadata must map at most 16 keys (up to 64 characters) to strings"
            " (up to 512 characters)",
            param="metadata",
        )
    return dict(value)


def _give_files(sources: list[tuple[Path, Path]]) -> None:
    """Each job keeps its own link (or copy) of its files: deleting the upload is harmless."""
    for source, target in sources:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


async def list_jobs(request: web.Request) -> web.Response:
    """GET /v1/fine_tuning/jobs: newest first, `limit` and `after` as on OpenAI."""
    limit = _limit(request, 20)
    jobs, has_more = await _service(request).store.list_jobs(limit, request.query.get("after"))
    return _page([job_object(j) for j in jobs], has_more)


async def get_job(request: web.Request) -> web.Response:
    """GET /v1/fine_tuning/jobs/{id}."""
    return web.json_response(job_object(await _job_or_404(request)))


async def cancel_job(request: web.Request) -> web.Response:
    """POST /v1/fine_tuning/jobs/{id}/cancel: answers once the worker has stopped."""
    job_id = request.match_info["job_id"]
    try:
        job = await _service(request).scheduler.cancel(job_id)
    except CancelError as exc:
        raise ApiError(400, str(exc), code="job_finished") from None
    if job is None:
        raise ApiError(404, f"No fine-tuning job found with id {job_id!r}", code="not_found")
    return web.json_response(job_object(job))


async def list_events(request: web.Request) -> web.Response:
    """GET /v1/fine_tuning/jobs/{id}/events: newest first."""
    job = await _job_or_404(request)
    limit = _limit(request, 20)
    events, has_more = await _service(request).store.list_events(
        job.id, limit, request.query.get("after")
    )
    return _page([event_object(e) for e in events], has_more)


async def list_checkpoints(request: web.Request) -> web.Response:
    """GET /v1/fine_tuning/jobs/{id}/checkpoints: newest first."""
    job = await _job_or_404(request)
    limit = _limit(request, 10)
    checkpoints, has_more = await _service(request).store.list_checkpoints(
        job.id, limit, request.query.get("after")
    )
    return _page([checkpoint_object(c) for c in checkpoints], has_more, ids=True)


# -- models -----------------------------------------------------------------------------------


async def _models(service: Service) -> list[dict[str, Any]]:
    finished = await service.store.fine_tuned_models()
    # Each base model's training throughput, as last measured here: clients estimate job
    # times from it (absent until a job on that base has succeeded).
    speeds = {job.model: job.tokens_per_second for job in finished if job.tokens_per_second}
    models = []
    for name in service.settings.base_models:
        model: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": service.started_at,
            "owned_by": OWNER,
        }
        if name in speeds:
            model[THROUGHPUT_FIELD] = speeds[name]
        models.append(model)
    for job in finished:
        assert job.fine_tuned_model is not None
        models.append(
            {
                "id": job.fine_tuned_model,
                "object": "model",
                "created": job.finished_at or job.created_at,
                "owned_by": OWNER,
                "parent": job.model,
                "root": job.adapter_path,
            }
        )
    return models


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the base models jobs may use, then the fine-tuned models made here."""
    return web.json_response({"object": "list", "data": await _models(_service(request))})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}."""
    name = request.match_info["model"]
    for model in await _models(_service(request)):
        if model["id"] == name:
            return web.json_response(model)
    raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
