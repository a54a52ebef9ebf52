"""Alembic's environment: run by middleware/migrate.py (Store.start, `switchboard migrate`), never by
the `alembic` command with an alembic.ini. The connection, already in a transaction (and holding the
PostgreSQL advisory lock), comes in `config.attributes["connection"]`; `--sql` runs offline from a URL.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

import middleware.store  # noqa: F401  (registers the tables in SQLModel.metadata)

config = context.config


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """sqlmodel's AutoString is a VARCHAR: new migrations say sa.String, not sqlmodel's type."""
    if type_ == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length else "sa.String()"
    return False


def _include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Autogenerate looks only at Switchboard's tables (a shared database may hold others)."""
    return type_ != "table" or name in SQLModel.metadata.tables


options: dict[str, Any] = {
    "target_metadata": SQLModel.metadata,
    # SQLite alters most things by copying the table: batch mode does that, PostgreSQL alters in place
    "render_as_batch": True,
    "compare_type": True,
    "render_item": _render_item,
    "include_name": _include_name,
}

if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, **options)
else:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("Switchboard's migrations run through `switchboard migrate`, not the alembic command")
    context.configure(connection=connection, **options)

with context.begin_transaction():
    context.run_migrations()
