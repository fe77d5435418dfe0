"""C-FIND attribute matching (PS3.4 C.2.2.2): a query value becomes a matcher.

A matcher answers the same question twice: as a SQL condition on an index column, so
that the database does the filtering on indexed columns, and as a Python predicate on a
decoded value, for keys the index holds no column for (they are matched against the
stored header of each candidate the SQL already narrowed down, never skipped).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import ColumnElement, and_, or_, true
from sqlalchemy.sql.elements import ColumnElement as Column

from minipacs.index.records import normalise_name

# PS3.4 C.2.2.2.4: wildcards are not allowed for these VRs; "*" or "?" there is literal.
_NO_WILDCARD_VRS: Final = frozenset(
    {"DA", "TM", "DT", "UI", "SL", "SS", "UL", "US", "FL", "FD", "OB", "OW", "UN", "AT", "SV"}
)
RANGE_VRS: Final = frozenset({"DA", "TM", "DT"})
_TM: Final = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_DA: Final = re.compile(r"\d{8}")
_DT: Final = re.compile(r"\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?")
_UID: Final = re.compile(r"[0-9.]{1,64}")
_LIKE_ESCAPE: Final = "\\"


class MatchError(ValueError):
    """A query value that no matching rule accepts (e.g. a malformed date range)."""


@dataclass(frozen=True)
class Matcher:
    """How a key's value matches: kind is universal, single, wildcard, range or list."""

    kind: str
    vr: str
    values: tuple[str, ...] = ()
    low: str = ""
    high: str = ""
    # PN only: compare upper-case normalised names (PS3.4 C.2.2.2.1 allows either).
    fold_case: bool = False

    @property
    def universal(self) -> bool:
        """True when the key only asks for its value to be returned."""
        return self.kind == "universal"

    def sql(self, column: Column[str], folded: Column[str] | None = None) -> ColumnElement[bool]:
        """This match as a condition on a column (for PN, `folded` is the upper-case one)."""
        if self.kind == "universal":
            return true()
        target = folded if self.fold_case and folded is not None else column
        if self.kind == "range":
            return _sql_range(target, self.low, self.high)
        if self.vr == "PN":
            return or_(*(_pn_sql(target, value) for value in self.values))
        conditions = []
        for value in self.values:
            if self.kind == "wildcard" and _has_wildcard(value):
                conditions.append(target.like(like_pattern(value), escape=_LIKE_ESCAPE))
            else:
                conditions.append(target == value)
        return or_(*conditions) if len(conditions) > 1 else conditions[0]

    def test(self, stored: Sequence[str]) -> bool:
        """True when any of an entity's stored values matches (PS3.4 C.2.2.2)."""
        if self.kind == "universal":
            return True
        candidates = [self._form(value) for value in stored if value != ""]
        if self.vr == "PN":
            return any(_pn_test(q, value) for q in self.values for value in candidates)
        if self.kind == "range":
            return any(_in_range(self.vr, value, self.low, self.high) for value in candidates)
        if self.kind == "wildcard":
            tests = [_wildcard_test(v) if _has_wildcard(v) else v.__eq__ for v in self.values]
        else:
            tests = [v.__eq__ for v in self.values]
        return any(check(value) for check in tests for value in candidates)

    def _form(self, value: str) -> str:
        value = value.strip(" ")
        if self.vr == "PN":
            return person_name_form(value, self.fold_case)
        if self.vr == "DA" and len(value) == 10 and value[4] == value[7] == ".":
            return value.replace(".", "")
        if self.vr == "TM":
            return value.replace(":", "")
        return value


def person_name_form(value: str, fold_case: bool) -> str:
    """A PN value as matched: empty trailing components dropped, upper case when folding."""
    if fold_case:
        return normalise_name(value)
    groups = [group.rstrip("^ ") for group in value.split("=")]
    return "=".join(groups).rstrip("=")


def _pn_sql(column: Column[str], value: str) -> ColumnElement[bool]:
    # PS3.5 6.2.1.2: a query naming only some component groups (alphabetic, ideographic,
    # phonetic) matches on those; the rest is compared in Python (Matcher.test) since a
    # LIKE '%' could cross a group boundary.
    groups = value.split("=")
    pattern = "=".join(like_pattern(group) if group else "%" for group in groups)
    if all(groups) and not _has_wildcard(value):
        whole = column == value
    else:
        whole = column.like(pattern, escape=_LIKE_ESCAPE)
    return or_(whole, column.like(pattern + "=%", escape=_LIKE_ESCAPE))


def _pn_test(query: str, stored: str) -> bool:
    stored_groups = stored.split("=")
    for index, group in enumerate(query.split("=")):
        if not group:
            continue
        value = stored_groups[index] if index < len(stored_groups) else ""
        if not (_wildcard_test(group)(value) if _has_wildcard(group) else group == value):
            return False
    return True


def like_pattern(value: str) -> str:
    """A C-FIND wildcard value as a LIKE pattern: `*` and `?` mapped, `%` `_` escaped."""
    out = []
    for char in value:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_" + _LIKE_ESCAPE:
            out.append(_LIKE_ESCAPE + char)
        else:
            out.append(char)
    return "".join(out)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _wildcard_test(value: str) -> Callable[[str], bool]:
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
    compiled = re.compile(pattern, re.DOTALL)
    return lambda stored: compiled.fullmatch(stored) is not None


def _sql_range(column: Column[str], low: str, high: str) -> ColumnElement[bool]:
    # An empty stored value is unknown: it matches no range (PS3.4 C.2.2.2.5).
    conditions: list[ColumnElement[bool]] = [column != ""]
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= high)
    return and_(*conditions)


def _in_range(vr: str, value: str, low: str, high: str) -> bool:
    if vr == "DT":
        value = value[:26].split("+")[0].split("-")[0]
    if vr == "TM":
        value = value.split("-")[0]
    return (not low or value >= low) and (not high or value <= high)


def time_bound(value: str, upper: bool) -> str:
    """A TM range bound as HHMMSS.FFFFFF; an upper bound covers all it leaves out."""
    match = _TM.fullmatch(value.replace(":", ""))
    if match is None:
        raise MatchError(f"{value!r} is not a TM value (HHMMSS.FFFFFF)")
    hours, minutes, seconds, fraction = match.groups()
    fill = "9" if upper else "0"
    minutes = minutes or ("59" if upper else "00")
    seconds = seconds or ("59" if upper else "00")
    fraction = fill * 6 if fraction is None else fraction.ljust(6, fill)
    if not upper:
        return f"{hours}{minutes}{seconds}"
    return f"{hours}{minutes}{seconds}.{fraction}"


def _date_bound(value: str) -> str:
    if len(value) == 10 and value[4] == value[7] == ".":
        value = value.replace(".", "")
    if not _DA.fullmatch(value):
        raise MatchError(f"{value!r} is not a DA value (YYYYMMDD)")
    return value


def _datetime_bound(value: str, upper: bool) -> str:
    value = value.split("+")[0]
    if not _DT.fullmatch(value):
        raise MatchError(f"{value!r} is not a DT value (YYYYMMDDHHMMSS.FFFFFF)")
    if not upper:
        return value
    # YYYYMMDDHHMMSS.FFFFFF with what is left out filled with its largest digits.
    full = "99991231235959.999999"
    return value + full[len(value) :]


def _bound(vr: str, value: str, upper: bool) -> str:
    if not value:
        return ""
    if vr == "DA":
        return _date_bound(value)
    if vr == "TM":
        return time_bound(value, upper)
    return _datetime_bound(value, upper)


def parse_value(vr: str, values: Sequence[str], fold_case: bool = True) -> Matcher:
    """The matcher for a key's query values (already decoded; several when multi-valued)."""
    values = tuple(v.strip(" ") for v in values)
    values = tuple(v for v in values if v != "")
    fold = fold_case and vr == "PN"
    if not values or all(set(v) == {"*"} and vr not in _NO_WILDCARD_VRS for v in values):
        return Matcher("universal", vr)
    if vr in RANGE_VRS and len(values) == 1 and "-" in values[0]:
        low, _, high = values[0].partition("-")
        if vr == "DT" and high.count("-"):
            raise MatchError(f"{values[0]!r} is not a DT range")
        if not low and not high:
            raise MatchError("a range needs at least one bound")
        return Matcher("range", vr, low=_bound(vr, low, False), high=_bound(vr, high, True))
    if vr == "PN":
        values = tuple(person_name_form(v, fold) for v in values)
    if vr in RANGE_VRS:
        # Checked like range bounds; DA is kept in its YYYYMMDD form, TM and DT as sent.
        checked = tuple(_bound(vr, v, False) for v in values)
        values = checked if vr == "DA" else values
    if vr == "UI":
        for value in values:
            if not _UID.fullmatch(value):
                raise MatchError(f"{value!r} is not a UID (PS3.5 9.1; no wildcards in UI)")
        return Matcher("list" if len(values) > 1 else "single", vr, values)
    if vr not in _NO_WILDCARD_VRS and any(_has_wildcard(v) for v in values):
        return Matcher("wildcard", vr, values, fold_case=fold)
    return Matcher("single", vr, values, fold_case=fold)


def combined_datetime(
    date: Matcher, time: Matcher, date_column: Column[str], time_column: Column[str]
) -> ColumnElement[bool]:
    """Date and time ranges given together match as one date-time range (PS3.4 C.2.2.2.5)."""
    conditions: list[ColumnElement[bool]] = [date_column != ""]
    if date.low:
        if time.low:
            on_first_day = and_(date_column == date.low, time_column >= time.low)
            conditions.append(or_(date_column > date.low, on_first_day))
        else:
            conditions.append(date_column >= date.low)
    if date.high:
        if time.high:
            on_last_day = and_(date_column == date.high, time_column <= time.high)
            conditions.append(or_(date_column < date.high, on_last_day))
        else:
            conditions.append(date_column <= date.high)
    return and_(*conditions)
