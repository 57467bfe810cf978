"""One fine-tuning job, as its own process: `python -m trainer.worker JOB_DIR`.

A process per job, so a crash, an out-of-memory kill or a cancel (SIGTERM) ends the job and
never the service; several GPUs: `accelerate launch --num_processes N -m trainer.worker JOB_DIR`.
It reads `JOB_DIR/config.json`, trains a LoRA adapter with TRL's SFTTrainer, and reports as
JSON lines on stdout, one event a line, from the main process only (the fd that was stdout is
kept for events; everything else printed, by us or by libraries, goes to stderr):

    {"type": "status", "message": ...}
    {"type": "step", "step", "total_steps", "epoch", "train_loss"}
    {"type": "eval", "step", "valid_loss"}
    {"type": "checkpoint", "step", "path", "train_loss", "valid_loss"}
    {"type": "done", "adapter_path", "trained_tokens", "seconds", "train_seconds",
     "tokens_per_second", "peak_memory_bytes"}
    {"type": "error", "message"}   (then exit code 1; the traceback goes to stderr)

Loss is on assistant turns only, and not on those with `"weight": 0`. The worker tokenizes
itself, with `apply_chat_template(return_assistant_tokens_mask=True)` as TRL does, and hands
SFTTrainer `input_ids` + `assistant_masks`, from which TRL builds the labels: that is what lets
it honour per-message weights, name the line of an example that is too long, and know the
token counts. Which template marks the assistant turns is reported in a status event.

SIGTERM kills the process at once (the default action, so it works even inside a long native
call); the final adapter is written to a temporary directory and renamed into place, so a
killed job never leaves a partial `OUTPUT_DIR/adapter`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from trainer import data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("trainer.worker")

BASE_LEARNING_RATE = 2e-4  # OpenAI's learning_rate_multiplier scales this
LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.05


class JobError(Exception):
    """A failure with a reason that is short and safe to show (bad config, bad data)."""


@dataclass(frozen=True, slots=True)
class JobConfig:
    """`JOB_DIR/config.json`, written by the service."""

    base_model_path: str
    training_file: Path
    validation_file: Path | None
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    seed: int
    max_seq_len: int
    output_dir: Path
    resume_from_checkpoint: Path | None = None
    save_steps: int | None = None

    @classmethod
    def load(cls, path: Path) -> JobConfig:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise JobError(f"cannot read {path.name}: {exc}") from None
        if not isinstance(raw, dict):
            raise JobError(f"{path.name} is not a JSON object")

        name = path.name

        def value(key: str, kind: type | tuple[type, ...]) -> Any:
            found = raw.get(key)
            if not isinstance(found, kind) or isinstance(found, bool):
                raise JobError(f"{name}: {key} is missing or of the wrong type")
            return found

        def count(key: str) -> int:
            number: int = value(key, int)
            if number < 1:
                raise JobError(f"{name}: {key} must be at least 1")
            return number

        def a_path(key: str) -> Path:
            text: str = value(key, str)
            if not text:
                raise JobError(f"{name}: {key} is empty")
            return Path(text).resolve()

        def multiplier() -> float:
            number = float(value("learning_rate_multiplier", (int, float)))
            if not (math.isfinite(number) and number > 0):
                raise JobError(f"{name}: learning_rate_multiplier must be positive")
            return number

        def absent(key: str) -> bool:
            return raw.get(key) is None

        # In field order, so the first problem reported is the first in the contract.
        return cls(
            base_model_path=value("base_model_path", str),
            training_file=a_path("training_file"),
            validation_file=None if absent("validation_file") else a_path("validation_file"),
            n_epochs=count("n_epochs"),
            batch_size=count("batch_size"),
            learning_rate_multiplier=multiplier(),
            seed=value("seed", int),
            max_seq_len=count("max_seq_len"),
            output_dir=a_path("output_dir"),
            resume_from_checkpoint=None
            if absent("resume_from_checkpoint")
            else a_path("resume_from_checkpoint"),
            save_steps=None if absent("save_steps") else count("save_steps"),
        )


class Events:
    """JSON-lines events on the real stdout; only the main process of a launch writes."""

    def __init__(self, stream: IO[str] | None, *, main: bool) -> None:
        self.stream = stream
        self.main = main

    @classmethod
    def take_stdout(cls) -> Events:
        """Keep fd 1 for events and point fd 1 and sys.stdout at stderr.

        Libraries print (Trainer's PrinterCallback, tqdm.write, C extensions); at the fd level
        none of it can land between two events.
        """
        main = os.environ.get("RANK", "0") == "0"
        sys.stdout.flush()
        stream = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(stream, main=main)

    def emit(self, kind: str, **fields: Any) -> None:
        if not self.main or self.stream is None:
            return
        # A diverged loss is NaN, which JSON has no word for: null.
        clean = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in fields.items()
        }
        line = json.dumps({"type": kind, **clean}, ensure_ascii=False, allow_nan=False)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except BrokenPipeError:  # the service went away; training goes on, logs show it
            self.stream = None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def status(self, message: str) -> None:
        log.info("%s", message)
        self.emit("status", message=message)


@dataclass(frozen=True, slots=True)
class TemplatePlan:
    """How assistant tokens are found: which template, and by markers or by prefixes."""

    template: str | None  # passed as apply_chat_template(chat_template=...); None: the model's
    by_markers: bool  # True: {% generation %} masks; False: diff of rendered prefixes
    description: str


def plan_template(tokenizer: PreTrainedTokenizerBase) -> TemplatePlan:
    """Pick the template: the model's with markers, TRL's training variant, or a fallback.

    TRL ships marked-up training variants of common templates (Qwen, Llama 3, Gemma, Phi, ...)
    that render exactly like the originals. For other templates without markers the assistant
    span of each turn is the difference between the conversation rendered up to that turn and
    the same prompt rendered with `add_generation_prompt` (how TRL masks prompt-completion
    data). A model with no template at all gets Parley's ChatML one, saved with the adapter.
    """
    from jinja2 import TemplateError
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    current = tokenizer.chat_template
    if isinstance(current, dict):
        current = current.get("default")
    if not current:
        return TemplatePlan(
            data.FALLBACK_CHAT_TEMPLATE,
            True,
            "the model has no chat template: using Parley's ChatML template with its own EOS "
            "(saved with the adapter)",
        )
    if has_generation_markers(current):
        return TemplatePlan(None, True, "the model's chat template marks assistant turns")
    try:
        training = get_training_chat_template(tokenizer)
    except (ValueError, TemplateError):
        return TemplatePlan(
            None,
            False,
            "the model's chat template has no generation markers: assistant turns are found "
            "by rendering each turn's prompt",
        )
    if training is None:
        return TemplatePlan(None, True, "the model's chat template marks assistant turns")
    return TemplatePlan(training, True, "using TRL's training variant of the model's template")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def encode(
    tokenizer: PreTrainedTokenizerBase, messages: list[data.Message], plan: TemplatePlan
) -> tuple[list[int], list[int]]:
    """Token ids and the assistant mask (1 = trained) of one conversation.

    Assistant messages with weight 0 are context only: their tokens are masked out.
    Raises DataError when the template does not let the assistant turns be found.
    """

    def render(msgs: list[data.Message], **kw: Any) -> Any:
        return tokenizer.apply_chat_template(
            msgs, chat_template=plan.template, tokenize=True, return_dict=True, **kw
        )

    assistants = [m for m in messages if m["role"] == "assistant"]
    if plan.by_markers:
        out = render(messages, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if 1 not in mask:
            raise data.DataError("the chat template marks no assistant tokens")
        if all(m.get("weight", 1) for m in assistants):
            return ids, mask
        runs = _runs(mask)
        if len(runs) != len(assistants):
            raise data.DataError(
                "the chat template's generation markers do not line up with the assistant "
                "messages, so weight 0 cannot be applied"
            )
        for (start, end), message in zip(runs, assistants, strict=True):
            if not message.get("weight", 1):
                mask[start:end] = [0] * (end - start)
        return ids, mask

    ids = list(render(messages)["input_ids"])
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message.get("weight", 1):
            continue
        upto = list(render(messages[: i + 1])["input_ids"])
        prompt = list(render(messages[:i], add_generation_prompt=True)["input_ids"]) if i else []
        if ids[: len(upto)] != upto:
            raise data.DataError(
                "the chat template renders earlier turns differently as the conversation grows, "
                "so assistant turns cannot be found; use a template with generation markers"
            )
        start = _common_prefix(prompt, upto)
        mask[start : len(upto)] = [1] * (len(upto) - start)
    return ids, mask


def _read_examples(path: Path, what: str) -> list[list[data.Message]]:
    try:
        return data.load_examples(path)
    except data.DataError as exc:
        raise JobError(f"{what}: {exc}") from None
    except OSError as exc:
        raise JobError(f"{what}: cannot read it ({exc.strerror or exc})") from None


def load_dataset_file(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    plan: TemplatePlan,
    max_seq_len: int,
    what: str,
) -> tuple[dict[str, list[list[int]]], int]:
    """Read and tokenize a JSONL file: columns for `datasets.Dataset.from_dict`, and tokens."""
    from jinja2 import TemplateError

    columns: dict[str, list[list[int]]] = {"input_ids": [], "assistant_masks": []}
    tokens = 0
    try:
        for example in data.iter_examples(path):
            try:
                ids, mask = encode(tokenizer, example.messages, plan)
            except data.DataError as exc:
                raise data.DataError(f"line {example.line}: {exc}") from None
            except TemplateError as exc:  # e.g. Gemma's: "System role not supported"
                reason = f"the chat template refuses it ({exc})"
                raise data.DataError(f"line {example.line}: {reason}") from None
            if len(ids) > max_seq_len:
                raise data.DataError(data.too_long(example.line, len(ids), max_seq_len))
            columns["input_ids"].append(ids)
            columns["assistant_masks"].append(mask)
            tokens += len(ids)
    except data.DataError as exc:
        raise JobError(f"{what}: {exc}") from None
    except OSError as exc:
        raise JobError(f"{what}: cannot read it ({exc.strerror or exc})") from None
    if not columns["input_ids"]:
        raise JobError(f"{what}: empty file")
    return columns, tokens


def linear_module_names(model: Any) -> list[str]:
    """The last name part of every linear layer but the LM head (q_proj, ..., down_proj).

    PEFT's "all-linear" saves every layer's full path in adapter_config.json; short names are
    what vLLM and llama.cpp's LoRA converter expect, and what adapters on the Hub carry.
    """
    import torch

    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def _peak_memory_bytes(on_cuda: bool) -> int:
    if on_cuda:
        import torch

        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS bytes, Linux KiB


def _quiet_libraries() -> None:
    """Silence the noise that says nothing about this job, narrowly, by message."""
    import warnings

    # PEFT still reads the old name on every model (transformers 5.x renamed it).
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    import datasets

    datasets.disable_progress_bars()


def _hub_env(base_model_path: str) -> None:
    """Environment for the Hugging Face libraries; they read it at import, so call it first."""
    if Path(base_model_path).is_dir():
        # A local base model must never make the Hub libraries look online.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Job:
    """A job ready to train: the SFTTrainer and what `run` needs around it."""

    trainer: Any  # trl.SFTTrainer
    reporter: Any  # the Reporter callback (see `_reporter`)
    on_cuda: bool
    has_eval: bool


def _reporter(events: Events, device: str) -> Any:
    """A TrainerCallback that turns the Trainer's log and save hooks into events."""
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        def __init__(self) -> None:
            self.train_loss: float | None = None
            self.valid_loss: float | None = None
            self.eval_step = -1
            self.tokens_at_start = 0
            self.started = time.monotonic()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.tokens_at_start = state.num_input_tokens_seen  # after a resume: not ours
            self.started = time.monotonic()
            events.status(f"training on {device}: {state.max_steps:,} steps")

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                self.train_loss = float(logs["loss"])
                events.emit(
                    "step",
                    step=state.global_step,
                    total_steps=state.max_steps,
                    epoch=round(float(state.epoch or 0), 4),
                    train_loss=self.train_loss,
                )
            if "eval_loss" in logs:
                self.valid_loss = float(logs["eval_loss"])
                self.eval_step = state.global_step
                events.emit("eval", step=state.global_step, valid_loss=self.valid_loss)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path = Path(args.output_dir, f"checkpoint-{state.global_step}").resolve()
            events.emit(
                "checkpoint",
                step=state.global_step,
                path=str(path),
                train_loss=self.train_loss,
                valid_loss=self.valid_loss,
            )

    return Reporter()


def prepare(config: JobConfig, events: Events) -> Job:
    """Load the tokenizer, the data and the model, and build the SFTTrainer."""
    _hub_env(config.base_model_path)
    if config.resume_from_checkpoint and not config.resume_from_checkpoint.is_dir():
        raise JobError("resume_from_checkpoint: no such checkpoint directory")

    # The files' shape first: a bad file fails in a blink, not after seconds of imports.
    files = {"training file": config.training_file, "validation file": config.validation_file}
    for what, path in files.items():
        if path is not None:
            _read_examples(path, what)

    events.status("loading libraries")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    _quiet_libraries()

    on_cuda = torch.cuda.is_available()
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    fp16 = on_cuda and not bf16
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if on_cuda:
        device = f"{world}x {torch.cuda.get_device_name(0)} ({'bf16' if bf16 else 'fp16'})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads, fp32)"

    local = Path(config.base_model_path).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.base_model_path, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot load the base model's tokenizer: {exc}") from None
    plan = plan_template(tokenizer)
    events.status(f"chat template: {plan.description}")
    if plan.template == data.FALLBACK_CHAT_TEMPLATE:
        tokenizer.chat_template = plan.template  # saved with checkpoints and the adapter

    train_columns, train_tokens = load_dataset_file(
        config.training_file, tokenizer, plan, config.max_seq_len, "training file"
    )
    n_train = len(train_columns["input_ids"])
    eval_dataset = None
    if config.validation_file is not None:
        valid_columns, _ = load_dataset_file(
            config.validation_file, tokenizer, plan, config.max_seq_len, "validation file"
        )
        eval_dataset = Dataset.from_dict(valid_columns)
    events.status(
        f"training file: {n_train:,} examples, {train_tokens:,} tokens"
        + (f"; validation file: {len(eval_dataset):,} examples" if eval_dataset else "")
    )

    try:
        model = AutoModelForCausalLM.from_pretrained(
            config.base_model_path, dtype=dtype, local_files_only=local
        )
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot load the base model: {exc}") from None
    params = sum(p.numel() for p in model.parameters())
    events.status(f"loaded model {config.base_model_path} ({params / 1e6:,.1f}M parameters)")

    # OpenAI's batch_size is the global batch: split it across the processes of a launch.
    per_device = max(1, config.batch_size // world)
    args = SFTConfig(
        output_dir=str(config.output_dir),
        num_train_epochs=config.n_epochs,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        learning_rate=BASE_LEARNING_RATE * config.learning_rate_multiplier,
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_seq_len,
        logging_steps=1,
        eval_strategy="epoch" if eval_dataset is not None else "no",
        save_strategy="steps" if config.save_steps else "epoch",
        save_steps=config.save_steps or 500,
        bf16=bf16,
        fp16=fp16,
        # Memory for time: worth it on a GPU; on the CPU memory is rarely the limit.
        # (activation_checkpointing is transformers 5's name for gradient checkpointing.)
        activation_checkpointing=on_cuda,
        dataloader_pin_memory=on_cuda,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        push_to_hub=False,
    )
    peft_config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=linear_module_names(model),
        task_type="CAUSAL_LM",
    )
    reporter = _reporter(events, device)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(train_columns),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[reporter],
    )
    # It prints each log dict (to stderr here, stdout being taken), repeating the events.
    trainer.remove_callback(PrinterCallback)
    return Job(trainer, reporter, on_cuda, eval_dataset is not None)


def run(config: JobConfig, events: Events) -> None:
    """Train, report, and leave the adapter in `OUTPUT_DIR/adapter`."""
    started = time.monotonic()
    job = prepare(config, events)
    trainer, reporter = job.trainer, job.reporter
    resume = config.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if job.has_eval and reporter.eval_step != trainer.state.global_step:
        trainer.evaluate()
    train_seconds = time.monotonic() - reporter.started

    # Written aside and renamed: a job killed while saving leaves no partial adapter.
    final = config.output_dir / "adapter"
    partial = config.output_dir / ".adapter.partial"  # the same name in every process
    if trainer.is_world_process_zero() and partial.exists():
        shutil.rmtree(partial)  # left by a job killed while saving
    trainer.save_model(str(partial))
    if trainer.is_world_process_zero():
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    seen = int(trainer.state.num_input_tokens_seen)
    session_tokens = seen - reporter.tokens_at_start
    events.emit(
        "done",
        adapter_path=str(final.resolve()),
        trained_tokens=seen,
        seconds=round(time.monotonic() - started, 3),
        train_seconds=round(train_seconds, 3),
        tokens_per_second=round(session_tokens / train_seconds, 1) if train_seconds > 0 else 0.0,
        peak_memory_bytes=_peak_memory_bytes(job.on_cuda),
    )


def _reason(exc: BaseException) -> str:
    """A one-line reason for an unexpected failure (the traceback is on stderr)."""
    name = type(exc).__name__
    if name == "OutOfMemoryError":
        return "out of GPU memory: lower batch_size or max_seq_len"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{name}: {first[:300]}" if first else name


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 done, 1 failed)."""
    # Cancel is SIGTERM: die at once, even inside native code (a library may have set a
    # handler that waits for the step to end).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    events = Events.take_stdout()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise JobError("usage: python -m trainer.worker JOB_DIR")
        config = JobConfig.load(Path(args[0]) / "config.json")
        config.output_dir.mkdir(parents=True, exist_ok=True)
        run(config, events)
    except JobError as exc:
        log.error("job failed: %s", exc)
        events.emit("error", message=str(exc))
        return 1
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        events.emit("error", message=_reason(exc))
        return 1
    finally:
        events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
