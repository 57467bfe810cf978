"""Fine-tuning trainers behind one small interface: start, get, list, cancel, events.

OpenAI is winding down self-serve fine-tuning (most organisations can no longer create
jobs; nobody can after 2027-01-06). `OpenAITrainer` drives OpenAI's fine-tuning API;
`SelfHostedTrainer` drives parley-trainer (or any service that copies that API) at
`FINE_TUNE_BASE_URL` with the same calls, and prices a job in GPU time instead of dollars.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import openai
from openai import AsyncOpenAI

from bot.errors import classify_model_error

log = logging.getLogger(__name__)

T = TypeVar("T")

OPENAI_TRAINER = "openai"  # how jobs on the chat endpoint's fine-tuning API are recorded

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class JobInfo:
    id: str
    status: str
    base_model: str
    created_at: int
    fine_tuned_model: str | None = None
    error: str | None = None
    trained_tokens: int | None = None
    training_file: str | None = None
    validation_file: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True, slots=True)
class JobEvent:
    created_at: int
    level: str
    message: str


@dataclass(frozen=True, slots=True)
class LossPoint:
    step: int
    train_loss: float


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a job is expected to cost: dollars on OpenAI, GPU seconds on a trainer of one's own.

    `usd` and `gpu_seconds` are None when unknown (no price for the model, or a trainer
    that has not finished a job on that base model yet).
    """

    where: str  # "OpenAI", or the host of one's own trainer (self_hosted)
    usd: float | None = None
    gpu_seconds: float | None = None
    self_hosted: bool = False


class TrainerError(Exception):
    """A trainer call failed. `kind`: permission, not_found, invalid, unavailable."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


class Trainer(Protocol):
    name: str

    async def estimate(
        self, *, base_model: str, tokens: int, epochs: int, usd: float | None
    ) -> Estimate: ...

    async def start(
        self,
        train: Path,
        validation: Path | None,
        *,
        base_model: str,
        suffix: str,
        metadata: Mapping[str, str],
    ) -> JobInfo: ...

    async def get(self, job_id: str) -> JobInfo: ...

    async def list_jobs(self, limit: int = 20) -> list[JobInfo]: ...

    async def cancel(self, job_id: str) -> JobInfo: ...

    async def events(self, job_id: str, limit: int = 10) -> list[JobEvent]: ...

    async def losses(self, job_id: str) -> list[LossPoint]: ...


def _job(job: Any) -> JobInfo:
    error = getattr(job, "error", None)
    message = getattr(error, "message", None) if error else None
    return JobInfo(
        id=job.id,
        status=job.status,
        base_model=job.model,
        created_at=job.created_at,
        fine_tuned_model=job.fine_tuned_model,
        error=message,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
    )


def _trainer_error(exc: Exception) -> TrainerError:
    if isinstance(exc, openai.PermissionDeniedError):
        return TrainerError("permission", "403 from the fine-tuning API")
    if isinstance(exc, openai.NotFoundError):
        return TrainerError("not_found", "404")
    if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        # The API's own sentence (e.g. which base models a trainer offers), for the admin.
        body = exc.body if isinstance(exc.body, dict) else {}
        reason = body.get("message")
        return TrainerError("invalid", reason[:300] if isinstance(reason, str) else "")
    return TrainerError("unavailable", classify_model_error(exc).kind)


@dataclass
class OpenAITrainer:
    """OpenAI's fine-tuning API: upload the JSONL files, then a supervised job."""

    client: AsyncOpenAI
    epochs: int = 3
    name: str = field(default=OPENAI_TRAINER, init=False)

    async def estimate(
        self, *, base_model: str, tokens: int, epochs: int, usd: float | None
    ) -> Estimate:
        return Estimate(where="OpenAI", usd=usd)

    async def start(
        self,
        train: Path,
        validation: Path | None,
        *,
        base_model: str,
        suffix: str,
        metadata: Mapping[str, str],
    ) -> JobInfo:
        async def upload_and_create() -> Any:
            train_file = await self.client.files.create(file=train, purpose="fine-tune")
            validation_id = None
            if validation is not None:
                validation_id = (
                    await self.client.files.create(file=validation, purpose="fine-tune")
                ).id
            extra: dict[str, Any] = {}
            if validation_id is not None:  # the API refuses an explicit null
                extra["validation_file"] = validation_id
            return await self.client.fine_tuning.jobs.create(
                model=base_model,
                training_file=train_file.id,
                **extra,
                suffix=suffix,
                metadata=dict(metadata),
                method={
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": self.epochs}},
                },
            )

        return _job(await _api(upload_and_create()))

    async def get(self, job_id: str) -> JobInfo:
        return _job(await _api(self.client.fine_tuning.jobs.retrieve(job_id)))

    async def list_jobs(self, limit: int = 20) -> list[JobInfo]:
        page = await _api(self.client.fine_tuning.jobs.list(limit=limit))
        return [_job(j) for j in page.data]

    async def cancel(self, job_id: str) -> JobInfo:
        return _job(await _api(self.client.fine_tuning.jobs.cancel(job_id)))

    async def events(self, job_id: str, limit: int = 10) -> list[JobEvent]:
        page = await _api(self.client.fine_tuning.jobs.list_events(job_id, limit=limit))
        return [JobEvent(e.created_at, e.level, e.message) for e in page.data]

    async def losses(self, job_id: str) -> list[LossPoint]:
        page = await _api(self.client.fine_tuning.jobs.checkpoints.list(job_id, limit=100))
        points = [
            LossPoint(c.step_number, c.metrics.train_loss)
            for c in page.data
            if c.metrics is not None and c.metrics.train_loss is not None
        ]
        return sorted(points, key=lambda p: p.step)


async def _api(call: Awaitable[T]) -> T:
    """Await an OpenAI call, turning its errors into TrainerError."""
    try:
        return await call
    except openai.OpenAIError as exc:
        raise _trainer_error(exc) from exc


# The model objects parley-trainer lists for its base models carry this extension: the
# training throughput it measured on its own hardware (absent until a job has finished).
THROUGHPUT_FIELD = "parley_tokens_per_second"


@dataclass
class SelfHostedTrainer(OpenAITrainer):
    """parley-trainer (or another copy of OpenAI's fine-tuning API) at `FINE_TUNE_BASE_URL`.

    Its jobs are recorded under the trainer's URL, so jobs of an earlier trainer (OpenAI's)
    are still followed beside them. A job costs GPU time on the admin's own hardware:
    estimated from the throughput the trainer reports for the base model.
    """

    def __post_init__(self) -> None:
        self.name = str(self.client.base_url).rstrip("/")

    async def estimate(
        self, *, base_model: str, tokens: int, epochs: int, usd: float | None
    ) -> Estimate:
        where = str(self.client.base_url.host)  # the reader's words are added when shown
        try:
            models = (await self.client.models.list()).data
        except openai.OpenAIError as exc:
            log.warning("could not ask the trainer about %s: %s", base_model, type(exc).__name__)
            return Estimate(where=where, self_hosted=True)
        model = next((m for m in models if m.id == base_model), None)
        speed = (model.model_extra or {}).get(THROUGHPUT_FIELD) if model else None
        if not isinstance(speed, int | float) or speed <= 0:
            return Estimate(where=where, self_hosted=True)
        return Estimate(where=where, gpu_seconds=tokens * epochs / speed, self_hosted=True)
