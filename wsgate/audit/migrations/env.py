"""Alembic environment of the audit schema.

wsgate runs it programmatically (``wsgate.audit.store.migrate``) and passes
an open connection in ``config.attributes["connection"]``; no alembic.ini is
needed. For development, ``alembic -c wsgate/audit/migrations/alembic.ini``
with ``-x url=...`` works too.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from wsgate.audit.orm import VERSION_TABLE, Base

config = context.config


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url")
    if not url:
        raise SystemExit("give the database URL: alembic -x url=sqlite:///wsgate-audit.db ...")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()
