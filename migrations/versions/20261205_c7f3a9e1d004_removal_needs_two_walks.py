"""A task is marked removed only when two complete walks in a row miss it.

Adds tasks.unlisted_after: set by a complete walk that did not list the
task, to when the task was last observed listed; cleared by the next
complete walk that lists it. A list that shifts between the pages of one
walk can hide a live task from that walk, but hardly from the next one too.
Existing tasks start unflagged, so a task already missing needs two more
complete walks to be marked removed.

Revision ID: c7f3a9e1d004
Revises: a3d1c0f2b001
Create Date: 2026-12-05 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c7f3a9e1d004"
down_revision: str | None = "a3d1c0f2b001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable ADD COLUMN: no table rebuild on SQLite, no rewrite on
    # PostgreSQL, however many tasks are stored.
    op.add_column(
        "tasks",
        sa.Column(
            "unlisted_after",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="set when a complete walk did not list the task: when it was "
            "last observed listed; the next complete walk that misses it too "
            "marks it removed; empty while listed",
        ),
    )
    # Partial: it holds only the few flagged tasks, which every complete
    # walk reads, and costs nothing to the writes of the others.
    op.create_index(
        "ix_tasks_flagged",
        "tasks",
        ["user_id", "sub_user_id"],
        sqlite_where=sa.text("unlisted_after IS NOT NULL"),
        postgresql_where=sa.text("unlisted_after IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_flagged", table_name="tasks")
    op.drop_column("tasks", "unlisted_after")
