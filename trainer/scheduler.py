"""Jobs from creation to the end: validation, one queue for the device slots, workers, publishing.

Status moves `validating_files -> queued -> running -> succeeded | failed | cancelled`, as on
OpenAI. Every move is a conditional update in the store, so a cancel racing a finishing worker
ends one way only, and no job is started twice.

Each job runs in its own process group (`python -m trainer.worker JOB_DIR`, or `accelerate
launch` for a slot of several GPUs), one job per slot; the rest wait as `queued`. The worker
reports on stdout, one JSON object a line (status, step, eval, checkpoint, done, error); its
stderr goes to `JOB_DIR/worker.log`, whose tail explains a crash.

Cancel: SIGTERM to the job's process group, SIGKILL after `TRAINER_CANCEL_GRACE` seconds;
the cancel answers once the worker is gone. Stopping the service does the same to every
running job. A job interrupted that way, or found `running` by the next start after a crash
(its orphaned worker is killed first), goes back to the queue to resume from its last
checkpoint (`TRAINER_RESUME`, at most `MAX_RESUMES` times); without one it fails with the
reason. Jobs left `validating_files` are checked again; the queue runs in creation order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from trainer.publish import Publisher, PublishError
from trainer.settings import Slot, TrainerSettings
from trainer.state import ACTIVE, Checkpoint, Job, NewEvent, Store, new_id, now

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_EPOCHS = 3
MAX_RESUMES = 3
DEFAULT_LR_MULTIPLIER = 1.0
STDERR_TAIL_BYTES = 4096
STDOUT_LINE_LIMIT = 1 << 20

RESTARTED = "the trainer restarted while this job was running"
_importing = threading.Lock()
_imported = threading.Event()
STOPPED = "the trainer was stopped while this job was running"


def auto_batch_size(examples: int) -> int:
    """OpenAI's `batch_size: auto`, our way: small datasets get small batches."""
    if examples >= 64:
        return 4
    return 2 if examples >= 16 else 1


def model_name(base: str, suffix: str | None, job_id: str) -> str:
    """The name a job's model is served under: `<base>-<suffix>-<6 hex of the job id>`.

    Lower case, `[a-z0-9._-]` only, so it works as a vLLM `lora_name` and an Ollama model
    name alike (OpenAI's `ft:base:org:suffix:id` has colons, which Ollama reads as a tag).
    """
    tail = re.sub(r"[^0-9a-f]", "", job_id.lower())[-6:]
    parts = [base, suffix or "", tail]
    cleaned = [re.sub(r"[^a-z0-9._-]+", "-", p.lower()).strip("-.") for p in parts]
    cleaned[1] = cleaned[1][:40].strip("-.")
    return "-".join(p for p in cleaned if p)


class CancelError(Exception):
    """The job cannot be cancelled (it has already finished)."""


@dataclass
class Running:
    """A job this process has started (or is starting) in a slot."""

    job: Job
    slot: Slot
    job_dir: Path
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    cancelled: bool = False
    interrupted: bool = False  # the service is stopping
    error: str | None = None  # the worker's own "error" message
    done: dict[str, Any] | None = None
    last_train_loss: float | None = None
    last_step: int = 0
    started_at: int | None = None
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def stopping(self) -> bool:
        return self.cancelled or self.interrupted


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking work in a daemon thread: unlike `to_thread`, it never delays exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="trainer-validate", daemon=True).start()
    return await future


class Scheduler:
    """Owns the job lifecycle; the HTTP layer only creates jobs and asks for cancels."""

    def __init__(
        self,
        settings: TrainerSettings,
        store: Store,
        publisher: Publisher,
        slots: list[Slot],
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.slots = slots
        self.data_dir = settings.data_dir.resolve()
        self._running: dict[str, Running] = {}
        self._busy: dict[str, str] = {}  # slot name -> job id
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._validations = asyncio.Semaphore(settings.validation_concurrency)
        self._dispatcher: asyncio.Task[None] | None = None
        self._closing = False

    # -- paths --------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def file_path(self, file_id: str) -> Path:
        return self.data_dir / "files" / f"{file_id}.jsonl"

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous run left behind, then start running the queue."""
        for job in await self.store.jobs_with_status("running"):
            await self._kill_orphan(job)
            await self._interrupted(job, "trainer_restarted", RESTARTED)
        for job in await self.store.jobs_with_status("validating_files"):
            self.validate_later(job)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="trainer-dispatch")
        self.wake()

    async def stop(self) -> None:
        """Stop launching; terminate running jobs (queued to resume, or failed with the reason)."""
        self._closing = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        running = list(self._running.values())
        for run in running:
            run.interrupted = True
        await asyncio.gather(*(self._stop_run(run) for run in running))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s crashed", task.get_name(), exc_info=task.exception())

    # -- validation ---------------------------------------------------------------------------

    def validate_later(self, job: Job) -> None:
        self._spawn(self._validate(job), f"validate-{job.id}")

    async def _validate(self, job: Job) -> None:
        async with self._validations:
            current = await self.store.get_job(job.id)
            if current is None or current.status != "validating_files":
                return
            outcome = await self._check_files(job)
        if isinstance(outcome, dict):
            await self.store.transition(
                job.id,
                ["validating_files"],
                "failed",
                finished_at=now(),
                error=outcome,
                events=[NewEvent(f"Validation failed: {outcome['message']}", level="error")],
            )
            self.wake()  # younger jobs may have been waiting for this one
            return
        examples, tokens = outcome
        requested = job.hyperparameters
        resolved = {
            "n_epochs": _resolve(requested.get("n_epochs"), DEFAULT_EPOCHS),
            "batch_size": _resolve(requested.get("batch_size"), auto_batch_size(examples)),
            "learning_rate_multiplier": _resolve(
                requested.get("learning_rate_multiplier"), DEFAULT_LR_MULTIPLIER
            ),
        }
        moved = await self.store.transition(
            job.id,
            ["validating_files"],
            "queued",
            hyperparameters=resolved,
            examples=examples,
            tokens=tokens,
            events=[
                NewEvent(
                    f"Files validated: {examples:,} examples, {tokens:,} tokens;"
                    " moving job to queued state",
                    data={"examples": examples, "tokens": tokens},
                )
            ],
        )
        if moved:
            self.wake()

    async def _check_files(self, job: Job) -> tuple[int, int] | dict[str, Any]:
        """(examples, tokens) of the training file, or the job's error object."""
        try:
            from trainer.data import validate_file
        except ImportError as exc:
            return _job_error(
                "validation_failed",
                f"the trainer's dependencies are not installed ({exc});"
                " pip install 'parley[trainer]'",
                None,
            )
        tokenizer = self.settings.base_models[job.model]

        def check(path: Path) -> Any:
            def run() -> Any:
                return validate_file(
                    path,
                    tokenizer_path=tokenizer,
                    max_seq_len=self.settings.max_seq_len,
                    max_examples=self.settings.max_examples,
                )

            if _imported.is_set():
                return run()
            # The first check imports transformers, which is not safe from two threads at once.
            with _importing:
                result = run()
                _imported.set()
                return result

        job_dir = self.job_dir(job.id)
        checks = [("training_file", job_dir / "train.jsonl")]
        if job.validation_file:
            checks.append(("validation_file", job_dir / "valid.jsonl"))
        totals = (0, 0)
        for param, path in checks:
            try:
                outcome = await in_daemon_thread(check, path)
            except Exception as exc:
                log.exception("checking %s of job %s failed", param, job.id)
                return _job_error(
                    "validation_failed",
                    f"could not check the {param.replace('_', ' ')}: {type(exc).__name__}: {exc}",
                    param,
                )
            if outcome.error is not None:
                return _job_error(f"invalid_{param}", outcome.error, param)
            if param == "training_file":
                totals = (outcome.examples, outcome.tokens)
        return totals

    # -- dispatching --------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._fill_slots()
            except Exception:
                log.exception("dispatching jobs failed; retrying shortly")
                await asyncio.sleep(1)
                self.wake()

    async def _fill_slots(self) -> None:
        if self._closing:
            return
        # Jobs run in the order they were created. Files are validated several at once, so a
        # younger job can be queued while an older one is still being validated: it waits
        # for that one instead of jumping ahead of it.
        pending = await self.store.jobs_with_status("validating_files", "queued")
        # No await from here on: the free slots and the reservations stay consistent.
        ahead = [job for job in pending if job.id not in self._running]
        first_validating = next(
            (i for i, job in enumerate(ahead) if job.status == "validating_files"), len(ahead)
        )
        waiting = ahead[:first_validating]
        free = [slot for slot in self.slots if slot.name not in self._busy]
        for slot, job in zip(free, waiting, strict=False):
            run = Running(job=job, slot=slot, job_dir=self.job_dir(job.id))
            self._running[job.id] = run
            self._busy[slot.name] = job.id
            run.task = self._spawn(self._run_job(run), f"job-{job.id}")

    async def _run_job(self, run: Running) -> None:
        """Start the job's worker in its slot, follow it to the end, record the outcome."""
        job = run.job
        try:
            started = await self.store.transition(
                job.id,
                ["queued"],
                "running",
                slot=run.slot.name,
                started_at=now(),
                events=[
                    NewEvent(
                        f"Fine-tuning job started on {run.slot.name}"
                        + (f", resuming from {job.resume_from}" if job.resume_from else "")
                    )
                ],
            )
            if not started:  # cancelled while it waited
                return
            run.started_at = now()
            try:
                config = await self._write_config(job, run.job_dir)
                run.proc = await self._start_process(run, config)
            except Exception as exc:
                log.exception("could not start job %s", job.id)
                await self._fail(run, "worker_failed", f"could not start the worker: {exc}")
                return
            await self.store.update_job(job.id, pid=run.proc.pid)
            if run.stopping:  # cancelled (or the service stopping) while it started
                await terminate_group(run.proc, self.settings.cancel_grace)
            await self._supervise(run)
        except asyncio.CancelledError:
            # Only while publishing (the worker is gone by then), by a cancel or a stop.
            if run.proc is not None and run.proc.returncode is None:
                await terminate_group(run.proc, 0)
            if run.interrupted:
                await self._fail(run, "trainer_stopped", STOPPED)  # it had finished training
            elif run.cancelled and self.publisher.kind != "none":
                with contextlib.suppress(PublishError):
                    await self.publisher.unpublish(job.model_name)
            raise
        finally:
            self._release(run)

    def _release(self, run: Running) -> None:
        self._running.pop(run.job.id, None)
        if self._busy.get(run.slot.name) == run.job.id:
            del self._busy[run.slot.name]
        run.stopped.set()
        self.wake()

    async def _write_config(self, job: Job, job_dir: Path) -> Path:
        hyper = job.hyperparameters
        config = {
            "base_model_path": self.settings.base_models[job.model],
            "training_file": str(job_dir / "train.jsonl"),
            "validation_file": str(job_dir / "valid.jsonl") if job.validation_file else None,
            "n_epochs": hyper["n_epochs"],
            "batch_size": hyper["batch_size"],
            "learning_rate_multiplier": hyper["learning_rate_multiplier"],
            "seed": job.seed,
            "max_seq_len": self.settings.max_seq_len,
            "output_dir": str(job_dir / "output"),
            "resume_from_checkpoint": job.resume_from,
            "save_steps": self.settings.save_steps,
        }
        path = job_dir / "config.json"
        await asyncio.to_thread(_write_json, path, config)
        return path

    def command(self, slot: Slot, job_dir: Path) -> list[str]:
        """The worker command line for a slot (TRAINER_WORKER_COMMAND, or the default)."""
        template = self.settings.worker_command
        if template is None:
            template = "{python} -m trainer.worker"
            if slot.processes > 1:
                template = (
                    "{python} -m accelerate.commands.launch --multi_gpu --num_machines 1"
                    " --num_processes {num_processes} -m trainer.worker"
                )
        fill = {"{python}": sys.executable, "{num_processes}": str(slot.processes)}
        words = []
        for word in shlex.split(template):
            for mark, value in fill.items():
                word = word.replace(mark, value)
            words.append(word)
        return [*words, str(job_dir)]

    async def _start_process(self, run: Running, config: Path) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        # A CPU slot hides the GPUs; a GPU slot shows only its own.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(run.slot.gpus)
        env["PYTHONUNBUFFERED"] = "1"
        for name in ("TRAINER_API_KEY", "TRAINER_PUBLISH_API_KEY"):
            env.pop(name, None)  # the worker needs neither; keep secrets where they are used
        log_file = await asyncio.to_thread(open, run.job_dir / "worker.log", "ab")
        try:
            return await asyncio.create_subprocess_exec(
                *self.command(run.slot, run.job_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=env,
                cwd=run.job_dir,
                start_new_session=True,
                limit=STDOUT_LINE_LIMIT,
            )
        finally:
            await asyncio.to_thread(log_file.close)

    # -- a running job ------------------------------------------------------------------------

    async def _supervise(self, run: Running) -> None:
        proc = run.proc
        assert proc is not None and proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line over the limit: skip it
                log.warning("job %s: skipped an over-long worker line", run.job.id)
                continue
            if not line:
                break
            await self._on_line(run, line)
        code = await proc.wait()
        await _reap_group(proc.pid)
        await self._finish(run, code)

    async def _on_line(self, run: Running, raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            log.debug("job %s worker said: %s", run.job.id, raw[:200])
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        job_id = run.job.id
        try:
            if kind == "status":
                await self.store.add_event(job_id, NewEvent(str(message.get("message", ""))))
            elif kind == "step":
                await self._on_step(run, message)
            elif kind == "eval":
                step, loss = int(message["step"]), float(message["valid_loss"])
                run.metrics.setdefault(step, {})["valid_loss"] = loss
                data: dict[str, Any] = {"step": step, "valid_loss": loss}
                if run.last_step == step and run.last_train_loss is not None:
                    data["train_loss"] = run.last_train_loss
                await self.store.add_event(
                    job_id,
                    NewEvent(f"Step {step}: validation loss={loss:.4f}", type="metrics", data=data),
                )
            elif kind == "checkpoint":
                await self._on_checkpoint(run, message)
            elif kind == "done":
                run.done = message
            elif kind == "error":
                run.error = str(message.get("message") or "the worker reported an error")
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("job %s: unreadable %s message from the worker: %s", job_id, kind, exc)

    async def _on_step(self, run: Running, message: dict[str, Any]) -> None:
        step = int(message["step"])
        total = int(message.get("total_steps") or 0)
        loss = float(message["train_loss"])
        run.last_step, run.last_train_loss = step, loss
        run.metrics.setdefault(step, {})["train_loss"] = loss
        data: dict[str, Any] = {"step": step, "train_loss": loss}
        if total:
            data["total_steps"] = total
        if message.get("epoch") is not None:
            data["epoch"] = float(message["epoch"])
        values: dict[str, Any] = {}
        if total and step > 0 and run.started_at is not None:
            elapsed = max(0, now() - run.started_at)
            values["estimated_finish"] = now() + int(elapsed / step * max(0, total - step))
        where = f"Step {step}/{total}" if total else f"Step {step}"
        text = f"{where}: training loss={loss:.4f}"
        await self.store.update_job(
            run.job.id, [NewEvent(text, type="metrics", data=data)], **values
        )

    async def _on_checkpoint(self, run: Running, message: dict[str, Any]) -> None:
        step = int(message["step"])
        path = Path(str(message["path"]))
        if not path.is_absolute():
            path = run.job_dir / path
        metrics: dict[str, Any] = {"step": step}
        for key in ("train_loss", "valid_loss"):
            value = message.get(key)
            if value is None:
                value = run.metrics.get(step, {}).get(key)
            if value is not None:
                metrics[key] = float(value)
        name = f"{run.job.model_name}-step-{step}"
        await self.store.add_checkpoint(
            Checkpoint(new_id("ftckpt"), run.job.id, now(), step, name, str(path), metrics),
            NewEvent(f"Checkpoint saved at step {step}: {path}", data={"step": step}),
        )

    async def _finish(self, run: Running, code: int) -> None:
        job = run.job
        if run.cancelled:
            return  # the cancel recorded the outcome
        finished = code == 0 and run.done is not None
        if run.interrupted and not finished:
            await self._interrupted(job, "trainer_stopped", STOPPED)
            return
        if not finished or run.done is None:
            reason = run.error or await asyncio.to_thread(_stderr_reason, run.job_dir, code)
            assert reason is not None
            await self._fail(run, "training_failed", reason)
            return
        adapter = Path(str(run.done.get("adapter_path") or run.job_dir / "output" / "adapter"))
        if not adapter.is_absolute():
            adapter = run.job_dir / adapter
        summary = _done_summary(run.done)
        await self.store.add_event(
            job.id, NewEvent(f"Training finished: {summary}; adapter saved at {adapter}")
        )
        if self.publisher.kind != "none":
            await self.store.add_event(
                job.id, NewEvent(f"Publishing {job.model_name} to {self.publisher.kind}")
            )
            try:
                await self.publisher.publish(job.model_name, job.model, adapter)
            except PublishError as exc:
                await self._fail(run, "publish_failed", f"publishing failed: {exc}")
                return
        trained = run.done.get("trained_tokens")
        speed = {
            column: _number(run.done.get(key), kind)
            for column, key, kind in (
                ("train_seconds", "seconds", float),
                ("tokens_per_second", "tokens_per_second", float),
                ("peak_memory_bytes", "peak_memory_bytes", int),
            )
        }
        succeeded = await self.store.transition(
            job.id,
            ["running"],
            "succeeded",
            fine_tuned_model=job.model_name,
            adapter_path=str(adapter),
            finished_at=now(),
            estimated_finish=None,
            trained_tokens=_number(trained, int),
            **speed,
            events=[
                NewEvent(f"New fine-tuned model created: {job.model_name}"),
                NewEvent("The job has successfully completed"),
            ],
        )
        if not succeeded and self.publisher.kind != "none":
            # Cancelled while it was being published: take it back off the server.
            with contextlib.suppress(PublishError):
                await self.publisher.unpublish(job.model_name)

    async def _interrupted(self, job: Job, code: str, reason: str) -> None:
        """A running job the service lost: back in the queue from its checkpoint, or failed."""
        checkpoint = await self.store.latest_checkpoint(job.id) if self.settings.resume else None
        usable = checkpoint is not None and await asyncio.to_thread(Path(checkpoint.path).is_dir)
        if checkpoint is not None and usable and job.resumes < MAX_RESUMES:
            requeued = await self.store.transition(
                job.id,
                ["running"],
                "queued",
                resumes=job.resumes + 1,
                resume_from=checkpoint.path,
                pid=None,
                estimated_finish=None,
                events=[
                    NewEvent(
                        f"{reason[:1].upper()}{reason[1:]}; it resumes from its checkpoint"
                        f" at step {checkpoint.step}",
                        level="warn",
                        data={"step": checkpoint.step},
                    )
                ],
            )
            if requeued:
                log.warning("job %s: %s; resuming at step %d", job.id, reason, checkpoint.step)
                return
        if checkpoint is not None and usable:
            reason = f"{reason} (it had already been resumed {job.resumes} times)"
        failed = await self.store.transition(
            job.id,
            ["running"],
            "failed",
            finished_at=now(),
            estimated_finish=None,
            error=_job_error(code, reason, None),
            events=[NewEvent(f"Fine-tuning job failed: {reason}", level="error")],
        )
        if failed:
            log.warning("job %s: %s; marked failed", job.id, reason)

    async def _fail(self, run: Running, code: str, message: str) -> None:
        await self.store.transition(
            run.job.id,
            ["running"],
            "failed",
            finished_at=now(),
            estimated_finish=None,
            error=_job_error(code, message, None),
            events=[NewEvent(f"Fine-tuning job failed: {message}", level="error")],
        )

    # -- cancel and stop ----------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a job; waits until its worker is gone. None if there is no such job."""
        job = await self.store.get_job(job_id)
        if job is None:
            return None
        run = self._running.get(job_id)
        if run is not None:
            run.cancelled = True  # before the move, so the supervisor never reports a failure
        moved = await self.store.transition(
            job_id,
            ACTIVE,
            "cancelled",
            finished_at=now(),
            estimated_finish=None,
            events=[NewEvent("Fine-tuning job cancelled")],
        )
        if not moved:
            if run is not None:
                run.cancelled = False
            current = await self.store.get_job(job_id)
            raise CancelError(
                f"Job {job_id} has already {current.status if current else 'finished'}."
            )
        if run is not None:
            await self._stop_run(run)
        self.wake()  # a cancelled job still being validated held the younger ones back
        return await self.store.get_job(job_id)

    async def _stop_run(self, run: Running) -> None:
        """SIGTERM the job's process group, SIGKILL after the grace period; wait till it is done."""
        if run.proc is not None and run.proc.returncode is None:
            await terminate_group(run.proc, self.settings.cancel_grace)
        elif run.proc is not None and run.task is not None and not run.task.done():
            run.task.cancel()  # publishing: the worker is already gone
        # Not started yet: the job task sees the flag and stops the worker as soon as it runs.
        await asyncio.shield(run.stopped.wait())

    async def _kill_orphan(self, job: Job) -> None:
        """Workers left running by a crashed service still hold their device: end them.

        Found by their command line (it names the job directory), so a worker started just
        before the crash, whose pid was never recorded, and accelerate's ranks are found too.
        """
        job_dir = self.job_dir(job.id)
        groups = await asyncio.to_thread(_worker_groups, job_dir)
        if not groups:
            return
        log.warning("job %s: ending its orphaned worker (process groups %s)", job.id, groups)
        for sig, within in ((signal.SIGTERM, self.settings.cancel_grace), (signal.SIGKILL, 30.0)):
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, sig)
            if await _gone(job_dir, within):
                return


async def _gone(job_dir: Path, within: float) -> bool:
    """Wait (polling /proc: they are not our children) until a job's workers have exited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if not await asyncio.to_thread(_worker_groups, job_dir):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)


async def terminate_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM a process group, SIGKILL it after `grace` seconds; returns once the leader exited."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    await _reap_group(proc.pid)


async def _reap_group(pgid: int) -> None:
    """Children of the worker (e.g. accelerate's ranks) do not outlive it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _worker_groups(job_dir: Path) -> list[int]:
    """Process groups of live processes whose command line names `job_dir` (Linux /proc)."""
    mark = str(job_dir).encode()
    own = os.getpgid(0)
    groups: set[int] = set()
    try:
        entries = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return []  # no /proc (not Linux): orphans cannot be found
    for entry in entries:
        try:
            stat = (entry / "stat").read_text()
            if stat.rpartition(")")[2].split()[:1] == ["Z"]:
                continue  # a zombie waiting for its new parent to reap it
            if mark not in (entry / "cmdline").read_bytes().split(b"\0"):
                continue
            group = os.getpgid(int(entry.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
        if group != own:
            groups.add(group)
    return sorted(groups)


def _number(value: Any, kind: type[int] | type[float]) -> Any:
    """A worker-reported figure as int/float, or None if absent or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def _resolve(value: Any, default: Any) -> Any:
    return default if value is None or value == "auto" else value


def _job_error(code: str, message: str, param: str | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param}


def _write_json(path: Path, value: Any) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _stderr_reason(job_dir: Path, code: int) -> str:
    """Why a worker died, from the end of its log: the last meaningful line."""
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    try:
        with (job_dir / "worker.log").open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - STDERR_TAIL_BYTES))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        tail = ""
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    if not lines:
        return f"the worker stopped ({how}) without a reason"
    last = lines[-1]
    if len(last) > 500:
        last = last[:497] + "..."
    return f"the worker stopped ({how}): {last}"


def _done_summary(done: dict[str, Any]) -> str:
    parts = []
    if done.get("trained_tokens") is not None:
        parts.append(f"{int(done['trained_tokens']):,} tokens")
    if done.get("seconds") is not None:
        parts.append(f"{float(done['seconds']):.1f} s")
    if done.get("tokens_per_second") is not None:
        parts.append(f"{float(done['tokens_per_second']):,.0f} tokens/s")
    if done.get("peak_memory_bytes"):
        parts.append(f"peak memory {int(done['peak_memory_bytes']) / 2**20:,.0f} MiB")
    return ", ".join(parts) or "done"
