# Spillway: one slim image for every role (worker, simulator, flower, serve, producer).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPILLWAY_CONFIG=/app/spillway.toml

WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py spillway.toml ./
COPY workers ./workers
COPY producer ./producer
COPY examples ./examples
RUN pip install ".[postgres]" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin spillway \
    && install -d -o spillway -g spillway -m 0750 /data

# The code stays in root-owned /app; the working directory is /data, the user's own (mount a
# volume there): the default SQLite store (sqlite:///spillway.db) and relative output paths
# land there. docker-compose.yml sets PostgreSQL instead.
WORKDIR /data
USER spillway
ENTRYPOINT ["spillway"]
CMD ["--help"]
