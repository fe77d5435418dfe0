# minipacs: slim image, non-root, data on the /data volume, the server as PID 1 so that
# `docker stop` sends it SIGTERM (graceful drain for server.shutdown_grace seconds).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MINIPACS_STORAGE_PATH=/data/store \
    MINIPACS_DATABASE_URL=sqlite:////data/index.sqlite

WORKDIR /app
COPY pyproject.toml README.md ./
COPY minipacs ./minipacs
COPY migrations ./migrations
COPY config ./config
# Editable, because the alembic migrations are looked up next to the package (/app).
# Bytecode is compiled now: the non-root user cannot write it at run time.
RUN pip install --no-cache-dir -e . \
    && python -m compileall -q minipacs migrations \
    && useradd --system --uid 10001 --no-create-home --home-dir /data minipacs \
    && mkdir -p /data \
    && chown minipacs /data

USER minipacs
VOLUME ["/data"]
EXPOSE 11112
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ.get('MINIPACS_SERVER_PORT', '11112'))), 3).close()"]
ENTRYPOINT ["minipacs"]
CMD ["serve"]
