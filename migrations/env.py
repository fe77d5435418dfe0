"""alembic environment: migrates the database named in the Config, online only."""

from __future__ import annotations

from alembic import context

from minipacs.index.db import make_engine
from minipacs.index.models import Base

config = context.config
engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
