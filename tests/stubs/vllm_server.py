"""A stand-in vLLM server: OpenAI-compatible chat (spec-checked) plus runtime LoRA loading.

vLLM started with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` serves one base
model and loads adapters at runtime (docs: features/lora.md, "Dynamically serving LoRA
Adapters"; code: vllm/entrypoints/openai/serving_models.py):

- `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}`: 200 with the plain-text body
  `Success: LoRA adapter '<name>' added successfully.`; 400 when a field is missing or the
  name is already loaded, or the adapter cannot be loaded; 404 when there is no adapter at
  the path ("No adapter found").
- `POST /v1/unload_lora_adapter` `{"lora_name"}`: 200 plain text, 404 for an unknown name.
- `GET /v1/models`: the base model, then each adapter with `parent` = the base and `root` =
  its path.
- A completion for a model it does not serve: 404, "The model `x` does not exist.".

Errors have vLLM's current shape, `{"error": {"message", "type", "param", "code"}}` with the
HTTP status as `code`. Chat Completions are FakeOpenAI's, so every request is checked
against the OpenAI spec and every call is recorded in `calls` (model and transcript).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.stubs.openai_server import API_KEY, FakeOpenAI
from tests.stubs.specs import OpenAISpec


class FakeVLLM(FakeOpenAI):
    def __init__(self, spec: OpenAISpec | None, base_model: str, api_key: str = API_KEY) -> None:
        super().__init__(spec, api_key)
        self.base_model = base_model
        self.adapters: dict[str, str] = {}  # lora_name -> lora_path, in load order
        self.loads: list[dict[str, Any]] = []  # every load request body, failed ones too
        self.unloads: list[str] = []
        # The next load fails with this reason (400), as vLLM does when the engine refuses
        # an adapter (e.g. its rank is over --max-lora-rank).
        self.fail_next_load: str | None = None

    @property
    def root(self) -> str:
        """The server root, as TRAINER_PUBLISH_URL names it (without /v1)."""
        return self.url.removesuffix("/v1")

    def served(self) -> set[str]:
        return {self.base_model, *self.adapters}

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        if path in ("/load_lora_adapter", "/unload_lora_adapter", "/models"):
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return _error(401, "Unauthorized", "Unauthorized")
        if request.method == "POST" and path == "/load_lora_adapter":
            return await self._load(await _body(request))
        if request.method == "POST" and path == "/unload_lora_adapter":
            return self._unload(await _body(request))
        if request.method == "GET" and path == "/models":
            return web.json_response(self._models())
        return await super()._dispatch(request)

    async def _chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body.get("model")
        if model not in self.served():
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return await super()._chat(request, body)

    async def _load(self, body: dict[str, Any]) -> web.Response:
        self.loads.append(body)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error(
                400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
            )
        if name in self.adapters:
            return _error(
                400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput"
            )
        if self.fail_next_load is not None:
            reason, self.fail_next_load = self.fail_next_load, None
            return _error(400, f"Loading lora {name} failed: {reason}", "BadRequestError")
        directory = Path(str(path))
        if not await asyncio.to_thread(directory.is_dir):
            return _error(
                404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError"
            )
        if not await asyncio.to_thread((directory / "adapter_config.json").is_file):
            return _error(
                400,
                f"Loading lora {name} failed: {path} has no adapter_config.json",
                "BadRequestError",
            )
        self.adapters[name] = str(path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    def _unload(self, body: dict[str, Any]) -> web.Response:
        name = body.get("lora_name")
        self.unloads.append(str(name))
        if not name:
            return _error(
                400,
                "either 'lora_name' and 'lora_int_id' needs to be provided.",
                "InvalidUserInput",
            )
        if name not in self.adapters:
            return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def _models(self) -> dict[str, Any]:
        created = int(time.time())

        def card(model_id: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": 4096,
                "permission": [],
            }

        data = [card(self.base_model, self.base_model, None)]
        data += [card(name, path, self.base_model) for name, path in self.adapters.items()]
        return {"object": "list", "data": data}


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": status}},
        status=status,
    )
