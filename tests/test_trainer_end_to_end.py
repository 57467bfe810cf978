"""The learning loop on hardware the admin controls, end to end, with nothing faked but the edges.

The real bot (/train → start) drives the real parley-trainer process, which trains the tiny
model for real with TRL on the CPU and publishes the adapter to a stand-in vLLM; "use this
model" then routes the chat there, and the next answer comes under the adapter's name with
the chat's earlier turns. Telegram, OpenAI and vLLM are spec-checked stand-ins.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SettingsFactory, running, settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.specs import OpenAISpec
from tests.stubs.telegram_server import FakeTelegram
from tests.stubs.vllm_server import FakeVLLM
from tests.test_finetune import ADMIN, USER, _chat, _press, _seed
from tests.test_self_hosted_training import _train
from tests.test_trainer_service import KEY, _env, service_process
from tests.tinymodel import build_tiny_model, require_training_stack


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    require_training_stack()
    return build_tiny_model(tmp_path / "tiny")


async def test_train_on_parley_trainer_then_answer_through_vllm_under_the_adapter(
    tg: FakeTelegram,
    oai: FakeOpenAI,
    make_settings: SettingsFactory,
    tiny: Path,
    tmp_path: Path,
    shared: Path,
) -> None:
    vllm = FakeVLLM(OpenAISpec.load(shared / "specs" / "openai-openapi.json"), "tiny")
    await vllm.start()
    env = _env(
        tmp_path,
        TRAINER_API_KEY=KEY,
        TRAINER_BASE_MODELS=f"tiny={tiny}",
        TRAINER_DATA_DIR=str(tmp_path / "trainer-data"),
        TRAINER_LISTEN="127.0.0.1:0",
        TRAINER_DEVICES="cpu",
        TRAINER_PUBLISH="vllm",
        TRAINER_PUBLISH_URL=vllm.root,
        TRAINER_PUBLISH_API_KEY=vllm.api_key,
    )
    try:
        async with service_process(env, tmp_path) as (_, url):
            own = {
                "fine_tune_base_url": url,
                "fine_tune_api_key": KEY,
                "fine_tune_epochs": 2,
                "serve_base_url": vllm.url,
                "serve_api_key": vllm.api_key,
                "job_poll_interval": 0.2,
            }
            # A base model the trainer doesn't offer: refused, with the trainer's reason.
            async with running(make_settings(fine_tune_base_model="qwen-imaginary", **own)) as app:
                await _seed(tg, 11)
                await _chat(tg, USER, ["My name is Ada."])
                await settled(app)
                await _train(tg)
                await _press(tg, ADMIN, ADMIN, "ft:start:")
                await tg.wait_for(lambda: "refused" in tg.texts(ADMIN)[-1])
                refusal = tg.texts(ADMIN)[-1]
                assert refusal.startswith("The trainer refused the job:") and "tiny" in refusal

            settings = make_settings(fine_tune_base_model="tiny", **own)
            async with running(settings) as app:
                summary = await _train(tg)
                assert "Runs on: parley-trainer at 127.0.0.1" in summary
                assert "known once a first job on tiny has finished there" in summary
                await _press(tg, ADMIN, ADMIN, "ft:start:")
                await tg.wait_for(
                    lambda: any("succeeded" in t for t in tg.sent_texts(ADMIN)), timeout=300
                )
                notice = next(t for t in tg.sent_texts(ADMIN) if "succeeded" in t)
                [(job_id, model)] = await app.bot_data.services.store.fetch_all(  # type: ignore[union-attr]
                    "SELECT job_id, fine_tuned_model FROM fine_tune_jobs WHERE status = 'succeeded'"
                )
                assert model.startswith("tiny-parley-") and model in notice
                assert vllm.adapters.keys() == {model}  # the trainer published it

                await _press(tg, ADMIN, ADMIN, "ft:use:")
                await tg.wait_for(lambda: any(t.startswith("Switched") for t in tg.texts(ADMIN)))
                calls_before = len(oai.calls)
                vllm.enqueue("You told me: Ada.")
                await _chat(tg, USER, ["What is my name?"])
                assert tg.sent_texts(USER)[-1] == "You told me: Ada."
                served = vllm.calls[-1]
                assert served.model == model
                assert served.transcript == [
                    ("user", "My name is Ada."),
                    ("assistant", "echo: My name is Ada."),
                    ("user", "What is my name?"),
                ]
                assert len(oai.calls) == calls_before

                # /job shows the trainer's events and the training-loss chart.
                photos_before = len(tg.calls_of("sendPhoto"))
                tg.push_message(ADMIN, f"/job {job_id}", user_id=ADMIN)
                await tg.wait_for(lambda: len(tg.calls_of("sendPhoto")) > photos_before)
                details = next(t for t in reversed(tg.texts(ADMIN)) if t.startswith(job_id))
                assert f"{job_id}: succeeded, tiny" in details and "Dataset:" in details

                # The trainer has measured itself now: the next summary prices GPU time.
                summary = await _train(tg)
                assert "min of GPU time on your own trainer (no fee)" in summary
    finally:
        await vllm.stop()
    assert vllm.violations == []
