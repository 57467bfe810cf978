"""parley-trainer's configuration: one typed settings object, read once from the environment.

Every variable starts with `TRAINER_` (`TRAINER_API_KEY`, `TRAINER_BASE_MODELS`, ...); a
`.env` file in the working directory is read too. Errors name the variable, on one line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "TRAINER_"

# Names the service offers (base models, and the fine-tuned names built from them) end up as
# vLLM `lora_name`s and Ollama model names: keep them to characters both accept.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Slot:
    """One place a job can run: the CPU, or one or more GPUs used together by one job."""

    name: str
    gpus: tuple[str, ...] = ()

    @property
    def processes(self) -> int:
        return max(1, len(self.gpus))


def _pairs(value: str, what: str) -> dict[str, str]:
    """`a=x,b=y` -> {"a": "x", "b": "y"}; names must be usable as model names."""
    result: dict[str, str] = {}
    for part in (p.strip() for p in value.replace(";", ",").split(",")):
        if not part:
            continue
        name, sep, target = (s.strip() for s in part.partition("="))
        if not sep or not name or not target:
            raise ValueError(f"must look like name={what},name2={what} (got {part!r})")
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(
                f"name {name!r} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
            )
        if name in result:
            raise ValueError(f"names {name!r} twice")
        result[name] = target
    return result


class TrainerSettings(BaseSettings):
    """Every setting; the environment variable is `TRAINER_` + the field name, upper-case."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Clients send `Authorization: Bearer <key>`; the service does not start without one.
    api_key: SecretStr
    listen: str = "127.0.0.1:8400"  # host:port; port 0 picks a free one (logged at start)
    data_dir: Path = Path("trainer-data")
    # name=Hugging Face id or local directory, comma-separated: the `model`s jobs may ask for.
    base_models: Annotated[dict[str, str], NoDecode]

    publish: Literal["vllm", "ollama", "none"] = "none"
    publish_url: str | None = None
    publish_api_key: SecretStr | None = None
    publish_timeout: float = Field(default=600.0, gt=0)
    # Ollama: the Ollama model each base model's adapters are applied to (name=ollama model);
    # unmapped bases use their own name.
    ollama_base: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)

    # "auto": one slot per visible CUDA GPU, else one CPU slot. "cpu"; "0,1": two slots of one
    # GPU each; "0+1": one slot of two GPUs (one job over both, through `accelerate launch`).
    devices: str = "auto"
    # The command that runs one job, the job directory appended; `{python}` and
    # `{num_processes}` are filled in. Unset: `{python} -m trainer.worker` on one device,
    # `{python} -m accelerate.commands.launch --multi_gpu --num_processes N -m trainer.worker`
    # on a slot of several GPUs.
    worker_command: str | None = None

    max_seq_len: int = Field(default=2048, ge=64, le=1_048_576)
    max_file_mb: float = Field(default=512, gt=0)
    max_examples: int = Field(default=100_000, ge=1)
    # Save a checkpoint every N optimizer steps; unset: the worker's default (each epoch).
    save_steps: int | None = Field(default=None, ge=1)
    # Seconds a cancelled (or, at shutdown, interrupted) job gets after SIGTERM before SIGKILL.
    cancel_grace: float = Field(default=5.0, ge=0, le=600)
    # A job interrupted by a restart (or a stop) resumes from its last checkpoint, at most
    # MAX_RESUMES times; off (or without a checkpoint) it fails with the reason.
    resume: bool = True
    # Files validated at once (each loads a tokenizer).
    validation_concurrency: int = Field(default=2, ge=1, le=64)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("is empty")
        return value

    @field_validator("base_models", mode="before")
    @classmethod
    def _parse_base_models(cls, value: object) -> object:
        if isinstance(value, str):
            value = _pairs(value, "hf_id_or_dir")
        if isinstance(value, dict) and not value:
            raise ValueError("names no model (e.g. tiny=/models/tiny,qwen3-4b=Qwen/Qwen3-4B)")
        return value

    @field_validator("ollama_base", mode="before")
    @classmethod
    def _parse_ollama_base(cls, value: object) -> object:
        return _pairs(value, "ollama_model") if isinstance(value, str) else value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("must look like host:port, e.g. 127.0.0.1:8400 or 0.0.0.0:8400")
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: str) -> str:
        parse_devices(value, detect=False)
        return value.strip()

    @field_validator("publish_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _publish_needs_url(self) -> TrainerSettings:
        if self.publish != "none" and self.publish_url is None:
            raise ValueError(f"TRAINER_PUBLISH_URL must be set when TRAINER_PUBLISH={self.publish}")
        unknown = sorted(set(self.ollama_base) - set(self.base_models))
        if unknown:
            raise ValueError(f"TRAINER_OLLAMA_BASE names unknown base models: {', '.join(unknown)}")
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    def slots(self) -> list[Slot]:
        """The device slots jobs run in (one job per slot at a time)."""
        return parse_devices(self.devices, detect=True)

    def secrets(self) -> list[str]:
        """Values that must never reach a log line."""
        keys = [self.api_key, self.publish_api_key]
        return [k.get_secret_value() for k in keys if k is not None]


def parse_devices(value: str, *, detect: bool) -> list[Slot]:
    """TRAINER_DEVICES -> slots; "auto" asks nvidia-smi (when `detect`) for the GPUs."""
    value = value.strip().lower()
    if value == "auto":
        if not detect:
            return []
        visible = visible_gpus()
        return [Slot(f"cuda:{g}", (g,)) for g in visible] if visible else [Slot("cpu")]
    if value == "cpu":
        return [Slot("cpu")]
    slots: list[Slot] = []
    seen: set[str] = set()
    for group in (g.strip() for g in value.split(",")):
        gpus = tuple(g.strip() for g in group.split("+"))
        if not group or not all(g.isdigit() for g in gpus):
            raise ValueError(
                "must be auto, cpu, or GPU indexes: 0,1 (a slot each) or 0+1 (one slot of two)"
            )
        if seen & set(gpus):
            raise ValueError(f"uses GPU {sorted(seen & set(gpus))[0]} twice")
        seen |= set(gpus)
        slots.append(Slot("cuda:" + "+".join(gpus), gpus))
    return slots


def visible_gpus() -> list[str]:
    """CUDA GPUs this machine shows, without importing torch in the service process."""
    import os

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


class ConfigError(Exception):
    """Configuration is missing or invalid; the message names the variables, one line."""


def load_settings(**overrides: Any) -> TrainerSettings:
    """Read settings once, turning pydantic's report into a one-line error naming each variable."""
    try:
        return TrainerSettings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = err["loc"]
            message = err["msg"].removeprefix("Value error, ")
            if not loc:  # model-level checks name their variables themselves
                problems.append(message)
                continue
            name = ENV_PREFIX + str(loc[0]).upper()
            if err["type"] == "missing":
                problems.append(f"{name} is not set")
            else:
                problems.append(f"{name} {message}")
        raise ConfigError("; ".join(problems)) from None
