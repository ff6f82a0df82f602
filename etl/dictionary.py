"""The data dictionary: every table, view and column, from the models.

`python -m etl.dictionary > docs/schema.md` writes it. Everything in it is
read from the table and column definitions (their comments, types and
indexes) or from the constants below, which the tests run against real
databases, so the document cannot drift from the schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    Integer,
    String,
    Table,
    Text,
)

from etl.models import UtcDateTime, metadata
from etl.views import VIEWS


@dataclass(frozen=True)
class Example:
    """A question a BI user asks, and the query that answers it.

    `sql` runs on both databases unless `postgresql` gives that database its
    own text (date arithmetic differs). `:name` marks a value to fill in.
    """

    name: str
    question: str
    sql: str
    postgresql: str | None = None

    def for_dialect(self, dialect: str) -> str:
        if dialect == "postgresql" and self.postgresql is not None:
            return self.postgresql
        return self.sql


EXAMPLES = (
    Example(
        "tasks_per_status",
        "How many tasks are in each status now?",
        """\
SELECT status_label, count(*) AS tasks
FROM current_tasks
WHERE is_listed
GROUP BY status_label
ORDER BY tasks DESC, status_label""",
    ),
    Example(
        "tasks_per_account",
        "How many tasks does each account have in each status now?",
        """\
SELECT user_id, sub_user_id, account_name, status_label, count(*) AS tasks
FROM current_tasks
WHERE is_listed
GROUP BY user_id, sub_user_id, account_name, status_label
ORDER BY user_id, sub_user_id, status_label""",
    ),
    Example(
        "account_tasks",
        "Which tasks does one account have now, and since when in their status?",
        """\
SELECT uuid, name, status_label, status_since
FROM current_tasks
WHERE user_id = :user_id AND sub_user_id = :sub_user_id AND is_listed
ORDER BY status, status_since, uuid""",
    ),
    Example(
        "running_time",
        "How long did each task run (seconds in the running status)?",
        """\
SELECT p.task_uuid, t.name, count(*) AS periods,
       sum(p.duration_seconds) AS running_seconds
FROM task_status_periods AS p
JOIN current_tasks AS t ON t.uuid = p.task_uuid
WHERE p.status_label = 'running'
GROUP BY p.task_uuid, t.name
ORDER BY running_seconds DESC, p.task_uuid""",
    ),
    Example(
        "paused_most",
        "Which tasks were paused most often, and for how long?",
        """\
SELECT p.task_uuid, t.name, count(*) AS times_paused,
       sum(p.duration_seconds) AS paused_seconds
FROM task_status_periods AS p
JOIN current_tasks AS t ON t.uuid = p.task_uuid
WHERE p.status = 1
GROUP BY p.task_uuid, t.name
ORDER BY times_paused DESC, paused_seconds DESC, p.task_uuid
LIMIT 10""",
    ),
    Example(
        "task_history",
        "What statuses did one task go through, and for how long?",
        """\
SELECT status_label, started_after, started_at, ended_at, duration_seconds
FROM task_status_periods
WHERE task_uuid = :task_uuid
ORDER BY started_at""",
    ),
    Example(
        "changes_last_day",
        "Which status changes, removals and restores happened in the last day?",
        """\
SELECT c.observed_at, c.task_uuid, t.name, c.event, c.old_status, c.new_status
FROM task_status_changes AS c
JOIN tasks AS t ON t.uuid = c.task_uuid
WHERE c.observed_at >= datetime('now', '-1 day')
ORDER BY c.observed_at DESC, c.id DESC""",
        postgresql="""\
SELECT c.observed_at, c.task_uuid, t.name, c.event, c.old_status, c.new_status
FROM task_status_changes AS c
JOIN tasks AS t ON t.uuid = c.task_uuid
WHERE c.observed_at >= now() - interval '1 day'
ORDER BY c.observed_at DESC, c.id DESC""",
    ),
    Example(
        "daily_counts",
        "How many tasks were in each status at the end of each of the last 30 days?",
        """\
SELECT day, status_label, sum(tasks) AS tasks
FROM daily_status_counts
WHERE day >= date('now', '-30 days')
GROUP BY day, status_label
ORDER BY day, status_label""",
        postgresql="""\
SELECT day, status_label, sum(tasks) AS tasks
FROM daily_status_counts
WHERE day >= current_date - 30
GROUP BY day, status_label
ORDER BY day, status_label""",
    ),
    Example(
        "removed_tasks",
        "Which tasks did the platform stop listing, most recent first?",
        """\
SELECT uuid, name, account_name, status_label, removed_at
FROM current_tasks
WHERE removed_at IS NOT NULL
ORDER BY removed_at DESC, uuid""",
    ),
)

READ_ONLY_ROLE = """\
-- As a superuser, or a role with CREATEROLE:
CREATE ROLE {reader} LOGIN PASSWORD '{password}';

-- As the role that owns the tables (the one `task-etl migrate` connects as):
GRANT CONNECT ON DATABASE {database} TO {reader};
GRANT USAGE ON SCHEMA public TO {reader};
GRANT SELECT ON ALL TABLES IN SCHEMA public TO {reader};
-- Tables and views that later migrations create are readable too:
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public
    GRANT SELECT ON TABLES TO {reader};"""

ROLE_DEFAULTS = {
    "reader": "bi_reader",
    "password": "choose-a-password",
    "database": "task_etl",
    "owner": "task_etl",
}

_INTRO = """\
# Schema: tables, views and columns

Generated from the table definitions by `python -m etl.dictionary >
docs/schema.md`; a test fails when this file and the definitions differ, so
edit the comments in `etl/models.py` and `etl/views.py`, not this file.

- **Time**: every timestamp is UTC (PostgreSQL `timestamp with time zone`;
  SQLite text `YYYY-MM-DD HH:MM:SS.ffffff`). The platform's own local times
  are converted on the way in. Days (`day`) are calendar days in the
  platform's time zone, the `timezone` row of `settings` (default
  Asia/Shanghai).
- **Ids** are text, as the platform sends them; they are not always UUIDs.
- **Accounts** are `user_id` (main account) plus `sub_user_id` (empty for the
  main account's own tasks).
- **Status** codes: 1 paused, 2 running, 3 waiting; any other code is kept
  and labelled `unknown`.
- **Booleans** are `true`/`false` on PostgreSQL and 1/0 on SQLite.
- The views are the stable way in for BI tools; `alembic_version` belongs to
  the migrations.
"""


def render() -> str:
    """The whole dictionary, as Markdown."""
    parts = [_INTRO, "## Views\n"]
    parts.extend(_describe(view, is_view=True) for view in VIEWS)
    parts.append("## Tables\n")
    parts.extend(_describe(table, is_view=False) for table in _tables())
    parts.append(_examples())
    parts.append(_read_only())
    return "\n".join(parts)


def _tables() -> list[Table]:
    return sorted(metadata.tables.values(), key=lambda table: table.name)


def _describe(table: Table, *, is_view: bool) -> str:
    lines = [f"### {table.name}", "", f"{_sentence(table.comment)}", ""]
    if is_view:
        lines += ["| column | type | unit | meaning |", "|---|---|---|---|"]
    else:
        lines += [
            "| column | type | nullable | unit | meaning |",
            "|---|---|---|---|---|",
        ]
    for column in table.columns:
        cells = [f"`{column.name}`", _type_name(column)]
        if not is_view:
            cells.append("" if column.primary_key or not column.nullable else "yes")
        cells += [_unit(column), _cell(column.comment)]
        lines.append("| " + " | ".join(cells) + " |")
    if not is_view:
        lines += ["", *_keys(table)]
    return "\n".join(lines) + "\n"


def _keys(table: Table) -> Iterator[str]:
    key = ", ".join(column.name for column in table.primary_key.columns)
    yield f"Primary key: ({key})."
    for index in sorted(table.indexes, key=lambda index: str(index.name)):
        columns = ", ".join(column.name for column in index.columns)
        where = index.dialect_options["postgresql"]["where"]
        rows = f", of the rows where {where}" if where is not None else ""
        yield f"Index `{index.name}`: ({columns}){rows}."
    for foreign_key in sorted(table.foreign_keys, key=lambda key: key.parent.name):
        yield f"`{foreign_key.parent.name}` refers to `{foreign_key.target_fullname}`."


def _type_name(column: Column[object]) -> str:
    kind = column.type
    if isinstance(kind, UtcDateTime):
        return "timestamp"
    if isinstance(kind, JSON):
        return "json (jsonb on PostgreSQL)"
    for sql_type, name in (
        (Boolean, "boolean"),
        (BigInteger, "bigint"),
        (Integer, "integer"),
        (Date, "date"),
        (Text, "text"),
    ):
        if isinstance(kind, sql_type):
            return name
    if isinstance(kind, String):
        return f"varchar({kind.length})" if kind.length else "varchar"
    return str(kind).lower()


def _unit(column: Column[object]) -> str:
    if isinstance(column.type, UtcDateTime):
        return "UTC"
    if isinstance(column.type, Date):
        return "day, platform time zone"
    return str(column.info.get("unit", ""))


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|")


def _sentence(text: str | None) -> str:
    text = (text or "").strip()
    return text[:1].upper() + text[1:] + "." if text else ""


def _examples() -> str:
    lines = [
        "## Example queries",
        "",
        "Each runs as written on both databases unless two versions are given; "
        "`:name` marks a value to fill in. The tests run every one of them.",
        "",
    ]
    for example in EXAMPLES:
        lines += [f"### {example.question}", ""]
        if example.postgresql is None:
            lines += ["```sql", example.sql + ";", "```", ""]
        else:
            lines += ["SQLite:", "", "```sql", example.sql + ";", "```", ""]
            lines += ["PostgreSQL:", "", "```sql", example.postgresql + ";", "```", ""]
    return "\n".join(lines)


def _read_only() -> str:
    return "\n".join(
        [
            "## Read-only access for a BI tool (PostgreSQL)",
            "",
            "A role that can read every table and view, today's and those of "
            "later migrations, and change nothing:",
            "",
            "```sql",
            READ_ONLY_ROLE.format(**ROLE_DEFAULTS),
            "```",
            "",
            "On PostgreSQL 14 and older every role may create tables in "
            "`public`; there, also run `REVOKE CREATE ON SCHEMA public FROM "
            "PUBLIC;` as a superuser (version 15 made that the default).",
            "",
        ]
    )


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
