"""Turning one raw task item into a typed record.

The platform's examples disagree on types (numbers as strings, ids that are
not UUIDs, empty strings for "no value") and its times are naive local
times. Parsing is forgiving field by field: a value that does not coerce
becomes NULL and is counted, the raw item is kept whole, and only an item
without a usable `uuid` is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

from etl.accounts import Account

STATUS_LABELS = {1: "paused", 2: "running", 3: "waiting"}
REDACTED = "[redacted]"

# Callback URLs can point into a customer's private network.
SENSITIVE_KEYS = frozenset({"call_notify_url"})

_DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S")
_INTEGER = re.compile(r"[+-]?\d+")


class RejectedItem(Exception):
    """The item cannot be stored as a task; the reason is the message."""


@dataclass(frozen=True)
class GroupRecord:
    id: str
    name: str | None


@dataclass(frozen=True)
class TaskRecord:
    uuid: str
    user_id: str
    sub_user_id: str
    name: str | None
    status: int | None
    status_str: str | None
    created_at: datetime | None
    altered_at: datetime | None
    maximumcall: int | None
    dial_time_id: str | None
    destination_extension: str | None
    caller_line_id: str | None
    bridge_group_id: str | None
    group: GroupRecord | None
    enable: bool | None
    remark: str | None
    raw: dict[str, Any]
    content_hash: str
    bad_fields: tuple[str, ...] = ()

    @property
    def group_id(self) -> str | None:
        return self.group.id if self.group else None


def parse_task(item: Any, account: Account, zone: tzinfo) -> TaskRecord:
    """One list item as a record; raise `RejectedItem` when it has no uuid."""
    if not isinstance(item, dict):
        raise RejectedItem(f"item is {type(item).__name__}, not an object")
    raw = clean(item)
    uuid = to_text(raw.get("uuid"))
    if uuid is None:
        reason = "uuid is missing" if "uuid" not in raw else "uuid is empty or null"
        raise RejectedItem(reason)

    bad: list[str] = []
    record = TaskRecord(
        uuid=uuid,
        user_id=account.user_id,
        sub_user_id=account.sub_user_id,
        name=to_text(raw.get("name")),
        status=_field(raw, "status", to_int, bad),
        status_str=to_text(raw.get("status_str")),
        created_at=_field(raw, "create_datetime", lambda v: to_utc(v, zone), bad),
        altered_at=_field(raw, "alter_datetime", lambda v: to_utc(v, zone), bad),
        maximumcall=_field(raw, "maximumcall", to_int, bad),
        dial_time_id=to_text(raw.get("dial_time_id")),
        destination_extension=to_text(raw.get("destination_extension")),
        caller_line_id=to_text(raw.get("caller_line_id")),
        bridge_group_id=to_text(raw.get("bridge_group_id")),
        group=parse_group(raw.get("group")),
        enable=_field(raw, "enable", to_bool, bad),
        remark=to_text(raw.get("remark")),
        raw=raw,
        content_hash=content_hash(raw),
        bad_fields=tuple(bad),
    )
    return record


def parse_group(value: Any) -> GroupRecord | None:
    """The embedded script group; `null`, `{}` or an id-less object is none."""
    if not isinstance(value, dict):
        return None
    group_id = to_text(value.get("id"))
    if group_id is None:
        return None
    return GroupRecord(id=group_id, name=to_text(value.get("name")))


def status_label(status: int | None) -> str:
    return STATUS_LABELS.get(status, "unknown") if status is not None else "unknown"


def clean(value: Any) -> Any:
    """A copy safe for every database and log: no NUL, no sensitive values.

    PostgreSQL refuses U+0000 in text and JSONB; stripping it everywhere keeps
    SQLite and PostgreSQL holding the same rows.
    """
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {
            clean(key): (REDACTED if key in SENSITIVE_KEYS and item else clean(item))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [clean(item) for item in value]
    return value


def content_hash(raw: dict[str, Any]) -> str:
    """A digest of the item, to skip rows that did not change.

    The account is left out on purpose: a task listed by two accounts must
    not look changed each time the other one lists it.
    """
    canonical = json.dumps(
        raw,
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def to_text(value: Any) -> str | None:
    """Ids and names as text; empty strings and nulls both mean no value."""
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip()
    return text or None


def to_int(value: Any) -> int | None:
    """An int from an int, an integral float or a string of digits."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    raise ValueError(f"not an integer: {value!r}")


def to_bool(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if value in (0, 1, "0", "1"):
        return bool(int(value))
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"not a boolean: {value!r}")


def to_utc(value: Any, zone: tzinfo) -> datetime | None:
    """A naive platform time in `zone` as an aware UTC datetime.

    Zero dates (`0000-00-00 00:00:00`) and impossible ones (`2022-11-00`)
    raise, so the caller stores NULL and counts it; the raw string stays in
    the payload.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a time: {value!r}")
    text = value.strip()
    for pattern in _DATE_FORMATS:
        try:
            local = datetime.strptime(text, pattern)
        except ValueError:
            continue
        return local.replace(tzinfo=zone).astimezone(UTC)
    raise ValueError(f"not a time: {value!r}")


def _field(raw: dict[str, Any], key: str, convert: Any, bad: list[str]) -> Any:
    try:
        return convert(raw.get(key))
    except ValueError:
        bad.append(key)
        return None
