"""The container's entrypoint: make the data folder the bot's, then run the command as the bot.

Docker starts it as root. A host folder bind-mounted at /data is usually owned by root, and
the bot, running as the unprivileged user `parley`, could not create its database there. So
the folder, and whatever in it is not already the bot's (say, a database an older image wrote
as root), is given to `parley`; then root is dropped for good (groups, gid, uid) and the
command runs in this process's place. Started as another user (`docker run --user`), it
changes nothing and runs the command as that user, warning if the folder isn't writable.

Standard library only; `PARLEY_DATA_DIR` moves the folder (the tests use it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP_UID = 10001  # the image's `parley` user and group (Dockerfile)
APP_GID = 10001
APP_HOME = "/home/parley"


def give_to_app(data: Path, uid: int = APP_UID, gid: int = APP_GID) -> None:
    """Create `data` if needed and own it, and everything under it, as uid:gid."""
    data.mkdir(parents=True, exist_ok=True)
    for path in [data, *data.rglob("*")]:
        stat = path.lstat()
        if (stat.st_uid, stat.st_gid) != (uid, gid):
            os.chown(path, uid, gid, follow_symlinks=False)


def drop_root(uid: int = APP_UID, gid: int = APP_GID) -> None:
    """Become uid:gid with no supplementary groups; there is no way back to root after this."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.environ["HOME"] = APP_HOME


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: entrypoint.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    data = Path(os.environ.get("PARLEY_DATA_DIR", "/data"))
    if os.geteuid() == 0:
        try:
            give_to_app(data)
        except OSError as exc:
            print(
                f"parley: can't give {data} to uid {APP_UID} ({exc.strerror}); on the host run"
                f" `chown -R {APP_UID}:{APP_GID}` on the mounted folder, or start the container"
                " with --user and a uid that may write there",
                file=sys.stderr,
            )
            return 1
        drop_root()
    elif not os.access(data, os.W_OK):
        print(
            f"parley: {data} is not writable by uid {os.geteuid()}: the database may not be"
            " created there; chown the mounted folder on the host",
            file=sys.stderr,
        )
    sys.stdout.flush()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
