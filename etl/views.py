"""The views BI tools read: their columns and their SQL, per database.

Each view is a `Table` on its own metadata, so that Python code and the
data dictionary can read its columns while Alembic's comparison of tables
with the database leaves it alone. Its SQL is written per dialect where the
databases disagree (timestamp arithmetic); the names and columns are the
same on every database.

The SQL here is the current definition. A revision that creates or changes
a view keeps its own copy of the SQL, so that a later change here cannot
alter what an old revision does; a test compares the migrated views with
these definitions.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from etl.models import Id, UtcDateTime
from etl.parse import STATUS_LABELS

view_metadata = MetaData()

current_tasks = Table(
    "current_tasks",
    view_metadata,
    Column("uuid", Id, comment="the platform's task id"),
    Column("user_id", Id, comment="owning main account"),
    Column("sub_user_id", Id, comment="empty for the main account"),
    Column("account_name", Text, comment="name of the owning account; may be empty"),
    Column("name", Text, comment="task name"),
    Column("status", Integer, comment="status code: 1 paused, 2 running, 3 waiting"),
    Column(
        "status_label",
        String(20),
        comment="paused, running, waiting, or unknown for any other code",
    ),
    Column("status_str", Text, comment="the platform's text for the status"),
    Column(
        "status_since",
        UtcDateTime,
        comment="when a run first observed the current status",
    ),
    Column("group_id", Id, comment="script group id"),
    Column("group_name", Text, comment="script group name"),
    Column("enable", Boolean, comment="the platform's enable flag"),
    Column("maximumcall", BigInteger, comment="the platform's maximumcall"),
    Column("created_at", UtcDateTime, comment="when the task was created"),
    Column("altered_at", UtcDateTime, comment="when the platform last altered it"),
    Column("first_seen_at", UtcDateTime, comment="when a run first listed it"),
    Column("last_changed_at", UtcDateTime, comment="when a run last stored a change"),
    Column("removed_at", UtcDateTime, comment="when it stopped being listed"),
    Column(
        "is_listed",
        Boolean,
        comment="whether the platform still lists the task (removed_at is empty)",
    ),
    comment="every task with its account and group names and a readable status",
)

task_status_periods = Table(
    "task_status_periods",
    view_metadata,
    Column("task_uuid", Id, comment="task"),
    Column("user_id", Id, comment="owning main account"),
    Column("sub_user_id", Id, comment="empty for the main account"),
    Column("status", Integer, comment="status code during the period"),
    Column("status_label", String(20), comment="paused, running, waiting or unknown"),
    Column("status_str", Text, comment="the platform's text for the status"),
    Column(
        "started_after",
        UtcDateTime,
        comment="the previous observation: the status began after it; empty for "
        "a task's first sighting",
    ),
    Column(
        "started_at",
        UtcDateTime,
        comment="when a run first observed the status: it began at or before",
    ),
    Column(
        "ended_at",
        UtcDateTime,
        comment="when a run observed the next status or the removal; empty while "
        "current",
    ),
    Column(
        "duration_seconds",
        BigInteger,
        comment="ended_at minus started_at, or now minus started_at while current",
        info={"unit": "seconds"},
    ),
    Column("is_current", Boolean, comment="whether this is the task's status now"),
    Column("start_event", String(20), comment="first_seen, changed or restored"),
    Column("end_event", String(20), comment="changed or removed; empty while current"),
    comment="one row per task and period in one status, from task_status_changes: "
    "a removal ends a period, a restore starts one",
)

daily_status_counts = Table(
    "daily_status_counts",
    view_metadata,
    Column(
        "day",
        Date,
        comment="calendar day in the platform's time zone (settings.timezone)",
    ),
    Column("user_id", Id, comment="main account"),
    Column("sub_user_id", Id, comment="empty for the main account"),
    Column("account_name", Text, comment="name of the account; may be empty"),
    Column("status", Integer, comment="status code"),
    Column("status_label", String(20), comment="paused, running, waiting or unknown"),
    Column(
        "tasks",
        Integer,
        comment="listed tasks in this status at the end of the day (so far, for "
        "today); no row means none",
    ),
    comment="tasks per account and status at the end of each day, read from "
    "daily_status_rollup",
)

VIEWS = (current_tasks, task_status_periods, daily_status_counts)


def status_label_sql(column: str) -> str:
    """A CASE expression giving the label of a status code, as etl.parse does."""
    whens = " ".join(
        f"WHEN {code} THEN '{label}'" for code, label in sorted(STATUS_LABELS.items())
    )
    return f"CASE {column} {whens} ELSE 'unknown' END"


def seconds_between_sql(dialect: str, start: str, end: str) -> str:
    """Whole seconds from `start` to `end`, two timestamp expressions."""
    if dialect == "postgresql":
        return f"CAST(ROUND(EXTRACT(EPOCH FROM ({end} - {start}))) AS BIGINT)"
    # SQLite keeps timestamps as ISO text, which julianday() reads.
    return f"CAST(ROUND((julianday({end}) - julianday({start})) * 86400) AS INTEGER)"


def _current_tasks(dialect: str) -> str:
    return f"""
SELECT t.uuid, t.user_id, t.sub_user_id, a.name AS account_name, t.name,
       t.status,
       {status_label_sql("t.status")} AS status_label,
       t.status_str,
       t.status_seen_at AS status_since, t.group_id, g.name AS group_name,
       t.enable, t.maximumcall, t.created_at, t.altered_at, t.first_seen_at,
       t.last_changed_at, t.removed_at, t.removed_at IS NULL AS is_listed
FROM tasks AS t
LEFT JOIN accounts AS a ON a.user_id = t.user_id AND a.sub_user_id = t.sub_user_id
LEFT JOIN groups AS g ON g.id = t.group_id
"""


def _task_status_periods(dialect: str) -> str:
    # Each event opens a period that the task's next event closes; a removal
    # only closes one. Ties in observed_at keep the order they were written.
    ended = "COALESCE(p.ended_at, CURRENT_TIMESTAMP)"
    return f"""
SELECT p.task_uuid, t.user_id, t.sub_user_id, p.status,
       {status_label_sql("p.status")} AS status_label,
       p.status_str,
       p.started_after, p.started_at, p.ended_at,
       {seconds_between_sql(dialect, "p.started_at", ended)} AS duration_seconds,
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


def _daily_status_counts(dialect: str) -> str:
    return f"""
SELECT r.day, r.user_id, r.sub_user_id, a.name AS account_name, r.status,
       {status_label_sql("r.status")} AS status_label,
       r.tasks
FROM daily_status_rollup AS r
LEFT JOIN accounts AS a ON a.user_id = r.user_id AND a.sub_user_id = r.sub_user_id
"""


_SQL: dict[str, Callable[[str], str]] = {
    "current_tasks": _current_tasks,
    "task_status_periods": _task_status_periods,
    "daily_status_counts": _daily_status_counts,
}


def view_sql(name: str, dialect: str) -> str:
    """The SELECT behind view `name` on a database of `dialect`."""
    return _SQL[name](dialect).strip()
