"""The LoRA worker trains for real on the CPU, and the training files are checked first.

The worker runs as the service runs it, a subprocess reporting JSON lines on stdout, on a tiny
random model built in-process (tests/tinymodel.py): nothing is downloaded. Without the trainer
extra the training tests skip (under CI=true they fail); the file checks need no extra.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.tinymodel import build_tiny_model, chat_jsonl, require_training_stack
from trainer import data

REPO = Path(__file__).resolve().parent.parent
GOOD = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the fox?"},
        {"role": "assistant", "content": "The fox is red."},
    ]
}
TIMEOUT = 300  # a guard against hangs, never a speed check


# -- helpers -------------------------------------------------------------------------------


def _config(tmp: Path, model: Path, train: Path, **overrides: Any) -> Path:
    """A job directory with its config.json, as the service writes it."""
    job = tmp / "job"
    job.mkdir(parents=True, exist_ok=True)
    config = {
        "base_model_path": str(model),
        "training_file": str(train),
        "validation_file": None,
        "n_epochs": 2,
        "batch_size": 4,
        # The tiny random model needs a bold rate to show learning in a dozen steps.
        "learning_rate_multiplier": 25.0,
        "seed": 7,
        "max_seq_len": 128,
        "output_dir": str(tmp / "out"),
        "resume_from_checkpoint": None,
        "save_steps": None,
        **overrides,
    }
    (job / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return job


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _events(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line is one JSON event: nothing else may be printed there."""
    return [json.loads(line) for line in stdout.splitlines()]


@dataclass
class Run:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


def _run_worker(job: Path) -> Run:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.worker", str(job)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return Run(proc.returncode, _events(proc.stdout), proc.stderr)


def _jsonl(path: Path, *lines: Any) -> Path:
    path.write_bytes(
        b"".join(
            line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n" for line in lines
        )
    )
    return path


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_training_stack()
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """One real training run with a validation file, shared by the tests that read it."""
    tmp = tmp_path_factory.mktemp("trained")
    train = chat_jsonl(tmp / "train.jsonl", 24, seed=1)
    valid = chat_jsonl(tmp / "valid.jsonl", 6, seed=2)
    job = _config(tmp, tiny_model, train, validation_file=str(valid))
    run = _run_worker(job)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "out", run


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process `prepare` sets Hub variables; restore them after the test."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


# -- training for real ---------------------------------------------------------------------


def test_worker_trains_and_the_loss_falls(trained: tuple[Path, Run]) -> None:
    out, run = trained
    steps = run.of("step")
    assert [e["step"] for e in steps] == list(range(1, 13))  # 24 examples / 4, two epochs
    assert {e["total_steps"] for e in steps} == {12}
    assert steps[-1]["epoch"] == pytest.approx(2.0)
    losses = [e["train_loss"] for e in steps]
    assert sum(losses[-3:]) / 3 < losses[0]
    assert run.of("status"), "progress is reported"
    assert not run.of("error")


def test_worker_evaluates_each_epoch_and_checkpoints(trained: tuple[Path, Run]) -> None:
    out, run = trained
    evals = run.of("eval")
    assert [e["step"] for e in evals] == [6, 12]
    assert all(e["valid_loss"] > 0 for e in evals)
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"]
    checkpoints = run.of("checkpoint")
    assert [c["step"] for c in checkpoints] == [6, 12]
    for checkpoint in checkpoints:
        path = Path(checkpoint["path"])
        assert path.is_absolute() and (path / "adapter_config.json").is_file()
        assert (path / "adapter_model.safetensors").is_file()
        assert checkpoint["train_loss"] > 0 and checkpoint["valid_loss"] > 0


# PEFT reads the attribute transformers 5 renamed; nothing to fix on our side.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_done_adapter_loads_and_changes_the_model(
    trained: tuple[Path, Run], tiny_model: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, run = trained
    (done,) = run.of("done")
    assert run.events[-1] is done
    adapter = Path(done["adapter_path"])
    assert adapter == (out / "adapter").resolve()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    assert not (out / ".adapter.partial").exists(), "no temporary adapter left behind"
    assert done["trained_tokens"] > 0 and done["tokens_per_second"] > 0
    assert done["peak_memory_bytes"] > 0 and done["seconds"] > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and "q_proj" in config["target_modules"]

    tokenizer: Any = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What colour is the cat?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        after = tuned(ids).logits
    assert before.shape == after.shape
    assert not torch.allclose(before, after, atol=1e-4)


def test_resume_continues_from_a_checkpoint(
    trained: tuple[Path, Run], tiny_model: Path, tmp_path: Path
) -> None:
    out, first = trained
    checkpoint = first.of("checkpoint")[0]
    config = json.loads((out.parent / "job" / "config.json").read_text())
    job = _config(
        tmp_path,
        tiny_model,
        Path(config["training_file"]),
        validation_file=config["validation_file"],
        resume_from_checkpoint=checkpoint["path"],
    )
    run = _run_worker(job)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = run.of("step")
    assert steps[0]["step"] == checkpoint["step"] + 1
    assert steps[-1]["step"] == 12
    # Same data order, same RNG state: the resumed run ends where the straight one did.
    assert steps[-1]["train_loss"] == pytest.approx(first.of("step")[-1]["train_loss"], rel=1e-3)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


# -- assistant-only loss -------------------------------------------------------------------


def test_labels_cover_exactly_the_trained_assistant_turns(
    tiny_model: Path, tmp_path: Path, hub_env: None
) -> None:
    """Through TRL's real preparation: labels are the assistant replies, not weight-0 ones."""
    from trainer import worker

    weighted = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What colour is the cat?"},
            {"role": "assistant", "content": "The cat is black.", "weight": 0},
            {"role": "user", "content": "And the dog?"},
            {"role": "assistant", "content": "The dog is brown.", "weight": 1},
        ]
    }
    train = _jsonl(tmp_path / "train.jsonl", GOOD, weighted)
    config = worker.JobConfig.load(_config(tmp_path, tiny_model, train) / "config.json")
    job = worker.prepare(config, worker.Events(None, main=True))
    tokenizer = job.trainer.processing_class
    dataset = job.trainer.train_dataset

    def trained_text(row: dict[str, Any]) -> str:
        return tokenizer.decode([t for t in row["labels"] if t != -100])

    assert trained_text(dataset[0]) == "The fox is red.<|im_end|>"
    assert trained_text(dataset[1]) == "The dog is brown.<|im_end|>"
    # Label positions line up with the input: each trained token is the input token there.
    for row in dataset:
        for token, label in zip(row["input_ids"], row["labels"], strict=True):
            assert label in (-100, token)

    batch = job.trainer.data_collator([dataset[0], dataset[1]])
    padding = batch["attention_mask"] == 0
    assert padding.any(), "the two examples differ in length"
    assert (batch["labels"][padding] == -100).all()


def test_templates_without_markers_still_mask_the_prompt(tiny_model: Path, tmp_path: Path) -> None:
    """TRL's training variant, turn-by-turn rendering, or our ChatML: the reply is trained."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import qwen2_5_chat_template

    from trainer import worker

    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_model)
    messages = data.load_examples(_jsonl(tmp_path / "one.jsonl", GOOD))[0]
    marked = tokenizer.chat_template

    def trained(expected_description: str) -> str:
        plan = worker.plan_template(tokenizer)
        assert expected_description in plan.description
        ids, mask = worker.encode(tokenizer, messages, plan)
        return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])

    assert trained("marks assistant turns") == "The fox is red.<|im_end|>"
    tokenizer.chat_template = qwen2_5_chat_template  # a template TRL knows a variant of
    assert trained("TRL's training variant") == "\nThe fox is red.<|im_end|>\n"
    tokenizer.chat_template = marked.replace("{%- generation %}", "").replace(
        "{%- endgeneration %}", ""
    )
    assert trained("rendering each turn's prompt") == "The fox is red.<|im_end|>\n"
    tokenizer.chat_template = None
    assert trained("no chat template") == f"The fox is red.{tokenizer.eos_token}"


# -- failures ------------------------------------------------------------------------------


def test_bad_training_file_fails_with_an_error_event(tiny_model: Path, tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", GOOD, b"{not json\n", GOOD)
    run = _run_worker(_config(tmp_path, tiny_model, train))
    assert run.returncode == 1
    assert run.events[-1] == {"type": "error", "message": "training file: line 2: not JSON"}
    assert not (tmp_path / "out" / "adapter").exists()


def test_bad_config_fails_with_an_error_event(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "config.json").write_text(json.dumps({"base_model_path": "x"}), encoding="utf-8")
    run = _run_worker(job)
    assert run.returncode == 1
    (error,) = run.of("error")
    assert "training_file" in error["message"] and "Traceback" not in error["message"]


def test_example_over_the_limit_names_its_line(
    tiny_model: Path, tmp_path: Path, hub_env: None
) -> None:
    from trainer import worker

    train = _jsonl(tmp_path / "train.jsonl", GOOD, GOOD)
    config = worker.JobConfig.load(
        _config(tmp_path, tiny_model, train, max_seq_len=20) / "config.json"
    )
    with pytest.raises(worker.JobError, match=r"training file: line 1: \d+ tokens, over the 20"):
        worker.prepare(config, worker.Events(None, main=True))


def test_sigterm_stops_training_and_leaves_no_adapter(tiny_model: Path, tmp_path: Path) -> None:
    train = chat_jsonl(tmp_path / "train.jsonl", 24, seed=3)
    job = _config(tmp_path, tiny_model, train, n_epochs=500)
    lines: queue.Queue[str | None] = queue.Queue()
    events: list[dict[str, Any]] = []
    with subprocess.Popen(
        [sys.executable, "-m", "trainer.worker", str(job)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            while not events or events[-1]["type"] != "step":
                line = lines.get(timeout=TIMEOUT)
                assert line is not None, f"worker ended early: {events}"
                events.append(json.loads(line))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == -signal.SIGTERM
            reader.join(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    while (line := lines.get_nowait()) is not None:
        events.append(json.loads(line))
    assert not [e for e in events if e["type"] == "done"]
    assert not (tmp_path / "out" / "adapter").exists()


# -- validate_file -------------------------------------------------------------------------


def _check(path: Path, *, max_seq_len: int = 1000, **kw: Any) -> data.FileCheck:
    return data.validate_file(path, tokenizer_path=None, max_seq_len=max_seq_len, **kw)


def _with(**message: Any) -> dict[str, Any]:
    """GOOD with one more message appended."""
    return {"messages": [*GOOD["messages"], message]}


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ((GOOD, b"{not json\n"), "line 2: not JSON"),
        ((b"[1, 2]\n",), "line 1: not a JSON object"),
        ((b"[" * 100_000 + b"\n",), "line 1: JSON nested too deeply"),
        ((b"1" * 5000 + b"\n",), "line 1: not JSON"),
        (({"prompt": "x"},), 'line 1: no "messages" list'),
        (({"messages": []},), 'line 1: no "messages" list'),
        ((GOOD, _with(role="tool", content="42")), "line 2: unknown role 'tool'"),
        (({"messages": [{"role": "user", "content": "hi"}]},), "line 1: no assistant message"),
        (({"messages": ["hi"]},), "line 1: message 1 is not an object"),
        ((_with(role="assistant", content="  "),), "line 1: message 4: empty content"),
        ((_with(role="assistant", content=None),), "line 1: message 4: no content"),
        ((_with(role="assistant", content=7),), "must be a string or a list of text parts"),
        (
            (
                _with(
                    role="user",
                    content=[
                        {"type": "text", "text": "And this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                    ],
                ),
            ),
            "line 1: message 4: image parts are not supported by this trainer",
        ),
        ((_with(role="user", content=[{"type": "audio"}]),), "unknown content part 'audio'"),
        ((_with(role="assistant", content="x", weight=2),), "line 1: weight must be 0 or 1"),
        ((_with(role="assistant", content="x", weight=True),), "line 1: weight must be 0 or 1"),
        ((_with(role="user", content="x", weight=1),), "line 1: weight on a user message"),
        (
            ({"messages": [*GOOD["messages"][:2], {**GOOD["messages"][2], "weight": 0}]},),
            "line 1: every assistant message has weight 0",
        ),
        (
            (_with(role="assistant", content="", tool_calls=[{"id": "1"}]),),
            "line 1: tool calls are not supported by this trainer",
        ),
        ((b'{"messages": [{"role": "user", "content": "\\ud800"}]}\n',), "lone surrogate"),
        ((b"",), "empty file"),
        ((b"\n  \n",), "empty file"),
        ((GOOD, b'{"messages": "\xff\xfe"}\n'), "line 2: not UTF-8"),
    ],
)
def test_validate_file_rejects(tmp_path: Path, lines: tuple[Any, ...], error: str) -> None:
    check = _check(_jsonl(tmp_path / "f.jsonl", *lines))
    assert check.error is not None and error in check.error


def test_validate_file_counts_a_good_file(tmp_path: Path) -> None:
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
            },
            {"role": "assistant", "content": "Hello.", "weight": 0},
            {"role": "user", "content": "Bye."},
            {"role": "assistant", "content": "Bye!", "weight": 1},
        ]
    }
    path = _jsonl(tmp_path / "f.jsonl", GOOD, b"\n", parts)
    check = _check(path)
    expected = sum(data.estimate_tokens(m) for m in data.load_examples(path))
    assert check == data.FileCheck(examples=2, tokens=expected, error=None)
    assert data.load_examples(path)[1][0] == {"role": "user", "content": "Hi there"}
    assert data.load_examples(path)[1][1] == {"role": "assistant", "content": "Hello.", "weight": 0}


def test_validate_file_bounds_hostile_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 200)
    long_line = _with(role="user", content="x" * 300)
    check = _check(_jsonl(tmp_path / "long.jsonl", GOOD, long_line))
    assert check.error == "line 2: longer than 200 bytes"
    assert check.examples == 1

    many = _check(_jsonl(tmp_path / "many.jsonl", GOOD, GOOD, GOOD), max_examples=2)
    assert many.error == "over 2 examples"

    missing = _check(tmp_path / "nope.jsonl")
    assert missing.error is not None and missing.error.startswith("cannot read the file")


def test_validate_file_estimates_without_a_tokenizer(tmp_path: Path) -> None:
    check = _check(_jsonl(tmp_path / "f.jsonl", GOOD, GOOD), max_seq_len=20)
    tokens = data.estimate_tokens(GOOD["messages"])
    assert check.error == f"line 1: {tokens:,} tokens, over the 20 limit"


def test_validate_file_counts_with_the_tokenizer(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = _jsonl(tmp_path / "f.jsonl", GOOD, GOOD)
    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_model)
    exact = len(tokenizer.apply_chat_template(GOOD["messages"], return_dict=True)["input_ids"])

    ok = data.validate_file(path, tokenizer_path=str(tiny_model), max_seq_len=exact)
    assert ok == data.FileCheck(examples=2, tokens=2 * exact, error=None)
    over = data.validate_file(path, tokenizer_path=str(tiny_model), max_seq_len=exact - 1)
    assert over.error == f"line 1: {exact:,} tokens, over the {exact - 1:,} limit"


# -- the skip rule -------------------------------------------------------------------------


def test_missing_training_stack_skips_locally_and_fails_on_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Runs with or without the extra: torch is the first module asked for.
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"pip install -e '\.\[trainer\]'\): torch"):
        require_training_stack()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="torch"):
        require_training_stack()


def test_a_template_that_refuses_an_example_names_its_line(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Gemma-style templates raise on a system message: a reason, not a traceback."""
    from transformers import AutoTokenizer

    from trainer import worker

    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = (
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- raise_exception('System role not supported') }}{%- endif %}" + tokenizer.chat_template
    )
    strict = tmp_path / "strict"
    tokenizer.save_pretrained(strict)
    user_only = {"messages": GOOD["messages"][1:]}
    path = _jsonl(tmp_path / "f.jsonl", user_only, GOOD)
    reason = "line 2: the chat template refuses it (System role not supported)"

    check = data.validate_file(path, tokenizer_path=str(strict), max_seq_len=1000)
    assert check == data.FileCheck(examples=1, tokens=check.tokens, error=reason)
    plan = worker.plan_template(tokenizer)
    with pytest.raises(worker.JobError, match=re.escape(f"training file: {reason}")):
        worker.load_dataset_file(path, tokenizer, plan, 1000, "training file")
