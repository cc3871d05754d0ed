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
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin spillway

USER spillway
ENTRYPOINT ["spillway"]
CMD ["--help"]
