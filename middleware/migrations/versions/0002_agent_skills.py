"""agent.skills: what an agent can take (languages, topics), matched against queues' `skills`.

Additive: nodes of the previous version keep working beside it (they never name the column, and
its default fills it for the agents they add).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agent") as batch:
        batch.add_column(sa.Column("skills", sa.String(length=1000), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("agent") as batch:
        batch.drop_column("skills")
