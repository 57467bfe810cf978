"""Where the datasets /train built wait for their admin to press start or cancel.

In one process they wait in its memory (`MemoryHeldDatasets`). When several bot processes
share one database, the press may reach a process other than the one that built the dataset,
so they wait in the store (`StoredHeldDatasets`): the report and options as JSON, the files'
contents beside them. The process that takes one writes the files into its own datasets
folder, when it hasn't them, for the trainer to upload, and removes them again afterwards:
they are the builder's, and /forget on another process could not reach them.

Taking is all or nothing: of two presses at once, in one process or two, one gets the
dataset and the other finds it gone, as it does one that was dropped, forgotten or expired.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bot.services.dataset import DatasetOptions, DatasetReport

T = TypeVar("T", DatasetReport, DatasetOptions)

PENDING_TTL = 3600.0  # seconds a built dataset waits for "start"
MAX_PENDING = 20  # datasets held at once; holding one more lets the oldest go

# The report's files, by the name the store keeps each one under.
FILES = {"train": "train_path", "validation": "validation_path", "test": "test_path"}


@dataclass(slots=True)
class Held:
    """A built dataset waiting for "start": what the job is made of, and who asked."""

    report: DatasetReport
    options: DatasetOptions
    admin_id: int
    # Seconds it had waited when taken: put back, it waits only for the rest of its time.
    age: float = 0.0
    # Files a take wrote into this process's datasets folder: removed once the start is over.
    copied: tuple[Path, ...] = field(default_factory=tuple)


class HeldDatasets(Protocol):
    """Held datasets by token (the start and cancel buttons carry it)."""

    async def hold(self, token: str, held: Held) -> None:
        """Keep `held` until taken, dropped or cleared, or until it expires."""

    async def take(self, token: str) -> Held | None:
        """Remove and return it; None when it isn't held (any more) or has expired."""

    async def put_back(self, token: str, held: Held) -> None:
        """Hold again what `take` returned (the trainer refused it: the admin may retry)."""

    async def drop(self, token: str) -> bool:
        """Let it go (cancel); whether it was held."""

    async def clear(self) -> int:
        """Let every held dataset go (/forget: they may hold forgotten words); how many."""


class MemoryHeldDatasets:
    """In this process's memory: for a database only one process uses (SQLite)."""

    def __init__(self, *, ttl: float = PENDING_TTL, limit: int = MAX_PENDING) -> None:
        self.ttl = ttl
        self.limit = limit
        self._held: dict[str, tuple[Held, float]] = {}  # oldest first

    async def hold(self, token: str, held: Held) -> None:
        now = time.monotonic()
        for other, (_, since) in list(self._held.items()):
            if now - since >= self.ttl:
                del self._held[other]
        while len(self._held) >= max(self.limit, 1):
            del self._held[next(iter(self._held))]
        self._held[token] = (held, now - held.age)

    async def take(self, token: str) -> Held | None:
        found = self._held.pop(token, None)
        if found is None:
            return None
        held, since = found
        age = time.monotonic() - since
        if age >= self.ttl:
            return None
        held.age = age
        return held

    async def put_back(self, token: str, held: Held) -> None:
        self._held[token] = (held, time.monotonic() - held.age)

    async def drop(self, token: str) -> bool:
        return self._held.pop(token, None) is not None

    async def clear(self) -> int:
        count = len(self._held)
        self._held.clear()
        return count


class HeldStore(Protocol):
    """What a store offers for held datasets (storage/pg/held.py): JSON and bytes, no types
    of the bot's, and times by the database server's clock, which every process shares."""

    async def hold(
        self,
        token: str,
        admin_id: int,
        held: dict[str, Any],
        files: Mapping[str, bytes],
        *,
        ttl: float,
        limit: int,
    ) -> None: ...

    async def take(
        self, token: str, *, ttl: float
    ) -> tuple[int, dict[str, Any], dict[str, bytes], float] | None: ...

    async def put_back(
        self,
        token: str,
        admin_id: int,
        held: dict[str, Any],
        files: Mapping[str, bytes],
        *,
        age: float,
    ) -> None: ...

    async def drop(self, token: str) -> bool: ...

    async def clear(self) -> int: ...


class StoredHeldDatasets:
    """In the store every process shares; files go to and come from `datasets_dir`."""

    def __init__(
        self,
        store: HeldStore,
        datasets_dir: Path,
        *,
        ttl: float = PENDING_TTL,
        limit: int = MAX_PENDING,
    ) -> None:
        self._store = store
        self.datasets_dir = datasets_dir
        self.ttl = ttl
        self.limit = limit

    async def hold(self, token: str, held: Held) -> None:
        data, files = await asyncio.to_thread(_serialise, held)
        await self._store.hold(token, held.admin_id, data, files, ttl=self.ttl, limit=self.limit)

    async def take(self, token: str) -> Held | None:
        taken = await self._store.take(token, ttl=self.ttl)
        if taken is None:
            return None
        admin_id, data, files, age = taken
        try:
            return await asyncio.to_thread(self._unpack, admin_id, data, files, age)
        except OSError:  # e.g. a full disk: it stays held, for a retry
            await self._store.put_back(token, admin_id, data, files, age=age)
            raise

    async def put_back(self, token: str, held: Held) -> None:
        data, files = await asyncio.to_thread(_serialise, held)
        await self._store.put_back(token, held.admin_id, data, files, age=held.age)

    async def drop(self, token: str) -> bool:
        return await self._store.drop(token)

    async def clear(self) -> int:
        return await self._store.clear()

    def _unpack(
        self, admin_id: int, data: dict[str, Any], files: Mapping[str, bytes], age: float
    ) -> Held:
        """The held dataset, its files in this process's datasets folder (written there if
        this process hasn't them: another one built the dataset)."""
        paths: dict[str, Path] = {}
        copied: list[Path] = []
        try:
            for name, where in data["files"].items():
                if name not in FILES:
                    continue  # a file a process running newer code keeps: not for this one
                folder, filename = where
                if not (_plain(folder) and _plain(filename)) or name not in files:
                    raise ValueError(f"held dataset file {name!r} is not in its folder")
                path = self.datasets_dir / folder / filename
                if not _holds(path, files[name]):
                    if path.exists():  # another file by that name: never overwrite one
                        path = self.datasets_dir / f"{folder}-{secrets.token_hex(3)}" / filename
                    _write(path, files[name])
                    copied.append(path)
                paths[FILES[name]] = path
        except BaseException:
            remove_copies(tuple(copied))
            raise
        report = _load(DatasetReport, data["report"])
        for attr, path in paths.items():
            setattr(report, attr, path)
        options = _load(DatasetOptions, data["options"])
        return Held(report, options, admin_id, age, tuple(copied))


def remove_copies(copied: tuple[Path, ...]) -> None:
    """Remove the files a take wrote, and their folder if that leaves it empty."""
    for path in copied:
        path.unlink(missing_ok=True)
    for folder in {path.parent for path in copied}:
        try:
            folder.rmdir()
        except OSError:
            pass  # the builder's own files are there, or a build in this process now


def _serialise(held: Held) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The report and options as JSON, the files' contents by name (read here: blocking)."""
    report: dict[str, Any] = {}
    for f in fields(DatasetReport):
        if f.name not in FILES.values():
            value = getattr(held.report, f.name)
            report[f.name] = dict(value) if isinstance(value, Counter) else value
    where: dict[str, list[str]] = {}
    contents: dict[str, bytes] = {}
    for name, attr in FILES.items():
        path: Path | None = getattr(held.report, attr)
        if path is not None:
            where[name] = [path.parent.name, path.name]
            contents[name] = path.read_bytes()
    data = {"report": report, "options": asdict(held.options), "files": where}
    return data, contents


def _load(cls: type[T], values: dict[str, Any]) -> T:
    """A report or options from JSON; fields it lacks (a process running older code held it)
    take their defaults, fields this code doesn't know are left out."""
    defaults = cls()
    known: dict[str, Any] = {}
    for f in fields(defaults):
        if f.name in values:
            value = values[f.name]
            counter = isinstance(getattr(defaults, f.name), Counter)
            known[f.name] = Counter(value) if counter else value
    return cls(**known)


def _plain(name: object) -> bool:
    """A single file or folder name: nothing read from the store writes outside the folder."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _holds(path: Path, data: bytes) -> bool:
    """Whether `path` is already this file (this process built it, or shares the folder)."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _write(path: Path, data: bytes) -> None:
    """Write atomically: an upload never reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
