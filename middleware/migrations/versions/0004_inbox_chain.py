"""A conversation's handled messages as a chain (inbox.prev_id, conversation.last_inbox_id) instead
of the (conversation_key, id) index over every inbox row.

That index served only the conversation view and the agent inbox's previews, and cost every
accepted message a write on a leaf of its conversation's region: one more page in the next commit
per message (conversations interleave), about a fifth of the store writer's work (bench/README.md).
A handled message now records the conversation's previous handled message in the UPDATE that
marks it done (which rewrote the row anyway), and the conversation its newest one in the UPDATE
that stores the turn's state; the views walk that chain by primary key. Pending messages keep
their partial index; flooded ones (never handled) get one of their own.

Existing handled messages are linked here, oldest first, with the old index still in place.
During a rolling upgrade a node of the previous version marks messages done without linking
them: they stay stored and deduplicated, but the conversation view does not list them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FLOODED = sa.text("status = 'flooded'")


def upgrade() -> None:
    with op.batch_alter_table("inbox") as batch:
        batch.add_column(sa.Column("prev_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("conversation") as batch:
        batch.add_column(sa.Column("last_inbox_id", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE inbox SET prev_id = (SELECT MAX(older.id) FROM inbox older"
        " WHERE older.conversation_key = inbox.conversation_key AND older.status = 'done' AND older.id < inbox.id)"
        " WHERE status = 'done'"
    )
    op.execute(
        'UPDATE conversation SET last_inbox_id = (SELECT MAX(id) FROM inbox WHERE conversation_key = conversation."key"'
        " AND status = 'done')"
    )
    op.create_index(
        "ix_inbox_flooded", "inbox", ["conversation_key", "id"], sqlite_where=FLOODED, postgresql_where=FLOODED
    )
    op.drop_index("ix_inbox_conversation", table_name="inbox")


def downgrade() -> None:
    op.create_index("ix_inbox_conversation", "inbox", ["conversation_key", "id"])
    op.drop_index("ix_inbox_flooded", table_name="inbox")
    with op.batch_alter_table("conversation") as batch:
        batch.drop_column("last_inbox_id")
    with op.batch_alter_table("inbox") as batch:
        batch.drop_column("prev_id")
