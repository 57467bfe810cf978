"""Serving a finished adapter: load it into vLLM, create an Ollama model with it, or neither.

`TRAINER_PUBLISH`:
- `vllm`: `POST {TRAINER_PUBLISH_URL}/v1/load_lora_adapter` with `lora_name` (the job's
  `fine_tuned_model`) and `lora_path` (the adapter directory, which vLLM must be able to read:
  run it on the same machine or mount the data directory at the same path). vLLM must run
  with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`.
- `ollama`: each adapter file uploaded as a blob (`POST /api/blobs/sha256:<digest>`), then
  `POST /api/create` with `from` (the base's Ollama model, `TRAINER_OLLAMA_BASE`) and `adapters`.
- `none`: the adapter stays in the data directory; its path is in the job's events and in
  `/v1/models`.

A publish that fails raises `PublishError` with the server's reason; the job then fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

_REASON_MAX = 500


class PublishError(Exception):
    """Publishing failed; the message is the server's reason, fit for the job's error."""


class Publisher(Protocol):
    kind: str

    async def publish(self, name: str, base: str, adapter_dir: Path) -> None: ...

    async def unpublish(self, name: str) -> None: ...

    async def close(self) -> None: ...


class NoPublisher:
    """TRAINER_PUBLISH=none: adapters are deployed by hand."""

    kind = "none"

    async def publish(self, name: str, base: str, adapter_dir: Path) -> None:
        return None

    async def unpublish(self, name: str) -> None:
        return None

    async def close(self) -> None:
        return None


class _HTTPPublisher:
    kind = "http"
    server = "the server"

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No proxies from the environment: the inference server is the admin's own,
            # usually on the same machine or network.
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _unreachable(self, exc: BaseException) -> PublishError:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            detail = "no answer in time"
        return PublishError(f"could not reach {self.server} at {self.url}: {detail}")

    def _refused(self, status: int, body: str) -> PublishError:
        return PublishError(f"{self.server} answered {status}: {_reason(body)}")


class VLLMPublisher(_HTTPPublisher):
    """Loads adapters into a running vLLM server through its runtime LoRA endpoints."""

    kind = "vllm"
    server = "vLLM"

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        super().__init__(url.removesuffix("/v1"), api_key, timeout)

    async def publish(self, name: str, base: str, adapter_dir: Path) -> None:
        await self._post(
            "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter_dir)}
        )

    async def unpublish(self, name: str) -> None:
        await self._post("/v1/unload_lora_adapter", {"lora_name": name})

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        try:
            async with self.session.post(self.url + path, json=body) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise self._refused(resp.status, text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc


class OllamaPublisher(_HTTPPublisher):
    """Creates an Ollama model: the base model plus the adapter's files, uploaded as blobs."""

    kind = "ollama"
    server = "Ollama"

    def __init__(
        self, url: str, api_key: str | None, timeout: float, bases: dict[str, str]
    ) -> None:
        super().__init__(url, api_key, timeout)
        self.bases = bases

    async def publish(self, name: str, base: str, adapter_dir: Path) -> None:
        files = await asyncio.to_thread(_adapter_files, adapter_dir)
        adapters: dict[str, str] = {}
        try:
            for path in files:
                digest = "sha256:" + await asyncio.to_thread(_sha256, path)
                await self._upload(path, digest)
                adapters[path.name] = digest
            body = {
                "model": name,
                "from": self.bases.get(base, base),
                "adapters": adapters,
                "stream": False,
            }
            async with self.session.post(self.url + "/api/create", json=body) as resp:
                text = await resp.text()
            if resp.status != 200:
                raise self._refused(resp.status, text)
            # A streamed answer (or a server that ignores stream=false) reports errors inline.
            for line in text.splitlines():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("error"):
                    raise PublishError(f"Ollama could not create {name}: {message['error']}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc

    async def _upload(self, path: Path, digest: str) -> None:
        async with self.session.head(f"{self.url}/api/blobs/{digest}") as resp:
            if resp.status == 200:
                return
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            async with self.session.post(f"{self.url}/api/blobs/{digest}", data=handle) as resp:
                text = await resp.text()
                if resp.status not in (200, 201):
                    raise self._refused(resp.status, text)
        finally:
            await asyncio.to_thread(handle.close)

    async def unpublish(self, name: str) -> None:
        try:
            async with self.session.delete(self.url + "/api/delete", json={"model": name}) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise self._refused(resp.status, text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc


def make_publisher(settings: TrainerSettings) -> Publisher:
    key = settings.publish_api_key.get_secret_value() if settings.publish_api_key else None
    if settings.publish == "vllm":
        assert settings.publish_url is not None
        return VLLMPublisher(settings.publish_url, key, settings.publish_timeout)
    if settings.publish == "ollama":
        assert settings.publish_url is not None
        return OllamaPublisher(
            settings.publish_url, key, settings.publish_timeout, dict(settings.ollama_base)
        )
    return NoPublisher()


def _adapter_files(adapter_dir: Path) -> list[Path]:
    """The files Ollama needs of a PEFT adapter directory: its weights and its config."""
    if not adapter_dir.is_dir():
        raise PublishError(f"the adapter directory {adapter_dir} does not exist")
    files = sorted(
        p
        for p in adapter_dir.iterdir()
        if p.is_file() and (p.suffix == ".safetensors" or p.name == "adapter_config.json")
    )
    if not any(p.suffix == ".safetensors" for p in files):
        raise PublishError(f"no .safetensors weights in {adapter_dir}")
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reason(body: str) -> str:
    """The message of an error body (OpenAI-style, vLLM's older flat one, Ollama's), or its text."""
    text = body.strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            text = str(error["message"])
        elif isinstance(error, str) and error:
            text = error
        elif data.get("message"):
            text = str(data["message"])
        elif data.get("detail"):
            text = str(data["detail"])
    text = " ".join(text.split()) or "(no reason given)"
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."
