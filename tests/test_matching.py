"""Matching rules of PS3.4 C.2.2.2, unit by unit: query values, SQL patterns, Python tests."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, MetaData, String, Table, create_engine, insert, select

from minipacs.index.matching import (
    MatchError,
    like_pattern,
    parse_value,
    person_name_form,
    time_bound,
)


def test_like_pattern_maps_wildcards_and_escapes_sql_ones() -> None:
    assert like_pattern("A%B_C*D?") == "A\\%B\\_C%D_"
    assert like_pattern("back\\slash") == "back\\\\slash"


@pytest.mark.parametrize(
    ("vr", "values", "kind"),
    [
        ("PN", [], "universal"),
        ("PN", [""], "universal"),
        ("LO", ["*"], "universal"),
        ("LO", ["**"], "universal"),
        ("LO", ["AB*"], "wildcard"),
        ("LO", ["A?"], "wildcard"),
        ("LO", ["ABC"], "single"),
        ("DA", ["20240101"], "single"),
        ("DA", ["20240101-"], "range"),
        ("TM", ["-1200"], "range"),
        ("DT", ["20240101-20240102"], "range"),
        ("UI", ["1.2.3"], "single"),
        ("UI", ["1.2.3", "1.2.4"], "list"),
        ("CS", ["CT", "MR"], "single"),
    ],
)
def test_kinds_of_matching(vr: str, values: list[str], kind: str) -> None:
    assert parse_value(vr, values).kind == kind


@pytest.mark.parametrize(
    ("vr", "value"),
    [
        ("DA", "2024-01-01x"),
        ("DA", "2024"),
        ("TM", "25h"),
        ("DA", "-"),
        ("UI", "1.2.*"),
        ("UI", "../../etc"),
        ("DT", "2024x-"),
    ],
)
def test_malformed_values_are_refused(vr: str, value: str) -> None:
    with pytest.raises(MatchError):
        parse_value(vr, [value])


def test_time_bounds_cover_what_they_leave_out() -> None:
    assert time_bound("10", upper=False) == "100000"
    assert time_bound("1030", upper=True) == "103059.999999"
    assert time_bound("10:30:15", upper=True) == "103015.999999"
    assert time_bound("103015.5", upper=True) == "103015.599999"


def test_ranges_in_python() -> None:
    dates = parse_value("DA", ["20240101-20240131"])
    assert dates.test(["20240115"]) and dates.test(["2024.01.31"])
    assert not dates.test(["20240201"]) and not dates.test([""])
    times = parse_value("TM", ["1000-1030"])
    assert times.test(["103059.5"]) and not times.test(["103100"])
    stamps = parse_value("DT", ["20240101-20240101"])
    assert stamps.test(["20240101235959.123456+0100"]) and not stamps.test(["20240102"])


def test_person_names_match_per_component_group_ignoring_case() -> None:
    japanese = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert parse_value("PN", ["yamada^tarou"]).test([japanese])
    assert parse_value("PN", ["=山田^太郎"]).test([japanese])
    assert parse_value("PN", ["YAM*"]).test([japanese])
    assert not parse_value("PN", ["*太郎"]).test([japanese])  # "*" stays in its group
    assert parse_value("PN", ["doe^john"]).test(["DOE^JOHN^^^"])
    exact = parse_value("PN", ["Doe^John"], fold_case=False)
    assert exact.test(["Doe^John^"]) and not exact.test(["DOE^JOHN"])
    assert person_name_form("Doe^John^^=", fold_case=False) == "Doe^John"


def test_wildcards_in_python_treat_regex_characters_literally() -> None:
    matcher = parse_value("LO", ["A.B*"])
    assert matcher.test(["A.BCD"]) and not matcher.test(["AxBCD"])
    assert parse_value("LO", ["ACC%1"]).test(["ACC%1"])
    assert not parse_value("LO", ["ACC%1"]).test(["ACCzz1"])


def test_sql_conditions_on_a_real_database() -> None:
    engine = create_engine("sqlite://")
    table = Table("t", MetaData(), Column("v", String), Column("n", String))
    table.metadata.create_all(engine)
    values = ["ACC%1", "ACCzz1", "ACC_2", "ACCX2", "back\\slash", "", "DOE^JOHN=ドウ^ジョン"]
    with engine.begin() as connection:
        connection.execute(insert(table), [{"v": v, "n": v} for v in values])

    def matching(vr: str, *query: str) -> set[str]:
        condition = parse_value(vr, list(query), fold_case=False).sql(table.c.v)
        with engine.connect() as connection:
            return {row[0] for row in connection.execute(select(table.c.v).where(condition))}

    assert matching("LO", "ACC%1") == {"ACC%1"}
    assert matching("LO", "ACC_*") == {"ACC_2"}
    assert matching("LO", "ACC?2") == {"ACC_2", "ACCX2"}
    assert matching("LO", "back*") == {"back\\slash"}
    assert matching("PN", "DOE^JOHN") == {"DOE^JOHN=ドウ^ジョン"}
    assert matching("DA", "-99999999") == set()  # an empty value is in no range
