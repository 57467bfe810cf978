"""Fine-tuning trainers behind one small interface: start, get, list, cancel, events.

OpenAI is winding down self-serve fine-tuning (most organisations can no longer create
jobs; nobody can after 2027-01-06), so the trainer is an interface: another provider or a
local trainer implements the same five calls. `OPENAI_BASE_URL` already covers services
that copy OpenAI's fine-tuning API.
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


class TrainerError(Exception):
    """A trainer call failed. `kind`: permission, not_found, invalid, unavailable."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


class Trainer(Protocol):
    name: str

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
        return TrainerError("invalid", type(exc).__name__)
    return TrainerError("unavailable", classify_model_error(exc).kind)


@dataclass
class OpenAITrainer:
    """OpenAI's fine-tuning API: upload the JSONL files, then a supervised job."""

    client: AsyncOpenAI
    epochs: int = 3
    name: str = field(default="openai", init=False)

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
            return await self.client.fine_tuning.jobs.create(
                model=base_model,
                training_file=train_file.id,
                validation_file=validation_id,
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
