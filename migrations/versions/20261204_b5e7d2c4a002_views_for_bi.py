"""Views and indexes for BI tools, daily status counts, comments everywhere.

Adds the views current_tasks, task_status_periods and daily_status_counts,
the tables they need (settings, daily_status_rollup), indexes for the
dashboards' queries, and a comment on every table and column (stored on
PostgreSQL; SQLite has no place for them). The SQL of the views is copied
here on purpose: a later change of a view is a new revision, and this one
keeps doing what it did.

Revision ID: b5e7d2c4a002
Revises: 02ec0e391456
Create Date: 2026-12-04 14:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b5e7d2c4a002"
down_revision: str | None = "02ec0e391456"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE_COMMENTS = {
    "accounts": "one row per account synced: a main account or one of its sub-accounts",
    "groups": "one row per script group embedded in a task",
    "tasks": "one row per task, by uuid, as last listed; removed tasks are kept",
    "sync_runs": "one row per run: one execution of a sync over some accounts",
    "task_status_changes": "one row per observed status change, removal or "
    "restore of a task",
    "sync_rejects": "one row per listed item that could not be stored as a task",
}

COLUMN_COMMENTS = {
    "accounts": {
        "name": "display name, from the configuration or the platform's list "
        "of sub-accounts; may be empty",
        "first_seen_at": "when a run first configured or discovered the account",
        "last_run_id": "the run that last walked it",
    },
    "groups": {
        "name": "script group name, as last listed",
        "first_seen_at": "when a task first listed the group",
        "last_changed_at": "when the group's name last changed",
    },
    "tasks": {
        "name": "task name",
        "maximumcall": "the platform's maximumcall, a call limit (not "
        "documented further)",
        "dial_time_id": "dial-time group: when the task may call",
        "caller_line_id": "the caller line the task dials from",
        "bridge_group_id": "the platform's bridge group id",
        "enable": "the platform's enable flag",
        "remark": "free text from the platform",
        "content_hash": "SHA-256 of the item: an item that did not change is "
        "not rewritten",
        "first_seen_at": "when a run first listed the task",
        "last_changed_at": "when a run last stored a different item, a removal "
        "or a restore",
        "removed_at": "when a run found the platform no longer lists it; empty "
        "while listed",
    },
    "sync_runs": {
        "id": "run number",
        "started_at": "when the run began",
        "finished_at": "when it ended; empty while running",
        "host": "host name of the run",
        "pid": "its process id",
        "accounts": "accounts walked",
        "accounts_failed": "accounts whose walk failed",
        "pages": "pages stored",
        "tasks_seen": "task items listed, duplicates included",
        "tasks_new": "tasks first seen",
        "tasks_changed": "tasks whose item changed",
        "tasks_removed": "tasks marked removed",
        "tasks_restored": "removed tasks listed again",
        "status_changes": "rows written to task_status_changes",
        "rejected": "items written to sync_rejects",
        "bad_values": "field values that could not be read and were stored as NULL",
    },
    "task_status_changes": {
        "id": "row number",
        "task_uuid": "task",
        "run_id": "the run that observed the change",
        "old_status": "status before a change or removal; empty for a first "
        "sighting or a restore",
        "old_status_str": "the platform's text for old_status",
        "new_status": "status after the event; empty for a removal",
        "new_status_str": "the platform's text for new_status",
        "observed_at": "when a run observed the new state: the change happened before",
    },
    "sync_rejects": {
        "id": "row number",
        "run_id": "the run that rejected the item",
        "user_id": "main account of the page",
        "sub_user_id": "empty for the main account",
        "endpoint": "path of the list, as a template",
        "page": "page number, from 1",
        "reason": "why the item was refused",
        "rejected_at": "when the page came",
    },
}

# (table, columns) of the indexes this revision adds.
INDEXES = (
    ("tasks", ("user_id", "sub_user_id", "removed_at", "status")),
    ("tasks", ("removed_at", "status")),
    ("sync_runs", ("outcome", "started_at")),
    ("task_status_changes", ("new_status", "observed_at")),
    ("task_status_changes", ("run_id", "observed_at")),
)

STATUS_LABEL = (
    "CASE {0} WHEN 1 THEN 'paused' WHEN 2 THEN 'running' WHEN 3 THEN 'waiting' "
    "ELSE 'unknown' END"
)

SECONDS_BETWEEN = {
    "postgresql": "CAST(ROUND(EXTRACT(EPOCH FROM ({end} - {start}))) AS BIGINT)",
    "sqlite": "CAST(ROUND((julianday({end}) - julianday({start})) * 86400) AS INTEGER)",
}

CURRENT_TASKS = f"""
SELECT t.uuid, t.user_id, t.sub_user_id, a.name AS account_name, t.name,
       t.status,
       {STATUS_LABEL.format("t.status")} AS status_label,
       t.status_str,
       t.status_seen_at AS status_since, t.group_id, g.name AS group_name,
       t.enable, t.maximumcall, t.created_at, t.altered_at, t.first_seen_at,
       t.last_changed_at, t.removed_at, t.removed_at IS NULL AS is_listed
FROM tasks AS t
LEFT JOIN accounts AS a ON a.user_id = t.user_id AND a.sub_user_id = t.sub_user_id
LEFT JOIN groups AS g ON g.id = t.group_id
"""

TASK_STATUS_PERIODS = f"""
SELECT p.task_uuid, t.user_id, t.sub_user_id, p.status,
       {STATUS_LABEL.format("p.status")} AS status_label,
       p.status_str,
       p.started_after, p.started_at, p.ended_at,
       {{seconds}} AS duration_seconds,
       p.ended_at IS NULL AS is_current, p.start_event, p.end_event
FROM (
    SELECT c.task_uuid, c.event AS start_event, c.new_status AS status,
           c.new_status_str AS status_str, c.old_seen_at AS started_after,
           c.observed_at AS started_at,
           LEAD(c.observed_at) OVER next_event AS ended_at,
           LEAD(c.event) OVER next_event AS end_event
    FROM task_status_changes AS c
    WINDOW next_event AS (PARTITION BY c.task_uuid ORDER BY c.observed_at, c.id)
) AS p
JOIN tasks AS t ON t.uuid = p.task_uuid
WHERE p.start_event <> 'removed'
"""

DAILY_STATUS_COUNTS = f"""
SELECT r.day, r.user_id, r.sub_user_id, a.name AS account_name, r.status,
       {STATUS_LABEL.format("r.status")} AS status_label,
       r.tasks
FROM daily_status_rollup AS r
LEFT JOIN accounts AS a ON a.user_id = r.user_id AND a.sub_user_id = r.sub_user_id
"""

VIEW_COMMENTS = {
    "current_tasks": (
        "every task with its account and group names and a readable status",
        {
            "uuid": "the platform's task id",
            "user_id": "owning main account",
            "sub_user_id": "empty for the main account",
            "account_name": "name of the owning account; may be empty",
            "name": "task name",
            "status": "status code: 1 paused, 2 running, 3 waiting",
            "status_label": "paused, running, waiting, or unknown for any other code",
            "status_str": "the platform's text for the status",
            "status_since": "when a run first observed the current status",
            "group_id": "script group id",
            "group_name": "script group name",
            "enable": "the platform's enable flag",
            "maximumcall": "the platform's maximumcall",
            "created_at": "when the task was created",
            "altered_at": "when the platform last altered it",
            "first_seen_at": "when a run first listed it",
            "last_changed_at": "when a run last stored a change",
            "removed_at": "when it stopped being listed",
            "is_listed": "whether the platform still lists the task (removed_at "
            "is empty)",
        },
    ),
    "task_status_periods": (
        "one row per task and period in one status, from task_status_changes: "
        "a removal ends a period, a restore starts one",
        {
            "task_uuid": "task",
            "user_id": "owning main account",
            "sub_user_id": "empty for the main account",
            "status": "status code during the period",
            "status_label": "paused, running, waiting or unknown",
            "status_str": "the platform's text for the status",
            "started_after": "the previous observation: the status began after "
            "it; empty for a task's first sighting",
            "started_at": "when a run first observed the status: it began at or before",
            "ended_at": "when a run observed the next status or the removal; "
            "empty while current",
            "duration_seconds": "ended_at minus started_at, or now minus "
            "started_at while current",
            "is_current": "whether this is the task's status now",
            "start_event": "first_seen, changed or restored",
            "end_event": "changed or removed; empty while current",
        },
    ),
    "daily_status_counts": (
        "tasks per account and status at the end of each day, read from "
        "daily_status_rollup",
        {
            "day": "calendar day in the platform's time zone (settings.timezone)",
            "user_id": "main account",
            "sub_user_id": "empty for the main account",
            "account_name": "name of the account; may be empty",
            "status": "status code",
            "status_label": "paused, running, waiting or unknown",
            "tasks": "listed tasks in this status at the end of the day (so far, "
            "for today); no row means none",
        },
    ),
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.drop_index(op.f("ix_tasks_user_id_sub_user_id"), table_name="tasks")
    for table, columns in INDEXES:
        op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))
    _create_settings()
    _create_daily_status_rollup()
    for name, select in _views(dialect).items():
        op.execute(f"CREATE VIEW {name} AS {select.strip()}")
    if dialect == "postgresql":
        _comment_tables()
        _comment_views()


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name in reversed(list(_views(dialect))):
        op.execute(f"DROP VIEW {name}")
    op.drop_table("daily_status_rollup")
    op.drop_table("settings")
    for table, columns in reversed(INDEXES):
        op.drop_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table_name=table)
    op.create_index(
        op.f("ix_tasks_user_id_sub_user_id"), "tasks", ["user_id", "sub_user_id"]
    )
    if dialect == "postgresql":
        _uncomment_tables()


def _views(dialect: str) -> dict[str, str]:
    seconds = SECONDS_BETWEEN[dialect].format(
        start="p.started_at", end="COALESCE(p.ended_at, CURRENT_TIMESTAMP)"
    )
    return {
        "current_tasks": CURRENT_TASKS,
        "task_status_periods": TASK_STATUS_PERIODS.format(seconds=seconds),
        "daily_status_counts": DAILY_STATUS_COUNTS,
    }


def _create_settings() -> None:
    op.create_table(
        "settings",
        sa.Column("key", sa.String(length=100), nullable=False, comment="setting name"),
        sa.Column("value", sa.Text(), nullable=False, comment="its value, as text"),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="when it was written",
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_settings")),
        comment="values the product keeps for readers: timezone is the "
        "platform's time zone, in which daily_status_rollup.day is counted",
    )


def _create_daily_status_rollup() -> None:
    op.create_table(
        "daily_status_rollup",
        sa.Column(
            "id", sa.Integer(), autoincrement=True, nullable=False, comment="row number"
        ),
        sa.Column(
            "day",
            sa.Date(),
            nullable=False,
            comment="calendar day in the platform's time zone (settings.timezone)",
        ),
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
            "status",
            sa.Integer(),
            nullable=True,
            comment="status code; empty when unreadable",
        ),
        sa.Column(
            "tasks",
            sa.Integer(),
            nullable=False,
            comment="listed tasks in this status at the end of the day (so far, "
            "for today)",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_daily_status_rollup")),
        comment="tasks per account and status at the end of each day, kept up "
        "to date at the end of every run; read it through daily_status_counts",
    )
    op.create_index(op.f("ix_daily_status_rollup_day"), "daily_status_rollup", ["day"])
    op.create_index(
        op.f("ix_daily_status_rollup_user_id_sub_user_id_day"),
        "daily_status_rollup",
        ["user_id", "sub_user_id", "day"],
    )


def _comment_tables() -> None:
    for table, comment in TABLE_COMMENTS.items():
        op.create_table_comment(table, comment)
    for table, columns in COLUMN_COMMENTS.items():
        for column, comment in columns.items():
            op.alter_column(table, column, comment=comment)


def _uncomment_tables() -> None:
    # Back to 02ec0e391456, which had no table comments and a shorter
    # comment on tasks.removed_at.
    for table in TABLE_COMMENTS:
        op.drop_table_comment(table)
    for table, columns in COLUMN_COMMENTS.items():
        for column in columns:
            op.alter_column(table, column, comment=None)
    op.alter_column(
        "tasks", "removed_at", comment="when the platform stopped listing it"
    )


def _comment_views() -> None:
    for view, (comment, columns) in VIEW_COMMENTS.items():
        op.execute(f"COMMENT ON VIEW {view} IS {_quote(comment)}")
        for column, text in columns.items():
            op.execute(f"COMMENT ON COLUMN {view}.{column} IS {_quote(text)}")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
