"""Checks a server's answers against the OpenAI spec's response schemas.

The stand-ins check what the bot *sends*; a service of our own that copies OpenAI's API (the
trainer) must also *answer* as OpenAI does. `ResponseChecker.install(app)` puts a middleware
in front of an aiohttp app that validates every JSON answer: a 2xx against the operation's
documented response schema, anything else against `ErrorResponse`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.stubs.specs import OpenAISpec

_BASE_URI = "urn:parley:openai-openapi:responses"


def _exclusive(keyword: str, beyond: Callable[[Any, Any], bool]) -> Callable[..., Iterator[Any]]:
    """`exclusiveMinimum: true` is OpenAPI 3.0's spelling (a flag on `minimum`), which the
    spec still uses in places; JSON Schema 2020-12 would compare the value with `true` (1)."""
    bound = keyword.removeprefix("exclusive").lower()
    standard = Draft202012Validator.VALIDATORS[keyword]

    def check(validator: Any, value: Any, instance: Any, schema: Mapping[str, Any]) -> Any:
        if not isinstance(value, bool):
            yield from standard(validator, value, instance, schema)
        elif value and validator.is_type(instance, "number") and bound in schema:
            if not beyond(instance, schema[bound]):
                yield ValidationError(
                    f"{instance!r} is not beyond the exclusive {bound} {schema[bound]!r}"
                )

    return check


# As in specs.py: the spec's oneOf branches overlap, so "exactly one" would be too strict.
_Validator = validators.extend(
    Draft202012Validator,
    validators={
        "oneOf": Draft202012Validator.VALIDATORS["anyOf"],
        "exclusiveMinimum": _exclusive("exclusiveMinimum", lambda a, b: a > b),
        "exclusiveMaximum": _exclusive("exclusiveMaximum", lambda a, b: a < b),
    },
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ResponseChecker:
    def __init__(self, spec_path: Path, prefix: str = "/v1") -> None:
        self._doc: Mapping[str, Any] = json.loads(Path(spec_path).read_text(encoding="utf-8"))
        self._paths = OpenAISpec.load(spec_path)
        self._registry: Registry = Registry().with_resource(
            _BASE_URI, Resource.from_contents(self._doc, default_specification=DRAFT202012)
        )
        self._validators: dict[str, Validator] = {}
        self.prefix = prefix
        self.violations: list[str] = []
        self.seen: list[tuple[str, str, int]] = []  # method, path, status

    def _validator(self, pointer: str) -> Validator:
        if pointer not in self._validators:
            self._validators[pointer] = _Validator(
                {"$ref": f"{_BASE_URI}#{pointer}"}, registry=self._registry
            )
        return self._validators[pointer]

    def validate_object(self, schema: str, value: Any) -> list[str]:
        """Errors of `value` against `#/components/schemas/<schema>`."""
        validator = self._validator(f"/components/schemas/{schema}")
        return [
            f"{schema}: {e.json_path}: {e.message}"[:400]
            for e in sorted(validator.iter_errors(value), key=lambda e: e.json_path)
        ]

    def check(self, method: str, path: str, status: int, body: Any) -> list[str]:
        """Errors of one answer; an unknown route is itself an error."""
        where = f"{method} {path} -> {status}"
        if status >= 400:
            return [f"{where}: {e}" for e in self.validate_object("ErrorResponse", body)]
        template = self._paths.match_path(path.removeprefix(self.prefix))
        operation = self._doc["paths"].get(template or "", {}).get(method.lower())
        if operation is None:
            return [f"{where}: not an operation of the OpenAI API"]
        responses = operation.get("responses", {})
        content = (responses.get(str(status)) or responses.get("200") or {}).get("content", {})
        if "application/json" not in content:
            return [f"{where}: the spec documents no JSON answer"]
        escaped = (template or "").replace("~", "~0").replace("/", "~1")
        code = str(status) if str(status) in responses else "200"
        parts = ["", "paths", escaped, method.lower(), "responses", code, "content"]
        pointer = "/".join([*parts, "application~1json", "schema"])
        errors = sorted(self._validator(pointer).iter_errors(body), key=lambda e: e.json_path)
        return [f"{where}: {e.json_path}: {e.message}"[:400] for e in errors]

    def install(self, app: web.Application) -> None:
        """Check every answer of `app` (call before the app starts)."""
        app.middlewares.insert(0, self._middleware)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        self.seen.append((request.method, request.path, response.status))
        if isinstance(response, web.Response) and response.content_type == "application/json":
            assert isinstance(response.body, bytes)
            body = json.loads(response.body)
            self.violations += self.check(request.method, request.path, response.status, body)
        return response
