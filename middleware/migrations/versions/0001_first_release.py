"""The first released schema: the tables as `SQLModel.metadata.create_all` made them before agent skills.

A database made by a version before migrations is recognised by its tables and stamped
(middleware/migrate.py): without `agent.skills` it is at this revision.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(length=128), nullable=False),
        sa.Column("message_id", sa.String(length=300), nullable=False),
        sa.Column("conversation_key", sa.String(length=400), nullable=False),
        sa.Column("body", sa.String(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("handled_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("platform", "message_id", name="uq_inbox_platform_message"),
    )
    op.create_index("ix_inbox_pending", "inbox", ["status", "conversation_key", "id"])
    op.create_index("ix_inbox_conversation", "inbox", ["conversation_key", "id"])
    op.create_table(
        "conversation",
        sa.Column("key", sa.String(length=400), nullable=False),
        sa.Column("platform", sa.String(length=128), nullable=False),
        sa.Column("external_id", sa.String(length=300), nullable=False),
        sa.Column("state", sa.String(), nullable=True),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=16), nullable=False),
        sa.Column("queue", sa.String(length=128), nullable=True),
        sa.Column("agent", sa.String(length=200), nullable=True),
        sa.Column("owner_since", sa.Float(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_conversation_owner", "conversation", ["owner"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_key", sa.String(length=400), nullable=False),
        sa.Column("platform", sa.String(length=128), nullable=False),
        sa.Column("body", sa.String(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=80), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        # unnamed, as create_all made it (PostgreSQL names it outbox_idempotency_key_key)
        sa.UniqueConstraint("idempotency_key"),
    )
    op.create_index("ix_outbox_pending", "outbox", ["status", "conversation_key", "id"])
    op.create_table(
        "timer",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_key", sa.String(length=400), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("due_at", sa.Float(), nullable=False),
        sa.Column("payload", sa.String(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_timer_conversation", "timer", ["conversation_key", "name", "status"])
    op.create_index("ix_timer_due", "timer", ["status", "due_at"])
    op.create_table(
        "ownership",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_key", sa.String(length=400), nullable=False),
        sa.Column("before", sa.String(length=16), nullable=False),
        sa.Column("after", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ownership_conversation", "ownership", ["conversation_key", "id"])
    op.create_table(
        "user_vars",
        sa.Column("key", sa.String(length=400), nullable=False),
        sa.Column("vars", sa.String(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "agent",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("password_hash", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "agent_session",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("agent", sa.String(length=200), nullable=False),
        sa.Column("csrf", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_index("ix_agent_session_agent", "agent_session", ["agent"])
    op.create_index("ix_agent_session_expires", "agent_session", ["expires_at"])
    op.create_table(
        "node",
        sa.Column("node_id", sa.String(length=180), nullable=False),
        sa.Column("incarnation", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=300), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("pid_start", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("node_id"),
    )


def downgrade() -> None:
    for table in (
        "node",
        "agent_session",
        "agent",
        "user_vars",
        "ownership",
        "timer",
        "outbox",
        "conversation",
        "inbox",
    ):
        op.drop_table(table)
