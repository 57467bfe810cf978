"""A trainer of one's own beside OpenAI's: jobs on both followed, the result served elsewhere.

Stand-ins: one FakeOpenAI plays the chat endpoint (OpenAI), a second parley-trainer's
fine-tuning API, a third the serving endpoint (vLLM). The real trainer and a real vLLM
stand-in run in test_trainer_end_to_end.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.services.trainer import THROUGHPUT_FIELD
from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.specs import OpenAISpec
from tests.stubs.telegram_server import FakeTelegram
from tests.test_finetune import ADMIN, USER, _chat, _press, _seed

BASE = "gpt-4.1-mini"  # one of the stand-in's listed models


async def _stand_in(shared: Path, key: str) -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(OpenAISpec.load(shared / "specs" / "openai-openapi.json"), key)
    await server.start()
    yield server
    await server.stop()
    assert server.violations == []


@pytest.fixture
async def trainer(shared: Path) -> AsyncIterator[FakeOpenAI]:
    """parley-trainer's fine-tuning API, played by a stand-in."""
    async for server in _stand_in(shared, "trainer-key"):
        yield server


@pytest.fixture
async def serve(shared: Path) -> AsyncIterator[FakeOpenAI]:
    """The serving endpoint (vLLM), played by a stand-in."""
    async for server in _stand_in(shared, "serve-key"):
        yield server


def _self_hosted(trainer: FakeOpenAI, serve: FakeOpenAI) -> dict[str, object]:
    return {
        "fine_tune_base_url": trainer.url,
        "fine_tune_api_key": "trainer-key",
        "fine_tune_base_model": BASE,
        "serve_base_url": serve.url,
        "serve_api_key": "serve-key",
        "job_poll_interval": 0.1,
    }


async def _train(tg: FakeTelegram) -> str:
    """/train as the admin; the summary it shows (with its start button)."""
    tg.chat(ADMIN)
    before = len(tg.buttons(ADMIN))
    tg.push_message(ADMIN, "/train", user_id=ADMIN)
    await tg.wait_for(lambda: len(tg.buttons(ADMIN)) > before)
    return tg.texts(ADMIN)[-1]


async def test_openai_and_self_hosted_jobs_side_by_side_and_the_served_model_keeps_the_thread(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    trainer: FakeOpenAI,
    serve: FakeOpenAI,
    make_settings: SettingsFactory,
) -> None:
    # An OpenAI job from before the move; it stays running.
    oai.job_plan = ["validating_files", "running"]
    async with running(make_settings(job_poll_interval=0.1)) as app:
        await _seed(tg, 11)
        await _chat(tg, USER, ["My name is Ada."])
        await settled(app)
        summary = await _train(tg)
        assert "Runs on: OpenAI" in summary
        await _press(tg, ADMIN, ADMIN, "ft:start:")
        await tg.wait_for(lambda: any("Started fine-tuning job" in t for t in tg.texts(ADMIN)))
    [openai_job] = oai.jobs

    trainer.model_extras[BASE] = {THROUGHPUT_FIELD: 50.0}
    settings = make_settings(**_self_hosted(trainer, serve))
    async with running(settings) as app:
        summary = await _train(tg)
        assert "Runs on: parley-trainer at 127.0.0.1" in summary
        assert "min of GPU time on your own trainer (no fee)" in summary
        await _press(tg, ADMIN, ADMIN, "ft:start:")
        await tg.wait_for(lambda: len(trainer.jobs) == 1)
        [own_job] = trainer.jobs
        assert len(oai.jobs) == 1 and trainer.jobs[own_job]["model"] == BASE

        # The poller follows both: the OpenAI job at OpenAI, the new one at the trainer.
        await tg.wait_for(lambda: any("succeeded" in t for t in tg.texts(ADMIN)), timeout=10)
        asked = [path for _, path, _ in oai.requests if path.startswith("/fine_tuning/jobs/")]
        assert f"/fine_tuning/jobs/{openai_job}" in asked
        assert not any(own_job in path for _, path, _ in oai.requests)
        tg.push_message(ADMIN, "/jobs", user_id=ADMIN)
        await tg.wait_for(lambda: openai_job in tg.texts(ADMIN)[-1])
        listing = tg.texts(ADMIN)[-1].splitlines()
        assert any(line.startswith(f"{openai_job}: running") for line in listing)
        assert any(line.startswith(f"{own_job}: succeeded") for line in listing)

        # The trainer published the adapter to the serving endpoint; "use this model".
        model = trainer.jobs[own_job]["fine_tuned_model"]
        serve.fine_tuned_models.append(model)
        await _press(tg, ADMIN, ADMIN, "ft:use:")
        await tg.wait_for(lambda: any(t.startswith("Switched") for t in tg.texts(ADMIN)))
        calls_before = len(oai.calls)
        await _chat(tg, USER, ["What is my name?"])
        served = serve.calls[-1]
        assert served.api == "chat" and served.model == model
        # The chat's earlier turn, held in an OpenAI conversation, came from the log.
        assert served.transcript == [
            ("user", "My name is Ada."),
            ("assistant", "echo: My name is Ada."),
            ("user", "What is my name?"),
        ]
        assert len(oai.calls) == calls_before  # nothing went to the chat endpoint

    async with running(settings) as app:  # the route survives a restart
        await _chat(tg, USER, ["Still there?"])
        assert serve.calls[-1].model == model and serve.calls[-1].last_user_text == "Still there?"
        tg.push_message(ADMIN, "/model gpt-5.4-mini", user_id=ADMIN)
        await tg.wait_for(lambda: tg.texts(ADMIN)[-1].startswith("Switched"))
        await _chat(tg, USER, ["And back?"])
        back = oai.calls[-1]
        assert back.api == "responses" and back.model == "gpt-5.4-mini"
        # A new conversation, seeded with the turns the served model had.
        assert ("user", "Still there?") in back.transcript
        assert ("assistant", "echo: What is my name?") in back.transcript
        assert back.last_user_text == "And back?"


async def test_a_self_hosted_trainer_without_a_finished_job_gives_no_price(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    trainer: FakeOpenAI,
    serve: FakeOpenAI,
    make_settings: SettingsFactory,
) -> None:
    async with running(make_settings(**_self_hosted(trainer, serve))) as app:
        await _seed(tg, 11)
        await settled(app)
        summary = await _train(tg)
    assert "known once a first job on gpt-4.1-mini has finished there" in summary
    assert "$" not in summary


async def test_model_lists_both_endpoints_and_refuses_a_name_neither_serves(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    trainer: FakeOpenAI,
    serve: FakeOpenAI,
    make_settings: SettingsFactory,
) -> None:
    serve.fine_tuned_models.append("tiny-parley-abc123")
    async with running(make_settings(**_self_hosted(trainer, serve))):
        tg.chat(ADMIN)
        tg.push_message(ADMIN, "/model", user_id=ADMIN)
        [listing] = await tg.wait_sent(ADMIN, 1)
        assert "tiny-parley-abc123" in listing and "gpt-5.4-mini" in listing
        tg.push_message(ADMIN, "/model nonesuch", user_id=ADMIN)
        await tg.wait_sent(ADMIN, 2)
        assert tg.texts(ADMIN)[-1] == "There is no model called nonesuch here."
        tg.push_message(ADMIN, "/model tiny-parley-abc123", user_id=ADMIN)
        await tg.wait_sent(ADMIN, 3)
        await _chat(tg, USER, ["hi"])
    assert serve.calls[-1].model == "tiny-parley-abc123" and oai.calls == []
