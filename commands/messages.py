"""The vocabulary every decider shares: commands, events, rejections, and the decision context.

Deciders are pure: the clock and new ids come in through `DecisionContext`, so a test can
replay any decision exactly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .bounds import StoredText


class Command(BaseModel):
    """A request to change state. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=100_000)

    idempotency_key: StoredText | None = None
    # The field that holds the bus's idempotency key (one reply per key, whatever is sent
    # again). A command whose Prefect shape already gives `idempotency_key` a domain meaning
    # (a flow run's: "the existing run of this flow with this key") names another field; one
    # that is safe to send again by its own content (a bulk of runs with their keys), None.
    BUS_KEY_FIELD: ClassVar[str | None] = "idempotency_key"

    @property
    def bus_key(self) -> str | None:
        return getattr(self, self.BUS_KEY_FIELD) if self.BUS_KEY_FIELD else None

    def explicitly_set(self) -> set[str]:
        """C-4: the fields the caller sent, so absent fields keep their value."""
        return set(self.model_fields_set) - {self.BUS_KEY_FIELD}


# How long a routine record (a heartbeat, a poll) outlives the moment a newer word is due
# without it (a worker offline, a queue not ready): the foreman, every 15 s, has written that
# word (an event kept) well before.
EXPIRY_MARGIN_SECONDS = 60


class Event(BaseModel):
    """A fact. `event_type` names the subject suffix; `schema_version` drives upcasting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_type: ClassVar[str]
    aggregate_type: ClassVar[str]
    schema_version: ClassVar[int] = 1

    def append_headroom(self) -> int:
        """Bytes this event must leave free under the broker's max payload when it is appended
        (checked, never stored): 0 for most. An event that creates or grows a run leaves room
        for the run's later events, which carry the whole run again with more on top
        (commands/bounds.py `RUN_STATE_HEADROOM_BYTES`)."""
        return 0

    def expires_no_sooner_than(self) -> float | None:
        """None: the log keeps this event for ever (every event but routine ones). Else it may
        expire from the log (`Settings.routine_retention_seconds`), but not within this
        many seconds: while it may still be its aggregate's latest word."""
        return None


class ErrorCode(StrEnum):
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID = "invalid"
    FORBIDDEN = "forbidden"
    UNAVAILABLE = "unavailable"


class Rejection(Exception):
    """Why a command changes nothing. Carries the reply code and, where useful, the field."""

    def __init__(self, code: ErrorCode, message: str, *, field: str | None = None, details: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.details = details

    def as_reply(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        if self.details is not None:
            error["details"] = self.details
        return error

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rejection) and (self.code, self.message, self.field) == (
            other.code,
            other.message,
            other.field,
        )

    def __repr__(self) -> str:
        return f"Rejection({self.code!s}, {self.message!r}, field={self.field!r})"


def not_found(message: str) -> Rejection:
    return Rejection(ErrorCode.NOT_FOUND, message)


def conflict(message: str) -> Rejection:
    return Rejection(ErrorCode.CONFLICT, message)


def invalid(message: str, field: str | None = None) -> Rejection:
    return Rejection(ErrorCode.INVALID, message, field=field)


def forbidden(message: str) -> Rejection:
    return Rejection(ErrorCode.FORBIDDEN, message)


class _RandomIds:
    """Version-4 UUIDs from the OS's random source, read 4 KiB at a time: `uuid.uuid4()` makes
    one system call per id, which cost ~5 % of the service's CPU per command."""

    _CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
    _SET = (0x4000 << 64) | (0x8000 << 48)

    def __init__(self, ids_per_read: int = 256):
        self._bytes_per_read = 16 * ids_per_read
        self._pool = b""
        self._at = 0

    def __call__(self) -> uuid.UUID:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(self._bytes_per_read), 0
        raw = int.from_bytes(self._pool[self._at:self._at + 16], "big")
        self._at += 16
        return uuid.UUID(int=(raw & self._CLEAR) | self._SET)


random_uuid4 = _RandomIds()


@dataclass
class DecisionContext:
    """What a decider may not fetch itself: the time and fresh ids."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    new_id: Callable[[], uuid.UUID] = random_uuid4

    @classmethod
    def fixed(cls, now: datetime, ids: Iterator[uuid.UUID] | None = None) -> DecisionContext:
        it = ids if ids is not None else (uuid.UUID(int=i) for i in range(1, 1 << 62))
        return cls(now=now, new_id=lambda: next(it))


_Model = TypeVar("_Model", bound=BaseModel)


def new_model_default(model: type[_Model]) -> Any:
    """A field's default that is a new `model()` each time (its JSON schema still shows it).
    pydantic deep-copies a default it cannot hash (a model holding a list, such as a run's
    policy; an empty dict or list) for every instance it validates: a command that creates a
    run took 18 – 26 µs to validate with those copies, 7.4 – 9.4 µs with factories instead
    (`bench/run_writes.py` prints the latter)."""
    return Field(default_factory=model, json_schema_extra={"default": model().model_dump(mode="json")})


def empty_dict() -> Any:
    """A field's default that is a new `{}` each time, not a deep copy (`new_model_default`)."""
    return Field(default_factory=dict, json_schema_extra={"default": {}})


def empty_list() -> Any:
    """A field's default that is a new `[]` each time, not a deep copy (`new_model_default`)."""
    return Field(default_factory=list, json_schema_extra={"default": []})
