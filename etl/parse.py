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
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, NamedTuple

import orjson

from etl.accounts import ID_LENGTH, Account

STATUS_LABELS = {1: "paused", 2: "running", 3: "waiting"}
REDACTED = "[redacted]"

# Callback URLs can point into a customer's private network.
SENSITIVE_KEYS = frozenset({"call_notify_url"})
# Each as it starts a member of an object in canonical JSON.
_KEYS_AS_JSON = tuple((key, f'"{key}":'.encode()) for key in SENSITIVE_KEYS)

_DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S")
_USUAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_INTEGER = re.compile(r"[+-]?\d+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNCLEAN_TEXT = (b"\\u0000", b"NaN", b"Infinity")
_SURROGATE_BYTES = re.compile(b"\xed[\xa0-\xbf]")
# The spaces trimmed from the ends of ids and names: those a person, a
# spreadsheet or a line end leaves. Python's own `strip()` also took the
# information separators (\x1c-\x1f), NEL and the Unicode line separators,
# by which two distinct ids may differ.
_TRIMMED = " \t\n\r\x0b\x0c\xa0\u3000"
# Built once: building an encoder for every item cost a third of encoding it.
_PAYLOAD_ENCODER = json.JSONEncoder(
    sort_keys=True, ensure_ascii=False, separators=(",", ":")
)
# orjson would write a datetime or a dataclass where the json module
# refuses it; passed through, it is refused as before.
_ORJSON_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
# datetime's methods that take keywords, `replace` and `astimezone`, cost
# several times its arithmetic, and a first sync converts two times of
# every task: times change zone as offsets added to these.
UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NAIVE_EPOCH = datetime(1970, 1, 1)
# Cleaning and redacting walk an item by recursion, two frames a level of
# lists; an item nested deeper than this is refused, well within Python's
# recursion limit. orjson writes no deeper than 254 levels, so only an item
# it refused is ever measured.
MAX_NESTING = 256
# What the typed columns hold on every supported database: values beyond
# them become NULL here rather than failing the page on one database only.
INT32 = 2**31
INT64 = 2**63


class ReadFloat(float):
    """A number read from JSON with a fraction or an exponent, or a NaN or
    Infinity, as `read_json` gives it.

    orjson writes a few floats in another form than the json module does
    (1e-05 as 0.00001, NaN as null), and refuses to write a subclass of
    float: so an item holding one is written by the json module, in the
    form its stored content hash was taken of (see `canonical_json`).
    """


class RejectedItem(Exception):
    """The item cannot be stored as a task; the reason is the message."""

    # Whether the item itself can be kept with the reason, cleaned.
    kept = True


class TooDeepItem(RejectedItem):
    """An item nested deeper than `MAX_NESTING`, which not even cleaning
    it for the rejects table can walk."""

    kept = False


# A named tuple: one is made for every task parsed, and a frozen dataclass,
# which sets each field through object.__setattr__, took five times as long.
class GroupRecord(NamedTuple):
    id: str
    name: str | None


# Not frozen, though never changed: a frozen dataclass sets each field
# through object.__setattr__, and making the records of every item took a
# sixth longer.
@dataclass(slots=True)
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
    # `raw` as JSON text in `payload_json` form, when parsing already made it.
    raw_json: str | None = field(default=None, repr=False)

    @property
    def group_id(self) -> str | None:
        return self.group.id if self.group else None

    def parsed(self) -> TaskRecord:
        """The record itself: a page may hold records or listed tasks."""
        return self


@dataclass(slots=True)  # not frozen: see TaskRecord
class ListedTask:
    """A listed item, identified: what tells whether the task changed.

    A re-sync needs only the uuid and content hash of the many tasks that
    did not change, and cleaning and coercing all their fields would cost
    more than fetching them; `parsed()` does that for the tasks written.
    """

    uuid: str
    content_hash: str
    account: Account
    zone: tzinfo
    item: dict[str, Any] = field(repr=False)
    needs_cleaning: bool = True
    # The item's canonical JSON, which its hash is taken of.
    canonical: bytes | None = field(default=None, repr=False)

    def parsed(self) -> TaskRecord:
        # Cleaning walks every string of the item, which cost a first sync
        # a fifth of its time; most items hold nothing it would change.
        raw_json = None
        if self.needs_cleaning:
            raw = clean(self.item)
        elif self.canonical and not _nested_secret(self.item, self.canonical):
            # The canonical text is then the payload itself: serializing
            # the item again cost as much as taking its hash.
            raw = _top_level_redacted(self.item)
            raw_json = self.canonical.decode()
        else:
            raw = redact(self.item)
        zone = self.zone
        bad: list[str] = []
        return TaskRecord(
            uuid=self.uuid,
            user_id=self.account.user_id,
            sub_user_id=self.account.sub_user_id,
            name=to_text(raw.get("name")),
            status=_field(raw, "status", lambda v: to_int(v, INT32), bad),
            status_str=to_text(raw.get("status_str")),
            created_at=_field(raw, "create_datetime", lambda v: to_utc(v, zone), bad),
            altered_at=_field(raw, "alter_datetime", lambda v: to_utc(v, zone), bad),
            maximumcall=_field(raw, "maximumcall", to_int, bad),
            dial_time_id=_field(raw, "dial_time_id", to_id, bad),
            destination_extension=_field(raw, "destination_extension", to_id, bad),
            caller_line_id=_field(raw, "caller_line_id", to_id, bad),
            bridge_group_id=_field(raw, "bridge_group_id", to_id, bad),
            group=parse_group(raw.get("group")),
            enable=_field(raw, "enable", to_bool, bad),
            remark=to_text(raw.get("remark")),
            raw=raw,
            content_hash=self.content_hash,
            bad_fields=tuple(bad),
            raw_json=raw_json,
        )


def parse_task(item: Any, account: Account, zone: tzinfo) -> TaskRecord:
    """One list item as a record; raise `RejectedItem` when it has no uuid."""
    return identify_task(item, account, zone).parsed()


def identify_task(item: Any, account: Account, zone: tzinfo) -> ListedTask:
    """The item's uuid and content hash; `RejectedItem` when it has no uuid
    or nests deeper than `MAX_NESTING`.

    The item is as `read_json` read it: a float read otherwise would be
    hashed in orjson's form of it (see `ReadFloat`).
    """
    if not isinstance(item, dict):
        raise RejectedItem(f"item is {type(item).__name__}, not an object")
    given = item.get("uuid")
    if type(given) is str and given.isascii() and "\x00" not in given:
        uuid = given.strip(_TRIMMED) or None  # as `to_text`: nothing to clean
    else:
        if type(given) is str:
            _refuse_unstorable(given)
        uuid = to_text(clean(given))
    if uuid is None:
        reason = "uuid is missing" if "uuid" not in item else "uuid is empty or null"
        raise RejectedItem(reason)
    if len(uuid) > ID_LENGTH:
        raise RejectedItem(f"uuid is longer than {ID_LENGTH} characters")
    canonical, needs_cleaning = _identity(_top_level_redacted(item))
    # Positional: with keywords, building the record took twice as long.
    return ListedTask(
        uuid,
        hashlib.sha256(canonical).hexdigest(),
        account,
        zone,
        item,
        needs_cleaning,
        canonical,
    )


def _refuse_unstorable(uuid: Any) -> None:
    """Refuse a uuid that no database can store as given.

    Cleaning drops a NUL and replaces a lone surrogate, and two ids that
    differ only by those became one task: the other was lost, unseen.
    """
    if clean(uuid) != uuid:
        raise RejectedItem(
            "uuid holds a NUL or a lone surrogate, which cannot be stored"
        )


def _identity(value: dict[str, Any]) -> tuple[bytes, bool]:
    """`canonical_json` of the value, and whether `clean` may change it.

    What orjson writes holds no non-finite number and no lone surrogate,
    which it refuses, so only a NUL can need cleaning, and JSON always
    escapes that. Cleaning walks the item by recursion, so an item orjson
    refused for its depth is cleaned only when it shows something to clean,
    and refused when deeper than cleaning can go.
    """
    written = _orjson_form(value)
    if written is None:
        if _nested_deeper_than(value, MAX_NESTING):
            raise TooDeepItem(f"item is nested more than {MAX_NESTING} levels deep")
        canonical = _json_module_form(value)
        return canonical, _shows_unclean(canonical)

    # orjson's bytes keep the buffer of several kilobytes it wrote them in.
    # A listed task keeps its JSON until the page is stored: the pages in
    # flight held 10 MB more at a run's peak than in a copy of the text.
    canonical = memoryview(written).tobytes()
    # A backslash, found much faster, is rare in itself.
    return canonical, b"\\" in canonical and b"\\u0000" in canonical


def _nested_deeper_than(value: Any, levels: int) -> bool:
    """Whether objects and arrays nest more than `levels` deep in `value`;
    found a level at a time, without recursion."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(levels):
        level = [
            child
            for parent in level
            for child in (parent.values() if isinstance(parent, dict) else parent)
            if isinstance(child, dict | list)
        ]
    return bool(level)


def parse_group(value: Any) -> GroupRecord | None:
    """The embedded script group; `null`, `{}` or an id-less object is none."""
    if not isinstance(value, dict):
        return None
    group_id = to_text(value.get("id"))
    if group_id is None or len(group_id) > ID_LENGTH:
        return None
    # Positional: with keywords, making it took three times as long.
    return GroupRecord(group_id, to_text(value.get("name")))


def status_label(status: int | None) -> str:
    return STATUS_LABELS.get(status, "unknown") if status is not None else "unknown"


def clean(value: Any) -> Any:
    """A copy safe for every database and log: no NUL, no sensitive values.

    PostgreSQL refuses U+0000 in text and JSONB, UTF-8 cannot encode a lone
    surrogate (JSON's "\\ud83d" from an emoji cut in half), and JSON has no
    NaN or Infinity although Python's decoder accepts them. Each is dropped
    or replaced everywhere, so SQLite and PostgreSQL hold the same rows.
    """
    if isinstance(value, str):
        value = value.replace("\x00", "")
        return _SURROGATE.sub("\ufffd", value) if not value.isascii() else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        cleaned: dict[Any, Any] = {}
        for key, item in value.items():
            name = clean(key)
            # Judged by the cleaned key, which is the one stored: a NUL makes
            # "call_notify_url\u0000" that very key. A value of another key
            # cleaned into it never replaces the redaction.
            if name in SENSITIVE_KEYS and (item or cleaned.get(name) == REDACTED):
                cleaned[name] = REDACTED
            else:
                cleaned[name] = clean(item)
        return cleaned
    if isinstance(value, list):
        return [clean(item) for item in value]
    return value


def redact(value: Any) -> Any:
    """`clean` for a value that holds nothing else to clean: a copy with the
    sensitive values replaced."""
    if isinstance(value, dict):
        return {
            key: REDACTED
            if key in SENSITIVE_KEYS and item
            else redact(item)
            if isinstance(item, dict | list)
            else item
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def content_hash(item: dict[str, Any]) -> str:
    """A digest of the item, to skip rows that did not change.

    It is taken before cleaning, which only the rows written need, but with
    the sensitive values replaced as cleaning replaces them: the digest never
    depends on a secret, and equals the cleaned payload's for every item
    that holds nothing else to clean. The account is left out on purpose: a
    task listed by two accounts must not look changed each time the other
    one lists it.
    """
    return hashlib.sha256(canonical_json(_top_level_redacted(item))).hexdigest()


def payload_json(value: Any) -> str:
    """The one JSON form of stored payloads: keys sorted, compact, UTF-8."""
    return canonical_json(value).decode(errors="surrogatepass")


def canonical_json(value: Any) -> bytes:
    """`payload_json` as UTF-8, a lone surrogate as "surrogatepass" makes it.

    This form is the json module's, byte for byte: stored content hashes
    were taken of it, and a new form would make every stored task look
    changed once. orjson writes it about ten times faster, which in a
    re-sync was a sixth of the whole run. It refuses what it would write
    otherwise (a `ReadFloat`) or not at all (an integer beyond 64 bits, a
    lone surrogate, a deep nesting), and the json module writes those.
    """
    written = _orjson_form(value)
    return _json_module_form(value) if written is None else written


def _orjson_form(value: Any) -> bytes | None:
    """`canonical_json` as orjson writes it; None where orjson refuses."""
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS)
    except TypeError:
        return None


def _shows_unclean(canonical: bytes) -> bool:
    """Whether the json module's form shows what `clean` changes: a NUL,
    always escaped; a non-finite number; or a lone surrogate, whose bytes
    by "surrogatepass" start as no other character's do. A name holding
    the word NaN shows too, and is merely cleaned for nothing."""
    if any(text in canonical for text in _UNCLEAN_TEXT):
        return True
    return _SURROGATE_BYTES.search(canonical) is not None


def _json_module_form(value: Any) -> bytes:
    return _PAYLOAD_ENCODER.encode(value).encode(errors="surrogatepass")


def read_json(content: bytes | str) -> Any:
    """A body as the json module reads it, its floats `ReadFloat`s.

    orjson reads a page of a hundred tasks in about a third of the time,
    and reads the same values as the json module, but for numbers: it has
    no hook to make a float a `ReadFloat`, and reads an integer beyond 64
    bits as a float. So a body holding a float, or anything orjson refuses
    (NaN, a lone surrogate, a byte order mark, another encoding than UTF-8,
    nesting past 1,024 levels), is read again by the json module, which
    then also raises its own errors. No field of a documented task is a
    float, and looking for one takes about a quarter of what orjson saves.
    """
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return _json_module_read(content)
    return _json_module_read(content) if _holds_float(value) else value


def _json_module_read(content: bytes | str) -> Any:
    return json.loads(content, parse_float=ReadFloat, parse_constant=ReadFloat)


def _holds_float(value: Any) -> bool:
    """Whether a value read by orjson holds a float, at any depth; found
    a level at a time, without recursion."""
    if type(value) is not dict and type(value) is not list:
        return type(value) is float
    stack = [value]
    while stack:
        node = stack.pop()
        children = node.values() if type(node) is dict else node
        for child in children:
            kind = type(child)
            if kind is float:
                return True
            if kind is dict or kind is list:
                stack.append(child)
    return False


def _top_level_redacted(item: dict[str, Any]) -> dict[str, Any]:
    hidden = {key: REDACTED for key in SENSITIVE_KEYS if item.get(key)}
    return {**item, **hidden} if hidden else item


def _nested_secret(item: dict[str, Any], canonical: bytes) -> bool:
    """Whether a sensitive key shows below the top level of the item.

    In compact JSON a key is always its quoted name and a colon, which no
    string value can hold unescaped, so counting finds every one.
    """
    for key, quoted in _KEYS_AS_JSON:  # a loop: `any` of a generator took longer
        if canonical.count(quoted) > (key in item):
            return True
    return False


def to_text(value: Any) -> str | None:
    """Ids and names as text; empty strings and nulls both mean no value."""
    if type(value) is str:  # the usual cases first: parsing calls this a lot
        return value.strip(_TRIMMED) or None
    if type(value) is int:  # the platform sends most ids as numbers
        return str(value)
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip(_TRIMMED)
    return text or None


def to_id(value: Any) -> str | None:
    """An id as text, refused when longer than the id columns hold."""
    text = to_text(value)
    if text is not None and len(text) > ID_LENGTH:
        raise ValueError(f"longer than {ID_LENGTH} characters")
    return text


def to_int(value: Any, limit: int = INT64) -> int | None:
    """An int from an int, an integral float or a string of digits, within
    -limit .. limit - 1 (a signed 64-bit column by default)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)  # the usual string: a match took three times as long
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        number = int(value.strip())
    if number is None:
        raise ValueError(f"not an integer: {value!r}")
    if not -limit <= number < limit:
        raise ValueError("out of range")
    return number


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
    local = _read_local(value.strip())
    if local is None:
        raise ValueError(f"not a time: {value!r}")
    offset = zone.utcoffset(local)  # of the local time, as on the platform
    try:
        if offset is None:
            return local.replace(tzinfo=zone).astimezone(UTC)
        return UTC_EPOCH + (local - NAIVE_EPOCH) - offset
    except OverflowError:
        # "0001-01-01 00:00:00" east of UTC falls before year 1.
        raise ValueError(f"out of range: {value!r}") from None


def _read_local(text: str) -> datetime | None:
    if _USUAL_TIME.fullmatch(text):
        # The platform's usual form: fromisoformat reads it ten times faster
        # than strptime, and refuses the same impossible dates.
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            return None
    for pattern in _DATE_FORMATS:
        try:
            return datetime.strptime(text, pattern)
        except ValueError:
            continue
    return None


def _field(raw: dict[str, Any], key: str, convert: Any, bad: list[str]) -> Any:
    try:
        return convert(raw.get(key))
    except ValueError:
        bad.append(key)
        return None
