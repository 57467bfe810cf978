# Parley: a slim image, run as a non-root user, database on a volume, no secrets inside.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATABASE_URL=sqlite:////data/parley.sqlite3

RUN useradd --create-home --uid 10001 parley \
    && mkdir /data && chown parley:parley /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY handlers ./handlers
COPY storage ./storage
RUN pip install .

USER parley
VOLUME ["/data"]
# Configuration (TELEGRAM_BOT_TOKEN, OPENAI_API_KEY, ...) comes from the environment at run time.
CMD ["python", "-m", "bot"]
