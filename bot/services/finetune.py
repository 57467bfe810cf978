"""From the dialogue log to a fine-tuning job and back to the bot's model.

/train builds a dataset and holds it until an admin confirms (bot/services/held.py: where
held datasets wait, so that any process may start one); "start" uploads it and creates the
job; a poller follows unfinished jobs (also after a restart) and tells the admin who started
each one when its status changes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from bot.domain import JobRecord, utcnow
from bot.services.chat import CHAT_ROUTE, SERVE_ROUTE
from bot.services.dataset import DatasetOptions, DatasetReport, build_dataset
from bot.services.held import Held, HeldDatasets, MemoryHeldDatasets, remove_copies
from bot.services.trainer import (
    OPENAI_TRAINER,
    Estimate,
    JobEvent,
    JobInfo,
    LossPoint,
    Trainer,
    TrainerError,
)
from storage.interface import DatasetSource, JobStore

log = logging.getLogger(__name__)

# Tells the admin who started a job its new status; returns the id of the message that now
# follows the job (edited while it runs), or None to keep the one recorded.
Notify = Callable[[JobRecord, JobInfo], Awaitable[int | None]]


@dataclass(frozen=True, slots=True)
class JobDetails:
    """One job as `/job` shows it: the bot's record, the trainer's view, events, losses."""

    record: JobRecord | None
    info: JobInfo
    events: list[JobEvent]
    losses: list[LossPoint]


class FineTuner:
    def __init__(
        self,
        jobs: JobStore,
        trainer: Trainer,
        *,
        dataset: DatasetSource,
        earlier: Sequence[Trainer] = (),
        datasets_dir: Path,
        base_model: str,
        suffix: str,
        epochs: int,
        held: HeldDatasets | None = None,
    ) -> None:
        self._jobs = jobs
        self.trainer = trainer  # new jobs go here
        # Jobs remember their trainer: earlier ones (e.g. OpenAI's) are still followed.
        self.trainers = {t.name: t for t in (*earlier, trainer)}
        self.dataset = dataset  # the store's part that opens snapshots of the log
        self.datasets_dir = datasets_dir
        self.base_model = base_model
        self.suffix = suffix
        self.epochs = epochs
        # Built datasets waiting for "start": in this process's memory unless the store
        # shared with other processes keeps them (any process may get the press).
        self.held: HeldDatasets = held if held is not None else MemoryHeldDatasets()
        # The test split /train sets aside (share, at most, at least: see DatasetOptions),
        # and what keeps its items when a job starts (the evaluation); unset: none.
        self.test_split: tuple[float, int, int] = (0.0, 0, 0)
        self.keep_test_split: Callable[[JobRecord, Path], Awaitable[int]] | None = None
        # ... and what removes kept items that /forget took words from.
        self.forget_test_split: Callable[[], Awaitable[int]] | None = None

    async def build(self, options: DatasetOptions) -> DatasetReport:
        """Build and validate a dataset from the log, off the event loop, in its own folder."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        out_dir = self.datasets_dir / f"{stamp}-{secrets.token_hex(3)}"
        out_dir.mkdir(parents=True, exist_ok=True)
        # The cost estimate must count the epochs the job will really run.
        share, most, least = self.test_split
        options = replace(
            options, epochs=self.epochs, test_share=share, test_max=most, test_min=least
        )
        return await asyncio.to_thread(
            build_dataset, self.dataset, out_dir, options, base_model=self.base_model
        )

    async def hold(self, report: DatasetReport, options: DatasetOptions, admin_id: int) -> str:
        """Keep a built dataset until its admin presses start or cancel; returns its token."""
        token = secrets.token_urlsafe(8)
        await self.held.hold(token, Held(report, options, admin_id))
        return token

    async def drop(self, token: str) -> bool:
        return await self.held.drop(token)

    async def forget_datasets(self) -> int:
        """Delete every dataset built so far and drop the held ones; how many folders went.

        After /forget they may hold the forgotten words. Datasets are built again from the
        log on demand; "start" under an earlier summary says it expired. Files already
        uploaded to a trainer are out of the bot's reach.
        """
        await self.held.clear()
        if self.forget_test_split is not None:
            await self.forget_test_split()

        def remove(root: Path) -> int:
            removed = 0
            for folder in root.iterdir() if root.is_dir() else ():
                if folder.is_dir() and not folder.is_symlink():
                    # A build writing here meanwhile starts over (see build_dataset).
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink(missing_ok=True)
                if folder.exists():
                    log.warning("could not remove the dataset folder %s", folder.name)
                else:
                    removed += 1
            return removed

        return await asyncio.to_thread(remove, self.datasets_dir)

    async def start(self, token: str, admin_id: int) -> JobRecord:
        """Upload the held dataset and create the job. KeyError if the token expired (or was
        started meanwhile, here or by another process)."""
        held = await self.held.take(token)
        if held is None:
            raise KeyError(token)
        try:
            return await self._start(token, held, admin_id)
        finally:
            if held.copied:  # another process built it: its files were copied here for this
                await asyncio.to_thread(remove_copies, held.copied)

    async def _start(self, token: str, held: Held, admin_id: int) -> JobRecord:
        report = held.report
        if report.train_path is None:
            raise TrainerError("invalid", "dataset has no training file")
        description = describe(held.options, report)
        try:
            info = await self.trainer.start(
                report.train_path,
                report.validation_path,
                base_model=self.base_model,
                suffix=self.suffix,
                metadata={
                    "source": "parley",
                    "started_by": str(admin_id),
                    "examples": str(report.examples),
                },
            )
        except TrainerError:
            await self.held.put_back(token, held)  # the admin may retry (or /export)
            raise
        now = utcnow()
        job = JobRecord(
            job_id=info.id,
            trainer=self.trainer.name,
            base_model=self.base_model,
            training_file=info.training_file,
            validation_file=info.validation_file,
            train_examples=report.train_examples,
            validation_examples=report.validation_examples,
            tokens=report.tokens,
            started_by=admin_id,
            description=description,
            status=info.status,
            created_at=now,
            updated_at=now,
            dataset_since=held.options.since,
            dataset_chat_id=held.options.chat_id,
            dataset_photos=held.options.include_photos,
        )
        await self._jobs.add(job)
        await self._jobs.mark_notified(job.job_id, job.status)  # the admin sees it start
        job.notified_status = job.status
        if self.keep_test_split is not None and report.test_path is not None:
            try:
                await self.keep_test_split(job, report.test_path)
            except Exception:  # the job runs anyway; it just can't be evaluated
                log.exception("could not keep the test split of job %s", job.job_id)
        return job

    async def follow_with(self, job: JobRecord, message_id: int) -> None:
        """The admin's message `message_id` follows `job` from now on: its notices edit it."""
        await self._jobs.mark_notified(job.job_id, job.notified_status or job.status, message_id)
        job.notice_message_id = message_id

    async def job(self, job_id: str) -> JobRecord | None:
        """The bot's record of a job it started (None for one it doesn't know)."""
        return await self._jobs.get(job_id)

    def trainer_of(self, record: JobRecord | None) -> Trainer | None:
        """The trainer a job belongs to (the current one for a job the bot has no record of)."""
        return self.trainer if record is None else self.trainers.get(record.trainer)

    async def estimate(self, report: DatasetReport) -> Estimate:
        """Where a job on this dataset would run and what it would cost."""
        return await self.trainer.estimate(
            base_model=self.base_model,
            tokens=report.tokens,
            epochs=self.epochs,
            usd=report.estimated_cost_usd,
        )

    async def jobs(self) -> tuple[list[tuple[JobRecord | None, JobInfo | None]], bool]:
        """Jobs from every trainer merged with the local table; bool: every trainer answered."""
        local = {j.job_id: j for j in await self._jobs.recent()}
        merged: list[tuple[JobRecord | None, JobInfo | None]] = []
        online = True
        for trainer in self.trainers.values():
            try:
                remote = await trainer.list_jobs()
            except TrainerError as exc:
                log.warning("could not list fine-tuning jobs: %s", exc.kind)
                online = False
                continue
            for info in remote:
                record = local.pop(info.id, None)
                if record is not None and record.status != info.status:
                    await self._jobs.update(info.id, info.status, info.fine_tuned_model, info.error)
                    record.status, record.fine_tuned_model = info.status, info.fine_tuned_model
                merged.append((record, info))
        merged += [(j, None) for j in local.values()]
        merged.sort(key=lambda pair: _created(*pair), reverse=True)
        return merged, online

    async def details(self, job_id: str) -> tuple[JobRecord | None, JobDetails | TrainerError]:
        """One job from its own trainer; the error instead when that trainer can't say."""
        record = await self._jobs.get(job_id)
        trainer = self.trainer_of(record)
        if trainer is None:
            return record, TrainerError("unavailable", "the job's trainer is not configured")
        try:
            info = await trainer.get(job_id)
            events = await trainer.events(job_id, limit=5)
            losses = await trainer.losses(job_id)
        except TrainerError as exc:
            return record, exc
        return record, JobDetails(record, info, events, losses)

    async def cancel(self, job_id: str) -> JobInfo:
        """Cancel a job at its own trainer and record the status it answers with."""
        record = await self._jobs.get(job_id)
        trainer = self.trainer_of(record)
        if trainer is None:
            raise TrainerError("unavailable", "the job's trainer is not configured")
        info = await trainer.cancel(job_id)
        if record is not None:
            await self._jobs.update(info.id, info.status, info.fine_tuned_model, info.error)
        return info

    async def poll_once(self, notify: Notify) -> None:
        """Check every unfinished job once; store changes and notify on each new status."""
        for job in await self._jobs.recent(unfinished=True):
            trainer = self.trainers.get(job.trainer)
            if trainer is None:
                continue  # its trainer is no longer configured: /jobs shows the last status
            try:
                info = await trainer.get(job.job_id)
            except TrainerError as exc:
                log.warning("could not check job %s: %s", job.job_id, exc.kind)
                continue
            if info.status != job.status:
                await self._jobs.update(job.job_id, info.status, info.fine_tuned_model, info.error)
            if info.status != job.notified_status:
                # A notice on its way when the poller is stopped is finished and recorded:
                # Bot API calls are never cut off once sent, so an unrecorded one would be
                # sent again after the restart.
                telling = asyncio.ensure_future(self._tell(notify, job, info))
                try:
                    await asyncio.shield(telling)
                except asyncio.CancelledError:
                    await asyncio.wait([telling])
                    raise

    async def _tell(self, notify: Notify, job: JobRecord, info: JobInfo) -> None:
        # Claimed before it is sent: a poller that lost its lead mid-round (replicas) finds
        # the notice taken and stays quiet. A crash between the two loses this notice
        # (/jobs still shows the status) rather than sending it twice.
        if not await self._jobs.claim_notice(job.job_id, job.notified_status, info.status):
            return
        try:
            message_id = await notify(job, info)
        except Exception:
            log.exception("could not notify about job %s", job.job_id)
            # Nobody was told: the next round tries again.
            await self._jobs.claim_notice(job.job_id, info.status, job.notified_status)
            return
        await self._jobs.mark_notified(job.job_id, info.status, message_id)

    async def run(
        self, notify: Notify, interval: float, leads: Callable[[], Awaitable[bool]] | None = None
    ) -> None:
        """Poll until cancelled; a failing round is logged and the next one comes anyway.

        With replicas, `leads` says whether this process follows the jobs now (one does at a
        time: bot/app.py); the others ask again each round, and one takes over if it dies.
        """
        while True:
            try:
                if leads is None or await leads():
                    await self.poll_once(notify)
            except Exception:
                log.exception("fine-tuning poll failed")
            await asyncio.sleep(interval)


def served_route(record: JobRecord) -> str:
    """Where a job's model answers: OpenAI's on the chat endpoint, others where SERVE_* say."""
    return CHAT_ROUTE if record.trainer == OPENAI_TRAINER else SERVE_ROUTE


def _created(record: JobRecord | None, info: JobInfo | None) -> str:
    """A sortable creation time for a job, from the trainer's view or the bot's record."""
    if info is not None:
        return datetime.fromtimestamp(info.created_at, UTC).isoformat(timespec="milliseconds")
    return record.created_at if record is not None else ""


def describe(options: DatasetOptions, report: DatasetReport) -> str:
    """One line saying what went into a dataset, in English: the job record's description.

    Admins read it in their own language from the options kept with the job (`/job`)."""
    parts = [f"{report.examples} examples"]
    if options.since:
        parts.append(f"since {options.since[:10]}")
    if options.chat_id is not None:
        parts.append(f"chat {options.chat_id}")
    parts.append("with photos" if options.include_photos else "text only")
    return ", ".join(parts)
