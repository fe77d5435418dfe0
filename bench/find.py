"""C-FIND benchmark: latency of typical queries over one open association.

Run: .venv/bin/python -m bench.find [--small 10000] [--large 1000000] [--repeat 40]
                                    [--backends sqlite,postgresql] [--no-orthanc]
The small archive (bench/catalog.py) is sent with C-STORE (8 storescu processes) to
Orthanc and to minipacs, so both hold the same instances; the large one is written
straight into a minipacs index (catalog.fill_index). Each query kind is asked `repeat`
times with varying values, every answer is checked for its number of matches, and the
table shows median and p95 latency in ms, the ratio Orthanc / minipacs at the small
size (higher is better for minipacs) and minipacs large / small (the goal is <= 2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from bench import catalog
from bench.catalog import Layout
from bench.peers import Peer, dcmtk_env, echo_probe, minipacs, orthanc
from minipacs import dataset as dicom
from minipacs.index.schema import upgrade
from minipacs.net.client import ClientAssociation
from minipacs.net.commands import C_FIND_RQ, DATASET_PRESENT, PRIORITY_MEDIUM
from tests.qr_client import identifier as _identifier

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_KEYS = {
    "StudyInstanceUID": "",
    "PatientName": "",
    "PatientID": "",
    "StudyDate": "",
    "AccessionNumber": "",
    "StudyDescription": "",
    "ModalitiesInStudy": "",
    "NumberOfStudyRelatedInstances": "",
}


@dataclass(frozen=True)
class QueryKind:
    """A kind of query: builds an identifier for a random entity; knows its match count."""

    name: str
    build: Callable[[Layout, random.Random], Dataset]
    matches: Callable[[Layout], int]


def _by_patient_id(layout: Layout, rng: random.Random) -> Dataset:
    p = rng.randrange(layout.patients)
    return _identifier("STUDY", **{**STUDY_KEYS, "PatientID": catalog.patient_id(p)})


def _by_name(layout: Layout, rng: random.Random) -> Dataset:
    tens = rng.randrange(max(1, layout.patients // 10))
    # Lower case: workstations expect PN matching to ignore case.
    return _identifier("STUDY", **{**STUDY_KEYS, "PatientName": f"pat{tens:06d}*"})


def _by_date(layout: Layout, rng: random.Random) -> Dataset:
    first = rng.randrange(layout.patients * layout.studies - 10)
    p, s = divmod(first, layout.studies)
    q, t = divmod(first + 9, layout.studies)
    dates = f"{catalog.study_date(layout, p, s)}-{catalog.study_date(layout, q, t)}"
    return _identifier("STUDY", **{**STUDY_KEYS, "StudyDate": dates})


def _series_of_study(layout: Layout, rng: random.Random) -> Dataset:
    p, s = rng.randrange(layout.patients), rng.randrange(layout.studies)
    return _identifier(
        "SERIES",
        StudyInstanceUID=catalog.study_uid(p, s),
        SeriesInstanceUID="",
        Modality="",
        SeriesNumber="",
        NumberOfSeriesRelatedInstances="",
    )


def _images_of_series(layout: Layout, rng: random.Random) -> Dataset:
    p, s, r = rng.randrange(layout.patients), rng.randrange(layout.studies), 0
    return _identifier(
        "IMAGE",
        StudyInstanceUID=catalog.study_uid(p, s),
        SeriesInstanceUID=catalog.series_uid(p, s, r),
        SOPInstanceUID="",
        SOPClassUID="",
        InstanceNumber="",
    )


QUERIES = (
    QueryKind("study by PatientID", _by_patient_id, lambda lay: lay.studies),
    QueryKind(
        "study by PatientName wildcard",
        _by_name,
        lambda lay: min(10, lay.patients) * lay.studies,
    ),
    QueryKind("study by StudyDate range", _by_date, lambda lay: 10),
    QueryKind("series of one study", _series_of_study, lambda lay: lay.series),
    QueryKind("images of one series", _images_of_series, lambda lay: lay.instances),
)


COMMAND = {
    "CommandField": C_FIND_RQ,
    "AffectedSOPClassUID": STUDY_ROOT_FIND,
    "Priority": PRIORITY_MEDIUM,
    "CommandDataSetType": DATASET_PRESENT,
}


async def _connect(peer: Peer) -> ClientAssociation:
    return await ClientAssociation.connect(
        "127.0.0.1",
        peer.port,
        calling_ae="BENCH",
        called_ae=peer.ae_title,
        contexts=[(STUDY_ROOT_FIND, [ExplicitVRLittleEndian])],
    )


async def _query(
    peer: Peer, association: ClientAssociation, kind: QueryKind, layout: Layout, rng: random.Random
) -> float:
    """One query of a kind, checked for its match count; its latency in ms."""
    raw = dicom.encode(kind.build(layout, rng), ExplicitVRLittleEndian)
    context_id = association.context_for(STUDY_ROOT_FIND)
    started = time.perf_counter()
    responses = [r async for r in association.request(context_id, COMMAND, raw)]
    elapsed = (time.perf_counter() - started) * 1000
    status = int(responses[-1].command["Status"])  # type: ignore[call-overload]
    found = len(responses) - 1
    if status != 0 or found != kind.matches(layout):
        raise SystemExit(
            f"{peer.name}: {kind.name}: status 0x{status:04X}, {found} matches, "
            f"expected {kind.matches(layout)}"
        )
    return elapsed


async def measure(peer: Peer, layout: Layout, repeat: int) -> dict[str, list[float]]:
    """Latencies (ms) of each query kind over one association; checks each match count."""
    rng = random.Random(7)
    results: dict[str, list[float]] = {}
    async with await _connect(peer) as association:
        for kind in QUERIES:
            # The first two warm caches up.
            latencies = [
                await _query(peer, association, kind, layout, rng) for _ in range(repeat + 2)
            ]
            results[kind.name] = latencies[2:]
    return results


async def under_load(
    peer: Peer, layout: Layout, associations: int, seconds: float
) -> tuple[int, list[float]]:
    """Queries answered by `associations` clients querying back to back for `seconds`,
    and the C-ECHO latencies (ms) of a probe on its own association meanwhile."""
    stop = asyncio.Event()
    probe = asyncio.create_task(echo_probe(peer, stop))
    deadline = time.perf_counter() + seconds

    async def client(seed: int) -> int:
        rng = random.Random(seed)
        done = 0
        async with await _connect(peer) as association:
            while time.perf_counter() < deadline:
                await _query(peer, association, QUERIES[done % len(QUERIES)], layout, rng)
                done += 1
        return done

    counts = await asyncio.gather(*(client(seed) for seed in range(associations)))
    stop.set()
    return sum(counts), await probe


def send_files(peer: Peer, folders: list[Path]) -> float:
    """Store every file with one storescu process per folder; return seconds taken."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            ["storescu", "-aec", peer.ae_title, "127.0.0.1", str(peer.port), "+sd", str(f)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for f in folders
    ]
    for process in processes:
        _out, err = process.communicate(timeout=3600)
        if process.returncode != 0 or b"E:" in err:
            raise SystemExit(f"storescu to {peer.name} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - started


def _summary(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


@contextlib.contextmanager
def _database(backend: str, workdir: Path, postgres: object) -> Iterator[str]:
    """A fresh, migrated index URL on the backend."""
    if backend == "sqlite":
        url = f"sqlite:///{workdir / 'index.sqlite'}"
    else:
        url = postgres.create_database()  # type: ignore[attr-defined]
    upgrade(url)
    yield url


def _cell(figures: tuple[float, float]) -> str:
    return f"{figures[0]:.2f} / {figures[1]:.2f}"


def _print(rows: list[tuple[str, str, tuple[float, float]]], sizes: tuple[int, int]) -> None:
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for query, server, figures in rows:
        table.setdefault(query, {})[server] = figures
    servers = list(dict.fromkeys(server for _, server, _ in rows))
    header = f"{'query':32}" + "".join(f"{s:>26}" for s in servers)
    print(f"\nC-FIND latency, ms (median / p95); small = {sizes[0]}, large = {sizes[1]} instances")
    print(header)
    for query, by_server in table.items():
        cells = "".join(f"{_cell(by_server[s]) if s in by_server else '':>26}" for s in servers)
        print(f"{query:32}{cells}")
    print("\nratios of medians")
    for query, by_server in table.items():
        parts = []
        for server in servers:
            if not server.startswith("minipacs") or not server.endswith("small"):
                continue
            backend = server.removesuffix(" small")
            mine = by_server[server][0]
            if "orthanc small" in by_server:
                parts.append(f"orthanc/{backend} {by_server['orthanc small'][0] / mine:.2f}x")
            large = by_server.get(f"{backend} large")
            if large:
                parts.append(f"{backend} large/small {large[0] / mine:.2f}x")
        print(f"{query:32}  " + ", ".join(parts))


def main() -> None:
    """Fill the archives, measure every query kind on every server, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000, help="instances (C-STORE)")
    parser.add_argument("--large", type=int, default=1_000_000, help="instances (0: skip)")
    parser.add_argument("--repeat", type=int, default=40, help="queries of each kind")
    parser.add_argument("--backends", default="sqlite", help="sqlite,postgresql")
    parser.add_argument("--no-orthanc", action="store_true", help="skip Orthanc")
    parser.add_argument(
        "--load", type=int, default=8, help="associations querying at once for the probe (0: skip)"
    )
    args = parser.parse_args()
    small, large = Layout.of_size(args.small), Layout.of_size(args.large)
    backends = args.backends.split(",")
    postgres = None
    if "postgresql" in backends:
        from tests.pgserver import start_postgres

        postgres = start_postgres()
    rows: list[tuple[str, str, tuple[float, float]]] = []
    loads: list[tuple[str, int, list[float]]] = []

    def record(server: str, results: dict[str, list[float]]) -> None:
        for query, latencies in results.items():
            rows.append((query, server, _summary(latencies)))

    try:
        with tempfile.TemporaryDirectory(prefix="bench-find-") as tmp:
            root = Path(tmp)
            folders = catalog.write_files(root / "files", small)
            print(f"wrote {small.total} files", file=sys.stderr)
            if not args.no_orthanc:
                with orthanc() as peer:
                    seconds = send_files(peer, folders)
                    print(f"orthanc: stored in {seconds:.0f} s", file=sys.stderr)
                    record("orthanc small", asyncio.run(measure(peer, small, args.repeat)))
            for backend in backends:
                name = "minipacs" if backend == "sqlite" else "minipacs-pg"
                workdir = root / f"{backend}-small"
                workdir.mkdir()
                with (
                    _database(backend, workdir, postgres) as url,
                    minipacs(workdir, MINIPACS_DATABASE_URL=url) as peer,
                ):
                    seconds = send_files(peer, folders)
                    print(f"{name}: stored in {seconds:.0f} s", file=sys.stderr)
                    record(f"{name} small", asyncio.run(measure(peer, small, args.repeat)))
                    if args.load:
                        loads.append((name, *asyncio.run(under_load(peer, small, args.load, 10))))
                if not args.large:
                    continue
                workdir = root / f"{backend}-large"
                workdir.mkdir()
                with _database(backend, workdir, postgres) as url:
                    started = time.perf_counter()
                    catalog.fill_index(url, large)
                    print(
                        f"{name}: {large.total} rows in {time.perf_counter() - started:.0f} s",
                        file=sys.stderr,
                    )
                    with minipacs(workdir, MINIPACS_DATABASE_URL=url) as peer:
                        record(f"{name} large", asyncio.run(measure(peer, large, args.repeat)))
    finally:
        if postgres is not None:
            postgres.stop()
    _print(rows, (small.total, large.total))
    for name, queries, echoes in loads:
        median, p95 = _summary(echoes)
        print(
            f"\n{name}: {args.load} associations querying for 10 s: {queries / 10:.0f} "
            f"queries/s; C-ECHO probe meanwhile {median:.2f} ms median, {p95:.2f} ms p95, "
            f"{max(echoes):.2f} ms max ({len(echoes)} echoes)"
        )


if __name__ == "__main__":
    main()
