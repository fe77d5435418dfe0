"""alembic environment: migrates the database named in the Config built by minipacs.index.schema.

Online mode connects with minipacs' own engine settings (SQLite pragmas, psycopg 3); offline
mode (`--sql`) prints the SQL for a DBA to run.
"""

from __future__ import annotations

from alembic import context

from minipacs.index.db import is_sqlite, make_engine
from minipacs.index.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or ""
# SQLite cannot ALTER most things: later revisions use batch mode (copy and move) there.
options = {"target_metadata": Base.metadata, "render_as_batch": is_sqlite(url)}

if context.is_offline_mode():
    context.configure(url=url, literal_binds=True, **options)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **options)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
