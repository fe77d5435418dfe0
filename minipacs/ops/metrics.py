"""Prometheus metrics: associations, DIMSE operations, bytes, latencies, index and disk.

Counters are fed by the network layer through the Observer interface; the index size
and the store's free space are read when Prometheus scrapes (index counts are cached for
a few seconds: counting a million-row index on every scrape would cost more than it tells).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from minipacs.index.stats import counts
from minipacs.net.observer import Observer

# Seconds: C-STORE is dominated by fsync, C-FIND by the number of matches.
_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_INDEX_CACHE_SECONDS: Final = 15.0


class _ArchiveCollector(Collector):
    """Index row counts and bytes, and free space under the store, read at scrape time."""

    def __init__(self, engine: Engine, store_dir: Path) -> None:
        self.engine = engine
        self.store_dir = store_dir
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._read_at = 0.0

    def _index_counts(self) -> dict[str, int]:
        with self._lock:
            if time.monotonic() - self._read_at > _INDEX_CACHE_SECONDS:
                self._counts = counts(self.engine)
                self._read_at = time.monotonic()
            return self._counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the index and disk gauges."""
        index = GaugeMetricFamily(
            "minipacs_index_entities", "Entities in the index, by kind", labels=["kind"]
        )
        values = self._index_counts()
        for kind in ("patients", "studies", "series", "instances"):
            index.add_metric([kind], values.get(kind, 0))
        yield index
        yield GaugeMetricFamily(
            "minipacs_index_bytes", "Bytes of the indexed files", value=values.get("bytes", 0)
        )
        yield GaugeMetricFamily(
            "minipacs_store_free_bytes",
            "Free bytes on the store's filesystem",
            value=shutil.disk_usage(self.store_dir).free,
        )


class Metrics(Observer):
    """The metrics of one server process, in a registry of their own."""

    def __init__(self, engine: Engine | None = None, store_dir: Path | None = None) -> None:
        # The *_created series double every counter and tell ops nothing.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.active = Gauge("minipacs_associations_active", "Open associations", registry=r)
        self.accepted = Counter("minipacs_associations", "Associations established", registry=r)
        self.rejected = Counter(
            "minipacs_associations_rejected",
            "Associations refused, by reason",
            ["reason"],
            registry=r,
        )
        self.operations = Counter(
            "minipacs_dimse_operations",
            "DIMSE operations by service and final status",
            ["service", "status"],
            registry=r,
        )
        self.received = Counter("minipacs_received_bytes", "Bytes received", registry=r)
        self.sent = Counter("minipacs_sent_bytes", "Bytes sent", registry=r)
        self.latency = Histogram(
            "minipacs_operation_seconds",
            "Duration of DIMSE operations (C-STORE: until durable; C-FIND: whole stream)",
            ["service"],
            buckets=_BUCKETS,
            registry=r,
        )
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        if engine is not None and store_dir is not None:
            r.register(_ArchiveCollector(engine, store_dir))

    def association_accepted(self) -> None:
        """Count an established association."""
        self.accepted.inc()
        self.active.inc()

    def association_rejected(self, reason: str) -> None:
        """Count a refused association."""
        self.rejected.labels(reason).inc()

    def association_ended(self, received: int, sent: int) -> None:
        """Count an association's end and its bytes."""
        self.active.dec()
        self.received.inc(received)
        self.sent.inc(sent)

    def operation(self, name: str, status: int, seconds: float) -> None:
        """Count a finished DIMSE operation and its duration."""
        children = self._children.get((name, status))
        if children is None:
            # labels() formats and looks up its label values each time (~2 us a call, on
            # the path of every C-ECHO): the children are kept per (operation, status).
            service = name.removesuffix("-RQ")
            children = (
                self.operations.labels(service, f"0x{status:04X}"),
                self.latency.labels(service),
            )
            self._children[(name, status)] = children
        counter, histogram = children
        counter.inc()
        histogram.observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric (blocking: reads the index)."""
        return generate_latest(self.registry)
