"""`parley-trainer` / `python -m trainer`: serve the fine-tuning API until SIGTERM or SIGINT.

Configuration errors (no TRAINER_API_KEY, no TRAINER_BASE_MODELS, ...) and start-up failures
(the port is taken, the data directory is in use) end it at once with one line and exit code 2.
On SIGTERM/SIGINT it stops taking requests, terminates running jobs (each goes back to the
queue to resume from its last checkpoint at the next start, or fails with that reason; queued
jobs stay queued) and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from trainer.settings import ConfigError, TrainerSettings, load_settings

log = logging.getLogger("trainer")

USAGE = "usage: parley-trainer   (configured by TRAINER_* environment variables)"


def main(argv: list[str] | None = None) -> int:
    """Run the service; exit 2 with a one-line error on bad configuration."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        _check_base_models(settings)
    except ConfigError as exc:
        print(f"parley-trainer: configuration error: {exc}", file=sys.stderr)
        return 2

    from bot.logs import setup_logging

    setup_logging(settings.log_level, settings.secrets())
    if settings.log_level != "DEBUG":
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return asyncio.run(serve(settings))


def _check_base_models(settings: TrainerSettings) -> None:
    """A base model given as a local directory must be there (Hub ids are fetched when used)."""
    for name, target in settings.base_models.items():
        if target.startswith(("/", "./", "../", "~")) and not Path(target).expanduser().is_dir():
            raise ConfigError(f"TRAINER_BASE_MODELS: {name}={target} is not a directory")


async def serve(settings: TrainerSettings) -> int:
    """Serve until a stop signal; 2 if the service cannot start."""
    from aiohttp import web

    from trainer.server import StartupError, build_app

    runner = web.AppRunner(build_app(settings))
    try:
        await runner.setup()
    except StartupError as exc:
        print(f"parley-trainer: {exc}", file=sys.stderr)
        return 2
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            print(
                f"parley-trainer: cannot listen on {settings.listen} (TRAINER_LISTEN):"
                f" {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
        host, port = runner.addresses[0][:2]
        log.info("parley-trainer listening on http://%s:%d", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: running jobs are terminated")
    finally:
        await runner.cleanup()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
