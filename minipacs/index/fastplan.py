"""A batch of new instances as the index writer's fast path writes it (index.fastpath).

What both dialects share: the instances columns in their INSERT order, the lock order of
the count updates, the lookup of series chains, and the plan of a batch's rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from minipacs.index.ingest import InstanceRecord

# The instances columns a record fills, in the INSERT's order.
COLUMNS = (
    "series_fk",
    "sop_uid",
    "sop_class_uid",
    "instance_number",
    "transfer_syntax",
    "number_of_frames",
    "rows",
    "columns",
    "rel_path",
    "size",
    "received_at",
    "calling_ae",
    "charset",
    "header",
)
# Lock order of the count updates, as in ingest._Pending: patients, studies, series.
LEVELS = ("patients", "studies", "series")
# The (series, study, patient) chains of series, by Series Instance UID (a WHERE follows).
CHAINS = (
    "SELECT series.series_uid, series.id, series.study_fk, studies.patient_fk"
    " FROM series JOIN studies ON studies.id = series.study_fk"
)


@dataclass(frozen=True)
class Batch:
    """What the writer hands over: records, their unsynced tokens, tokens to drop."""

    records: Sequence[InstanceRecord]
    unsynced: Sequence[str | None]
    settled: Sequence[str]


@dataclass
class Plan:
    """A batch's rows, once its lookups allow this path."""

    # Instances rows in COLUMNS order, values as the record holds them.
    rows: list[tuple[Any, ...]]
    # Per level, (row id, instances added) in id order: the lock order.
    counts: dict[str, list[tuple[int, int]]]
    # (token, rel_path, sop_uid) of the records listed as unsynced.
    listed: list[tuple[str, str, str]]
    # Per level, row id -> count columns (num_studies, num_series) to add to besides
    # num_instances, for the rows above new series (PostgreSQL).
    grown: dict[str, dict[int, dict[str, int]]] = field(default_factory=dict)


def plan_batch(
    records: Sequence[InstanceRecord],
    unsynced: Sequence[str | None],
    chain_rows: Sequence[tuple[Any, ...]],
    grown: dict[str, dict[int, dict[str, int]]] | None = None,
) -> Plan:
    """The rows of a batch of new instances, given the chains of all its series."""
    chains = {uid: (series, study, patient) for uid, series, study, patient in chain_rows}
    rows = []
    counts: dict[str, Counter[int]] = {level: Counter() for level in LEVELS}
    for record in records:
        series, study, patient = chains[record.series_uid]
        rows.append(_values(record, series))
        counts["series"][series] += 1
        counts["studies"][study] += 1
        counts["patients"][patient] += 1
    listed = [
        (token, r.rel_path, r.sop_uid)
        for r, token in zip(records, unsynced, strict=True)
        if token is not None
    ]
    ordered = {level: sorted(counts[level].items()) for level in LEVELS}
    return Plan(rows, ordered, listed, grown or {})


def _values(record: InstanceRecord, series: int) -> tuple[Any, ...]:
    """A record's instances row, in COLUMNS order."""
    return (
        series,
        record.sop_uid,
        record.sop_class_uid,
        record.instance_number,
        record.transfer_syntax,
        record.number_of_frames,
        record.rows,
        record.columns,
        record.rel_path,
        record.size,
        record.received_at,
        record.calling_ae,
        record.charset,
        record.header,
    )
