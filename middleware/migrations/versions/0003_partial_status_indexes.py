"""Status indexes only for the rows still to work on: pending messages and deliveries, dead letters.

`ix_inbox_pending` and `ix_outbox_pending` were (status, conversation_key, id) over every row: each
handled message and sent reply moved an entry into a `done`/`sent` region that only grows, one more
index page written per message. They become partial (WHERE status = 'pending'), and the dead-letter
list gets a small index of its own (it was served by the old outbox index's prefix).

Compatible both ways: the queries of the previous version still find their rows (a partial index
is used where it applies, the table otherwise); rows of every status stay where they are.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _where(status: str) -> dict[str, Any]:
    condition = sa.text(f"status = '{status}'")
    return {"sqlite_where": condition, "postgresql_where": condition}


def upgrade() -> None:
    op.drop_index("ix_inbox_pending", table_name="inbox")
    op.create_index("ix_inbox_pending", "inbox", ["conversation_key", "id"], **_where("pending"))
    op.drop_index("ix_outbox_pending", table_name="outbox")
    op.create_index("ix_outbox_pending", "outbox", ["conversation_key", "id"], **_where("pending"))
    op.create_index("ix_outbox_dead", "outbox", ["id"], **_where("dead"))


def downgrade() -> None:
    op.drop_index("ix_outbox_dead", table_name="outbox")
    op.drop_index("ix_outbox_pending", table_name="outbox")
    op.create_index("ix_outbox_pending", "outbox", ["status", "conversation_key", "id"])
    op.drop_index("ix_inbox_pending", table_name="inbox")
    op.create_index("ix_inbox_pending", "inbox", ["status", "conversation_key", "id"])
