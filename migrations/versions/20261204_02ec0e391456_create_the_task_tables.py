"""Create the task tables: accounts, groups, tasks, history, runs, rejects.

Revision ID: 02ec0e391456
Revises:
Create Date: 2026-12-04 14:24:49.280687
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "02ec0e391456"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column(
            "user_id", sa.String(length=200), nullable=False, comment="main account id"
        ),
        sa.Column(
            "sub_user_id",
            sa.String(length=200),
            nullable=False,
            comment="sub-account id; empty for the main account's own tasks",
        ),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "origin",
            sa.String(length=20),
            nullable=False,
            comment="configured or discovered",
        ),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "last_sync_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="start of the last walk",
        ),
        sa.Column(
            "last_success_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="end of the last walk that ended",
        ),
        sa.Column(
            "last_complete_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment=(
                "start of the last complete, unfiltered walk: every task it "
                "listed was observed at or after this moment"
            ),
        ),
        sa.Column(
            "last_outcome",
            sa.String(length=20),
            nullable=True,
            comment="succeeded, failed or stopped",
        ),
        sa.Column(
            "last_error",
            sa.Text(),
            nullable=True,
            comment="one line; empty after a success",
        ),
        sa.Column("last_run_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("user_id", "sub_user_id", name=op.f("pk_accounts")),
    )
    op.create_table(
        "groups",
        sa.Column(
            "id",
            sa.String(length=200),
            nullable=False,
            comment="the platform's script group id",
        ),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_groups")),
    )
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column(
            "kind",
            sa.String(length=20),
            nullable=False,
            comment="sync, backfill or replay",
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "outcome",
            sa.String(length=20),
            nullable=False,
            comment="running, succeeded, partial, failed, stopped or abandoned",
        ),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("accounts", sa.Integer(), nullable=False),
        sa.Column("accounts_failed", sa.Integer(), nullable=False),
        sa.Column("pages", sa.Integer(), nullable=False),
        sa.Column("tasks_seen", sa.Integer(), nullable=False),
        sa.Column("tasks_new", sa.Integer(), nullable=False),
        sa.Column("tasks_changed", sa.Integer(), nullable=False),
        sa.Column("tasks_removed", sa.Integer(), nullable=False),
        sa.Column("tasks_restored", sa.Integer(), nullable=False),
        sa.Column("status_changes", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.Column("bad_values", sa.Integer(), nullable=False),
        sa.Column(
            "error", sa.Text(), nullable=True, comment="one line per failed account"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_runs")),
    )
    op.create_index(op.f("ix_sync_runs_started_at"), "sync_runs", ["started_at"])

    op.create_table(
        "tasks",
        sa.Column(
            "uuid",
            sa.String(length=200),
            nullable=False,
            comment="the platform's id; not a UUID",
        ),
        sa.Column(
            "user_id",
            sa.String(length=200),
            nullable=False,
            comment="owning main account",
        ),
        sa.Column(
            "sub_user_id",
            sa.String(length=200),
            nullable=False,
            comment="empty for the main account",
        ),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column(
            "status",
            sa.Integer(),
            nullable=True,
            comment="1 paused, 2 running, 3 waiting; else kept",
        ),
        sa.Column(
            "status_str",
            sa.Text(),
            nullable=True,
            comment="the platform's text for the status",
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="create_datetime, in UTC",
        ),
        sa.Column(
            "altered_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="alter_datetime, in UTC",
        ),
        sa.Column("maximumcall", sa.BigInteger(), nullable=True),
        sa.Column("dial_time_id", sa.String(length=200), nullable=True),
        sa.Column(
            "destination_extension",
            sa.String(length=200),
            nullable=True,
            comment="script group id as sent",
        ),
        sa.Column("caller_line_id", sa.String(length=200), nullable=True),
        sa.Column("bridge_group_id", sa.String(length=200), nullable=True),
        sa.Column(
            "group_id",
            sa.String(length=200),
            nullable=True,
            comment="id of the embedded script group",
        ),
        sa.Column("enable", sa.Boolean(), nullable=True),
        sa.Column("remark", sa.Text(), nullable=True),
        sa.Column(
            "raw",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
            comment="the item as received",
        ),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "status_seen_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="when the current status was first observed",
        ),
        sa.Column(
            "removed_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="when the platform stopped listing it",
        ),
        sa.PrimaryKeyConstraint("uuid", name=op.f("pk_tasks")),
    )
    op.create_index(op.f("ix_tasks_status"), "tasks", ["status"])
    op.create_index(
        op.f("ix_tasks_user_id_sub_user_id"), "tasks", ["user_id", "sub_user_id"]
    )

    op.create_table(
        "sync_rejects",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("sub_user_id", sa.String(length=200), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("page", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "item",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=True,
            comment="as received, sensitive values redacted",
        ),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name=op.f("fk_sync_rejects_run_id_sync_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_rejects")),
    )
    op.create_index(op.f("ix_sync_rejects_run_id"), "sync_rejects", ["run_id"])

    op.create_table(
        "task_status_changes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_uuid", sa.String(length=200), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column(
            "event",
            sa.String(length=20),
            nullable=False,
            comment="first_seen, changed, removed or restored",
        ),
        sa.Column("old_status", sa.Integer(), nullable=True),
        sa.Column("old_status_str", sa.Text(), nullable=True),
        sa.Column("new_status", sa.Integer(), nullable=True),
        sa.Column("new_status_str", sa.Text(), nullable=True),
        sa.Column(
            "old_seen_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="last observation of the old state: the change happened after",
        ),
        sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sync_runs.id"],
            name=op.f("fk_task_status_changes_run_id_sync_runs"),
        ),
        sa.ForeignKeyConstraint(
            ["task_uuid"],
            ["tasks.uuid"],
            name=op.f("fk_task_status_changes_task_uuid_tasks"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_status_changes")),
    )
    op.create_index(
        op.f("ix_task_status_changes_observed_at"),
        "task_status_changes",
        ["observed_at"],
    )
    op.create_index(
        op.f("ix_task_status_changes_task_uuid_observed_at"),
        "task_status_changes",
        ["task_uuid", "observed_at"],
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_task_status_changes_task_uuid_observed_at"),
        table_name="task_status_changes",
    )
    op.drop_index(
        op.f("ix_task_status_changes_observed_at"), table_name="task_status_changes"
    )

    op.drop_table("task_status_changes")
    op.drop_index(op.f("ix_sync_rejects_run_id"), table_name="sync_rejects")

    op.drop_table("sync_rejects")
    op.drop_index(op.f("ix_tasks_user_id_sub_user_id"), table_name="tasks")
    op.drop_index(op.f("ix_tasks_status"), table_name="tasks")

    op.drop_table("tasks")
    op.drop_index(op.f("ix_sync_runs_started_at"), table_name="sync_runs")

    op.drop_table("sync_runs")
    op.drop_table("groups")
    op.drop_table("accounts")
