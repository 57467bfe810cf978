"""Request/object validators built from the API specs in ``../shared/specs``.

The stand-in Telegram and OpenAI servers use these to reject anything the real
APIs would not accept. Every validator returns a list of human-readable
violations; an empty list means the input is valid.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = [
    "INPUT_FILE",
    "UPLOAD_FILE",
    "OpenAISpec",
    "TelegramSpec",
    "require_shared_dir",
    "shared_dir",
]

INPUT_FILE: Any = object()
"""Stands for an uploaded file part of a multipart Telegram request."""

UPLOAD_FILE: Any = object()
"""Stands for an uploaded file part of a multipart OpenAI request."""

_MAX_ERRORS = 10
_MAX_MESSAGE = 300


def _repo_root() -> Path:
    """The nearest ancestor of this file that holds ``pyproject.toml``."""
    here = Path(__file__).resolve()
    return next(p for p in here.parents if (p / "pyproject.toml").is_file())


def shared_dir() -> Path | None:
    """The shared directory (``$PARLEY_SHARED_DIR`` or ``<repo>/../shared``) if it has specs/."""
    env = os.environ.get("PARLEY_SHARED_DIR")
    path = Path(env) if env else _repo_root().parent / "shared"
    return path if (path / "specs").is_dir() else None


def require_shared_dir() -> Path:
    """The folder holding specs/: ../shared, PARLEY_SHARED_DIR, or the fetched, checked copy.

    Located once per process (tests/stubs/spec_source.py). Offline the test is skipped; a
    wrong PARLEY_SHARED_DIR, CI without the specs or a copy failing its sha256 stop the
    session. conftest.py does this for every test using the ``shared`` fixture before any
    runs, so that a whole session skips or stops once, with one line.
    """
    from tests.stubs.spec_source import SpecsUnavailable, session_specs

    found = session_specs()
    if isinstance(found, SpecsUnavailable):
        pytest.skip(str(found))
    if isinstance(found, Exception):
        pytest.exit(str(found), returncode=pytest.ExitCode.USAGE_ERROR)
    return found.shared


def _short(value: Any) -> str:
    """A bounded repr for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- Telegram

_ARRAY = "Array of "
_ATTACH = re.compile(r"attach://([A-Za-z0-9_\-]+)")
# Discriminator fields of subtypes are documented as `..., always "user"` / `..., must be chat`.
_CONSTANT = re.compile(r", (?:always|must be) [\"“]?([a-z0-9_]+)[\"”]?\.?\Z")
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "Integer": (int,),
    "Float": (int, float),
    "Boolean": (bool,),
    "String": (str,),
}


class TelegramSpec:
    """Validates Bot API calls and objects against ``telegram-bot-api.json``."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.version: str = data["version"]
        self._methods: dict[str, Mapping[str, Any]] = {
            name.lower(): method for name, method in data["methods"].items()
        }
        self._types: Mapping[str, Mapping[str, Any]] = data["types"]
        self._constants: dict[str, dict[str, str]] = {
            name: {
                field["name"]: match.group(1)
                for field in spec.get("fields", [])
                if field["types"] == ["String"]
                and (match := _CONSTANT.search(field["description"]))
            }
            for name, spec in self._types.items()
        }

    @classmethod
    @functools.cache
    def load(cls, path: Path) -> TelegramSpec:
        """Load (once per path) the spec from a ``telegram-bot-api.json`` file."""
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    def validate_call(
        self, method: str, params: Mapping[str, Any], *, form_encoded: bool
    ) -> list[str]:
        """Check a method call's parameters.

        With ``form_encoded`` the values are the strings python-telegram-bot puts on the
        wire (``RequestData.json_parameters``: ``str`` as is, everything else
        ``json.dumps``-ed), with :data:`INPUT_FILE` for file parts. File parts that are
        referenced from another value as ``attach://<name>`` are accepted as extra fields.
        """
        spec = self._methods.get(method.lower())
        if spec is None:
            return [f"{method}: unknown method"]
        params = dict(params)
        errors: list[str] = []
        if form_encoded:
            attached = {
                name
                for value in params.values()
                if isinstance(value, str)
                for name in _ATTACH.findall(value)
            }
            for name in sorted(attached):
                if params.pop(name, None) is not INPUT_FILE:
                    errors.append(f"{method}: no file part for 'attach://{name}'")
        errors += self._check_fields(spec["name"], spec.get("fields", []), params, form_encoded)
        return errors

    def validate_object(self, type_name: str, obj: Any) -> list[str]:
        """Check a decoded JSON value (e.g. an ``Update`` or a ``Message``) against a type."""
        if type_name not in self._types:
            return [f"{type_name}: unknown type"]
        return self._check(type_name, type_name, obj)

    def _check_fields(
        self,
        where: str,
        fields: list[Mapping[str, Any]],
        values: Mapping[str, Any],
        form_encoded: bool = False,
    ) -> list[str]:
        """Required, unknown and per-field type checks for an object or a call."""
        by_name = {field["name"]: field for field in fields}
        errors = [
            f"{where}: missing required field '{name}'"
            for name, field in by_name.items()
            if field["required"] and name not in values
        ]
        for name, value in values.items():
            field = by_name.get(name)
            if field is None:
                errors.append(f"{where}: unknown field '{name}'")
            elif form_encoded:
                errors += self._check_form_value(f"{where}.{name}", field["types"], value)
            else:
                errors += self._check_any(f"{where}.{name}", field["types"], value)
        return errors

    def _check_form_value(self, where: str, types: list[str], value: Any) -> list[str]:
        """Check one wire value: String/InputFile take it raw, other types JSON-decode it."""
        if value is INPUT_FILE:
            return [] if "InputFile" in types else [f"{where}: file upload not allowed here"]
        if not isinstance(value, str):
            return [f"{where}: form value must be a string, got {_short(value)}"]
        if {"String", "InputFile"} & set(types):
            return []
        try:
            decoded = json.loads(value)
        except ValueError:
            return [f"{where}: expected {' or '.join(types)}, got non-JSON text {_short(value)}"]
        return self._check_any(where, types, decoded)

    def _check_any(self, where: str, types: list[str], value: Any) -> list[str]:
        """Valid if any of ``types`` accepts ``value``; else the closest type's errors."""
        candidates: list[list[str]] = []
        for type_name in types:
            errors = self._check(where, type_name, value)
            if not errors:
                return []
            if self._same_kind(type_name, value):
                candidates.append(errors)
        if candidates:
            return min(candidates, key=len)
        return [f"{where}: expected {' or '.join(types)}, got {_short(value)}"]

    def _same_kind(self, type_name: str, value: Any) -> bool:
        """Whether ``value`` is the JSON kind (array/object) ``type_name`` describes."""
        if type_name.startswith(_ARRAY):
            return isinstance(value, list)
        spec = self._types.get(type_name)
        if spec is None or type_name == "InputFile":
            return False
        if "subtypes" in spec:
            return any(self._same_kind(sub, value) for sub in spec["subtypes"])
        return isinstance(value, dict)

    def _check(self, where: str, type_name: str, value: Any) -> list[str]:
        """Check a decoded JSON value against one spec type string."""
        if type_name.startswith(_ARRAY):
            if not isinstance(value, list):
                return [f"{where}: expected {type_name}, got {_short(value)}"]
            item_type = type_name.removeprefix(_ARRAY)
            return [
                error
                for i, item in enumerate(value)
                for error in self._check(f"{where}[{i}]", item_type, item)
            ]
        if type_name in _PRIMITIVES:
            ok = isinstance(value, _PRIMITIVES[type_name]) and (
                type_name == "Boolean" or not isinstance(value, bool)
            )
            return [] if ok else [f"{where}: expected {type_name}, got {_short(value)}"]
        if type_name == "InputFile":
            ok = value is INPUT_FILE or isinstance(value, str)
            return [] if ok else [f"{where}: expected InputFile, got {_short(value)}"]
        spec = self._types.get(type_name)
        if spec is None:
            return [f"{where}: spec has no type '{type_name}'"]
        if "subtypes" in spec:
            subtypes = [sub for sub in spec["subtypes"] if self._may_be(sub, value)]
            if not subtypes:
                return [f"{where}: {_short(value)} is no known kind of {type_name}"]
            return self._check_any(where, subtypes, value)
        if not isinstance(value, dict):
            return [f"{where}: expected {type_name} object, got {_short(value)}"]
        errors = self._check_fields(where, spec.get("fields", []), value)
        for name, constant in self._constants[type_name].items():
            if name in value and value[name] != constant:
                errors.append(f"{where}.{name}: must be {constant!r}, got {_short(value[name])}")
        return errors

    def _may_be(self, subtype: str, value: Any) -> bool:
        """False if ``value`` is an object whose discriminator rules ``subtype`` out."""
        constants = self._constants.get(subtype, {})
        return not isinstance(value, dict) or all(
            value.get(name, constant) == constant for name, constant in constants.items()
        )


# --------------------------------------------------------------------------- OpenAI

_BASE_URI = "urn:parley:openai-openapi"
_HTTP_METHODS = frozenset({"get", "post", "put", "patch", "delete"})

# The spec uses ``oneOf`` for unions whose branches overlap (e.g. an input message matches
# both EasyInputMessage and InputMessage), so "exactly one" would reject real SDK requests.
_OpenAPIValidator = validators.extend(
    Draft202012Validator, validators={"oneOf": Draft202012Validator.VALIDATORS["anyOf"]}
)


def _leaves(error: ValidationError) -> Iterator[ValidationError]:
    """The innermost errors under an anyOf/oneOf failure."""
    if not error.context:
        yield error
    for sub in error.context or []:
        yield from _leaves(sub)


class OpenAISpec:
    """Validates OpenAI API requests against ``openai-openapi.json`` (OpenAPI 3.1)."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self._doc = document
        self._registry: Registry = Registry().with_resource(
            _BASE_URI, Resource.from_contents(document, default_specification=DRAFT202012)
        )
        self._routes: list[tuple[re.Pattern[str], str]] = sorted(
            ((self._template_regex(t), t) for t in document["paths"]),
            key=lambda route: route[1].count("{"),
        )
        self._validators: dict[tuple[str, str, str], Validator] = {}

    @classmethod
    @functools.cache
    def load(cls, path: Path) -> OpenAISpec:
        """Load (once per path) the spec from an ``openai-openapi.json`` file."""
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    @staticmethod
    def _template_regex(template: str) -> re.Pattern[str]:
        """``/a/{id}/b`` -> a regex matching one path segment per parameter."""
        parts = re.split(r"(\{[^}]+\})", template)
        return re.compile(
            "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + r"\Z"
        )

    def match_path(self, path: str) -> str | None:
        """The spec path template matching ``path`` (literal segments win), if any."""
        path = path.split("?", 1)[0]
        return next((t for regex, t in self._routes if regex.match(path)), None)

    def validate_request(
        self,
        http_method: str,
        path: str,
        body: Any,
        *,
        content_type: str = "application/json",
        strict_unknown: bool = True,
    ) -> list[str]:
        """Check method + path (relative to ``/v1``) and the request body.

        JSON bodies are validated with the operation's schema; multipart bodies are a
        dict of form field -> ``str`` or :data:`UPLOAD_FILE`. With ``strict_unknown``,
        top-level JSON keys the schema does not declare are reported even where the spec
        allows additional properties (the real API rejects them).
        """
        method = http_method.lower()
        where = f"{http_method.upper()} {path}"
        template = self.match_path(path)
        if template is None:
            return [f"{where}: unknown path"]
        operation = self._doc["paths"][template].get(method)
        if method not in _HTTP_METHODS or operation is None:
            return [f"{where}: method not allowed for {template}"]
        request_body = operation.get("requestBody")
        if request_body is None:
            return [] if body is None else [f"{where}: operation takes no request body"]
        if body is None:
            required = request_body.get("required", False)
            return [f"{where}: missing required request body"] if required else []
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type not in request_body["content"]:
            return [f"{where}: unsupported content type {media_type!r}"]
        schema = request_body["content"][media_type]["schema"]
        if media_type == "multipart/form-data":
            return self._check_multipart(where, schema, body)
        errors = self._check_json(where, method, template, media_type, body)
        if strict_unknown and isinstance(body, dict) and not self._closed(schema):
            known = self._properties(schema)
            if known:
                errors += [f"{where}: unknown field {key!r}" for key in body if key not in known]
        return errors[:_MAX_ERRORS]

    def _validator(self, method: str, template: str, media_type: str) -> Validator:
        """The (cached) validator of one operation's request body."""
        key = (method, template, media_type)
        if key not in self._validators:
            pointer = "/".join(
                p.replace("~", "~0").replace("/", "~1")
                for p in ("paths", template, method, "requestBody", "content", media_type, "schema")
            )
            self._validators[key] = _OpenAPIValidator(
                {"$ref": f"{_BASE_URI}#/{pointer}"}, registry=self._registry
            )
        return self._validators[key]

    def _check_json(
        self, where: str, method: str, template: str, media_type: str, body: Any
    ) -> list[str]:
        """jsonschema errors of a JSON body, each with its JSON path."""
        errors = sorted(
            self._validator(method, template, media_type).iter_errors(body),
            key=lambda e: e.json_path,
        )
        return [self._format(where, error) for error in errors[:_MAX_ERRORS]]

    @staticmethod
    def _format(where: str, error: ValidationError) -> str:
        """``<where>: $.path: message`` plus the deepest sub-error of anyOf/oneOf failures."""
        text = f"{error.json_path}: {error.message}"
        if error.context:
            closest = max(_leaves(error), key=lambda e: len(e.absolute_path))
            text = f"{text[:_MAX_MESSAGE]} (closest: {closest.json_path}: {closest.message})"
        if len(text) > 2 * _MAX_MESSAGE:
            text = text[: 2 * _MAX_MESSAGE - 3] + "..."
        return f"{where}: {text}"

    def _resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """Follow local ``$ref`` chains."""
        while "$ref" in schema:
            node: Any = self._doc
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
            schema = node
        return schema

    def _subschemas(self, schema: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
        """``schema`` and everything it combines through allOf/anyOf/oneOf, resolved."""
        schema = self._resolve(schema)
        yield schema
        for keyword in ("allOf", "anyOf", "oneOf"):
            for sub in schema.get(keyword, []):
                yield from self._subschemas(sub)

    def _properties(self, schema: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
        """All properties an object schema declares, collected through combinators."""
        props: dict[str, Mapping[str, Any]] = {}
        for sub in self._subschemas(schema):
            for name, prop in sub.get("properties", {}).items():
                props.setdefault(name, self._resolve(prop))
        return props

    def _closed(self, schema: Mapping[str, Any]) -> bool:
        """Whether the schema itself already forbids undeclared properties."""
        return any(
            sub.get("additionalProperties") is False or sub.get("unevaluatedProperties") is False
            for sub in self._subschemas(schema)
        )

    def _check_multipart(self, where: str, schema: Mapping[str, Any], body: Any) -> list[str]:
        """Required/unknown fields, file-vs-text parts and enums of a multipart form."""
        if not isinstance(body, Mapping):
            return [f"{where}: multipart body must be a mapping of form fields"]
        props = self._properties(schema)
        required = {name for sub in self._subschemas(schema) for name in sub.get("required", [])}
        present = {key.split("[", 1)[0] for key in body}
        errors = [f"{where}: missing required field {n!r}" for n in sorted(required - present)]
        for key, value in body.items():
            name = key.split("[", 1)[0]
            prop = props.get(name)
            if prop is None:
                errors.append(f"{where}: unknown field {key!r}")
                continue
            is_file = any(s.get("format") == "binary" for s in self._subschemas(prop))
            if is_file != (value is UPLOAD_FILE):
                kind = "a file upload" if is_file else "a text field"
                errors.append(f"{where}: field {key!r} must be {kind}")
            elif key == name and "enum" in prop and value not in prop["enum"]:
                errors.append(f"{where}: field {key!r}: {value!r} is not one of {prop['enum']}")
        return errors[:_MAX_ERRORS]
