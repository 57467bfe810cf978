"""Where the API specs come from on a machine without ../shared (tests/stubs/spec_source.py).

The fetching path runs against a local HTTP server on 127.0.0.1 that serves the spec files
as raw.githubusercontent.com lays them out (PARLEY_SHARED_DIR, CI and offline cases too). The
session-level behaviours run as real pytest sessions in a copy of the test tree that has no
../shared beside it, exactly as on a user's machine.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.stubs.spec_source import (
    PINNED,
    SpecsRefused,
    SpecsUnavailable,
    cache_dir,
    locate,
)

ROOT = Path(__file__).resolve().parents[1]

# The test module the pytest sessions below run: three tests that need the specs (each its
# own function, so that pytest would report each skip on a line of its own) and one that
# doesn't.
PROBE = """
from pathlib import Path

from tests.stubs.specs import OpenAISpec, TelegramSpec


def test_telegram_spec(shared: Path) -> None:
    spec = TelegramSpec.load(shared / "specs" / "telegram-bot-api.json")
    assert spec.version == "Bot API 10.1"
    assert spec.validate_call("sendMessage", {"chat_id": 1}, form_encoded=False)


def test_openai_spec(shared: Path) -> None:
    spec = OpenAISpec.load(shared / "specs" / "openai-openapi.json")
    assert spec.match_path("/responses") == "/responses"


def test_both_specs(shared: Path) -> None:
    assert sorted(p.name for p in (shared / "specs").iterdir()) == [
        "openai-openapi.json", "telegram-bot-api.json"
    ]


def test_without_specs() -> None:
    assert Path(__file__).name == "test_probe.py"
"""


class SpecServer:
    """raw.githubusercontent.com's layout on 127.0.0.1, from given bodies; counts requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _path(index: int) -> str:
    pinned = PINNED[index]
    return f"/{pinned.repo}/{pinned.commit}/{pinned.path}"


@pytest.fixture
def upstream(shared: Path) -> Iterator[SpecServer]:
    """Serves the real spec files at their pinned upstream paths."""
    server = SpecServer(
        {_path(i): (shared / "specs" / p.name).read_bytes() for i, p in enumerate(PINNED)}
    )
    yield server
    server.stop()


@pytest.fixture
def offline_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens: the fetch fails as offline."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the test tree (conftest, stand-ins, settings) with no ../shared beside it."""
    proj = tmp_path / "checkout" / "parley"
    (proj / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", proj)
    for name in ("__init__.py", "conftest.py", "pg.py"):
        shutil.copy(ROOT / "tests" / name, proj / "tests")
    shutil.copytree(ROOT / "tests" / "stubs", proj / "tests" / "stubs",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (proj / "tests" / "test_probe.py").write_text(PROBE)
    assert not (proj.parent / "shared").exists()
    return proj


def _cache(tmp_path: Path) -> Path:
    return cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg-cache")})


def _pytest(
    project: Path, tmp_path: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """A pytest session in `project` as a user starts it; no variable of ours leaks in."""
    environ = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_probe.py", *args],
        cwd=project,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _lines(result: subprocess.CompletedProcess[str], word: str) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if word in line]


# --------------------------------------------------------------------------- sessions


def test_a_user_session_fetches_the_specs_once_checks_and_caches_them(
    project: Path, tmp_path: Path, upstream: SpecServer, shared: Path
) -> None:
    first = _pytest(project, tmp_path, PARLEY_SPECS_BASE_URL=upstream.url)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 passed" in first.stdout and "skipped" not in first.stdout
    assert sorted(upstream.requests) == sorted([_path(0), _path(1)])
    [origin] = _lines(first, "API specs:")
    assert f"fetched from {upstream.url}" in origin and "sha256 checked" in origin

    # Cached outside the repository, byte for byte, with no temporary file left behind.
    cached = sorted(_cache(tmp_path).rglob("*"))
    files = [p for p in cached if p.is_file()]
    assert [p.name for p in files] == ["openai-openapi.json", "telegram-bot-api.json"]
    for path in files:
        assert path.read_bytes() == (shared / "specs" / path.name).read_bytes()
    assert not any(p.name.endswith(".part") for p in cached)
    assert not project.joinpath("specs").exists() and not list(project.rglob("*.json"))

    # The next session needs no network: the server is gone and nothing is fetched.
    upstream.stop()
    again = _pytest(project, tmp_path, PARLEY_SPECS_BASE_URL=upstream.url)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "4 passed" in again.stdout
    [origin] = _lines(again, "API specs:")
    assert origin.endswith("(cached)")
    assert len(upstream.requests) == 2


def test_offline_the_tests_needing_specs_skip_with_one_line(
    project: Path, tmp_path: Path, offline_url: str
) -> None:
    result = _pytest(project, tmp_path, "-ra", PARLEY_SPECS_BASE_URL=offline_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 3 skipped" in result.stdout
    [skipped] = _lines(result, "SKIPPED")
    assert skipped.startswith("SKIPPED [3] tests/conftest.py:")
    assert f"not fetched from {offline_url}" in skipped and "README" in skipped
    [header] = _lines(result, "(3 of 4 tests)")
    assert header.startswith(f"API specs not in ../shared and not fetched from {offline_url}")
    assert "Traceback" not in result.stdout + result.stderr
    assert not _cache(tmp_path).exists() or not any(_cache(tmp_path).rglob("*.json"))


def test_a_fetched_file_with_the_wrong_sha256_is_refused_and_stops_the_session(
    project: Path, tmp_path: Path, upstream: SpecServer, shared: Path
) -> None:
    upstream.files[_path(0)] = upstream.files[_path(0)].replace(b"Bot API 10.1", b"Bot API 10.2")
    actual = hashlib.sha256(upstream.files[_path(0)]).hexdigest()
    result = _pytest(project, tmp_path, PARLEY_SPECS_BASE_URL=upstream.url)
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    [line] = _lines(result, "sha256")
    assert f"sha256 {actual}, expected {PINNED[0].sha256}" in line and "refused" in line
    assert "passed" not in output and "Traceback" not in output
    assert not any(p.is_file() for p in _cache(tmp_path).rglob("*"))


def test_a_missing_parley_shared_dir_says_so(
    project: Path, tmp_path: Path, upstream: SpecServer
) -> None:
    nowhere = tmp_path / "no-such-folder"
    result = _pytest(
        project, tmp_path, PARLEY_SHARED_DIR=str(nowhere), PARLEY_SPECS_BASE_URL=upstream.url
    )
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    [line] = _lines(result, str(nowhere))
    assert f"PARLEY_SHARED_DIR={nowhere} does not exist: point it at a folder" in line
    assert "Traceback" not in output and "passed" not in output
    assert upstream.requests == []  # a wrong setting is not papered over by a download

    (nowhere / "specs").mkdir(parents=True)
    result = _pytest(project, tmp_path, PARLEY_SHARED_DIR=str(nowhere))
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    [line] = _lines(result, f"PARLEY_SHARED_DIR={nowhere} has no specs/telegram-bot-api.json")
    assert "specs/openai-openapi.json" in line


def test_under_ci_without_specs_the_session_stops_once_with_the_reason(
    project: Path, tmp_path: Path, upstream: SpecServer
) -> None:
    result = _pytest(project, tmp_path, CI="true", PARLEY_SPECS_BASE_URL=upstream.url)
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    [line] = _lines(result, "API specs not found")
    assert "CI=true" in line and "CI never downloads them" in line
    assert "Traceback" not in output and "passed" not in output and "error" not in output
    assert upstream.requests == []

    # A CI session that selects no test needing the specs runs as usual.
    unit_only = _pytest(project, tmp_path, "-k", "without_specs", CI="true")
    assert unit_only.returncode == 0, unit_only.stdout + unit_only.stderr
    assert "1 passed" in unit_only.stdout and not _lines(unit_only, "API specs")


# --------------------------------------------------------------------------- locate()


def _user_env(tmp_path: Path, base_url: str) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(tmp_path / "xdg-cache"), "PARLEY_SPECS_BASE_URL": base_url}


def test_a_damaged_cached_file_is_fetched_again(tmp_path: Path, upstream: SpecServer) -> None:
    env = _user_env(tmp_path, upstream.url)
    found = locate(env, tmp_path / "repo")
    damaged = found.shared / "specs" / PINNED[1].name
    damaged.write_bytes(damaged.read_bytes()[:1000])  # e.g. a disk that filled up
    upstream.requests.clear()

    again = locate(env, tmp_path / "repo")
    assert again.shared == found.shared and upstream.requests == [_path(1)]
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == PINNED[1].sha256


def test_upstream_answers_other_than_the_file(tmp_path: Path, upstream: SpecServer) -> None:
    del upstream.files[_path(1)]
    with pytest.raises(SpecsUnavailable, match=f"HTTP 404 for {upstream.url}/openai/"):
        locate(_user_env(tmp_path, upstream.url), tmp_path / "repo")
    with pytest.raises(SpecsRefused, match="PARLEY_SPECS_BASE_URL=ftp://x is not an http"):
        locate(_user_env(tmp_path, "ftp://x"), tmp_path / "repo")


def test_the_cache_lives_under_xdg_cache_home_else_home(tmp_path: Path) -> None:
    assert cache_dir({"XDG_CACHE_HOME": "/var/cache/me"}) == Path("/var/cache/me/parley/specs")
    assert cache_dir({"XDG_CACHE_HOME": "relative"}) == Path.home() / ".cache/parley/specs"
    assert cache_dir({}) == Path.home() / ".cache/parley/specs"


def test_local_specs_win_over_the_cache(tmp_path: Path, shared: Path, offline_url: str) -> None:
    repo = tmp_path / "work" / "parley"
    repo.mkdir(parents=True)
    (repo.parent / "shared").symlink_to(shared)
    found = locate(_user_env(tmp_path, offline_url), repo)
    assert found.shared == repo.parent / "shared"
    assert found.origin == f"API specs: {repo.parent / 'shared' / 'specs'}"
