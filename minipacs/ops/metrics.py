"""Prometheus metrics: associations, DIMSE operations, bytes, latencies, index and disk.

Counters are fed by the network layer through the Observer interface; the index size
and the store's free space are read when Prometheus scrapes (index counts are cached for
a few seconds: counting a million-row index on every scrape would cost more than it tells).
DIMSE operations are counted in plain ints and turned into metric families at scrape
time: prometheus_client's Counter.inc and Histogram.observe take a lock each and walk the
buckets in Python (~1.5 us per C-ECHO, of ~15 us).
"""

from __future__ import annotations

import shutil
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
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


class _OperationCollector(Collector):
    """DIMSE operations by service and status, and their durations, counted in plain ints.

    Written on the event loop, read by a scrape in another thread: collect() copies each
    dict first (one C-level copy, atomic under the GIL) rather than iterating it live.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        # Per operation name: a count per bucket (the last one is +Inf), and the sum.
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def add(self, name: str, status: int, seconds: float) -> None:
        """Count one finished operation."""
        key = (name, status)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        buckets = self.buckets.get(name)
        if buckets is None:
            buckets = self.buckets[name] = [0] * (len(_BUCKETS) + 1)
            self.sums[name] = 0.0
        # "le" buckets: the first bound not below the value.
        buckets[bisect_left(_BUCKETS, seconds)] += 1
        self.sums[name] += seconds

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        """Yield the operation counter and the duration histogram."""
        operations = CounterMetricFamily(
            "minipacs_dimse_operations",
            "DIMSE operations by service and final status",
            labels=["service", "status"],
        )
        for (name, status), count in sorted(dict(self.counts).items()):
            operations.add_metric([name.removesuffix("-RQ"), f"0x{status:04X}"], count)
        yield operations
        latency = HistogramMetricFamily(
            "minipacs_operation_seconds",
            "Duration of DIMSE operations (C-STORE: until durable; C-FIND: whole stream)",
            labels=["service"],
        )
        sums = dict(self.sums)
        for name, per_bucket in sorted(dict(self.buckets).items()):
            cumulative = 0
            buckets = []
            for bound, count in zip((*_BUCKETS, float("inf")), list(per_bucket), strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric([name.removesuffix("-RQ")], buckets, sums.get(name, 0.0))
        yield latency


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
        self.received = Counter("minipacs_received_bytes", "Bytes received", registry=r)
        self.sent = Counter("minipacs_sent_bytes", "Bytes sent", registry=r)
        self._operations = _OperationCollector()
        r.register(self._operations)
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
        self._operations.add(name, status, seconds)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric (blocking: reads the index)."""
        return generate_latest(self.registry)


def merge_expositions(parts: Sequence[tuple[str, str]], running: int, restarts: int) -> bytes:
    """Workers' expositions as one, each sample labelled worker="<its number>".

    Families of the same name are joined (the text format wants each once), so a query
    sums over workers with sum without (worker) (...). The supervisor adds its own
    minipacs_workers_running and minipacs_worker_restarts.
    """
    families: dict[str, Metric] = {}
    for worker, text in parts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples.extend(
                sample._replace(labels={**sample.labels, "worker": worker})
                for sample in family.samples
            )
    running_family = GaugeMetricFamily(
        "minipacs_workers_running", "Worker processes running (server.workers)"
    )
    running_family.add_metric([], running)
    restarts_family = CounterMetricFamily(
        "minipacs_worker_restarts", "Worker processes restarted after dying"
    )
    restarts_family.add_metric([], restarts)
    registry = CollectorRegistry()
    registry.register(_Families([*families.values(), running_family, restarts_family]))
    return generate_latest(registry)


class _Families(Collector):
    """Collects metric families made elsewhere (merge_expositions)."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        """The families given."""
        return iter(self.families)
