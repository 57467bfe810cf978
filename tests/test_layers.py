"""The layers keep to their jobs: handlers parse, call a service and render; they never reach
past the services into the store or the raw OpenAI client."""

from __future__ import annotations

import ast
import re
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


# SQL as the store writes it (keywords in capitals): a statement's opening words, in a string.
SQL = re.compile(
    r"\bSELECT\b|\bINSERT\s+(?:OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\b(?:CREATE|DROP|ALTER)\s+(?:TABLE|INDEX|VIEW|TRIGGER)\b|\bPRAGMA\s+\w+"
)
DATABASE_MODULES = {"sqlite3", "aiosqlite", "asyncpg", "psycopg", "psycopg2", "sqlalchemy"}


def _sql_and_drivers(source: str, name: str) -> list[str]:
    """Where a module speaks SQL (a string literal holding a statement) or imports a driver."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if SQL.search(node.value):
                found.append((node.lineno, "SQL in a string"))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names.append(node.module or "")
            found += [
                (node.lineno, f"imports {module}")
                for module in names
                if module.split(".")[0] in DATABASE_MODULES
            ]
    return [f"{name}:{line} {what}" for line, what in sorted(found)]


def test_nothing_outside_storage_speaks_sql_or_knows_the_database() -> None:
    found = [
        line
        for folder in ("bot", "handlers")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line in _sql_and_drivers(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert found == []


def test_the_sql_check_finds_statements_and_drivers_but_not_prose() -> None:
    statements = [
        "SELECT id FROM turns",
        "SELECT 1",
        "INSERT INTO inbox (a) VALUES (?)",
        "INSERT OR IGNORE INTO x VALUES (1)",
        "UPDATE jobs SET status = ?",
        "DELETE FROM reactions WHERE turn_id = ?",
        "CREATE TABLE t (a)",
        "PRAGMA journal_mode=WAL",
    ]
    source = "".join(f"s{i} = {s!r}\n" for i, s in enumerate(statements))
    source += "import sqlite3\nfrom aiosqlite import connect\nimport asyncpg.pool\n"
    source += "words = 'select a model from the list, update the settings, delete from history'\n"
    found = _sql_and_drivers(source, "probe.py")
    n = len(statements)
    assert found == [f"probe.py:{i + 1} SQL in a string" for i in range(n)] + [
        f"probe.py:{n + 1} imports sqlite3",
        f"probe.py:{n + 2} imports aiosqlite",
        f"probe.py:{n + 3} imports asyncpg.pool",
    ]


def _storage_imports(source: str, name: str) -> list[str]:
    """Where a module imports from storage/ (at the top or inside a function)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        found += [(node.lineno, m) for m in modules if m.split(".")[0] == "storage"]
    return [f"{name}:{line} imports {module}" for line, module in sorted(found)]


def test_handlers_import_nothing_from_storage() -> None:
    # Not even its errors: bot/errors.py has StorageUnavailable and WriterClosed.
    found = [
        line
        for path in sorted(HANDLERS.rglob("*.py"))
        for line in _storage_imports(path.read_text(encoding="utf-8"), path.name)
    ]
    assert found == []


def test_the_storage_import_check_finds_every_form() -> None:
    source = (
        "import storage\n"
        "from storage.writer import StorageUnavailable\n"
        "import storage.db as db\n"
        "def f():\n    from storage import threads\n"
        "from storagebox import x\nfrom bot.errors import WriterClosed\n"
    )
    assert _storage_imports(source, "probe.py") == [
        "probe.py:1 imports storage",
        "probe.py:2 imports storage.writer",
        "probe.py:3 imports storage.db",
        "probe.py:5 imports storage",
    ]
