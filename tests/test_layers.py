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


ROOT = HANDLERS.parent


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from module import name` in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.module or "", alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    ]


def test_the_domain_types_belong_to_the_bot_not_to_storage() -> None:
    import bot.domain

    domain = {name for name in vars(bot.domain) if not name.startswith("_")}
    found = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in [ROOT / "bot" / "domain.py"]
        for module, _ in _imports(path)
        if module.startswith("storage")
    ]
    # ... and nobody takes a domain type from a storage module.
    for folder in ("bot", "handlers", "storage", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += [
                f"{path.relative_to(ROOT)}: {name} from {module}"
                for module, name in _imports(path)
                if module.startswith("storage") and name in domain
            ]
    assert found == []
