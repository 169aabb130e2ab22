"""What the read side can store, as annotated types shared by every command, event and query.

The event log accepts any JSON; the Postgres read models do not. Whatever a command model
accepts must be storable by the projections, or the read model stops at that event for good:

- text: Postgres `text` and `jsonb` reject U+0000 (and a lone UTF-16 surrogate cannot be
  encoded at all), so stored text rejects both; names also reject control characters;
- integers: an `integer` column stops at 2^31-1, a `bigint` (and `OFFSET`) at 2^63-1;
- JSON documents: no NUL in keys or strings, finite numbers, integers of at most 64 bits,
  nesting at most `MAX_JSON_DEPTH` deep;
- datetimes: read as UTC (naive = UTC) and inside `EARLIEST`..`LATEST`, so the conversion to
  UTC, a day of arithmetic either side and `timestamptz` all hold;
- filters: at most `MAX_FILTER_VALUES` values each (asyncpg binds at most 32,767 parameters).

Each rule is one function and one type here; the error messages name what is wrong.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, Field
from pydantic_core import to_json

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
JSON_INT_MIN = -(2**63)
JSON_INT_MAX = 2**64 - 1
MAX_JSON_DEPTH = 64
MAX_FILTER_VALUES = 10_000
# A day inside Python's datetime range (years 1..9999), so that a conversion to UTC and a
# day of arithmetic either side cannot overflow; Postgres timestamptz holds all of it.
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, tzinfo=UTC)

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls, DEL and C1 controls, plus what text may not hold at all.
_NOT_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _describe(ch: str) -> str:
    if ch == "\x00":
        return "the NUL character (U+0000)"
    if "\ud800" <= ch <= "\udfff":
        return f"a lone surrogate (U+{ord(ch):04X})"
    return f"a control character (U+{ord(ch):04X})"


def check_storable_text(value: str) -> str:
    """No NUL and no lone surrogate: what Postgres `text` and `jsonb` can hold."""
    found = _UNSTORABLE.search(value)
    if found:
        raise ValueError(f"must not contain {_describe(found.group())}")
    return value


def check_name_characters(value: str) -> str:
    """Storable text without control characters (C0, DEL, C1): for names."""
    found = _NOT_IN_NAMES.search(value)
    if found:
        raise ValueError(f"name must not contain {_describe(found.group())}")
    return value


def _json_problem(value: Any, depth: int, path: str) -> str | None:
    where = f" (at {path})" if path else ""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        found = _UNSTORABLE.search(value)
        return f"must not contain {_describe(found.group())}{where}" if found else None
    if isinstance(value, int):
        if not JSON_INT_MIN <= value <= JSON_INT_MAX:
            return f"integers must be between -2^63 and 2^64-1{where}"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"numbers must be finite (no NaN or Infinity){where}"
    if isinstance(value, dict | list):
        if depth >= MAX_JSON_DEPTH:
            return f"must not nest deeper than {MAX_JSON_DEPTH} levels{where}"
        if isinstance(value, list):
            for i, item in enumerate(value):
                problem = _json_problem(item, depth + 1, f"{path}[{i}]")
                if problem:
                    return problem
            return None
        for key, item in value.items():
            if not isinstance(key, str):
                return f"object keys must be strings{where}"
            found = _UNSTORABLE.search(key)
            inner = f"{path}.{key}" if path else key
            if found:
                return f"keys must not contain {_describe(found.group())} (at {inner!r})"
            problem = _json_problem(item, depth + 1, inner)
            if problem:
                return problem
        return None
    return f"must be JSON (found a {type(value).__name__}){where}"


def lone_surrogate_at(value: Any) -> tuple[str, str] | None:
    """Where a decoded JSON value first holds a lone surrogate, as (its dotted path, what is
    wrong), or None. JSON's own parser refuses a lone surrogate escape (`"\\ud800"`) before any
    field sees it; Python's `json` decodes it, and this says which field holds it. A key's path
    ends in `[key]` after its object's (the key itself cannot be named: it is the surrogate)."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            found = _LONE_SURROGATE.search(item)
            if found:
                return ".".join(path), f"must not contain {_describe(found.group())}"
        elif isinstance(item, list):
            stack.extend(((*path, str(i)), v) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            children = []
            for key, v in item.items():
                found = _LONE_SURROGATE.search(key)
                if found:
                    return ".".join((*path, "[key]")), f"keys must not contain {_describe(found.group())}"
                children.append(((*path, key), v))
            stack.extend(reversed(children))
    return None


def check_json_document(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON object Postgres `jsonb` stores as it is."""
    problem = _json_problem(value, 0, "")
    if problem:
        raise ValueError(problem)
    return value


def as_bounded_utc(value: datetime) -> datetime:
    """UTC and timezone-aware (a naive time is read as UTC, as Prefect does), inside
    `EARLIEST`..`LATEST`."""
    try:
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise ValueError(f"must be between {EARLIEST.isoformat()} and {LATEST.isoformat()} once converted to UTC")
    return utc


StoredText = Annotated[str, AfterValidator(check_storable_text)]
JsonDocument = Annotated[dict[str, Any], AfterValidator(check_json_document)]


# Prefect's limit on the parameters of a deployment or a run (`SizedParameters`).
MAX_PARAMETERS_BYTES = 524_288

# What a run's creation must leave free under the broker's max payload: every later state of
# the run is an event that carries the whole run again, with the state (its message, its
# details, an inline result) on top. A run created closer to the limit could never be moved
# to another state, not even cancelled or failed.
RUN_STATE_HEADROOM_BYTES = 64 * 1024
# A run made from a deployment is larger than the deployment's own event for the same
# parameters, labels and tags (its name, state, `created_by`, two labels, a tag, a batch's
# headers): a deployment leaves this much more.
RUN_FROM_DEPLOYMENT_BYTES = 8 * 1024
# An update of what was created with room to spare may take a little of it (the event's
# `changed` list, a longer value): it need not leave quite as much as the creation did, so
# that what was made within the rules can always be changed back.
UPDATE_SLACK_BYTES = 4 * 1024


def parameters_size_problem(parameters: dict[str, Any]) -> str | None:
    """Why parameters are too large, counted as Prefect counts them: compact JSON with
    non-ASCII characters escaped (`\\u00e9` is six bytes), so the same parameters pass or fail
    on both. Escaping makes a character at most six times its UTF-8 size, so most parameters
    are known to fit from pydantic-core's quicker UTF-8 encoding; only the rest are counted."""
    if not parameters or 6 * len(to_json(parameters)) <= MAX_PARAMETERS_BYTES:
        return None
    size = len(json.dumps(parameters, separators=(",", ":")).encode())
    if size > MAX_PARAMETERS_BYTES:
        return f"parameters are {size} bytes once serialised, more than the {MAX_PARAMETERS_BYTES} allowed"
    return None


def _sized(parameters: dict[str, Any]) -> dict[str, Any]:
    problem = parameters_size_problem(parameters)
    if problem:
        raise ValueError(problem)
    return parameters


# A run's parameters, checked with the request's body as Prefect's `SizedParameters` is (a bulk
# with one oversized item is refused whole).
SizedParameters = Annotated[JsonDocument, AfterValidator(_sized)]
NonNegativeInt32 = Annotated[int, Field(ge=0, le=INT32_MAX)]
PositiveInt32 = Annotated[int, Field(gt=0, le=INT32_MAX)]
NonNegativeInt64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
UtcDatetime = Annotated[datetime, AfterValidator(as_bounded_utc)]


def json_time(value: datetime | None) -> str | None:
    """A time in a reply built by hand, written as every model's reply writes it (pydantic):
    ISO 8601 in UTC with `Z`, so one reply never says `+00:00` where another says `Z`."""
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def first_past_int32(values: dict[Any, int]) -> tuple[Any, int] | None:
    """The first (key, value) above `INT32_MAX`, or None: for values the rules derive."""
    for key, value in values.items():
        if value > INT32_MAX:
            return key, value
    return None
