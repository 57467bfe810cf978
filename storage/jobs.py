"""Fine-tuning jobs as the bot keeps them (they outlive the trainer's API being reachable)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from bot.domain import JobRecord, utcnow
from storage.base import Part

JOB_COLUMNS = (
    "job_id",
    "trainer",
    "base_model",
    "training_file",
    "validation_file",
    "train_examples",
    "validation_examples",
    "tokens",
    "started_by",
    "description",
    "status",
    "created_at",
    "updated_at",
    "fine_tuned_model",
    "error",
    "notified_status",
    "notice_message_id",
    "dataset_since",
    "dataset_chat_id",
    "dataset_photos",
)


class JobStore(Part):
    """Fine-tuning jobs: added, updated as they go, and the admin's notices of them."""

    async def add(self, job: JobRecord) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO fine_tune_jobs (job_id, trainer, base_model, training_file,"
                " validation_file, train_examples, validation_examples, tokens, started_by,"
                " description, status, created_at, updated_at, dataset_since, dataset_chat_id,"
                " dataset_photos) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.job_id,
                    job.trainer,
                    job.base_model,
                    job.training_file,
                    job.validation_file,
                    job.train_examples,
                    job.validation_examples,
                    job.tokens,
                    job.started_by,
                    job.description,
                    job.status,
                    job.created_at,
                    job.updated_at,
                    job.dataset_since,
                    job.dataset_chat_id,
                    None if job.dataset_photos is None else int(job.dataset_photos),
                ),
            )
        )

    async def update(
        self, job_id: str, status: str, fine_tuned_model: str | None, error: str | None
    ) -> None:
        now = utcnow()
        await self._write(
            lambda conn: conn.execute(
                "UPDATE fine_tune_jobs SET status = ?, fine_tuned_model = ?, error = ?,"
                " updated_at = ? WHERE job_id = ?",
                (status, fine_tuned_model, error, now, job_id),
            )
        )

    async def mark_notified(
        self, job_id: str, status: str, notice_message_id: int | None = None
    ) -> None:
        """The admin was told `status`; `notice_message_id`: the message that now says it
        (None keeps the one recorded)."""
        await self._write(
            lambda conn: conn.execute(
                "UPDATE fine_tune_jobs SET notified_status = ?,"
                " notice_message_id = COALESCE(?, notice_message_id) WHERE job_id = ?",
                (status, notice_message_id, job_id),
            )
        )

    async def claim_notice(self, job_id: str, told: str | None, status: str | None) -> bool:
        """Move the job's told status from `told` to `status` unless someone already moved
        it (another replica's poller): whether this caller is the one to tell the admin."""

        def claim(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE fine_tune_jobs SET notified_status = ?"
                " WHERE job_id = ? AND notified_status IS ?",
                (status, job_id, told),
            )
            return cur.rowcount == 1

        return await self._write(claim)

    async def recent(self, *, unfinished: bool = False, limit: int = 50) -> list[JobRecord]:
        where = " WHERE status NOT IN ('succeeded', 'failed', 'cancelled')" if unfinished else ""
        async with self._conn.execute(
            f"SELECT {', '.join(JOB_COLUMNS)} FROM fine_tune_jobs{where}"
            " ORDER BY created_at DESC LIMIT ?",
            (limit,),
        ) as cur:
            return [_job(row) async for row in cur]

    async def get(self, job_id: str) -> JobRecord | None:
        async with self._conn.execute(
            f"SELECT {', '.join(JOB_COLUMNS)} FROM fine_tune_jobs WHERE job_id = ?", (job_id,)
        ) as cur:
            row = await cur.fetchone()
        return _job(row) if row else None


def _job(row: Sequence[Any]) -> JobRecord:
    job = JobRecord(*row)
    if job.dataset_photos is not None:
        job.dataset_photos = bool(job.dataset_photos)  # stored as 0 or 1
    return job
