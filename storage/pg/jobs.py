"""Fine-tuning jobs as the bot keeps them, in PostgreSQL. Mirrors storage/jobs.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.domain import JobRecord, utcnow
from storage.jobs import JOB_COLUMNS
from storage.pg.base import Conn, PgPart


class PgJobStore(PgPart):
    """Fine-tuning jobs: added, updated as they go, and the admin's notices of them."""

    async def add(self, job: JobRecord) -> None:
        async def insert(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO fine_tune_jobs (job_id, trainer, base_model, training_file,"
                " validation_file, train_examples, validation_examples, tokens, started_by,"
                " description, status, created_at, updated_at, dataset_since, dataset_chat_id,"
                " dataset_photos) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
                " %s, %s, %s)",
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

        await self._write(insert)

    async def update(
        self, job_id: str, status: str, fine_tuned_model: str | None, error: str | None
    ) -> None:
        now = utcnow()

        async def change(conn: Conn) -> None:
            await conn.execute(
                "UPDATE fine_tune_jobs SET status = %s, fine_tuned_model = %s, error = %s,"
                " updated_at = %s WHERE job_id = %s",
                (status, fine_tuned_model, error, now, job_id),
            )

        await self._write(change)

    async def mark_notified(
        self, job_id: str, status: str, notice_message_id: int | None = None
    ) -> None:
        """The admin was told `status`; `notice_message_id`: the message that now says it
        (None keeps the one recorded)."""

        async def mark(conn: Conn) -> None:
            await conn.execute(
                "UPDATE fine_tune_jobs SET notified_status = %s,"
                " notice_message_id = COALESCE(%s, notice_message_id) WHERE job_id = %s",
                (status, notice_message_id, job_id),
            )

        await self._write(mark)

    async def claim_notice(self, job_id: str, told: str | None, status: str | None) -> bool:
        """Move the job's told status from `told` to `status` unless someone already moved
        it (another replica's poller): whether this caller is the one to tell the admin."""

        async def claim(conn: Conn) -> bool:
            cur = await conn.execute(
                "UPDATE fine_tune_jobs SET notified_status = %s"
                " WHERE job_id = %s AND notified_status IS NOT DISTINCT FROM %s",
                (status, job_id, told),
            )
            return cur.rowcount == 1

        return await self._write(claim, single=True)

    async def recent(self, *, unfinished: bool = False, limit: int = 50) -> list[JobRecord]:
        where = " WHERE status NOT IN ('succeeded', 'failed', 'cancelled')" if unfinished else ""
        rows = await self._fetch_all(
            f"SELECT {', '.join(JOB_COLUMNS)} FROM fine_tune_jobs{where}"
            " ORDER BY created_at DESC LIMIT %s",
            (limit,),
        )
        return [_job(row) for row in rows]

    async def get(self, job_id: str) -> JobRecord | None:
        row = await self._fetch_one(
            f"SELECT {', '.join(JOB_COLUMNS)} FROM fine_tune_jobs WHERE job_id = %s", (job_id,)
        )
        return _job(row) if row else None


def _job(row: Sequence[Any]) -> JobRecord:
    job = JobRecord(*row)
    if job.dataset_photos is not None:
        job.dataset_photos = bool(job.dataset_photos)  # stored as 0 or 1
    return job
