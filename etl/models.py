"""The database schema: a public interface read by BI tools.

Tables are SQLAlchemy Core objects on one `MetaData` with a naming
convention, so every index and constraint has a deterministic name that
Alembic can compare and migrate. All timestamps are stored in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

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
Id = String(200)

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
    Column("name", Text, nullable=False, default=""),
    Column("origin", String(20), nullable=False, comment="configured or discovered"),
    Column("first_seen_at", UtcDateTime, nullable=False),
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
    Column("last_run_id", Integer),
)

groups = Table(
    "groups",
    metadata,
    Column("id", Id, primary_key=True, comment="the platform's script group id"),
    Column("name", Text),
    Column("first_seen_at", UtcDateTime, nullable=False),
    Column("last_changed_at", UtcDateTime, nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    Column("uuid", Id, primary_key=True, comment="the platform's id; not a UUID"),
    Column("user_id", Id, nullable=False, comment="owning main account"),
    Column("sub_user_id", Id, nullable=False, comment="empty for the main account"),
    Column("name", Text),
    Column("status", Integer, comment="1 paused, 2 running, 3 waiting; else kept"),
    Column("status_str", Text, comment="the platform's text for the status"),
    Column("created_at", UtcDateTime, comment="create_datetime, in UTC"),
    Column("altered_at", UtcDateTime, comment="alter_datetime, in UTC"),
    Column("maximumcall", BigInteger),
    Column("dial_time_id", Id),
    Column("destination_extension", Id, comment="script group id as sent"),
    Column("caller_line_id", Id),
    Column("bridge_group_id", Id),
    Column("group_id", Id, comment="id of the embedded script group"),
    Column("enable", Boolean),
    Column("remark", Text),
    Column("raw", Payload, nullable=False, comment="the item as received"),
    Column("content_hash", String(64), nullable=False),
    Column("first_seen_at", UtcDateTime, nullable=False),
    Column("last_changed_at", UtcDateTime, nullable=False),
    Column(
        "status_seen_at",
        UtcDateTime,
        nullable=False,
        comment="when the current status was first observed",
    ),
    Column("removed_at", UtcDateTime, comment="when the platform stopped listing it"),
    Index(None, "user_id", "sub_user_id"),
    Index(None, "status"),
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(20), nullable=False, comment="sync, backfill or replay"),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    Column(
        "outcome",
        String(20),
        nullable=False,
        comment="running, succeeded, partial, failed, stopped or abandoned",
    ),
    Column("host", Text, nullable=False, default=""),
    Column("pid", Integer, nullable=False, default=0),
    Column("accounts", Integer, nullable=False, default=0),
    Column("accounts_failed", Integer, nullable=False, default=0),
    Column("pages", Integer, nullable=False, default=0),
    Column("tasks_seen", Integer, nullable=False, default=0),
    Column("tasks_new", Integer, nullable=False, default=0),
    Column("tasks_changed", Integer, nullable=False, default=0),
    Column("tasks_removed", Integer, nullable=False, default=0),
    Column("tasks_restored", Integer, nullable=False, default=0),
    Column("status_changes", Integer, nullable=False, default=0),
    Column("rejected", Integer, nullable=False, default=0),
    Column("bad_values", Integer, nullable=False, default=0),
    Column("error", Text, comment="one line per failed account"),
    Index(None, "started_at"),
)

task_status_changes = Table(
    "task_status_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_uuid", Id, ForeignKey("tasks.uuid"), nullable=False),
    Column("run_id", Integer, ForeignKey("sync_runs.id"), nullable=False),
    Column(
        "event",
        String(20),
        nullable=False,
        comment="first_seen, changed, removed or restored",
    ),
    Column("old_status", Integer),
    Column("old_status_str", Text),
    Column("new_status", Integer),
    Column("new_status_str", Text),
    Column(
        "old_seen_at",
        UtcDateTime,
        comment="last observation of the old state: the change happened after",
    ),
    Column("observed_at", UtcDateTime, nullable=False),
    Index(None, "task_uuid", "observed_at"),
    Index(None, "observed_at"),
)

sync_rejects = Table(
    "sync_rejects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("sync_runs.id"), nullable=False),
    Column("user_id", Id, nullable=False),
    Column("sub_user_id", Id, nullable=False),
    Column("endpoint", Text, nullable=False),
    Column("page", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("item", Payload, comment="as received, sensitive values redacted"),
    Column("rejected_at", UtcDateTime, nullable=False),
    Index(None, "run_id"),
)
