"""The database schema: a public interface read by BI tools.

Tables are SQLAlchemy Core objects on one `MetaData` with a naming
convention, so every index and constraint has a deterministic name that
Alembic can compare and migrate. All timestamps are stored in UTC. Every
table and column carries a comment: they are the data dictionary
(`python -m etl.dictionary`) and, on PostgreSQL, what a BI tool shows.
The views for BI tools are defined in `etl.views`, on their own metadata so
that Alembic's comparison of tables leaves them alone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

from etl.accounts import ID_LENGTH

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back as an aware datetime.

    SQLite has no time zone type and hands back naive values; normalising
    here keeps every comparison in the product aware and in UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        moment: datetime = value.astimezone(UTC)
        # SQLite compares timestamps as text, so they must all look alike.
        return moment.replace(tzinfo=None) if dialect.name == "sqlite" else moment

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


Payload = JSON().with_variant(JSONB(), "postgresql")
Id = String(ID_LENGTH)

accounts = Table(
    "accounts",
    metadata,
    Column("user_id", Id, primary_key=True, comment="main account id"),
    Column(
        "sub_user_id",
        Id,
        primary_key=True,
        comment="sub-account id; empty for the main account's own tasks",
    ),
    Column(
        "name",
        Text,
        nullable=False,
        default="",
        comment="display name, from the configuration or the platform's list of "
        "sub-accounts; may be empty",
    ),
    Column("origin", String(20), nullable=False, comment="configured or discovered"),
    Column(
        "first_seen_at",
        UtcDateTime,
        nullable=False,
        comment="when a run first configured or discovered the account",
    ),
    Column("last_sync_at", UtcDateTime, comment="start of the last walk"),
    Column("last_success_at", UtcDateTime, comment="end of the last walk that ended"),
    Column(
        "last_complete_at",
        UtcDateTime,
        comment="start of the last complete, unfiltered walk: every task it "
        "listed was observed at or after this moment",
    ),
    Column("last_outcome", String(20), comment="succeeded, failed or stopped"),
    Column("last_error", Text, comment="one line; empty after a success"),
    Column("last_run_id", Integer, comment="the run that last walked it"),
    comment="one row per account synced: a main account or one of its sub-accounts",
)

groups = Table(
    "groups",
    metadata,
    Column("id", Id, primary_key=True, comment="the platform's script group id"),
    Column("name", Text, comment="script group name, as last listed"),
    Column(
        "first_seen_at",
        UtcDateTime,
        nullable=False,
        comment="when a task first listed the group",
    ),
    Column(
        "last_changed_at",
        UtcDateTime,
        nullable=False,
        comment="when the group's name last changed",
    ),
    comment="one row per script group embedded in a task",
)

tasks = Table(
    "tasks",
    metadata,
    Column("uuid", Id, primary_key=True, comment="the platform's id; not a UUID"),
    Column("user_id", Id, nullable=False, comment="owning main account"),
    Column("sub_user_id", Id, nullable=False, comment="empty for the main account"),
    Column("name", Text, comment="task name"),
    Column("status", Integer, comment="1 paused, 2 running, 3 waiting; else kept"),
    Column("status_str", Text, comment="the platform's text for the status"),
    Column("created_at", UtcDateTime, comment="create_datetime, in UTC"),
    Column("altered_at", UtcDateTime, comment="alter_datetime, in UTC"),
    Column(
        "maximumcall",
        BigInteger,
        comment="the platform's maximumcall, a call limit (not documented further)",
    ),
    Column("dial_time_id", Id, comment="dial-time group: when the task may call"),
    Column("destination_extension", Id, comment="script group id as sent"),
    Column("caller_line_id", Id, comment="the caller line the task dials from"),
    Column("bridge_group_id", Id, comment="the platform's bridge group id"),
    Column("group_id", Id, comment="id of the embedded script group"),
    Column("enable", Boolean, comment="the platform's enable flag"),
    Column("remark", Text, comment="free text from the platform"),
    Column("raw", Payload, nullable=False, comment="the item as received"),
    Column(
        "content_hash",
        String(64),
        nullable=False,
        comment="SHA-256 of the item: an item that did not change is not rewritten",
    ),
    Column(
        "first_seen_at",
        UtcDateTime,
        nullable=False,
        comment="when a run first listed the task",
    ),
    Column(
        "last_changed_at",
        UtcDateTime,
        nullable=False,
        comment="when a run last stored a different item, a removal or a restore",
    ),
    Column(
        "status_seen_at",
        UtcDateTime,
        nullable=False,
        comment="when the current status was first observed",
    ),
    Column(
        "removed_at",
        UtcDateTime,
        comment="when a run found the platform no longer lists it; empty while listed",
    ),
    Column(
        "unlisted_after",
        UtcDateTime,
        comment="set when a complete walk did not list the task: when it was "
        "last observed listed; the next complete walk that misses it too "
        "marks it removed; empty while listed",
    ),
    # Dashboards filter by account, listed or not, and group by status; with
    # these the counts are read from the indexes alone.
    Index(None, "user_id", "sub_user_id", "removed_at", "status"),
    Index(None, "removed_at", "status"),
    Index(None, "status"),
    # Every complete walk reads its account's flagged tasks; partial, the
    # index holds those few only, where a scan read every task of the account.
    Index(
        "ix_tasks_flagged",
        "user_id",
        "sub_user_id",
        sqlite_where=text("unlisted_after IS NOT NULL"),
        postgresql_where=text("unlisted_after IS NOT NULL"),
    ),
    comment="one row per task, by uuid, as last listed; removed tasks are kept",
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, comment="run number"),
    Column("kind", String(20), nullable=False, comment="sync, backfill or replay"),
    Column("started_at", UtcDateTime, nullable=False, comment="when the run began"),
    Column("finished_at", UtcDateTime, comment="when it ended; empty while running"),
    Column(
        "outcome",
        String(20),
        nullable=False,
        comment="running, succeeded, partial, failed, stopped or abandoned",
    ),
    Column("host", Text, nullable=False, default="", comment="host name of the run"),
    Column("pid", Integer, nullable=False, default=0, comment="its process id"),
    Column("accounts", Integer, nullable=False, default=0, comment="accounts walked"),
    Column(
        "accounts_failed",
        Integer,
        nullable=False,
        default=0,
        comment="accounts whose walk failed",
    ),
    Column("pages", Integer, nullable=False, default=0, comment="pages stored"),
    Column(
        "tasks_seen",
        Integer,
        nullable=False,
        default=0,
        comment="task items listed, duplicates included",
    ),
    Column("tasks_new", Integer, nullable=False, default=0, comment="tasks first seen"),
    Column(
        "tasks_changed",
        Integer,
        nullable=False,
        default=0,
        comment="tasks whose item changed",
    ),
    Column(
        "tasks_removed",
        Integer,
        nullable=False,
        default=0,
        comment="tasks marked removed",
    ),
    Column(
        "tasks_restored",
        Integer,
        nullable=False,
        default=0,
        comment="removed tasks listed again",
    ),
    Column(
        "status_changes",
        Integer,
        nullable=False,
        default=0,
        comment="rows written to task_status_changes",
    ),
    Column(
        "rejected",
        Integer,
        nullable=False,
        default=0,
        comment="items written to sync_rejects",
    ),
    Column(
        "bad_values",
        Integer,
        nullable=False,
        default=0,
        comment="field values that could not be read and were stored as NULL",
    ),
    Column("error", Text, comment="one line per failed account"),
    Column(
        "accounts_skipped",
        Integer,
        nullable=False,
        default=0,
        server_default="0",
        comment="accounts left alone because another run held their lock",
    ),
    Column(
        "heartbeat_at",
        UtcDateTime,
        comment="last sign of life of a running run; older than the lease: "
        "its process is gone and the next run marks it abandoned",
    ),
    Index(None, "started_at"),
    # Finding the runs still running stays cheap however many runs there are.
    Index(None, "outcome", "started_at"),
    comment="one row per run: one execution of a sync over some accounts",
)

sync_run_accounts = Table(
    "sync_run_accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, comment="row number"),
    Column(
        "run_id",
        Integer,
        ForeignKey("sync_runs.id"),
        nullable=False,
        comment="the run",
    ),
    Column("user_id", Id, nullable=False, comment="main account"),
    Column("sub_user_id", Id, nullable=False, comment="empty for the main account"),
    Column(
        "outcome",
        String(20),
        nullable=False,
        comment="succeeded, failed, stopped or skipped (another run held the lock)",
    ),
    Column(
        "started_at",
        UtcDateTime,
        nullable=False,
        comment="when the run took the account's lock and began its walk",
    ),
    Column(
        "finished_at",
        UtcDateTime,
        nullable=False,
        comment="when the run had written the account, just before letting go "
        "of its lock",
    ),
    Column("pages", Integer, nullable=False, default=0, comment="pages written"),
    Column("tasks_seen", Integer, nullable=False, default=0, comment="tasks listed"),
    Column("error", Text, comment="why it failed or was skipped"),
    Index(None, "run_id"),
    Index(None, "user_id", "sub_user_id", "started_at"),
    comment="one row per account a run walked or skipped",
)

account_locks = Table(
    "account_locks",
    metadata,
    Column("user_id", Id, primary_key=True, comment="main account"),
    Column("sub_user_id", Id, primary_key=True, comment="empty for the main account"),
    Column("holder", Text, nullable=False, comment="host:pid:random of the holder"),
    Column("host", Text, nullable=False, comment="host name of the holder"),
    Column("pid", Integer, nullable=False, comment="process id of the holder"),
    Column("acquired_at", UtcDateTime, nullable=False, comment="when it was taken"),
    Column(
        "expires_at",
        UtcDateTime,
        nullable=False,
        comment="end of the lease; the heartbeat moves it on while the run goes",
    ),
    comment="one row per account a run is writing, on databases without locks "
    "of their own (SQLite); PostgreSQL uses advisory locks and leaves it empty",
)

task_status_changes = Table(
    "task_status_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, comment="row number"),
    Column("task_uuid", Id, ForeignKey("tasks.uuid"), nullable=False, comment="task"),
    Column(
        "run_id",
        Integer,
        ForeignKey("sync_runs.id"),
        nullable=False,
        comment="the run that observed the change",
    ),
    Column(
        "event",
        String(20),
        nullable=False,
        comment="first_seen, changed, removed or restored",
    ),
    Column(
        "old_status",
        Integer,
        comment="status before a change or removal; empty for a first sighting "
        "or a restore",
    ),
    Column("old_status_str", Text, comment="the platform's text for old_status"),
    Column(
        "new_status",
        Integer,
        comment="status after the event; empty for a removal",
    ),
    Column("new_status_str", Text, comment="the platform's text for new_status"),
    Column(
        "old_seen_at",
        UtcDateTime,
        comment="last observation of the old state: the change happened after",
    ),
    Column(
        "observed_at",
        UtcDateTime,
        nullable=False,
        comment="when a run observed the new state: the change happened before",
    ),
    Index(None, "task_uuid", "observed_at"),
    Index(None, "observed_at"),
    Index(None, "new_status", "observed_at"),
    # The daily counts look up what the runs since their last refresh wrote.
    Index(None, "run_id", "observed_at"),
    comment="one row per observed status change, removal or restore of a task",
)

sync_rejects = Table(
    "sync_rejects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, comment="row number"),
    Column(
        "run_id",
        Integer,
        ForeignKey("sync_runs.id"),
        nullable=False,
        comment="the run that rejected the item",
    ),
    Column("user_id", Id, nullable=False, comment="main account of the page"),
    Column("sub_user_id", Id, nullable=False, comment="empty for the main account"),
    Column("endpoint", Text, nullable=False, comment="path of the list, as a template"),
    Column("page", Integer, nullable=False, comment="page number, from 1"),
    Column("reason", Text, nullable=False, comment="why the item was refused"),
    Column("item", Payload, comment="as received, sensitive values redacted"),
    Column("rejected_at", UtcDateTime, nullable=False, comment="when the page came"),
    Index(None, "run_id"),
    comment="one row per listed item that could not be stored as a task",
)

settings = Table(
    "settings",
    metadata,
    Column("key", String(100), primary_key=True, comment="setting name"),
    Column("value", Text, nullable=False, comment="its value, as text"),
    Column("updated_at", UtcDateTime, nullable=False, comment="when it was written"),
    comment="values the product keeps for readers: timezone is the platform's "
    "time zone, in which daily_status_rollup.day is counted",
)

daily_status_rollup = Table(
    "daily_status_rollup",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, comment="row number"),
    Column(
        "day",
        Date,
        nullable=False,
        comment="calendar day in the platform's time zone (settings.timezone)",
    ),
    Column("user_id", Id, nullable=False, comment="main account"),
    Column("sub_user_id", Id, nullable=False, comment="empty for the main account"),
    Column("status", Integer, comment="status code; empty when unreadable"),
    Column(
        "tasks",
        Integer,
        nullable=False,
        comment="listed tasks in this status at the end of the day (so far, for today)",
    ),
    Index(None, "day"),
    Index(None, "user_id", "sub_user_id", "day"),
    comment="tasks per account and status at the end of each day, kept up to "
    "date at the end of every run; read it through daily_status_counts",
)
