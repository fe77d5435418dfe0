"""What the index holds: entity counts and stored bytes."""

from __future__ import annotations

from sqlalchemy import Engine, func, select

from minipacs.index.models import Instance, Patient, Series, Study


def counts(engine: Engine) -> dict[str, int]:
    """Patients, studies, series, instances and bytes (sum of instance sizes) in the index."""
    query = select(
        select(func.count(Patient.id)).scalar_subquery(),
        select(func.count(Study.id)).scalar_subquery(),
        select(func.count(Series.id)).scalar_subquery(),
        select(func.count(Instance.id)).scalar_subquery(),
        select(func.coalesce(func.sum(Instance.size), 0)).scalar_subquery(),
    )
    with engine.connect() as connection:
        row = connection.execute(query).one()
    keys = ("patients", "studies", "series", "instances", "bytes")
    return {key: int(value) for key, value in zip(keys, row, strict=True)}
