import json
import re
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from etl.accounts import Account
from etl.parse import (
    MAX_NESTING,
    REDACTED,
    GroupRecord,
    ReadFloat,
    RejectedItem,
    canonical_json,
    clean,
    content_hash,
    parse_task,
    payload_json,
    read_json,
    status_label,
    to_int,
    to_utc,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
ACCOUNT = Account("main-1", "sub-1")

CLASSIC = {
    "uuid": "0a1fd4ea-3bb6-4511-8-1c7931a22d55",
    "name": "0616",
    "create_datetime": "2020-06-16 16:33:28",
    "maximumcall": 1,
    "dial_time_id": 1505,
    "status": 2,
    "status_str": "执行中",
    "destination_extension": 5,
    "caller_line_id": "a62bdf07-df18-0f-07b411df4b6e",
    "bridge_group_id": 3,
    "group": {"id": 1, "name": "话术组1"},
}


def parse(**changes: object) -> object:
    return parse_task({**CLASSIC, **changes}, ACCOUNT, SHANGHAI)


def test_classic_example_becomes_a_typed_record() -> None:
    record = parse_task(CLASSIC, ACCOUNT, SHANGHAI)

    assert record.uuid == "0a1fd4ea-3bb6-4511-8-1c7931a22d55"
    assert (record.user_id, record.sub_user_id) == ("main-1", "sub-1")
    assert record.created_at == datetime(2020, 6, 16, 8, 33, 28, tzinfo=UTC)
    assert (record.status, record.status_str) == (2, "执行中")
    assert record.dial_time_id == "1505"
    assert record.destination_extension == "5"
    assert record.bridge_group_id == "3"
    assert record.group == GroupRecord(id="1", name="话术组1")
    assert record.raw == CLASSIC
    assert record.bad_fields == ()


@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [
        ({"status": "2"}, "status", 2),
        ({"maximumcall": "1"}, "maximumcall", 1),
        ({"maximumcall": " 7 "}, "maximumcall", 7),
        ({"maximumcall": 3.0}, "maximumcall", 3),
        ({"maximumcall": ""}, "maximumcall", None),
        ({"maximumcall": None}, "maximumcall", None),
        ({"destination_extension": "5"}, "destination_extension", "5"),
        ({"destination_extension": ""}, "destination_extension", None),
        ({"group": None}, "group", None),
        ({"group": {}}, "group", None),
        ({"group": {"name": "no id"}}, "group", None),
        ({"remark": ""}, "remark", None),
        ({"enable": True}, "enable", True),
        ({"enable": "0"}, "enable", False),
        ({"alter_datetime": None}, "altered_at", None),
        (
            {"create_datetime": "2020-06-16 16:33"},
            "created_at",
            datetime(2020, 6, 16, 8, 33, tzinfo=UTC),
        ),
        ({"name": "a\x00b"}, "name", "ab"),
    ],
    ids=[
        "status-string",
        "maximumcall-string",
        "padded-string",
        "integral-float",
        "empty-is-null",
        "null",
        "extension-string",
        "extension-empty",
        "group-null",
        "group-empty",
        "group-without-id",
        "remark-empty",
        "enable-bool",
        "enable-digit",
        "alter-null",
        "minutes-only",
        "nul-stripped",
    ],
)
def test_values_are_coerced_or_null(
    changes: dict, field: str, expected: object
) -> None:
    assert getattr(parse(**changes), field) == expected


def test_missing_group_key_is_no_group() -> None:
    item = {key: value for key, value in CLASSIC.items() if key != "group"}

    assert parse_task(item, ACCOUNT, SHANGHAI).group is None


@pytest.mark.parametrize(
    ("changes", "field", "raw_key"),
    [
        ({"create_datetime": "0000-00-00 00:00:00"}, "created_at", "create_datetime"),
        ({"create_datetime": "2022-11-00"}, "created_at", "create_datetime"),
        ({"create_datetime": "9:30"}, "created_at", "create_datetime"),
        ({"alter_datetime": 20200101}, "altered_at", "alter_datetime"),
        ({"maximumcall": "many"}, "maximumcall", "maximumcall"),
        ({"maximumcall": True}, "maximumcall", "maximumcall"),
        ({"status": "running"}, "status", "status"),
    ],
    ids=[
        "zero-date",
        "day-zero",
        "time-only",
        "number-as-date",
        "word",
        "bool",
        "status-word",
    ],
)
def test_unreadable_values_become_null_and_are_counted(
    changes: dict, field: str, raw_key: str
) -> None:
    record = parse(**changes)

    assert getattr(record, field) is None
    assert record.bad_fields == (raw_key,)
    assert record.raw[raw_key] == changes[raw_key]


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({**CLASSIC, "uuid": None}, "uuid is empty or null"),
        ({**CLASSIC, "uuid": ""}, "uuid is empty or null"),
        ({**CLASSIC, "uuid": {"x": 1}}, "uuid is empty or null"),
        ({k: v for k, v in CLASSIC.items() if k != "uuid"}, "uuid is missing"),
        (["not", "an", "object"], "item is list, not an object"),
    ],
    ids=["null", "empty", "object", "missing", "not-an-object"],
)
def test_item_without_usable_uuid_is_rejected(item: object, reason: str) -> None:
    with pytest.raises(RejectedItem, match=reason):
        parse_task(item, ACCOUNT, SHANGHAI)


def test_numeric_uuid_is_kept_as_text() -> None:
    assert parse(uuid=12345).uuid == "12345"


def test_status_outside_known_codes_is_kept_and_labelled_unknown() -> None:
    record = parse(status=7, status_str="新状态")

    assert (record.status, record.status_str) == (7, "新状态")
    assert status_label(record.status) == "unknown"
    assert [status_label(code) for code in (1, 2, 3)] == [
        "paused",
        "running",
        "waiting",
    ]


def test_callback_url_is_redacted_in_the_payload() -> None:
    record = parse(call_notify_url="http://10.0.0.5/cb?key=secret")

    assert record.raw["call_notify_url"] == REDACTED
    assert "secret" not in str(record.raw)


def test_nul_is_stripped_inside_the_payload_too() -> None:
    record = parse(name="x\x00y", remark="r\x00")

    assert record.raw["name"] == "xy"
    assert record.remark == "r"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"name": "plain 中文 name", "group": {"id": 7, "name": "组"}},
        {"name": "NUL\x00inside"},
        {"remark": "half an emoji \ud83d"},
        {"maximumcall": float("nan"), "enable": float("-inf")},
        {"group": {"id": 7, "name": "deep\x00"}, "tags": ["a\x00", {"b": "\udc00"}]},
        {"name": "NaN is a word", "call_notify_url": "http://10.0.0.8/hook"},
        {"nested": {"call_notify_url": "http://10.0.0.8/hook"}},
        {"bad\x00key": 1},
    ],
    ids=[
        "plain",
        "cjk",
        "nul",
        "surrogate",
        "non-finite",
        "nested",
        "word-nan-and-url",
        "nested-url",
        "key",
    ],
)
def test_the_stored_payload_is_the_cleaned_item_whatever_it_holds(
    extra: dict[str, object],
) -> None:
    # Read from JSON text, as every item is: NaN and lone surrogates too.
    item = read_json(json.dumps({**CLASSIC, **extra}))

    assert parse_task(item, ACCOUNT, SHANGHAI).raw == clean(item)


# Bodies whose canonical form orjson, left to itself, would write otherwise
# than the json module, or not at all.
ODD_BODIES = [
    '{"a":1e-05,"b":-6.7380758131588345e-09,"c":0.0001,"d":1e+16,"e":2.5}',
    '{"tiny":5e-324,"huge":1.7976931348623157e+308,"whole":100.0,"neg":-0.0}',
    '{"nan":NaN,"inf":Infinity,"ninf":-Infinity}',
    '{"big":123456789012345678901234,"small":-9223372036854775809}',
    '{"u64":18446744073709551615,"i64":-9223372036854775808}',
    '{"half":"\\ud83d","low":"\\udc00 x","pair":"\\ud83d\\ude00"}',
    '{"ctl":"\\u0000\\u001f\\b\\f\\n\\r\\t\\u007f","q":"\\"\\\\/"}',
    '{"z":1,"a":{"y":[1,{"b":2,"a":1}],"x":null},"中":"文","é":"\\u2028"}',
    '{"deep":' + "[" * 300 + "1" + "]" * 300 + "}",
]


@pytest.mark.parametrize("body", ODD_BODIES)
def test_the_canonical_form_is_the_json_module_s_byte_for_byte(body: str) -> None:
    # Stored hashes were taken of the json module's form: any other form of
    # the same item would make its task look changed once.
    value = read_json(body.encode())
    expected = json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":")
    ).encode(errors="surrogatepass")

    assert canonical_json(value) == expected


@pytest.mark.parametrize("depth", [254, MAX_NESTING - 1])
def test_an_item_nested_deeper_than_orjson_writes_is_stored_whole(depth: int) -> None:
    # orjson refuses to write past 254 levels; the json module writes these,
    # and an item with nothing to clean is not cleaned for it.
    tags = "[" * depth + '"t"' + "]" * depth
    body = '{"uuid":"deep-1","status":2,"tags":' + tags + "}"

    record = parse_task(read_json(body.encode()), ACCOUNT, SHANGHAI)

    assert record.raw_json == '{"status":2,"tags":' + tags + ',"uuid":"deep-1"}'
    assert record.status == 2


@pytest.mark.parametrize("depth", [MAX_NESTING, 900])
@pytest.mark.parametrize("inside", ['"t"', '"t\\u0000"', "NaN"])
def test_an_item_nested_too_deep_to_clean_is_refused(depth: int, inside: str) -> None:
    tags = "[" * depth + inside + "]" * depth
    item = read_json(('{"uuid":"deep-1","tags":' + tags + "}").encode())

    with pytest.raises(RejectedItem, match="nested more than 256 levels deep"):
        parse_task(item, ACCOUNT, SHANGHAI)


def _same_values(read: object, expected: object) -> bool:
    """Equal, of the very same types at every depth, NaN equal to NaN."""
    if type(read) is not type(expected):
        return False
    if isinstance(read, dict) and isinstance(expected, dict):
        return list(read) == list(expected) and all(
            _same_values(read[key], expected[key]) for key in read
        )
    if isinstance(read, list) and isinstance(expected, list):
        return len(read) == len(expected) and all(
            _same_values(a, b) for a, b in zip(read, expected, strict=True)
        )
    if isinstance(read, float):
        return repr(read) == repr(expected)
    return read == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"code":200,"data":[{"uuid":"t-1","n":5,"ok":true,"x":null}]}',
        b'{"data":[{"uuid":"t-1","group":{"id":2,"tags":[1,[2,[3.5]]]}}]}',
        b'{"data":[{"uuid":"t-1","big":[123456789012345678901234]}]}',
        b'{"a":18446744073709551615,"b":-9223372036854775808}',
        b'{"a":-9223372036854775809}',
        b"[1e-05, 1E400, -0.0, 0.1]",
        b'{"a":NaN,"b":[Infinity],"c":-Infinity}',
        b'{"a":"\\ud800 lone","b":"\\ud83d\\ude00"}',
        b'{"a":1,"b":2,"a":3}',
        '\ufeff{"a":"bom"}'.encode(),
        '{"a":"utf-16 \u56de"}'.encode("utf-16"),
        b'{"name":"\xe5\x9b\x9e\xe8\xae\xbf","url":"http://10.0.2.5/cb"}',
        b"5",
        b"2.5",
        b'"text"',
        b"null",
        b"[]",
        b"{}",
        '{"a":[1,2.5],"b":"\u56de\u8bbf"}',
        '{"a":"\\ud800","b":[123456789012345678901234]}',
        '{"a":{"b":[true,false,null,"x"]}}',
    ],
)
def test_bodies_are_read_as_the_json_module_reads_them(body: bytes | str) -> None:
    # read_json takes orjson's faster way where its values are the same.
    expected = json.loads(body, parse_float=ReadFloat, parse_constant=ReadFloat)

    assert _same_values(read_json(body), expected)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"a":1',
        b'{"a":"\x01"}',
        b'{"a":"\xff"}',
        b"[" * 1100 + b"]" * 1100,
        b"1" * 5000,
        b'{"a":1} x',
    ],
    ids=["empty", "cut", "control", "not-utf-8", "deep", "huge-int", "trailing"],
)
def test_bodies_are_refused_as_the_json_module_refuses_them(body: bytes) -> None:
    with pytest.raises(Exception) as expected:
        json.loads(body, parse_float=ReadFloat, parse_constant=ReadFloat)

    with pytest.raises(expected.type, match=re.escape(str(expected.value))):
        read_json(body)


def test_floats_are_read_as_json_reads_them() -> None:
    value = read_json(b'{"a":1e-05,"b":NaN,"c":123456789012345678901234,"d":7}')

    assert value["a"] == 1e-05 and value["b"] != value["b"]
    assert value["c"] == 123456789012345678901234 and type(value["c"]) is int
    assert type(value["d"]) is int


def test_content_hash_follows_content_only() -> None:
    same = parse_task(dict(CLASSIC), Account("other", ""), SHANGHAI)

    assert parse().content_hash == same.content_hash
    assert parse(status=1).content_hash != same.content_hash


def test_times_convert_from_the_configured_zone() -> None:
    assert to_utc("2026-03-08 12:00:00", ZoneInfo("America/New_York")) == datetime(
        2026, 3, 8, 16, 0, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("zone", "value"),
    [
        ("Asia/Shanghai", "2026-01-02 08:46:06"),
        ("Asia/Kathmandu", "2026-06-30 23:59:59"),
        ("Australia/Lord_Howe", "2026-04-05 01:45:00"),  # a half-hour fold
        ("America/New_York", "2026-03-08 02:30:00"),  # a gap: no such time
        ("America/New_York", "2026-11-01 01:30:00"),  # a fold: twice
        ("Europe/London", "2026-03-29 00:59:59"),
        ("UTC", "1970-01-01 00:00:00"),
        ("America/St_Johns", "9999-12-31 19:00:00"),
        ("Pacific/Kiritimati", "0001-01-02 13:59:59"),
    ],
)
def test_times_convert_as_datetime_s_own_zone_change_does(
    zone: str, value: str
) -> None:
    # The conversion adds offsets rather than calling `astimezone`, which
    # is slower: it must give the very same moment, gaps and folds included.
    local = datetime.fromisoformat(value)
    expected = local.replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)

    converted = to_utc(value, ZoneInfo(zone))

    assert converted == expected and converted.tzinfo is UTC
    assert converted.isoformat() == expected.isoformat()


@pytest.mark.parametrize(
    ("zone", "value"),
    [
        ("Asia/Shanghai", "0001-01-01 07:59:59"),
        ("America/New_York", "9999-12-31 23:00:00"),
    ],
)
def test_a_time_beyond_the_calendar_in_utc_is_refused(zone: str, value: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        to_utc(value, ZoneInfo(zone))


@pytest.mark.parametrize("value", ["1.5", "1e3", "0x10", [], {}], ids=str)
def test_to_int_refuses_what_is_not_an_integer(value: object) -> None:
    with pytest.raises(ValueError):
        to_int(value)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"call_notify_url": "http://10.0.0.8/hook"},
        {"call_notify_url": None},
        {"nested": {"call_notify_url": "http://10.0.0.8/hook"}},
        {"tags": [{"call_notify_url": "http://10.0.0.8/hook"}]},
        {"remark": 'quotes "call_notify_url": inside'},
        {"call_notify_url\x00": "http://10.0.0.8/hook"},
        {"x": {"call_\x00notify_url": "http://10.0.0.8/hook"}},
        {"call_notify_url": "http://a/1", "call_notify_url\x00": "http://10.0.0.8/h"},
        {"call_notify_url\x00": "http://10.0.0.8/h", "call_notify_url": None},
    ],
    ids=[
        "plain",
        "url",
        "null-url",
        "nested-url",
        "url-in-list",
        "quoted-key",
        "key-with-nul",
        "nested-key-with-nul",
        "key-cleaned-into-another",
        "null-after-a-key-cleaned-into-it",
    ],
)
def test_the_payload_text_is_the_cleaned_item_without_secrets(
    extra: dict[str, object],
) -> None:
    record = parse_task({**CLASSIC, **extra}, ACCOUNT, SHANGHAI)
    text = record.raw_json or payload_json(record.raw)

    assert json.loads(text) == clean({**CLASSIC, **extra})
    assert "10.0.0.8" not in text
    assert "10.0.0.8" not in json.dumps(clean({**CLASSIC, **extra}))


def test_the_content_hash_of_an_item_never_changes_between_versions() -> None:
    # Stored hashes decide what a re-sync rewrites: a new form of the same
    # item would rewrite every task once, as if each had changed.
    item = {
        "uuid": "u-1",
        "name": "活动推广",
        "status": 2,
        "maximumcall": 5,
        "enable": True,
        "remark": None,
        "group": {"id": 1, "name": "话术组1"},
        "call_notify_url": "http://10.0.0.5/cb?key=s",
    }

    assert content_hash(item) == (
        "164b963bedb21d56e0ab1687c92602b051f95ffdf0ac26f46bfa9f32ecf07785"
    )
    assert parse_task(item, ACCOUNT, SHANGHAI).content_hash == content_hash(item)
