"""Account locks and run heartbeats, for one writer per account.

Adds to sync_runs the heartbeat that tells a live run from an abandoned one
and the count of accounts a run skipped because another run held their
lock; adds sync_run_accounts (what each run did with each account, and
when) and account_locks (the leased locks of databases without their own).

Revision ID: a3d1c0f2b001
Revises: b5e7d2c4a002
Create Date: 2026-12-04 14:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a3d1c0f2b001"
down_revision: str | None = "b5e7d2c4a002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN on every database: SQLite needs no table rebuild, and
    # the existing runs get 0 skipped accounts and no heartbeat.
    op.add_column(
        "sync_runs",
        sa.Column(
            "accounts_skipped",
            sa.Integer(),
            nullable=False,
            server_default="0",
            comment="accounts left alone because another run held their lock",
        ),
    )
    op.add_column(
        "sync_runs",
        sa.Column(
            "heartbeat_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="last sign of life of a running run; older than the lease: "
            "its process is gone and the next run marks it abandoned",
        ),
    )

    op.create_table(
        "sync_run_accounts",
        sa.Column(
            "id", sa.Integer(), autoincrement=True, nullable=False, comment="row number"
        ),
        sa.Column("run_id", sa.Integer(), nullable=False, comment="the run"),
        sa.Column(
            "user_id", sa.String(length=200), nullable=False, comment="main account"
        ),
        sa.Column(
            "sub_user_id",
            sa.String(length=200),
            nullable=False,
            comment="empty for the main account",
        ),
        sa.Column(
            "outcome",
            sa.String(length=20),
            nullable=False,
            comment="succeeded, failed, stopped or skipped (another run held the lock)",
        ),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="when the run took the account's lock and began its walk",
        ),
        sa.Column(
            "finished_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="when the run had written the account, just before letting go "
            "of its lock",
        ),
        sa.Column("pages", sa.Integer(), nullable=False, comment="pages written"),
        sa.Column("tasks_seen", sa.Integer(), nullable=False, comment="tasks listed"),
        sa.Column(
            "error", sa.Text(), nullable=True, comment="why it failed or was skipped"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sync_runs.id"],
            name=op.f("fk_sync_run_accounts_run_id_sync_runs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_run_accounts")),
        comment="one row per account a run walked or skipped",
    )
    op.create_index(
        op.f("ix_sync_run_accounts_run_id"), "sync_run_accounts", ["run_id"]
    )
    op.create_index(
        op.f("ix_sync_run_accounts_user_id_sub_user_id_started_at"),
        "sync_run_accounts",
        ["user_id", "sub_user_id", "started_at"],
    )

    op.create_table(
        "account_locks",
        sa.Column(
            "user_id", sa.String(length=200), nullable=False, comment="main account"
        ),
        sa.Column(
            "sub_user_id",
            sa.String(length=200),
            nullable=False,
            comment="empty for the main account",
        ),
        sa.Column(
            "holder",
            sa.Text(),
            nullable=False,
            comment="host:pid:random of the holder",
        ),
        sa.Column("host", sa.Text(), nullable=False, comment="host name of the holder"),
        sa.Column(
            "pid", sa.Integer(), nullable=False, comment="process id of the holder"
        ),
        sa.Column(
            "acquired_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="when it was taken",
        ),
        sa.Column(
            "expires_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="end of the lease; the heartbeat moves it on while the run goes",
        ),
        sa.PrimaryKeyConstraint(
            "user_id", "sub_user_id", name=op.f("pk_account_locks")
        ),
        comment="one row per account a run is writing, on databases without locks "
        "of their own (SQLite); PostgreSQL uses advisory locks and leaves it empty",
    )


def downgrade() -> None:
    op.drop_table("account_locks")
    op.drop_index(
        op.f("ix_sync_run_accounts_user_id_sub_user_id_started_at"),
        table_name="sync_run_accounts",
    )
    op.drop_index(op.f("ix_sync_run_accounts_run_id"), table_name="sync_run_accounts")
    op.drop_table("sync_run_accounts")
    # SQLite since 3.35 drops a column in place, without a table rebuild.
    op.drop_column("sync_runs", "heartbeat_at")
    op.drop_column("sync_runs", "accounts_skipped")
