"""A stand-in Ollama server: blobs, model creation from a base plus adapters, the model list.

As Ollama's API documents it (docs/api.md):
- `HEAD /api/blobs/sha256:<hex>`: 200 if the blob exists, 404 if not.
- `POST /api/blobs/sha256:<hex>` with the file as the body: 201 Created, or 400 if the body's
  digest is not the one named.
- `POST /api/create` `{"model", "from", "adapters": {filename: digest}, "stream"}`: every
  digest must be an uploaded blob and `from` a model the server has; a safetensors adapter
  needs its weights and its `adapter_config.json`. Streamed (`{"status": ...}` lines ending
  in `{"status": "success"}`) unless `"stream": false`; errors are `{"error": "..."}`.
- `GET /api/tags`: the models, as `name:tag`. `DELETE /api/delete` `{"model"}`: 200 or 404.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


def _tagged(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclass
class OllamaModel:
    name: str
    base: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # filename -> digest


class FakeOllama:
    def __init__(self, models: list[str]) -> None:
        self.models: dict[str, OllamaModel] = {_tagged(m): OllamaModel(_tagged(m)) for m in models}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, headers
        self.creates: list[dict[str, Any]] = []
        # The next create fails with this reason, as Ollama does when it cannot convert an
        # adapter (e.g. for an architecture it does not support).
        self.fail_next_create: str | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("HEAD", "/api/blobs/{digest}", self._has_blob)
        app.router.add_post("/api/blobs/{digest}", self._put_blob)
        app.router.add_post("/api/create", self._create)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_delete("/api/delete", self._delete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _seen(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path, dict(request.headers)))

    async def _has_blob(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(status=200 if request.match_info["digest"] in self.blobs else 404)

    async def _put_blob(self, request: web.Request) -> web.Response:
        self._seen(request)
        digest = request.match_info["digest"]
        if not _DIGEST.match(digest):
            return _error(400, f"invalid digest format: {digest}")
        data = await request.read()
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            return _error(400, f'digest mismatch, expected "{digest}", got "{actual}"')
        self.blobs[digest] = data
        return web.Response(status=201)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid JSON")
        self.creates.append(body)
        name, base = body.get("model"), body.get("from")
        adapters = body.get("adapters") or {}
        if not name:
            return _error(400, "missing model field")
        if not base or _tagged(base) not in self.models:
            return _error(404, f"model '{base}' not found")
        missing = [d for d in adapters.values() if d not in self.blobs]
        if missing:
            return _error(400, f"blob {missing[0]} not found")
        names = set(adapters)
        if not any(n.endswith(".safetensors") for n in names) or "adapter_config.json" not in names:
            return _error(400, "invalid adapter: need *.safetensors and adapter_config.json")
        try:
            config = json.loads(self.blobs[adapters["adapter_config.json"]])
        except ValueError:
            return _error(400, "invalid adapter: adapter_config.json is not JSON")
        if not isinstance(config, dict):
            return _error(400, "invalid adapter: adapter_config.json is not an object")
        if self.fail_next_create is not None:
            reason, self.fail_next_create = self.fail_next_create, None
            if body.get("stream") is False:
                return _error(400, reason)
            return await _stream(request, [{"status": "parsing adapter"}, {"error": reason}])
        model = OllamaModel(_tagged(name), _tagged(base), dict(adapters))
        self.models[model.name] = model
        if body.get("stream") is False:
            return web.json_response({"status": "success"})
        lines = [{"status": "using existing layer " + d} for d in adapters.values()]
        return await _stream(
            request, [*lines, {"status": "writing manifest"}, {"status": "success"}]
        )

    async def _tags(self, request: web.Request) -> web.Response:
        self._seen(request)
        models = [
            {
                "name": m.name,
                "model": m.name,
                "modified_at": "2026-12-01T00:00:00Z",
                "size": sum(len(self.blobs.get(d, b"")) for d in m.adapters.values()),
                "digest": hashlib.sha256(m.name.encode()).hexdigest(),
                "details": {"parent_model": m.base or "", "format": "gguf"},
            }
            for m in self.models.values()
        ]
        return web.json_response({"models": models})

    async def _delete(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.json()
        name = _tagged(str(body.get("model", "")))
        if self.models.pop(name, None) is None:
            return _error(404, f"model '{body.get('model')}' not found")
        return web.Response(status=200)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _stream(request: web.Request, lines: list[dict[str, Any]]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    for line in lines:
        await resp.write(json.dumps(line).encode() + b"\n")
    await resp.write_eof()
    return resp
