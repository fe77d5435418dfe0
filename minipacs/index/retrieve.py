"""C-MOVE and C-GET identifiers become the instances to send (PS3.4 C.4.2.2.1, C.4.3.2.1).

A retrieve identifier names entities by unique keys only: a single value of the unique
key of each level above the retrieve level, and at the retrieve level a single value or
(for the UID levels) a list of UIDs. Other keys are not matching keys of a retrieve and
are ignored. `RetrieveQuery` reads the matching instances in pages ordered by instance
id (keyset pagination, as C-FIND does), so no retrieve holds a whole study in memory;
`summary` counts them per SOP class and transfer syntax first, which gives the number of
sub-operations and the presentation contexts they need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from sqlalchemy import ColumnElement, Engine, func

from minipacs.index.keys import IMAGE, PATIENT, UNIQUE_KEYS, InformationModel, key_for
from minipacs.index.matching import Matcher, MatchError, parse_value
from minipacs.index.models import Instance
from minipacs.index.query import (
    QueryError,
    check_levels_above,
    joined,
    key_tag,
    keyset_page,
    query_level,
    values_of,
)


@dataclass(frozen=True)
class RetrievePlan:
    """A checked retrieve identifier: its level and the unique keys that select instances."""

    model: InformationModel
    level: str
    keys: tuple[tuple[str, Matcher], ...]


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One instance to send: where its file is and what it holds."""

    id: int
    sop_class_uid: str
    sop_uid: str
    transfer_syntax: str
    rel_path: str
    size: int


def _is_single(matcher: Matcher) -> bool:
    return matcher.kind == "single" and len(matcher.values) == 1


def plan_retrieve(model: InformationModel, identifier: Dataset) -> RetrievePlan:
    """Check a C-MOVE/C-GET identifier against the model; raise QueryError."""
    level = query_level(model, identifier)
    wanted = model.levels[: model.levels.index(level) + 1]
    keys: dict[str, Matcher] = {}
    for upper in wanted:
        keyword = UNIQUE_KEYS[upper]
        tag = key_tag(keyword)
        vr = "UI" if upper != PATIENT else "LO"
        try:
            matcher = parse_value(vr, values_of(identifier, tag), fold_case=False)
        except (MatchError, ValueError, TypeError) as exc:
            raise QueryError(f"{keyword}: {exc}", tag) from exc
        keys[keyword] = matcher

    # PS3.4 C.4.2.2.1.1-3: the levels above are named by a single value of their key.
    check_levels_above(
        model, level, lambda keyword: _is_single(keys[keyword]), "retrieve", "PS3.4 C.4.2.2.1"
    )
    keyword = UNIQUE_KEYS[level]
    matcher = keys[keyword]
    # At the retrieve level: one value, or a list of UIDs (not of Patient IDs).
    if not (_is_single(matcher) or (matcher.kind == "list" and level != PATIENT)):
        what = "a single value" if level == PATIENT else "a single UID or a list of UIDs"
        raise QueryError(
            f"a {level} retrieve needs {what} of {keyword} (PS3.4 C.4.2.2.1)", key_tag(keyword)
        )
    return RetrievePlan(model, level, tuple(keys.items()))


class RetrieveQuery:
    """The instances a plan selects, counted and read page by page (blocking: executor)."""

    def __init__(self, plan: RetrievePlan, engine: Engine, page_size: int = 100) -> None:
        self.plan = plan
        self.engine = engine
        self.page_size = page_size
        conditions: list[ColumnElement[bool]] = []
        for keyword, matcher in plan.keys:
            conditions.append(matcher.sql(key_for(key_tag(keyword)).column))
        self._conditions = conditions

    def summary(self) -> dict[tuple[str, str], int]:
        """How many instances match, per (SOP class, transfer syntax)."""
        columns = (Instance.sop_class_uid, Instance.transfer_syntax)
        statement = (
            joined(IMAGE, (*columns, func.count(Instance.id)))
            .where(*self._conditions)
            .group_by(*columns)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(statement).all()
        return {(sop_class, syntax): count for sop_class, syntax, count in rows}

    def page(self, after: int = 0) -> tuple[Sequence[StoredInstance], int | None]:
        """The instances after instance id `after`, and the id to continue from (None: done)."""
        statement = (
            joined(
                IMAGE,
                (
                    Instance.id,
                    Instance.sop_class_uid,
                    Instance.sop_uid,
                    Instance.transfer_syntax,
                    Instance.rel_path,
                    Instance.size,
                ),
            )
            .where(*self._conditions)
            .order_by(Instance.id)
        )
        with self.engine.connect() as connection:
            rows, following = keyset_page(connection, statement, Instance.id, after, self.page_size)
        return [StoredInstance(*row) for row in rows], following
