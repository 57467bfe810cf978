# Parley: a slim image; the bot runs as an unprivileged user, the database lives on a volume,
# no secrets inside. Python 3.11: the version the tests and CI run on (tests/test_docker.py).
FROM python:3.11-slim-trixie

# HEARTBEAT_FILE: in long polling the bot touches it every few seconds; HEALTHCHECK reads it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATABASE_URL=sqlite:////data/parley.sqlite3 \
    HEARTBEAT_FILE=/tmp/parley.heartbeat

RUN groupadd --gid 10001 parley \
    && useradd --uid 10001 --gid parley --create-home parley \
    && mkdir /data && chown parley:parley /data

# Charts carry words in Russian and Spanish too: DejaVu Sans has their letters, Pillow's
# built-in font has no Cyrillic (bot/services/charts.py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-dejavu-core=2.37-8 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY handlers ./handlers
COPY storage ./storage
# The project itself, with its PostgreSQL extra (versions pinned by pyproject.toml's ranges;
# hadolint reads ".[postgres]" as an unpinned package name).
# hadolint ignore=DL3013
RUN pip install ".[postgres]"
COPY docker/entrypoint.py /usr/local/bin/parley-entrypoint

VOLUME ["/data"]
# Webhook mode (WEBHOOK_URL set) listens on WEBHOOK_PORT, 8080 unless changed; long polling
# needs no port.
EXPOSE 8080
# Webhook mode: the bot's GET /healthz; long polling: the age of HEARTBEAT_FILE (bot/health.py).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-m", "bot.health"]
# No USER line on purpose: the entrypoint starts as root only to hand /data (a root-owned
# host folder, when bind-mounted) to `parley`, then drops root for good and runs the bot.
ENTRYPOINT ["python", "/usr/local/bin/parley-entrypoint"]
# Configuration (TELEGRAM_BOT_TOKEN, OPENAI_API_KEY, ...) comes from the environment at run
# time: `--env-file .env`, or compose.yaml (every setting: .env.example).
CMD ["python", "-m", "bot"]
