# minipacs: slim image, non-root, data on the /data volume, the server as PID 1 so that
# `docker stop` sends it SIGTERM (graceful drain for server.shutdown_grace seconds).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MINIPACS_STORAGE_PATH=/data/store \
    MINIPACS_DATABASE_URL=sqlite:////data/index.sqlite \
    MINIPACS_METRICS_PORT=9112 \
    MINIPACS_METRICS_HOST=0.0.0.0

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
# 11112: DICOM; 9112: /metrics (Prometheus), /healthz, /readyz.
EXPOSE 11112 9112
# Healthy = ready: accepting associations and the index answers (GET /readyz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MINIPACS_METRICS_PORT', '9112') + '/readyz', timeout=4)"]
ENTRYPOINT ["minipacs"]
CMD ["serve"]
