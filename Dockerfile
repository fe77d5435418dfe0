# minipacs: slim image, non-root, data on a volume, the server as PID 1 (gets SIGTERM).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MINIPACS_STORAGE_PATH=/data/store \
    MINIPACS_DATABASE_URL=sqlite:////data/index.sqlite \
    MINIPACS_SERVER_HOST=0.0.0.0 \
    MINIPACS_SERVER_PORT=11112

WORKDIR /app
COPY pyproject.toml README.md ./
COPY minipacs ./minipacs
COPY migrations ./migrations
COPY config ./config
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /data minipacs \
    && mkdir -p /data && chown minipacs /data

USER minipacs
VOLUME ["/data"]
EXPOSE 11112
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
    CMD python -c "import socket; socket.create_connection(('127.0.0.1', 11112), 3).close()"
ENTRYPOINT ["minipacs"]
CMD ["serve"]
