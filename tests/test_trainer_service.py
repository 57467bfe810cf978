"""parley-trainer as its clients see it: OpenAI's fine-tuning API, over HTTP, from the real client.

Every test drives the service with `openai.AsyncOpenAI` (over aiohttp, as the bot does), and
every answer the service gives is checked against the OpenAI spec's response schemas. Most
tests run the app in-process with a scripted stand-in worker (TRAINER_WORKER_COMMAND, the
setting for custom launchers): it behaves by the job's `seed`, so hangs, crashes and
checkpoints happen exactly when a test wants them. Start-up and restarts spawn
`python -m trainer` for real; the end-to-end tests train the tiny model with the real worker
and publish to stand-in vLLM and Ollama servers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai import AsyncOpenAI, DefaultAioHttpClient

from tests.conftest import local_http
from tests.stubs.ollama_server import FakeOllama
from tests.stubs.openai_responses import ResponseChecker
from tests.stubs.specs import OpenAISpec
from tests.stubs.vllm_server import FakeVLLM
from tests.tinymodel import build_tiny_model, chat_jsonl, require_training_stack
from trainer.scheduler import RESTARTED, STOPPED, Scheduler, model_name
from trainer.server import SERVICE, build_app
from trainer.settings import ConfigError, Slot, TrainerSettings, load_settings, parse_devices
from trainer.state import Job, Store, migrate

ROOT = Path(__file__).resolve().parents[1]
KEY = "trainer-test-key-0123456789abcdef"
TERMINAL = ("succeeded", "failed", "cancelled")

# Watching processes come and go (and the service finding orphaned workers) reads /proc.
needs_proc = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="needs Linux /proc to follow processes"
)

# Seeds choose what the stand-in worker does.
SUCCEED, HANG, CHECKPOINT_THEN_HANG, STUBBORN, REPORT_ERROR, CRASH, WAIT_FOR_RELEASE = range(1, 8)

FAKE_WORKER = r'''
"""A stand-in for `python -m trainer.worker JOB_DIR`, speaking its stdout protocol."""
import json, os, signal, sys, time
from pathlib import Path

job_dir = Path(sys.argv[-1])
config = json.loads((job_dir / "config.json").read_text())
seed, resume = config["seed"], config["resume_from_checkpoint"]
if seed == 4:  # a worker stuck where SIGTERM does not reach: only SIGKILL ends it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with (job_dir / "launches.jsonl").open("a") as log:
    record = {"pid": os.getpid(), "seed": seed, "resume": resume, "argv": sys.argv,
              "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "config": config,
              "secrets": [k for k in os.environ if k.endswith("API_KEY")]}
    log.write(json.dumps(record) + "\n")
out = Path(config["output_dir"])
out.mkdir(parents=True, exist_ok=True)


def emit(kind, **fields):
    sys.stdout.write(json.dumps({"type": kind, **fields}) + "\n")
    sys.stdout.flush()


def checkpoint(step):
    path = out / f"checkpoint-{step}"
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text("{}")
    emit("checkpoint", step=step, path=str(path), train_loss=2.0 / step, valid_loss=2.5 / step)


def succeed(start=1):
    for step in range(start, 5):
        emit("step", step=step, total_steps=4, epoch=step / 4, train_loss=2.0 / step)
    emit("eval", step=4, valid_loss=0.6)
    checkpoint(4)
    adapter = out / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    emit("done", adapter_path=str(adapter), trained_tokens=1234, seconds=0.5,
         tokens_per_second=2468.0, peak_memory_bytes=1 << 20)
    sys.exit(0)


def hang():
    while True:
        time.sleep(0.05)


emit("status", message=f"stand-in worker, seed {seed}")
if resume:
    succeed(start=2)
if seed == 1:
    succeed()
emit("step", step=1, total_steps=4, epoch=0.25, train_loss=2.0)
if seed in (2, 4):
    hang()
if seed == 3:
    checkpoint(1)
    hang()
if seed == 5:
    emit("error", message="out of GPU memory: lower batch_size or max_seq_len")
    sys.exit(1)
if seed == 6:
    sys.stderr.write("Traceback (most recent call last):\n  ...\nRuntimeError: it broke\n")
    sys.exit(3)
if seed == 7:
    while not (job_dir / "release").exists():
        time.sleep(0.02)
    succeed(start=2)
'''


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_trainer_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TRAINER_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (and tokenizer) every job trains, built once."""
    require_training_stack()
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def spec_path(shared: Path) -> Path:
    return shared / "specs" / "openai-openapi.json"


@pytest.fixture
def checker(spec_path: Path) -> Iterator[ResponseChecker]:
    checker = ResponseChecker(spec_path)
    yield checker
    assert checker.violations == [], f"the trainer broke the OpenAI API spec: {checker.violations}"


@pytest.fixture
def worker_command(tmp_path: Path) -> str:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return f"{{python}} {script}"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Training files: 20 good examples."""
    return chat_jsonl(tmp_path / "train.jsonl", 20)


Settings = Callable[..., TrainerSettings]


@pytest.fixture
def make_settings(tmp_path: Path, tiny: Path, worker_command: str) -> Settings:
    def make(**overrides: Any) -> TrainerSettings:
        values: dict[str, Any] = {
            "api_key": KEY,
            "base_models": f"tiny={tiny}",
            "data_dir": tmp_path / "data",
            "devices": "cpu",
            "worker_command": worker_command,
            "cancel_grace": 2.0,
        }
        values.update(overrides)
        return load_settings(_env_file=None, **values)

    return make


def client_for(url: str, key: str = KEY) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=key, base_url=url, max_retries=0, timeout=60, http_client=DefaultAioHttpClient()
    )


@asynccontextmanager
async def serving(
    settings: TrainerSettings, checker: ResponseChecker
) -> AsyncIterator[tuple[AsyncOpenAI, web.Application]]:
    """The service in-process on a free port, and the real client pointed at it."""
    app = build_app(settings)
    checker.install(app)
    async with local_http(app) as url:
        client = client_for(url + "/v1")
        try:
            yield client, app
        finally:
            await client.close()


async def wait_for(
    client: AsyncOpenAI, job_id: str, *statuses: str, timeout: float = 300
) -> openai.types.fine_tuning.FineTuningJob:
    """Poll the job until it reaches one of `statuses` (default: any final one)."""
    wanted = statuses or TERMINAL
    async with asyncio.timeout(timeout):
        while True:
            job = await client.fine_tuning.jobs.retrieve(job_id)
            if job.status in wanted:
                return job
            assert statuses == () or job.status not in set(TERMINAL) - set(wanted), (
                f"{job_id} ended {job.status}: {job.error}"
            )
            await asyncio.sleep(0.05)


async def events_of(client: AsyncOpenAI, job_id: str) -> list[Any]:
    """All of a job's events, oldest first (the API pages them newest first)."""
    return [e async for e in client.fine_tuning.jobs.list_events(job_id, limit=100)][::-1]


async def wait_for_event(client: AsyncOpenAI, job_id: str, text: str, timeout: float = 300) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if any(text in e.message for e in await events_of(client, job_id)):
                return
            await asyncio.sleep(0.05)


async def launches(job_dir: Path) -> list[dict[str, Any]]:
    """What the stand-in worker recorded, one entry per start."""
    path = job_dir / "launches.jsonl"
    text = await asyncio.to_thread(lambda: path.read_text() if path.exists() else "")
    return [json.loads(line) for line in text.splitlines()]


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting to be reaped does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def upload(client: AsyncOpenAI, path: Path) -> str:
    return (await client.files.create(file=path, purpose="fine-tune")).id


async def create(client: AsyncOpenAI, file_id: str, seed: int = SUCCEED, **kw: Any) -> str:
    job = await client.fine_tuning.jobs.create(model="tiny", training_file=file_id, seed=seed, **kw)
    return job.id


# -- authentication and start-up --------------------------------------------------------------


async def test_every_request_needs_the_key_and_a_wrong_one_is_refused(
    tmp_path: Path, checker: ResponseChecker
) -> None:
    settings = load_settings(
        _env_file=None, api_key=KEY, base_models="tiny=/models/tiny", data_dir=tmp_path / "d"
    )
    app = build_app(settings, slots=[Slot("cpu")])
    checker.install(app)
    async with local_http(app) as url:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/v1/models") as resp:
                assert resp.status == 401
                body = await resp.json()
            assert body["error"]["type"] == "invalid_request_error"
            assert "API key" in body["error"]["message"]
            async with http.get(url + "/v1/models", headers={"Authorization": KEY}) as resp:
                assert resp.status == 401  # the key without "Bearer"
        wrong = client_for(url + "/v1", key="sk-not-the-key")
        try:
            with pytest.raises(openai.AuthenticationError) as caught:
                await wrong.fine_tuning.jobs.list()
            assert caught.value.code == "invalid_api_key"
            assert KEY not in str(caught.value.body)
            with pytest.raises(openai.AuthenticationError):
                await wrong.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
        finally:
            await wrong.close()
        right = client_for(url + "/v1")
        try:
            models = await right.models.list()
            assert [m.id for m in models.data] == ["tiny"]
            with pytest.raises(openai.NotFoundError):
                await right.fine_tuning.jobs.retrieve("ftjob-nope")
        finally:
            await right.close()
    assert ("GET", "/v1/models", 200) in checker.seen


def _env(home: Path, **values: str) -> dict[str, str]:
    """A clean environment: nothing from the developer's shell leaks in."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
    }
    env.update(values)
    return env


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TRAINER_BASE_MODELS": "tiny=/m"}, ["TRAINER_API_KEY"]),
        ({"TRAINER_API_KEY": "  "}, ["TRAINER_API_KEY", "TRAINER_BASE_MODELS"]),
        ({"TRAINER_API_KEY": "k", "TRAINER_BASE_MODELS": "tiny"}, ["TRAINER_BASE_MODELS"]),
        (
            {"TRAINER_API_KEY": "k", "TRAINER_BASE_MODELS": "a=/m", "TRAINER_DEVICES": "gpu"},
            ["TRAINER_DEVICES"],
        ),
        (
            {"TRAINER_API_KEY": "k", "TRAINER_BASE_MODELS": "a=/m", "TRAINER_PUBLISH": "vllm"},
            ["TRAINER_PUBLISH_URL"],
        ),
        (
            {"TRAINER_API_KEY": "k", "TRAINER_BASE_MODELS": "a=/m", "TRAINER_LISTEN": "8400"},
            ["TRAINER_LISTEN"],
        ),
        (
            {"TRAINER_API_KEY": "k", "TRAINER_BASE_MODELS": "a=/no/such/model"},
            ["TRAINER_BASE_MODELS", "/no/such/model"],
        ),
    ],
)
def test_bad_configuration_stops_it_with_one_line_naming_the_variable(
    tmp_path: Path, env: dict[str, str], named: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer"],
        cwd=tmp_path,
        env=_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(name in lines[0] for name in named), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_the_console_script_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("parley-trainer")
    if not script.exists():
        pytest.skip("parley-trainer is not installed in this environment (pip install -e .)")
    result = subprocess.run(
        [str(script)], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "TRAINER_API_KEY is not set" in result.stderr


def test_devices_become_slots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert parse_devices("cpu", detect=True) == [Slot("cpu")]
    assert parse_devices("0,1", detect=True) == [Slot("cuda:0", ("0",)), Slot("cuda:1", ("1",))]
    assert parse_devices("0+1, 2", detect=True) == [
        Slot("cuda:0+1", ("0", "1")),
        Slot("cuda:2", ("2",)),
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert parse_devices("auto", detect=True) == [Slot("cpu")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert [s.name for s in parse_devices("auto", detect=True)] == ["cuda:0", "cuda:1"]
    with pytest.raises(ConfigError, match="TRAINER_DEVICES uses GPU 0 twice"):
        load_settings(_env_file=None, api_key="k", base_models="a=/m", devices="0,0+1")

    settings = load_settings(_env_file=None, api_key="k", base_models="a=/m", devices="0+1")
    scheduler = Scheduler(settings, Store(tmp_path / "x.db"), None, [])  # type: ignore[arg-type]
    many = scheduler.command(Slot("cuda:0+1", ("0", "1")), tmp_path)
    assert many[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert many[-4:] == ["2", "-m", "trainer.worker", str(tmp_path)]
    assert scheduler.command(Slot("cpu"), tmp_path) == [
        sys.executable,
        "-m",
        "trainer.worker",
        str(tmp_path),
    ]
    custom = settings.model_copy(update={"worker_command": "launch -n {num_processes} w.py"})
    assert Scheduler(custom, scheduler.store, None, []).command(  # type: ignore[arg-type]
        Slot("cuda:0+1", ("0", "1")), tmp_path
    ) == ["launch", "-n", "2", "w.py", str(tmp_path)]


def test_fine_tuned_model_names_are_safe_for_vllm_and_ollama() -> None:
    assert model_name("qwen3-4b", "Parley Bot!", "ftjob-0123456789abcdef") == (
        "qwen3-4b-parley-bot-abcdef"
    )
    assert model_name("Tiny", None, "ftjob-00ff00aa11bb") == "tiny-aa11bb"
    name = model_name("tiny", "x" * 64, "ftjob-abcdef")
    assert re.fullmatch(r"[a-z0-9._-]+", name) and len(name) < 64


async def test_the_store_migrates_once_and_a_status_moves_only_from_where_it_was(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "trainer.sqlite3")
    await store.open()
    try:
        assert await store._run(migrate, store.conn) == []  # open() applied them all
        versions = await store._run(
            lambda: store.conn.execute("SELECT version FROM schema_migrations").fetchall()
        )
        assert [v[0] for v in versions] == [1]
        job = Job("ftjob-1", 1, "tiny", "file-1", None, "running", {}, None, 7, None, "tiny-1")
        await store.create_job(job)
        # A cancel and a finishing worker race: whichever moves first wins, the other is told.
        assert await store.transition(job.id, ["running"], "cancelled", finished_at=2)
        assert not await store.transition(job.id, ["running"], "succeeded", finished_at=3)
        stored = await store.get_job(job.id)
        assert stored is not None and (stored.status, stored.finished_at) == ("cancelled", 2)
    finally:
        await store.close()
    reopened = Store(tmp_path / "trainer.sqlite3")
    await reopened.open()  # an existing database: nothing to apply, nothing lost
    try:
        assert [j.id for j in (await reopened.list_jobs(10))[0]] == ["ftjob-1"]
    finally:
        await reopened.close()


# -- files ------------------------------------------------------------------------------------


async def test_files_are_uploaded_read_and_deleted(
    tmp_path: Path, checker: ResponseChecker
) -> None:
    settings = load_settings(
        _env_file=None,
        api_key=KEY,
        base_models="tiny=/models/tiny",
        data_dir=tmp_path / "data",
        max_file_mb=0.001,  # about a kilobyte
    )
    app = build_app(settings, slots=[Slot("cpu")])
    checker.install(app)
    small = chat_jsonl(tmp_path / "small.jsonl", 2)
    big = chat_jsonl(tmp_path / "big.jsonl", 40)
    async with local_http(app) as url:
        client = client_for(url + "/v1")
        try:
            uploaded = await client.files.create(file=small, purpose="fine-tune")
            assert uploaded.bytes == small.stat().st_size
            assert uploaded.filename == "small.jsonl" and uploaded.purpose == "fine-tune"
            again = await client.files.retrieve(uploaded.id)
            assert again.id == uploaded.id and again.bytes == uploaded.bytes

            with pytest.raises(openai.BadRequestError) as caught:
                await client.files.create(file=small, purpose="batch")
            assert caught.value.body["param"] == "purpose"  # type: ignore[index]
            with pytest.raises(openai.BadRequestError) as caught:
                await client.files.create(file=big, purpose="fine-tune")
            assert caught.value.code == "file_too_large"

            deleted = await client.files.delete(uploaded.id)
            assert deleted.deleted and deleted.id == uploaded.id
            with pytest.raises(openai.NotFoundError):
                await client.files.retrieve(uploaded.id)
            with pytest.raises(openai.NotFoundError):
                await client.files.delete(uploaded.id)
        finally:
            await client.close()
    # Nothing half-written is left: no partial upload, no refused file.
    assert sorted(p.name for p in (tmp_path / "data" / "files").iterdir()) == []


# -- creating jobs ----------------------------------------------------------------------------


async def test_a_job_for_an_unknown_base_model_or_with_bad_parameters_is_refused(
    tmp_path: Path, checker: ResponseChecker
) -> None:
    settings = load_settings(
        _env_file=None, api_key=KEY, base_models="tiny=/models/tiny", data_dir=tmp_path / "d"
    )
    app = build_app(settings, slots=[Slot("cpu")])
    checker.install(app)
    async with local_http(app) as url:
        client = client_for(url + "/v1")
        try:
            file_id = await upload(client, chat_jsonl(tmp_path / "t.jsonl", 3))
            with pytest.raises(openai.BadRequestError) as caught:
                await client.fine_tuning.jobs.create(model="gpt-4.1-mini", training_file=file_id)
            error = caught.value.body
            assert isinstance(error, dict)
            assert error["param"] == "model" and error["code"] == "model_not_available"
            assert "tiny" in error["message"]  # it says what is offered

            refused: list[tuple[dict[str, Any], str]] = [
                ({"training_file": "file-nope"}, "training_file"),
                ({"validation_file": "file-nope"}, "validation_file"),
                (
                    {"method": {"type": "dpo", "dpo": {}}},
                    "method.type",
                ),
                (
                    {
                        "method": {
                            "type": "supervised",
                            "supervised": {"hyperparameters": {"n_epochs": 0}},
                        }
                    },
                    "method.supervised.hyperparameters.n_epochs",
                ),
                ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters."),
                ({"suffix": "x" * 65}, "suffix"),
                ({"metadata": {"k": 1}}, "metadata"),
            ]
            for extra, param in refused:
                request: dict[str, Any] = {"model": "tiny", "training_file": file_id, **extra}
                with pytest.raises(openai.BadRequestError) as caught:
                    await client.fine_tuning.jobs.create(**request)
                got = caught.value.body
                assert isinstance(got, dict) and got["param"].startswith(param), (extra, got)
            assert (await client.fine_tuning.jobs.list()).data == []
        finally:
            await client.close()


def _bad_files(tmp_path: Path, data: Path) -> tuple[Path, Path, Path]:
    """Not JSON on line 2; no assistant turn; nothing at all."""
    bad = tmp_path / "bad.jsonl"
    lines = data.read_text().splitlines()
    bad.write_text(lines[0] + "\n" + "this is not json\n" + lines[1] + "\n")
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    return bad, no_answer, empty


async def test_a_bad_file_fails_validation_with_the_reason(
    make_settings: Settings, checker: ResponseChecker, tmp_path: Path, data: Path
) -> None:
    bad, no_answer, empty = _bad_files(tmp_path, data)
    async with serving(make_settings(), checker) as (client, _):
        good = await upload(client, data)
        cases = {
            await create(client, await upload(client, bad)): ("training_file", "line 2"),
            await create(client, await upload(client, no_answer)): ("training_file", "line 1"),
            await create(client, await upload(client, empty)): ("training_file", "empty"),
            await create(client, good, validation_file=await upload(client, bad)): (
                "validation_file",
                "line 2",
            ),
        }
        for job_id, (param, reason) in cases.items():
            job = await wait_for(client, job_id)
            assert job.status == "failed" and job.error is not None
            assert job.error.code == f"invalid_{param}" and job.error.param == param
            assert reason in job.error.message
            assert job.fine_tuned_model is None and job.finished_at is not None
            events = await events_of(client, job_id)
            assert any(e.level == "error" and reason in e.message for e in events)
        assert (await launches(tmp_path / "data" / "jobs" / job_id)) == []  # never ran


async def test_hyperparameters_are_honoured_with_defaults_and_the_request_is_kept(
    make_settings: Settings, checker: ResponseChecker, tmp_path: Path, data: Path
) -> None:
    async with serving(make_settings(), checker) as (client, _):
        file_id = await upload(client, data)
        defaults = await create(client, file_id, suffix="Parley Bot", metadata={"chat": "42"})
        legacy = await client.fine_tuning.jobs.create(
            model="tiny",
            training_file=file_id,
            hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5},
            seed=SUCCEED,
        )
        assert legacy.hyperparameters.n_epochs == 2  # as asked, before validation too
        method = await client.fine_tuning.jobs.create(
            model="tiny",
            training_file=file_id,
            seed=SUCCEED,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 5, "batch_size": "auto"}},
            },
        )
        assert method.status == "validating_files"
        assert method.hyperparameters.batch_size == "auto"
        # A job keeps its own copy: deleting the upload now does not break them.
        await client.files.delete(file_id)

        expected = {
            defaults: (3, 2, 1.0),  # 20 examples: a batch of 2
            legacy.id: (2, 8, 0.5),
            method.id: (5, 2, 1.0),
        }
        for job_id, (epochs, batch, rate) in expected.items():
            job = await wait_for(client, job_id)
            assert job.status == "succeeded", job.error
            assert job.hyperparameters.n_epochs == epochs
            assert job.hyperparameters.batch_size == batch
            assert job.hyperparameters.learning_rate_multiplier == rate
            assert job.method is not None and job.method.supervised is not None
            reported = job.method.supervised.hyperparameters
            assert reported is not None and reported.n_epochs == epochs
            [launch] = await launches(tmp_path / "data" / "jobs" / job_id)
            config = launch["config"]
            assert (config["n_epochs"], config["batch_size"]) == (epochs, batch)
            assert config["learning_rate_multiplier"] == rate
            assert config["seed"] == SUCCEED and config["max_seq_len"] == 2048
            assert config["resume_from_checkpoint"] is None
            assert not any(k.startswith("TRAINER_") for k in launch["secrets"])  # kept here

        job = await client.fine_tuning.jobs.retrieve(defaults)
        assert job.metadata == {"chat": "42"} and job.seed == SUCCEED
        assert job.fine_tuned_model == f"tiny-parley-bot-{defaults[-6:]}"
        assert job.model_extra is not None and job.model_extra["user_provided_suffix"] == (
            "Parley Bot"
        )
        assert job.trained_tokens == 1234 and job.estimated_finish is None


# -- scheduling, listing, cancelling ----------------------------------------------------------


async def test_jobs_wait_their_turn_and_are_listed_newest_first_in_pages(
    make_settings: Settings, checker: ResponseChecker, tmp_path: Path, data: Path
) -> None:
    jobs_dir = tmp_path / "data" / "jobs"
    async with serving(make_settings(), checker) as (client, _):
        file_id = await upload(client, data)
        ids = [await create(client, file_id, seed=WAIT_FOR_RELEASE) for _ in range(3)]
        await wait_for(client, ids[0], "running")
        for job_id in ids[1:]:
            await wait_for(client, job_id, "queued")
        await wait_for_event(client, ids[0], "Step 1/4")
        # One slot: the others wait while the first runs.
        assert [(await client.fine_tuning.jobs.retrieve(i)).status for i in ids[1:]] == [
            "queued",
            "queued",
        ]
        for job_id in ids:
            await wait_for(client, job_id, "running")
            await asyncio.to_thread((jobs_dir / job_id / "release").touch)
            assert (await wait_for(client, job_id)).status == "succeeded"

        first = await client.fine_tuning.jobs.list(limit=2)
        assert [j.id for j in first.data] == ids[:0:-1] and first.has_more
        rest = await client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
        assert [j.id for j in rest.data] == ids[:1] and not rest.has_more
        assert [j.id async for j in client.fine_tuning.jobs.list(limit=1)] == ids[::-1]

        page = await client.fine_tuning.jobs.list_events(ids[0], limit=3)
        assert len(page.data) == 3 and page.has_more
        assert page.data[0].message == "The job has successfully completed"
        everything = await events_of(client, ids[0])
        assert everything[0].message == f"Created fine-tuning job: {ids[0]}"
        assert len({e.id for e in everything}) == len(everything) > 10

        checkpoints = await client.fine_tuning.jobs.checkpoints.list(ids[0], limit=1)
        assert [c.step_number for c in checkpoints.data] == [4] and not checkpoints.has_more
        assert checkpoints.data[0].metrics.train_loss == pytest.approx(0.5)
        assert checkpoints.data[0].metrics.valid_loss == pytest.approx(0.625)
    for job_id in ids:
        assert len(await launches(jobs_dir / job_id)) == 1


async def test_a_job_never_jumps_ahead_of_an_older_one_still_being_validated(
    make_settings: Settings, checker: ResponseChecker, tmp_path: Path, data: Path
) -> None:
    jobs_dir = tmp_path / "data" / "jobs"
    # The older job's file takes far longer to validate than the younger one's, and both
    # are validated at once: the younger is queued first, but must not run first.
    big = chat_jsonl(tmp_path / "big.jsonl", 6000)
    async with serving(make_settings(validation_concurrency=2), checker) as (client, _):
        big_id, small_id = await upload(client, big), await upload(client, data)
        # A first job, so that the service has loaded what validation needs (the first
        # validation loads it alone; later ones run side by side).
        first = await create(client, small_id)
        assert (await wait_for(client, first)).status == "succeeded"
        older = await create(client, big_id, seed=WAIT_FOR_RELEASE)
        younger = await create(client, small_id, seed=WAIT_FOR_RELEASE)
        await wait_for(client, younger, "queued", "running")
        await wait_for(client, older, "running", timeout=120)
        assert (await client.fine_tuning.jobs.retrieve(younger)).status == "queued"
        assert await launches(jobs_dir / younger) == []
        for job_id in (older, younger):
            await wait_for(client, job_id, "running")
            await asyncio.to_thread((jobs_dir / job_id / "release").touch)
            assert (await wait_for(client, job_id)).status == "succeeded"


async def test_two_slots_run_two_jobs_at_once_each_on_its_own_gpu(
    make_settings: Settings, checker: ResponseChecker, tmp_path: Path, data: Path
) -> None:
    jobs_dir = tmp_path / "data" / "jobs"
    async with serving(make_settings(devices="0,1"), checker) as (client, _):
        file_id = await upload(client, data)
        ids = [await create(client, file_id, seed=WAIT_FOR_RELEASE) for _ in range(3)]
        for job_id in ids[:2]:
            await wait_for(client, job_id, "running")
            await wait_for_event(client, job_id, "Step 1/4")
        assert (await client.fine_tuning.jobs.retrieve(ids[2])).status == "queued"
        gpus = {(await launches(jobs_dir / i))[0]["cuda"] for i in ids[:2]}
        assert gpus == {"0", "1"}
        for job_id in ids:
            await wait_for(client, job_id, "running")
            await asyncio.to_thread((jobs_dir / job_id / "release").touch)
        for job_id in ids:
            assert (await wait_for(client, job_id)).status == "succeeded"


@needs_proc
async def test_cancel_stops_the_worker_and_nothing_is_published(
    make_settings: Settings, checker: ResponseChecker, tmp_path: Path, data: Path, spec_path: Path
) -> None:
    vllm = FakeVLLM(OpenAISpec.load(spec_path), "tiny")
    await vllm.start()
    jobs_dir = tmp_path / "data" / "jobs"
    settings = make_settings(publish="vllm", publish_url=vllm.root, publish_api_key=vllm.api_key)
    try:
        async with serving(settings, checker) as (client, _):
            file_id = await upload(client, data)
            stubborn = await create(client, file_id, seed=STUBBORN)  # ignores SIGTERM
            waiting = await create(client, file_id, seed=SUCCEED)
            await wait_for(client, stubborn, "running")
            await wait_for_event(client, stubborn, "Step 1/4")
            [launch] = await launches(jobs_dir / stubborn)
            assert alive(launch["pid"])

            queued = await client.fine_tuning.jobs.cancel(waiting)
            assert queued.status == "cancelled"
            cancelled = await client.fine_tuning.jobs.cancel(stubborn)
            # The answer comes once the worker is gone: SIGTERM, then SIGKILL after the grace.
            assert cancelled.status == "cancelled" and cancelled.finished_at is not None
            assert not alive(launch["pid"])
            assert cancelled.fine_tuned_model is None and cancelled.error is None
            with pytest.raises(openai.BadRequestError) as caught:
                await client.fine_tuning.jobs.cancel(stubborn)
            assert "already cancelled" in caught.value.message

            events = await events_of(client, stubborn)
            assert events[-1].message == "Fine-tuning job cancelled"
            assert (await client.fine_tuning.jobs.retrieve(stubborn)).status == "cancelled"
            assert await launches(jobs_dir / waiting) == []
        assert vllm.loads == []
        assert [m.id for m in (await models_of(settings, checker))] == ["tiny"]
    finally:
        await vllm.stop()


async def models_of(settings: TrainerSettings, checker: ResponseChecker) -> list[Any]:
    async with serving(settings, checker) as (client, _):
        return list((await client.models.list()).data)


async def test_a_failing_worker_fails_the_job_with_its_reason(
    make_settings: Settings, checker: ResponseChecker, data: Path
) -> None:
    async with serving(make_settings(), checker) as (client, _):
        file_id = await upload(client, data)
        reported = await wait_for(client, await create(client, file_id, seed=REPORT_ERROR))
        crashed = await wait_for(client, await create(client, file_id, seed=CRASH))
    assert reported.status == "failed" and reported.error is not None
    assert reported.error.code == "training_failed"
    assert reported.error.message == "out of GPU memory: lower batch_size or max_seq_len"
    assert crashed.status == "failed" and crashed.error is not None
    assert crashed.error.message == "the worker stopped (exit code 3): RuntimeError: it broke"


# -- publishing -------------------------------------------------------------------------------


async def test_a_publish_that_fails_fails_the_job_with_the_servers_reason(
    make_settings: Settings, checker: ResponseChecker, data: Path, spec_path: Path
) -> None:
    vllm = FakeVLLM(OpenAISpec.load(spec_path), "tiny")
    await vllm.start()
    vllm.fail_next_load = "LoRA rank 64 is greater than max_lora_rank 16"
    settings = make_settings(publish="vllm", publish_url=vllm.url, publish_api_key=vllm.api_key)
    try:
        async with serving(settings, checker) as (client, _):
            file_id = await upload(client, data)
            refused = await wait_for(client, await create(client, file_id))
            published = await wait_for(client, await create(client, file_id))
            listed = {m.id for m in (await client.models.list()).data}
    finally:
        await vllm.stop()
    assert refused.status == "failed" and refused.error is not None
    assert refused.error.code == "publish_failed"
    assert "vLLM answered 400" in refused.error.message
    assert "LoRA rank 64 is greater than max_lora_rank 16" in refused.error.message
    assert refused.fine_tuned_model is None
    assert published.status == "succeeded" and published.fine_tuned_model is not None
    assert vllm.adapters == {published.fine_tuned_model: published.model_extra["adapter_path"]}
    assert listed == {"tiny", published.fine_tuned_model}

    # vLLM down: the job fails saying so.
    async with serving(settings, checker) as (client, _):
        down = await wait_for(client, await create(client, await upload(client, data)))
    assert down.status == "failed" and down.error is not None
    assert down.error.code == "publish_failed" and "could not reach vLLM" in down.error.message


async def test_an_adapter_is_published_to_ollama_as_blobs_and_a_model(
    make_settings: Settings, checker: ResponseChecker, tmp_path: Path, data: Path
) -> None:
    ollama = FakeOllama(["qwen-tiny"])
    await ollama.start()
    settings = make_settings(
        publish="ollama", publish_url=ollama.url, ollama_base="tiny=qwen-tiny:latest"
    )
    try:
        async with serving(settings, checker) as (client, _):
            file_id = await upload(client, data)
            job = await wait_for(client, await create(client, file_id))
            ollama.fail_next_create = "unsupported architecture"
            refused = await wait_for(client, await create(client, file_id))
    finally:
        await ollama.stop()
    assert job.status == "succeeded" and job.fine_tuned_model is not None
    adapter = Path(job.model_extra["adapter_path"])  # type: ignore[index]
    create_call = ollama.creates[0]
    assert create_call["model"] == job.fine_tuned_model
    assert create_call["from"] == "qwen-tiny:latest"
    digests = {
        name: "sha256:" + hashlib.sha256((adapter / name).read_bytes()).hexdigest()
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    assert create_call["adapters"] == digests
    assert f"{job.fine_tuned_model}:latest" in ollama.models
    assert refused.status == "failed" and refused.error is not None
    assert refused.error.code == "publish_failed"
    assert "unsupported architecture" in refused.error.message


# -- the real service process: stop and restart -----------------------------------------------


@asynccontextmanager
async def service_process(env: dict[str, str], cwd: Path) -> AsyncIterator[tuple[Any, str]]:
    """`python -m trainer`, its URL once it listens; killed on the way out if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trainer",
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, f"the trainer exited: {''.join(lines)}"
                lines.append(line)
                if match := re.search(r"listening on (http://\S+)", line):
                    break
        drain = asyncio.create_task(_drain(proc.stderr, lines))
        try:
            yield proc, match.group(1) + "/v1"
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await drain
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert KEY not in "".join(lines), "the API key reached the log"


async def _drain(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode())


@pytest.fixture
def service_env(tmp_path: Path, tiny: Path, worker_command: str) -> Callable[..., dict[str, str]]:
    def env(**extra: str) -> dict[str, str]:
        return _env(
            tmp_path,
            TRAINER_API_KEY=KEY,
            TRAINER_BASE_MODELS=f"tiny={tiny}",
            TRAINER_DATA_DIR=str(tmp_path / "data"),
            TRAINER_LISTEN="127.0.0.1:0",
            TRAINER_WORKER_COMMAND=worker_command.replace("{python}", sys.executable),
            TRAINER_CANCEL_GRACE="2",
            **extra,
        )

    return env


@needs_proc
async def test_after_a_crash_running_jobs_resume_or_fail_and_queued_ones_run_once(
    service_env: Callable[..., dict[str, str]], tmp_path: Path, data: Path
) -> None:
    jobs_dir = tmp_path / "data" / "jobs"
    env = service_env(TRAINER_DEVICES="0,1")
    async with service_process(env, tmp_path) as (proc, url):
        client = client_for(url)
        try:
            file_id = await upload(client, data)
            lost = await create(client, file_id, seed=HANG)  # no checkpoint yet
            saved = await create(client, file_id, seed=CHECKPOINT_THEN_HANG)
            queued = await create(client, file_id, seed=SUCCEED)
            for job_id in (lost, saved):
                await wait_for(client, job_id, "running")
            await wait_for_event(client, lost, "Step 1/4")
            await wait_for_event(client, saved, "Checkpoint saved at step 1")
            assert (await client.fine_tuning.jobs.retrieve(queued)).status == "queued"
        finally:
            await client.close()
        proc.kill()  # a crash: no chance to clean up
        await proc.wait()
    orphans = [(await launches(jobs_dir / j))[0]["pid"] for j in (lost, saved)]
    assert all(alive(pid) for pid in orphans)  # their own process groups outlive the service

    async with service_process(env, tmp_path) as (proc, url):
        client = client_for(url)
        try:
            failed = await wait_for(client, lost)
            resumed = await wait_for(client, saved)
            ran = await wait_for(client, queued)
        finally:
            await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    assert not any(alive(pid) for pid in orphans)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.message == RESTARTED and failed.error.code == "trainer_restarted"
    assert resumed.status == "succeeded" and ran.status == "succeeded"
    # Nothing ran twice: the interrupted job continued from its checkpoint.
    assert [run["resume"] for run in await launches(jobs_dir / lost)] == [None]
    assert [run["resume"] for run in await launches(jobs_dir / saved)] == [
        None,
        str(jobs_dir / saved / "output" / "checkpoint-1"),
    ]
    assert [run["resume"] for run in await launches(jobs_dir / queued)] == [None]


@needs_proc
async def test_sigterm_stops_running_jobs_and_the_queue_survives_a_restart(
    service_env: Callable[..., dict[str, str]], tmp_path: Path, data: Path
) -> None:
    jobs_dir = tmp_path / "data" / "jobs"
    env = service_env(TRAINER_DEVICES="cpu")
    async with service_process(env, tmp_path) as (proc, url):
        client = client_for(url)
        try:
            file_id = await upload(client, data)
            running = await create(client, file_id, seed=HANG)
            queued = await create(client, file_id, seed=SUCCEED)
            await wait_for(client, running, "running")
            await wait_for_event(client, running, "Step 1/4")
            await wait_for(client, queued, "queued")
        finally:
            await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    [launch] = await launches(jobs_dir / running)
    assert not alive(launch["pid"])

    async with service_process(env, tmp_path) as (proc, url):
        client = client_for(url)
        try:
            stopped = await wait_for(client, running)
            ran = await wait_for(client, queued)
        finally:
            await client.close()
    assert stopped.status == "failed" and stopped.error is not None
    assert stopped.error.message == STOPPED and stopped.error.code == "trainer_stopped"
    assert ran.status == "succeeded"
    assert len(await launches(jobs_dir / running)) == 1
    assert len(await launches(jobs_dir / queued)) == 1


# -- real training ----------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


async def test_a_job_trains_the_tiny_model_for_real_and_vllm_serves_the_adapter(
    tiny: Path, tmp_path: Path, checker: ResponseChecker, spec_path: Path
) -> None:
    vllm = FakeVLLM(OpenAISpec.load(spec_path), "tiny")
    await vllm.start()
    settings = load_settings(
        _env_file=None,
        api_key=KEY,
        base_models=f"tiny={tiny}",
        data_dir=tmp_path / "data",
        devices="cpu",
        publish="vllm",
        publish_url=vllm.root,
        publish_api_key=vllm.api_key,
    )
    train = chat_jsonl(tmp_path / "train.jsonl", 32)
    valid = chat_jsonl(tmp_path / "valid.jsonl", 8, seed=1)
    try:
        async with serving(settings, checker) as (client, app):
            job = await client.fine_tuning.jobs.create(
                model="tiny",
                training_file=await upload(client, train),
                validation_file=await upload(client, valid),
                suffix="parley",
                method={
                    "type": "supervised",
                    "supervised": {
                        "hyperparameters": {
                            "n_epochs": 2,
                            "batch_size": 2,
                            "learning_rate_multiplier": 10,
                        }
                    },
                },
            )
            done = await wait_for(client, job.id, timeout=300)
            assert done.status == "succeeded", done.error
            events = await events_of(client, job.id)
            checkpoints = (await client.fine_tuning.jobs.checkpoints.list(job.id)).data
            models = {m.id: m for m in (await client.models.list()).data}

            # The served adapter answers on vLLM's OpenAI API under the job's model name.
            served = client_for(vllm.url, key=vllm.api_key)
            try:
                vllm.enqueue("The cat is black.")
                answer = await served.chat.completions.create(
                    model=done.fine_tuned_model or "",
                    messages=[{"role": "user", "content": "What colour is the cat?"}],
                )
                with pytest.raises(openai.NotFoundError):
                    await served.chat.completions.create(
                        model="tiny-unknown", messages=[{"role": "user", "content": "Hi"}]
                    )
            finally:
                await served.close()
            assert app[SERVICE].scheduler._running == {}
    finally:
        await vllm.stop()

    name = done.fine_tuned_model
    assert name == f"tiny-parley-{job.id[-6:]}"
    assert done.trained_tokens and done.trained_tokens > 0
    assert done.hyperparameters.n_epochs == 2 and done.hyperparameters.batch_size == 2

    steps = [e.data for e in events if e.type == "metrics" and "train_loss" in e.data]
    train_losses = [d["train_loss"] for d in sorted(steps, key=lambda d: d["step"])]
    assert len(train_losses) >= 16  # per-step training loss, every step
    assert _mean(train_losses[-4:]) < _mean(train_losses[:4])  # it learns
    valid_losses = [e.data["valid_loss"] for e in events if "valid_loss" in (e.data or {})]
    assert len(valid_losses) == 2 and valid_losses[1] < valid_losses[0]  # once an epoch

    assert [c.step_number for c in checkpoints] == sorted(
        (c.step_number for c in checkpoints), reverse=True
    )
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        assert checkpoint.fine_tuned_model_checkpoint == f"{name}-step-{checkpoint.step_number}"
        assert checkpoint.metrics.train_loss is not None
        assert checkpoint.metrics.valid_loss is not None

    adapter = Path(done.model_extra["adapter_path"])  # type: ignore[index]
    assert (adapter / "adapter_config.json").is_file()
    assert vllm.loads == [{"lora_name": name, "lora_path": str(adapter)}]
    assert vllm.adapters == {name: str(adapter)}
    assert answer.choices[0].message.content == "The cat is black."
    assert vllm.calls[-1].model == name
    assert vllm.calls[-1].transcript == [("user", "What colour is the cat?")]
    assert vllm.violations == []

    assert models[name].model_extra == {"parent": "tiny", "root": str(adapter)}
    assert (models["tiny"].model_extra or {}).get("parley_tokens_per_second", 0) > 0
    assert any(str(adapter) in e.message for e in events)


@needs_proc
async def test_cancel_stops_real_training_within_seconds_and_leaves_no_adapter(
    tiny: Path, tmp_path: Path, checker: ResponseChecker, spec_path: Path
) -> None:
    vllm = FakeVLLM(OpenAISpec.load(spec_path), "tiny")
    await vllm.start()
    settings = load_settings(
        _env_file=None,
        api_key=KEY,
        base_models=f"tiny={tiny}",
        data_dir=tmp_path / "data",
        devices="cpu",
        publish="vllm",
        publish_url=vllm.root,
        publish_api_key=vllm.api_key,
    )
    try:
        async with serving(settings, checker) as (client, app):
            job = await client.fine_tuning.jobs.create(
                model="tiny",
                training_file=await upload(client, chat_jsonl(tmp_path / "t.jsonl", 64)),
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}},
            )
            await wait_for(client, job.id, "running", timeout=120)
            await wait_for_event(client, job.id, "training loss", timeout=120)
            record = await app[SERVICE].store.get_job(job.id)
            assert record is not None and record.pid is not None and alive(record.pid)
            cancelled = await client.fine_tuning.jobs.cancel(job.id)
            assert cancelled.status == "cancelled"
            assert not alive(record.pid)
            assert (await client.fine_tuning.jobs.retrieve(job.id)).status == "cancelled"
    finally:
        await vllm.stop()
    assert vllm.loads == []
    assert not (tmp_path / "data" / "jobs" / job.id / "output" / "adapter").exists()
