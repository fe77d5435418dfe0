"""C-FIND identifiers become SQL over the index (PS3.4 C.4.1.2, hierarchical search).

`plan_find` checks an identifier against its information model and turns each key into
a term: a SQL condition on an indexed column where the index has one, a Python test on
the stored header where it has not (applied only to rows SQL already matched, so no
key is ever dropped and no match widened). `FindQuery.page` runs the query in pages
ordered by the level's primary key (keyset pagination): memory stays flat whatever the
number of matches, and each page is one short read transaction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from sqlalchemy import ColumnElement, Connection, Engine, Select, exists, func, select

from minipacs import dataset as dicom
from minipacs.index.keys import (
    IMAGE,
    LEVELS,
    PATIENT,
    SERIES,
    STUDY,
    TABLES,
    UNIQUE_KEYS,
    InformationModel,
    Key,
    dictionary_vr,
    key_for,
)
from minipacs.index.matching import Matcher, MatchError, combined_datetime, parse_value
from minipacs.index.models import Instance, Patient, Series, Study

QUERY_RETRIEVE_LEVEL: Final = 0x00080052
SPECIFIC_CHARACTER_SET: Final = 0x00080005
RETRIEVE_AE_TITLE: Final = 0x00080054
INSTANCE_AVAILABILITY: Final = 0x00080056
# Request-only or not held by the index: answered as constants or left empty.
_QUERY_RETRIEVE_VIEW: Final = 0x00080053
_TIMEZONE_OFFSET: Final = 0x00080201
_CONSTANT_TAGS: Final = (RETRIEVE_AE_TITLE, INSTANCE_AVAILABILITY, _TIMEZONE_OFFSET)
# Date and time keys that match as one date-time range when both are ranges (C.2.2.2.5).
_DATE_TIME_PAIRS: Final = ((0x00080020, 0x00080030), (0x00080021, 0x00080031))


class QueryError(ValueError):
    """An identifier the model refuses; `tag` names the offending element when known."""

    def __init__(self, message: str, tag: int | None = None) -> None:
        super().__init__(message)
        self.tag = tag


@dataclass(frozen=True)
class Term:
    """One key of the identifier: how it matches and where its value comes from."""

    tag: int
    vr: str
    key: Key
    matcher: Matcher
    # False for a key below the query level: returned empty, not matched (0xFF01).
    supported: bool = True
    # Sequence keys: the request's item, i.e. the sub-keys to match and return.
    item: Dataset | None = None
    # Sub-keys of a sequence key's item that carry values (PS3.4 C.2.2.2.6).
    item_terms: tuple[Term, ...] = ()

    @property
    def from_header(self) -> bool:
        """True when the value comes from the stored header (no column holds it)."""
        return self.key.source == "header" and self.supported

    @property
    def filters_in_python(self) -> bool:
        """True when rows need a Python test for this key after SQL matched them."""
        if not self.supported:
            return False
        if self.key.source == "header":
            return not self.matcher.universal or bool(self.item_terms)
        if self.key.source == "integer":
            return self.matcher.kind in ("wildcard", "range")
        # PN component groups and wildcards are re-checked exactly (see matching._pn_sql).
        return self.vr == "PN" and not self.matcher.universal

    def test(self, element: DataElement | None, folded_value: Any = None) -> bool:
        """True when a stored element (or an index value) matches this key."""
        if self.item_terms:
            items = element.value if element is not None and element.VR == "SQ" else []
            return any(all(t.test(item.get(t.tag)) for t in self.item_terms) for item in items)
        if folded_value is not None or element is None:
            return self.matcher.test(strings(folded_value))
        return self.matcher.test(strings(element.value))


@dataclass(frozen=True)
class FindPlan:
    """A checked identifier: level, terms, and the client's character set."""

    model: InformationModel
    level: str
    terms: tuple[Term, ...]
    charset: tuple[str, ...]
    # True when some key is not supported for matching or return (status 0xFF01).
    unsupported: bool

    @property
    def needs_header(self) -> bool:
        """True when some key is matched or answered from the stored header."""
        return any(term.from_header for term in self.terms)


def strings(value: Any) -> list[str]:
    """A decoded element value as a list of strings (empty when it has no value)."""
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value if v is not None]
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    return [str(value)]


def _is_single(term: Term | None) -> bool:
    return term is not None and term.matcher.kind == "single" and len(term.matcher.values) == 1


def _term(element: DataElement, model: InformationModel, level: str, fold_pn: bool) -> Term:
    tag = int(element.tag)
    key = key_for(tag)
    vr = element.VR if element.VR not in ("UN", None) else dictionary_vr(tag)
    supported = LEVELS.index(model.level_of(key.level)) <= LEVELS.index(level)
    if vr == "SQ":
        items = element.value or []
        if len(items) > 1:
            raise QueryError(f"{key.keyword}: a sequence key has at most one item", tag)
        item = items[0] if items else None
        sub_terms = tuple(_sub_term(sub, fold_pn) for sub in (item or []) if strings(_plain(sub)))
        return Term(tag, vr, key, Matcher("universal", vr), supported, item, sub_terms)
    try:
        matcher = parse_value(vr, strings(element.value), fold_pn)
    except MatchError as exc:
        raise QueryError(f"{key.keyword}: {exc}", tag) from exc
    integers = key.source == "integer" and matcher.kind in ("single", "list")
    if integers and not all(v.lstrip("+-").isdigit() for v in matcher.values):
        raise QueryError(f"{key.keyword}: {matcher.values[0]!r} is not an integer", tag)
    return Term(tag, vr, key, matcher, supported)


def _plain(element: DataElement) -> Any:
    return None if element.VR == "SQ" else element.value


def _sub_term(element: DataElement, fold_pn: bool) -> Term:
    tag = int(element.tag)
    key = key_for(tag)
    try:
        matcher = parse_value(element.VR, strings(element.value), fold_pn)
    except MatchError as exc:
        raise QueryError(f"{key.keyword}: {exc}", tag) from exc
    return Term(tag, element.VR, Key(key.keyword, key.level, "header"), matcher)


def values_of(identifier: Dataset, tag: int) -> list[str]:
    """The string values of one element of an identifier (none when absent or empty)."""
    element = identifier.get(tag)
    return strings(element.value) if element is not None else []


def query_level(model: InformationModel, identifier: Dataset) -> str:
    """The identifier's Query/Retrieve Level, checked against the model; raise QueryError."""
    level_value = values_of(identifier, QUERY_RETRIEVE_LEVEL)
    if not level_value:
        raise QueryError("Query/Retrieve Level (0008,0052) is missing", QUERY_RETRIEVE_LEVEL)
    level = level_value[0].strip().upper()
    if level not in model.levels:
        raise QueryError(
            f"Query/Retrieve Level {level!r} is not one of {'/'.join(model.levels)} ({model.name})",
            QUERY_RETRIEVE_LEVEL,
        )
    return level


def check_levels_above(
    model: InformationModel,
    level: str,
    is_single: Callable[[str], bool],
    request: str = "query",
    rule: str = "hierarchical search, PS3.4 C.4.1.3.1.1",
) -> None:
    """Each level above `level` must be named by its unique key with a single value."""
    for upper in model.levels[: model.levels.index(level)]:
        keyword = UNIQUE_KEYS[upper]
        if not is_single(keyword):
            raise QueryError(
                f"a {level} {request} needs a single value of {keyword} ({rule})",
                key_tag(keyword),
            )


def plan_find(model: InformationModel, identifier: Dataset, fold_pn: bool = True) -> FindPlan:
    """Check an identifier against the model's hierarchical rules; raise QueryError."""
    level = query_level(model, identifier)
    charset = tuple(values_of(identifier, SPECIFIC_CHARACTER_SET))
    terms = []
    for element in identifier:
        tag = int(element.tag)
        if tag & 0xFFFF == 0 or tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET):
            continue
        if tag == _QUERY_RETRIEVE_VIEW:
            continue
        if tag in _CONSTANT_TAGS:
            key = Key(key_for(tag).keyword, PATIENT, "constant")
            terms.append(Term(tag, element.VR, key, Matcher("universal", element.VR)))
            continue
        try:
            terms.append(_term(element, model, level, fold_pn))
        except (ValueError, TypeError) as exc:
            if isinstance(exc, QueryError):
                raise
            # pydicom decodes values lazily: a malformed IS/DS/US value raises here.
            raise QueryError(
                f"{key_for(tag).keyword}: value cannot be decoded ({exc})", tag
            ) from exc
    by_keyword = {term.key.keyword: term for term in terms}
    # PS3.4 C.4.1.3.1.1: each level above the query level is named by its unique key,
    # with single value matching.
    check_levels_above(model, level, lambda keyword: _is_single(by_keyword.get(keyword)))
    return FindPlan(model, level, tuple(terms), charset, any(not term.supported for term in terms))


def key_tag(keyword: str) -> int:
    """The tag of a key named by keyword."""
    return int(tag_for_keyword(keyword))  # type: ignore[arg-type]


@dataclass
class Match:
    """One matching entity: its index values by tag, and the header of an instance of it."""

    entity_id: int
    values: dict[int, Any]
    header: Dataset | None = None
    sop_classes: list[str] = field(default_factory=list)


def joined(level: str, columns: Sequence[Any], top: str = PATIENT) -> Select[Any]:
    """SELECT columns from a level's table, joined up to the `top` level (default: all)."""
    statement = select(*columns).select_from(TABLES[level])
    upward = (
        (IMAGE, Series, Instance.series_fk == Series.id),
        (SERIES, Study, Series.study_fk == Study.id),
        (STUDY, Patient, Study.patient_fk == Patient.id),
    )
    for child, parent, on in upward:
        if LEVELS.index(top) < LEVELS.index(child) <= LEVELS.index(level):
            statement = statement.join(parent, on)
    return statement


def _top_level(plan: FindPlan) -> str:
    """The highest level whose table a supported key reads or matches (joins stop there)."""
    levels = [plan.level]
    for term in plan.terms:
        if term.supported and term.key.source not in ("header", "constant"):
            # Computed study keys correlate with the study row.
            levels.append(
                STUDY if term.key.source in ("modalities", "sop_classes") else term.key.level
            )
    return min(levels, key=LEVELS.index)


def keyset_page(
    connection: Connection, statement: Select[Any], id_column: Any, after: int, size: int
) -> tuple[Sequence[Any], int | None]:
    """Rows of a statement ordered by id_column after id `after`, and the id to go on from."""
    # Keyset pagination: each page is one short indexed read, whatever the number of rows;
    # the continuation is None once a page comes back short (the last one).
    rows = connection.execute(statement.where(id_column > after).limit(size)).all()
    return rows, rows[-1][0] if len(rows) == size else None


def _representative(level: str) -> Any:
    """The lowest instance id of the current entity: whose header answers header keys."""
    if level == IMAGE:
        return Instance.id
    lowest = select(func.min(Instance.id))
    if level == SERIES:
        return lowest.where(Instance.series_fk == Series.id).scalar_subquery()
    lowest = lowest.join(Series, Instance.series_fk == Series.id)
    if level == STUDY:
        return lowest.where(Series.study_fk == Study.id).scalar_subquery()
    return (
        lowest.join(Study, Series.study_fk == Study.id)
        .where(Study.patient_fk == Patient.id)
        .scalar_subquery()
    )


def _condition(term: Term) -> ColumnElement[bool] | None:
    matcher = term.matcher
    key = term.key
    if not term.supported or matcher.universal or key.source in ("header", "constant"):
        return None
    if key.source == "integer":
        if matcher.kind in ("wildcard", "range"):
            return None
        return key.column.in_([int(v) for v in matcher.values])
    if key.source == "modalities":
        return exists(
            select(Series.id).where(Series.study_fk == Study.id, matcher.sql(Series.modality))
        )
    if key.source == "sop_classes":
        return exists(
            select(Instance.id)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.study_fk == Study.id, matcher.sql(Instance.sop_class_uid))
        )
    return matcher.sql(key.column, key.folded)


class FindQuery:
    """Runs a plan against the index one page at a time (blocking: use an executor)."""

    def __init__(
        self,
        plan: FindPlan,
        engine: Engine,
        read_file_header: Callable[[str], Dataset],
        page_size: int = 200,
    ) -> None:
        self.plan = plan
        self.engine = engine
        self.read_file_header = read_file_header
        self.page_size = page_size
        table = TABLES[plan.level]
        self._id = table.id
        self._columns: dict[int, Any] = {}
        self._folded: dict[int, Any] = {}
        conditions = []
        by_tag = {term.tag: term for term in plan.terms if term.supported}
        combined: set[int] = set()
        for date_tag, time_tag in _DATE_TIME_PAIRS:
            date, time = by_tag.get(date_tag), by_tag.get(time_tag)
            if date and time and date.matcher.kind == time.matcher.kind == "range":
                conditions.append(
                    combined_datetime(date.matcher, time.matcher, date.key.column, time.key.column)
                )
                combined |= {date_tag, time_tag}
        for term in plan.terms:
            if term.supported and term.key.column is not None:
                self._columns[term.tag] = term.key.column
                if term.vr == "PN" and term.matcher.fold_case:
                    self._folded[term.tag] = term.key.folded
            condition = None if term.tag in combined else _condition(term)
            if condition is not None:
                conditions.append(condition)
        self._python_terms = [term for term in plan.terms if term.filters_in_python]
        selected = [
            self._id,
            *(column.label(f"c{tag}") for tag, column in self._columns.items()),
            *(column.label(f"f{tag}") for tag, column in self._folded.items()),
        ]
        self._wants_sop_classes = any(
            term.key.source == "sop_classes" and term.supported for term in plan.terms
        )
        if self._wants_sop_classes:
            selected.append(Study.id.label("study"))
        # Computed once: page() asks for every row.
        self._needs_header = plan.needs_header
        if self._needs_header:
            selected.append(_representative(plan.level).label("representative"))
        statement = joined(plan.level, selected, _top_level(plan))
        self._statement = statement.where(*conditions).order_by(self._id)

    def page(self, after: int = 0) -> tuple[list[Match], int | None]:
        """The matches after entity id `after`, and the id to continue from (None: done)."""
        with self.engine.connect() as connection:
            rows, following = keyset_page(
                connection, self._statement, self._id, after, self.page_size
            )
            headers = self._headers(connection, rows) if self._needs_header else {}
            sop_classes = self._sop_classes(connection, rows) if self._wants_sop_classes else {}
        matches = []
        for row in rows:
            mapping = row._mapping
            values = {tag: mapping[f"c{tag}"] for tag in self._columns}
            folded = {tag: mapping[f"f{tag}"] for tag in self._folded}
            header = headers.get(row.representative) if self._needs_header else None
            classes = sop_classes.get(row.study, []) if self._wants_sop_classes else []
            match = Match(row[0], values, header, classes)
            if all(self._passes(term, match, folded) for term in self._python_terms):
                matches.append(match)
        return matches, following

    def _passes(self, term: Term, match: Match, folded: dict[int, Any]) -> bool:
        if term.key.source == "header":
            return match.header is not None and term.test(match.header.get(term.tag))
        value = folded.get(term.tag, match.values.get(term.tag))
        return term.test(None, "" if value is None else str(value))

    def _headers(self, connection: Connection, rows: Sequence[Any]) -> dict[int, Dataset]:
        wanted = {row.representative for row in rows if row.representative is not None}
        if not wanted:
            return {}
        found = connection.execute(
            select(Instance.id, Instance.header, Instance.transfer_syntax, Instance.rel_path).where(
                Instance.id.in_(wanted)
            )
        )
        headers = {}
        for instance_id, header, syntax, rel_path in found:
            if header is None:
                headers[instance_id] = self.read_file_header(rel_path)
            else:
                headers[instance_id] = dicom.read_header(header, dicom.header_syntax(syntax))
        return headers

    def _sop_classes(self, connection: Connection, rows: Sequence[Any]) -> dict[int, list[str]]:
        studies = {row.study for row in rows}
        if not studies:
            return {}
        found = connection.execute(
            select(Series.study_fk, Instance.sop_class_uid)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.study_fk.in_(studies))
            .distinct()
        )
        classes: defaultdict[int, list[str]] = defaultdict(list)
        for study, sop_class in found:
            classes[study].append(sop_class)
        return {study: sorted(uids) for study, uids in classes.items()}
