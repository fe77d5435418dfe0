"""SQLite planner statistics are computed at start and again as the index grows."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from bench import catalog
from minipacs.index.db import make_engine
from minipacs.index.schema import upgrade
from minipacs.index.statistics import MIN_GROWTH, StatisticsKeeper


def _stat_rows(url: str) -> int:
    engine = make_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT count(*) FROM sqlite_stat1")).scalar_one()
    engine.dispose()
    return int(rows)


def test_statistics_follow_growth(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    upgrade(url)
    catalog.fill_index(url, catalog.Layout(patients=5))
    engine = make_engine(url)
    keeper = StatisticsKeeper(engine, executor=None)  # type: ignore[arg-type]
    assert keeper.refresh()  # first run: always
    assert _stat_rows(url) > 0
    assert not keeper.refresh()  # nothing grew
    assert keeper.analyzed_at == 5 * 100
    keeper.analyzed_at = keeper.analyzed_at - MIN_GROWTH
    assert keeper.refresh()  # grown by MIN_GROWTH since the last run
    engine.dispose()
