"""The layers keep to their jobs: handlers parse, call a service and render; they never reach
past the services into the store or the raw OpenAI client."""

from __future__ import annotations

import ast
from pathlib import Path

HANDLERS = Path(__file__).resolve().parent.parent / "handlers"
BEHIND_THE_SERVICES = {"store", "openai", "clients"}


def test_handlers_reach_storage_and_the_model_only_through_services() -> None:
    found = []
    for path in sorted(HANDLERS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # services.store..., context.services.openai...
            if (
                isinstance(node, ast.Attribute)
                and node.attr in BEHIND_THE_SERVICES
                and isinstance(node.value, ast.Attribute | ast.Name)
                and getattr(node.value, "attr", getattr(node.value, "id", None)) == "services"
            ):
                found.append(f"{path.name}:{node.lineno} services.{node.attr}")
    assert found == []
