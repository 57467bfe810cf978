"""Fine-tuning end to end: /train → confirm → upload + job → polling → notice → model switch."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from bot.domain import JobRecord, utcnow
from bot.services.finetune import FineTuner
from bot.services.trainer import JobInfo
from bot.texts import t
from tests.conftest import SettingsFactory, running, settled
from tests.pg import AnyStore
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram

ADMIN = 42
USER = 100


async def _chat(tg: FakeTelegram, chat_id: int, texts: list[str]) -> None:
    """Have a user talk to the bot; each message gets its answer before the next."""
    tg.chat(chat_id)
    start = len(tg.sent_texts(chat_id))
    for n, text in enumerate(texts, 1):
        tg.push_message(chat_id, text, user_id=chat_id)
        await tg.wait_sent(chat_id, start + n)


def _dialogue(n: int, tag: str = "q") -> list[str]:
    return [f"{tag} number {i}: tell me something about topic {i}" for i in range(n)]


async def _seed(tg: FakeTelegram, threads: int, first_chat: int = 1000, tag: str = "q") -> None:
    """`threads` users with a two-turn conversation each: one training example per thread."""
    for chat in range(first_chat, first_chat + threads):
        await _chat(tg, chat, [f"{tag} {chat}: hello", f"{tag} {chat}: tell me more"])


async def _press(
    tg: FakeTelegram, user_id: int, chat_id: int, data_prefix: str, language_code: str = "en"
) -> None:
    mid, _, data = next(b for b in tg.buttons(chat_id) if b[2].startswith(data_prefix))
    tg.push_callback(user_id, chat_id, mid, data, language_code)


async def _train_and_start(tg: FakeTelegram, language_code: str = "en") -> None:
    """The admin runs /train and presses "start" under the summary."""
    tg.chat(ADMIN)
    tg.push_message(ADMIN, "/train", user_id=ADMIN)
    await tg.wait_for(lambda: any(b[2].startswith("ft:start:") for b in tg.buttons(ADMIN)))
    await _press(tg, ADMIN, ADMIN, "ft:start:", language_code)


def _said(tg: FakeTelegram, chat_id: int, fragment: str) -> bool:
    """Whether the bot ever showed `fragment` in the chat, in a message or an edit of one."""
    calls = tg.calls_of("sendMessage") + tg.calls_of("editMessageText")
    return any(
        c.status == 200 and c.params["chat_id"] == str(chat_id) and fragment in c.params["text"]
        for c in calls
    )


def _uploaded_examples(oai: FakeOpenAI) -> list[dict]:  # type: ignore[type-arg]
    first = next(iter(oai.files.values()))
    return [json.loads(line) for line in first["data"].decode().splitlines()]


async def test_train_to_success_notice_to_model_switch(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    settings = make_settings(job_poll_interval=0.1)
    async with running(settings) as app:
        await _seed(tg, 11)
        await settled(app)  # every seeded turn is logged before /train
        await _chat(tg, USER, ["my mail is ada@example.com, call +44 20 7946 0958"])
        await settled(app)
        tg.chat(ADMIN)
        tg.push_message(ADMIN, "/train", user_id=ADMIN)
        await tg.wait_for(lambda: any(b[2].startswith("ft:start:") for b in tg.buttons(ADMIN)))
        summary = tg.texts(ADMIN)[-1]
        assert "Examples: 12 " in summary and "Base model: gpt-4.1-mini-2025-04-14" in summary
        # The message and its echo; in words, not codes.
        assert "Redacted: email addresses: 2; phone numbers: 2" in summary
        assert oai.files == {} and oai.jobs == {}  # nothing uploaded before "start"

        await _press(tg, ADMIN, ADMIN, "ft:start:")
        await tg.wait_for(lambda: _said(tg, ADMIN, "Started fine-tuning job"))
        [job] = oai.jobs.values()
        assert job["model"] == "gpt-4.1-mini-2025-04-14" and job["suffix"] == "parley"
        assert job["method"]["type"] == "supervised"
        examples = _uploaded_examples(oai)
        assert examples[0]["messages"][0] == {
            "role": "system",
            "content": settings.assistant_instructions,
        }
        dumped = json.dumps(examples)
        assert "ada@example.com" not in dumped and "7946" not in dumped and "[email]" in dumped

        # The poller follows the job to the end and tells the admin, with a switch button.
        # (the message that followed the job shows its end too; the notice is a new message)
        await tg.wait_for(lambda: any("succeeded" in t for t in tg.sent_texts(ADMIN)), timeout=10)
        notice = next(t for t in tg.sent_texts(ADMIN) if "succeeded" in t)
        model = job["fine_tuned_model"]
        assert model and model in notice
        await _press(tg, ADMIN, ADMIN, "ft:use:")
        await tg.wait_for(lambda: any(t.startswith("Switched") for t in tg.texts(ADMIN)))
        await _chat(tg, USER, ["which model answers now?"])
        assert oai.calls[-1].model == model
        await settled(app)
        [(status, result)] = await app.bot_data.services.store.fetch_all(  # type: ignore[union-attr]
            "SELECT status, fine_tuned_model FROM fine_tune_jobs"
        )
        assert (status, result) == ("succeeded", model)
    async with running(settings):  # the choice survives a restart
        await _chat(tg, USER, ["and after a restart?"])
    assert oai.calls[-1].model == model


async def test_job_notices_are_in_the_language_of_the_admin_who_started_the_job(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(job_poll_interval=0.1)) as app:
        await _seed(tg, 11)
        await settled(app)
        await _train_and_start(tg, language_code="ru")  # a Russian-speaking admin
        await tg.wait_for(lambda: any("выполнено" in t for t in tg.sent_texts(ADMIN)), timeout=10)
        assert any(b[1] == "Использовать эту модель" for b in tg.buttons(ADMIN))


async def test_a_job_is_followed_in_one_message_and_only_its_end_is_a_new_one(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    oai.job_plan = ["validating_files", "queued", "running", "succeeded"]
    async with running(make_settings(job_poll_interval=60)) as app:  # nothing polled yet
        await _seed(tg, 11)
        await settled(app)
        await _train_and_start(tg)
        await tg.wait_for(lambda: _said(tg, ADMIN, "Started fine-tuning job"))
        await settled(app)
        [job_id] = oai.jobs
        [record] = await app.bot_data.services.store.jobs.recent()  # type: ignore[union-attr]
        # The summary the admin pressed "start" under now says the job started, and follows it.
        live = record.notice_message_id
        assert live is not None and "Started fine-tuning job" in tg.messages[(ADMIN, live)]["text"]
        sent = len(tg.sent_texts(ADMIN))
    # After a restart the same message goes on following the job.
    async with running(make_settings(job_poll_interval=0.05)):
        await tg.wait_for(lambda: len(tg.sent_texts(ADMIN)) > sent, timeout=10)
        await asyncio.sleep(0.3)  # a notice too many would come within a few polls
    [notice] = tg.sent_texts(ADMIN)[sent:]  # one new message: the end, with its button
    assert notice.startswith(f"Fine-tuning job {job_id} succeeded.")
    edits = [
        c.params["text"]
        for c in tg.calls_of("editMessageText")
        if c.params["chat_id"] == str(ADMIN) and int(c.params["message_id"]) == live
    ]
    model = record.base_model

    def live_text(status: str) -> str:
        return t("job.live", job_id=job_id, model=model, status=t(f"job.status.{status}"))

    assert edits[1:] == [
        live_text("queued"),
        live_text("running"),
        t("job.status", job_id=job_id, status="succeeded"),
    ]
    assert edits[0].startswith(f"Started fine-tuning job {job_id}")


async def test_train_jobs_and_job_speak_the_admins_language(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    from PIL import Image, ImageChops, ImageDraw

    from bot.services.charts import LOSS_TITLE_AT, chart_font
    from tests.test_photos import jpeg

    def say(text: str) -> None:
        sender = {"id": ADMIN, "is_bot": False, "first_name": "Admin", "language_code": "ru"}
        tg.push_message(ADMIN, text, user_id=ADMIN, extra={"from": sender})

    async with running(make_settings(job_poll_interval=0.1)) as app:
        await _seed(tg, 11)
        tg.push_photo(USER, jpeg(), caption="what is this?")
        await tg.wait_sent(USER, 1)
        await settled(app)
        tg.chat(ADMIN)
        say("/train")
        await tg.wait_for(lambda: any(b[2].startswith("ft:start:") for b in tg.buttons(ADMIN)))
        summary = tg.texts(ADMIN)[-1]
        # Why turns were left out, in words: not the code photo_turn.
        assert "Исключено: реплики с фото (их добавляет photos=on): 1" in summary
        assert "photo_turn" not in summary and "text only" not in summary
        assert summary.startswith("Датасет готов (примеров: 11, только текст).")
        await _press(tg, ADMIN, ADMIN, "ft:start:", "ru")
        await tg.wait_for(lambda: any("выполнено" in t for t in tg.sent_texts(ADMIN)), timeout=10)
        [job_id] = oai.jobs
        n = len(tg.sent_texts(ADMIN))
        say("/jobs")
        [listing] = (await tg.wait_sent(ADMIN, n + 1))[n:]
        assert listing.startswith(f"{job_id}: выполнено, ") and "только что" in listing
        assert "succeeded" not in listing and "ago" not in listing
        say(f"/job {job_id}")
        detail = (await tg.wait_sent(ADMIN, n + 2))[-1]
        assert "Датасет: примеров: 11, только текст; токенов: " in detail
        await tg.wait_for(lambda: bool(tg.calls_of("sendPhoto")))
    photo = tg.calls_of("sendPhoto")[-1]
    assert photo.params["caption"] == f"Потери при обучении, {job_id}"
    png = [data for method, _, data in tg.uploads if method == "sendPhoto"][-1]
    band = Image.open(io.BytesIO(png)).convert("RGB").crop((0, 0, 720, 40))
    expected = Image.new("RGB", (720, 360), "white")
    title = t("chart.loss_title", lang="ru")
    ImageDraw.Draw(expected).text(LOSS_TITLE_AT, title, fill="black", font=chart_font(16))
    assert ImageChops.difference(band, expected.crop((0, 0, 720, 40))).getbbox() is None


@pytest.mark.parametrize(
    "command",
    [
        "/train",
        "/jobs",
        "/job ftjob-1",
        "/cancel ftjob-1",
        "/model",
        "/model gpt-4.1-mini",
        "/export",
        "/stats",
    ],
)
async def test_admin_commands_are_refused_to_everyone_else(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory, command: str
) -> None:
    async with running(make_settings()) as app:
        tg.chat(USER)
        tg.push_message(USER, command, user_id=USER)
        [text] = await tg.wait_sent(USER, 1)
        assert text == "Sorry, that command is only for the bot's admins."
        assert app.bot_data.services.chat.model == "gpt-5.4-mini"  # type: ignore[union-attr]
    assert [r for r in oai.requests if r[1] != "/conversations"] == []  # no API call at all


async def test_group_command_with_bot_name_is_refused_and_forwarded_commands_are_not_run(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()):
        tg.chat(-500, "supergroup")
        tg.push_message(-500, "/train@parley_test_bot", user_id=USER, chat_type="supergroup")
        [refusal] = await tg.wait_sent(-500, 1)
        assert "only for the bot's admins" in refusal
        tg.chat(ADMIN)
        origin = {
            "type": "user",
            "date": 1,
            "sender_user": {"id": USER, "is_bot": False, "first_name": "U"},
        }
        tg.push_message(ADMIN, "/train", user_id=ADMIN, extra={"forward_origin": origin})
        [text] = await tg.wait_sent(ADMIN, 1)
        assert "Forwarded commands are not run" in text
    assert oai.files == {}


async def test_start_button_pressed_by_someone_else_is_refused(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()) as app:
        await _seed(tg, 11)
        await settled(app)  # every seeded turn is logged before /train
        # The summary, forwarded out of the admin's chat: someone else presses its button.
        tg.chat(ADMIN)
        tg.push_message(ADMIN, "/train", user_id=ADMIN)
        await tg.wait_for(lambda: any(b[2].startswith("ft:start:") for b in tg.buttons(ADMIN)))
        await _press(tg, USER, ADMIN, "ft:start:")
        await tg.wait_for(lambda: bool(tg.calls_of("answerCallbackQuery")))
        answer = tg.calls_of("answerCallbackQuery")[-1].params
        assert answer["show_alert"] == "true" and "only for the bot's admins" in answer["text"]
    assert oai.files == {} and oai.jobs == {}


async def test_403_explains_the_wind_down_and_points_to_export(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    oai.fine_tuning_forbidden = True
    async with running(make_settings()) as app:
        await _seed(tg, 11)
        await settled(app)  # every seeded turn is logged before /train
        await _train_and_start(tg)
        await tg.wait_for(lambda: any("403" in t for t in tg.texts(ADMIN)))
    text = next(t for t in tg.texts(ADMIN) if "403" in t)
    assert "2027-01-06" in text and "/export" in text
    assert oai.jobs == {}


async def test_fewer_than_ten_examples_cannot_start(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()) as app:
        await _seed(tg, 3)
        await settled(app)  # every seeded turn is logged before /train
        tg.chat(ADMIN)
        tg.push_message(ADMIN, "/train", user_id=ADMIN)
        await tg.wait_for(lambda: any("Not enough" in t for t in tg.texts(ADMIN)))
    answer = tg.texts(ADMIN)[-1]
    # Plainly: how many there are, how many a job needs, how many more; no "ready".
    assert answer.startswith(t("train.too_few", examples=3, needed=10, missing=7))
    assert "ready" not in answer and "Examples:" not in answer
    assert not any(b[2].startswith("ft:start:") for b in tg.buttons(ADMIN))


async def test_forget_is_honoured_by_the_next_train(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(job_poll_interval=30)) as app:
        await _seed(tg, 11, tag="kept")
        await settled(app)  # every seeded turn is logged before /train
        await _chat(tg, USER, _dialogue(5, "secret"))
        tg.push_message(USER, "/forget", user_id=USER)
        await tg.wait_for(lambda: any(b[2].startswith("forget:yes:") for b in tg.buttons(USER)))
        await _press(tg, 1000, USER, "forget:yes:")  # someone else's press does nothing
        await tg.wait_for(lambda: bool(tg.calls_of("answerCallbackQuery")))
        await _press(tg, USER, USER, "forget:yes:")
        await tg.wait_for(lambda: any(t.startswith("Done: I deleted 10") for t in tg.texts(USER)))
        await _chat(tg, USER, ["secret after forgetting"])  # logged, but never trained on
        await _train_and_start(tg)
        await tg.wait_for(lambda: bool(oai.jobs))
        await settled(app)
        store = app.bot_data.services.store  # type: ignore[union-attr]
        assert await store.fetch_all("SELECT user_id FROM opted_out_users") == [(USER,)]
    dumped = json.dumps(_uploaded_examples(oai))
    assert "secret" not in dumped and "kept 1010: tell me more" in dumped


async def test_failed_job_is_reported_with_its_reason_and_polling_resumes_after_restart(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    oai.job_failure = "Training diverged at step 12"
    settings = make_settings(job_poll_interval=60)  # nothing is polled during the first run
    async with running(settings) as app:
        await _seed(tg, 11)
        await settled(app)  # every seeded turn is logged before /train
        await _train_and_start(tg)
        await tg.wait_for(lambda: _said(tg, ADMIN, "Started"))
    assert not any("failed" in t for t in tg.texts(ADMIN))
    async with running(make_settings(job_poll_interval=0.1)) as app:
        await tg.wait_for(lambda: any("failed" in t for t in tg.sent_texts(ADMIN)), timeout=10)
    assert "Training diverged at step 12" in next(t for t in tg.sent_texts(ADMIN) if "failed" in t)


async def test_jobs_job_and_cancel_and_offline_listing(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    oai.job_plan = ["validating_files", "queued", "running", "running", "running", "succeeded"]
    async with running(make_settings(job_poll_interval=60)) as app:
        await _seed(tg, 11)
        await settled(app)  # every seeded turn is logged before /train
        await _train_and_start(tg)
        await tg.wait_for(lambda: bool(oai.jobs))
        [job_id] = oai.jobs
        n = len(tg.sent_texts(ADMIN))
        tg.push_message(ADMIN, "/jobs", user_id=ADMIN)
        listing = (await tg.wait_sent(ADMIN, n + 1))[-1]
        assert job_id in listing and "gpt-4.1-mini-2025-04-14" in listing
        tg.push_message(ADMIN, f"/job {job_id}", user_id=ADMIN)
        detail = (await tg.wait_sent(ADMIN, n + 2))[-1]
        assert "Created fine-tuning job" in detail and "examples" in detail
        tg.push_message(ADMIN, f"/cancel {job_id}", user_id=ADMIN)
        assert (await tg.wait_sent(ADMIN, n + 3))[-1] == f"Job {job_id} is now cancelled."
        oai.fine_tuning_down = True
        tg.push_message(ADMIN, "/jobs", user_id=ADMIN)
        offline = (await tg.wait_sent(ADMIN, n + 4))[-1]
        # What went wrong is said in words, not as the bot's internal kind ("unavailable").
        tg.push_message(ADMIN, f"/job {job_id}", user_id=ADMIN)
        unreachable = (await tg.wait_sent(ADMIN, n + 5))[-1]
    assert job_id in offline and "cancelled" in offline and "bot's own records" in offline
    assert unreachable.endswith("Couldn't reach the fine-tuning API (server error).")


async def test_job_shows_a_loss_chart_once_metrics_exist(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(job_poll_interval=0.1)) as app:
        await _seed(tg, 11)
        await settled(app)  # every seeded turn is logged before /train
        await _train_and_start(tg)
        await tg.wait_for(lambda: any("succeeded" in t for t in tg.texts(ADMIN)), timeout=10)
        [job_id] = oai.jobs
        tg.push_message(ADMIN, f"/job {job_id}", user_id=ADMIN)
        await tg.wait_for(lambda: bool(tg.calls_of("sendPhoto")))
    photo = tg.calls_of("sendPhoto")[-1]
    assert photo.params["caption"] == f"Training loss, {job_id}"
    png = [data for method, _, data in tg.uploads if method == "sendPhoto"][-1]
    assert png.startswith(b"\x89PNG")


async def test_model_lists_and_switches(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()):
        tg.chat(ADMIN)
        tg.push_message(ADMIN, "/model", user_id=ADMIN)
        [listing] = await tg.wait_sent(ADMIN, 1)
        assert "The bot uses gpt-5.4-mini." in listing and "gpt-4.1-mini" in listing
        tg.push_message(ADMIN, "/model no-such-model", user_id=ADMIN)
        assert "no model called no-such-model" in (await tg.wait_sent(ADMIN, 2))[-1]
        tg.push_message(ADMIN, "/model gpt-5.4-nano", user_id=ADMIN)
        assert (await tg.wait_sent(ADMIN, 3))[
            -1
        ] == "Switched: the bot now answers with gpt-5.4-nano."
        await _chat(tg, USER, ["hello"])
    assert oai.calls[-1].model == "gpt-5.4-nano"


async def test_export_sends_the_curated_dataset(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()) as app:
        await _seed(tg, 11)
        await settled(app)  # every seeded turn is logged before /train
        tg.chat(ADMIN)
        tg.push_message(ADMIN, "/export", user_id=ADMIN)
        await tg.wait_for(lambda: bool(tg.calls_of("sendDocument")))
    data = [d for method, _, d in tg.uploads if method == "sendDocument"][0]
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert lines and all(ex["messages"][-1]["role"] == "assistant" for ex in lines)
    assert oai.files == {}  # exporting uploads nothing to OpenAI


async def test_an_edited_admin_command_from_someone_else_is_refused(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()):
        tg.chat(USER)
        message = tg.push_message(USER, "hello", user_id=USER)
        await tg.wait_sent(USER, 1)
        edited = {
            **message,
            "text": "/export",
            "edit_date": message["date"] + 5,
            "entities": [{"type": "bot_command", "offset": 0, "length": 7}],
        }
        tg.push_update({"edited_message": edited})
        assert (await tg.wait_sent(USER, 2))[
            -1
        ] == "Sorry, that command is only for the bot's admins."


async def test_help_shows_admin_commands_only_to_admins(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()):
        tg.chat(USER)
        tg.chat(ADMIN)
        tg.push_message(USER, "/help", user_id=USER)
        tg.push_message(ADMIN, "/help", user_id=ADMIN)
        [user_help] = await tg.wait_sent(USER, 1)
        [admin_help] = await tg.wait_sent(ADMIN, 1)
    assert "/train" not in user_help and "/forget" in user_help
    assert "/train" in admin_help and "/jobs" in admin_help


async def test_forget_also_deletes_the_private_chats_conversations_at_openai(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings()):
        await _chat(tg, USER, ["my secret plan", "more secrets"])
        tg.push_message(USER, "/reset", user_id=USER)  # a closed thread is deleted too
        await tg.wait_sent(USER, 3)
        await _chat(tg, USER, ["secret in the second thread"])
        assert len(oai.conversations) == 2
        tg.push_message(USER, "/forget", user_id=USER)
        await tg.wait_for(lambda: any(b[2].startswith("forget:yes:") for b in tg.buttons(USER)))
        await _press(tg, USER, USER, "forget:yes:")
        await tg.wait_for(lambda: any(t.startswith("Done: I deleted") for t in tg.texts(USER)))
        assert oai.conversations == {}  # nothing of theirs is left on the server
        await _chat(tg, USER, ["a fresh start"])
    assert oai.calls[-1].transcript == [("user", "a fresh start")]


async def test_the_cost_estimate_counts_the_configured_epochs(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    from bot.services.dataset import DatasetOptions

    costs = []
    for epochs in (1, 4):
        async with running(make_settings(fine_tune_epochs=epochs)) as app:
            if epochs == 1:
                await _seed(tg, 11)
                await settled(app)
            report = await app.bot_data.services.finetune.build(DatasetOptions())  # type: ignore[union-attr]
            costs.append(report.estimated_cost_usd)
    assert costs[0] and costs[1] == pytest.approx(costs[0] * 4)


async def test_a_job_notice_under_way_when_the_poller_stops_is_recorded_not_sent_again(
    tmp_path: Path, store: AnyStore
) -> None:
    now = utcnow()
    await store.jobs.add(
        JobRecord("ftjob-1", "openai", "m", None, None, 10, 0, 100, ADMIN, "d", "running", now, now)
    )

    class Trainer:  # only what the poller asks of one
        name = "openai"

        async def get(self, job_id: str) -> JobInfo:
            return JobInfo(job_id, "succeeded", "m", 0, fine_tuned_model="ft:m")

    tuner = FineTuner(
        store.jobs,
        Trainer(),  # type: ignore[arg-type]
        dataset=store.dataset,
        datasets_dir=tmp_path,
        base_model="m",
        suffix="s",
        epochs=1,
    )
    started, release, sent = asyncio.Event(), asyncio.Event(), []

    async def notify(job: JobRecord, info: JobInfo) -> None:
        started.set()
        await release.wait()  # the Bot API call is on its way
        sent.append(info.status)

    poller = asyncio.create_task(tuner.poll_once(notify))
    await started.wait()
    poller.cancel()  # shutdown, mid-notice
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await poller
    assert sent == ["succeeded"]
    [job] = await store.jobs.recent()
    assert job.notified_status == "succeeded"  # so the restart won't tell it again
