"""Where the test session's API specs come from: ../shared, PARLEY_SHARED_DIR, or a pinned copy.

Developers and CI have the specs in ``../shared/specs``. A user's machine has no ``../shared``:
there the session fetches both specs once from their public sources, at pinned upstream
commits, checks each file's sha256 and caches them outside the repository
(``$XDG_CACHE_HOME/parley/specs``, else ``~/.cache/parley/specs``), so later runs need no
network. CI (``CI=true``) never fetches: a CI machine without ``../shared`` is misconfigured.

``locate`` answers with a :class:`Located` folder (the same layout as ``../shared``: the files
are under ``specs/``), or raises :class:`SpecsUnavailable` (offline: the tests that need the
specs are skipped) or :class:`SpecsRefused` (something is wrong: the session stops).
"""

from __future__ import annotations

import functools
import hashlib
import os
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_BASE_URL",
    "PINNED",
    "Located",
    "Pinned",
    "SpecsRefused",
    "SpecsUnavailable",
    "cache_dir",
    "locate",
    "session_specs",
]

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
"""Serves ``/<owner>/<repo>/<commit>/<path>``; ``PARLEY_SPECS_BASE_URL`` replaces it."""

TIMEOUT = 20.0
"""Seconds for connecting and for each read."""

DEADLINE = 120.0
"""Seconds one file may take in all, however slowly it trickles."""

MAX_BYTES = 32 * 1024 * 1024
"""Far above either spec (0.9 and 3.4 MB); anything larger is not the file."""


@dataclass(frozen=True)
class Pinned:
    """One spec file: its name under ``specs/`` and the upstream file it is a copy of."""

    name: str
    repo: str
    commit: str
    path: str
    sha256: str

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


# The commits whose files are byte-identical to ../shared/specs (sha256 as in
# ../shared/README.md); both repositories are MIT-licensed.
PINNED = (
    Pinned(
        name="telegram-bot-api.json",
        repo="PaulSonOfLars/telegram-bot-api-spec",
        commit="160fd99507e1c7c77e92dc90f5993d724735b51c",  # Bot API 10.1, 2026-06-18
        path="api.json",
        sha256="0950def6a1c900792c3a1d65ab13c1ee76d2f400a761df1aa0e6245e2355070a",
    ),
    Pinned(
        name="openai-openapi.json",
        repo="openai/openai-openapi",
        commit="f85dbe223d40e1a31cba812ab2d755c7e98a92a3",  # spec v2.3.0, 2026-08-21
        path="openapi.json",
        sha256="bbfd19abcde0e7412da99378deb2a959ccdd3a812f97c9e35901921e8e973f9a",
    ),
)

_README = "README.md, 'Running the tests'"


class SpecsUnavailable(Exception):
    """The specs are not here and could not be fetched: tests that need them are skipped."""


class SpecsRefused(Exception):
    """The specs must not be used or looked for this way: the session stops with this reason."""


@dataclass(frozen=True)
class Located:
    """A folder holding ``specs/<name>`` for every pinned file, and one line saying whence."""

    shared: Path
    origin: str


def cache_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME/parley/specs`` (if absolute), else ``~/.cache/parley/specs``."""
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "parley" / "specs"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _missing(shared: Path) -> list[str]:
    return [p.name for p in PINNED if not (shared / "specs" / p.name).is_file()]


def locate(env: Mapping[str, str], repo_root: Path) -> Located:
    """Find the specs, or fetch them; see the module docstring for the order."""
    given = env.get("PARLEY_SHARED_DIR")
    if given:
        shared = Path(given)
        if not shared.is_dir():
            raise SpecsRefused(
                f"PARLEY_SHARED_DIR={given} does not exist: point it at a folder holding "
                "specs/, or unset it to use ../shared or the fetched copy"
            )
        if missing := _missing(shared):
            raise SpecsRefused(
                f"PARLEY_SHARED_DIR={given} has no specs/{', specs/'.join(missing)}: point it at "
                "a folder holding specs/, or unset it to use ../shared or the fetched copy"
            )
        return Located(shared, f"API specs: {shared / 'specs'} (PARLEY_SHARED_DIR)")
    local = repo_root.parent / "shared"
    if not _missing(local):
        return Located(local, f"API specs: {local / 'specs'}")
    if env.get("CI") == "true":
        raise SpecsRefused(
            f"API specs not found: under CI=true {local}/specs (or PARLEY_SHARED_DIR) must hold "
            f"{' and '.join(p.name for p in PINNED)}; CI never downloads them"
        )
    base_url = env.get("PARLEY_SPECS_BASE_URL") or DEFAULT_BASE_URL
    if not base_url.startswith(("http://", "https://")):
        raise SpecsRefused(f"PARLEY_SPECS_BASE_URL={base_url} is not an http(s) URL")
    return _cached_or_fetched(cache_dir(env), base_url)


def _cached_or_fetched(root: Path, base_url: str) -> Located:
    """The pinned files in the cache, fetching (once) those missing or damaged there."""
    shared = root / "-".join(p.commit[:12] for p in PINNED)
    fetched = []
    for pinned in PINNED:
        target = shared / "specs" / pinned.name
        if target.is_file() and _sha256(target) == pinned.sha256:
            continue
        data = _download(pinned.url(base_url), base_url)
        actual = hashlib.sha256(data).hexdigest()
        if actual != pinned.sha256:
            raise SpecsRefused(
                f"{pinned.url(base_url)} has sha256 {actual}, expected {pinned.sha256} "
                f"({pinned.repo} at {pinned.commit[:12]}): refused, nothing cached; "
                "report it if that URL is the real upstream"
            )
        try:
            _write_atomic(target, data)
        except OSError as exc:
            raise SpecsUnavailable(
                f"API specs not in ../shared, and the cache {root} can't be written ({exc}): "
                f"tests that validate against them are skipped; see {_README}"
            ) from None
        fetched.append(pinned.name)
    how = f"fetched from {base_url} at pinned commits, sha256 checked" if fetched else "cached"
    return Located(shared, f"API specs: {shared / 'specs'} ({how})")


def _ssl_context() -> ssl.SSLContext:
    """certifi's CA bundle when installed (httpx brings it), else the system's."""
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def _download(url: str, base_url: str) -> bytes:
    """The body of a 200 answer to GET ``url``, within TIMEOUT per read and DEADLINE in all."""
    request = urllib.request.Request(url, headers={"User-Agent": "parley-tests"})
    deadline = time.monotonic() + DEADLINE
    chunks: list[bytes] = []
    size = 0
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=_ssl_context()) as answer:
            while chunk := answer.read(1024 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BYTES or time.monotonic() > deadline:
                    break
    except (OSError, urllib.error.URLError) as exc:  # HTTPError, timeouts, refused, no DNS
        if isinstance(exc, urllib.error.HTTPError):
            reason: object = f"HTTP {exc.code} for {url}"
        else:
            reason = getattr(exc, "reason", None) or exc
        raise SpecsUnavailable(
            f"API specs not in ../shared and not fetched from {base_url} ({reason}): tests that "
            f"validate against them are skipped; see {_README}"
        ) from None
    if time.monotonic() > deadline:
        raise SpecsUnavailable(
            f"API specs not in ../shared; fetching {url} took over {DEADLINE:.0f} s: tests that "
            f"validate against them are skipped; see {_README}"
        )
    return b"".join(chunks)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _repo_root() -> Path:
    here = Path(__file__).resolve()
    return next(p for p in here.parents if (p / "pyproject.toml").is_file())


@functools.cache
def session_specs() -> Located | SpecsUnavailable | SpecsRefused:
    """``locate`` for this process's environment, done once; its error is returned, not raised."""
    try:
        return locate(os.environ, _repo_root())
    except (SpecsUnavailable, SpecsRefused) as exc:
        return exc
