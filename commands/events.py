"""The event envelope and the registry of event types and their upcasters.

Every message in the event log is one `EventEnvelope` as JSON. Readers look the payload model
up by `(type, schema_version)`; an old version is upcast, step by step, to the current one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import to_json

from .messages import Event

EVENT_TYPES: dict[str, type[Event]] = {}
# (event type, from version) -> function turning a payload of that version into version + 1.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def register_event(cls: type[Event]) -> type[Event]:
    if cls.event_type in EVENT_TYPES:
        raise ValueError(f"event type {cls.event_type} registered twice")
    EVENT_TYPES[cls.event_type] = cls
    return cls


def register_upcaster(event_type: str, from_version: int):
    def wrap(fn: Callable[[dict[str, Any]], dict[str, Any]]):
        UPCASTERS[(event_type, from_version)] = fn
        return fn

    return wrap


class UnknownEvent(Exception):
    """An event this reader cannot read: one a projection records and skips."""


class NewerThanReader(UnknownEvent):
    """A version of a known event type that this reader does not know yet: written by a newer
    runledger (during a rolling upgrade). A projection that handles the type waits at it,
    rather than skipping it, until it runs the version that reads it: skipped, it would be
    missing from the read model for good. (An unknown type reaches no projection that runs:
    each receives only the subjects of the types it handles.)"""


class EventEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    type: str
    schema_version: int
    occurred: datetime
    aggregate_type: str
    aggregate_id: str
    payload: dict[str, Any]
    idempotency_key: str | None = None

    @classmethod
    def wrap(cls, aggregate_id: str, event: Event, *, occurred: datetime, event_id: uuid.UUID,
             idempotency_key: str | None = None) -> EventEnvelope:
        return cls(
            id=event_id,
            type=event.event_type,
            schema_version=event.schema_version,
            occurred=occurred,
            aggregate_type=event.aggregate_type,
            aggregate_id=aggregate_id,
            payload=event.model_dump(mode="json"),
            idempotency_key=idempotency_key,
        )

    def decode(self) -> Event:
        return decode_event(self.type, self.schema_version, self.payload)


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """An event ready to append: its envelope as JSON bytes, the same bytes
    `EventEnvelope.model_dump_json()` gives, made with one serialisation of the payload."""

    id: uuid.UUID
    type: str
    aggregate_type: str
    aggregate_id: str
    data: bytes
    # `Event.expires_no_sooner_than`: None, kept for ever.
    expires_no_sooner_than: float | None = None
    # `Event.append_headroom`: what it must leave free under the max payload (not stored).
    headroom: int = 0


def encode_event(aggregate_id: str, event: Event, *, occurred: datetime, event_id: uuid.UUID,
                 idempotency_key: str | None = None) -> EncodedEvent:
    head = to_json({
        "id": event_id, "type": event.event_type, "schema_version": event.schema_version, "occurred": occurred,
        "aggregate_type": event.aggregate_type, "aggregate_id": aggregate_id,
    })
    data = b"".join((head[:-1], b',"payload":', event.__pydantic_serializer__.to_json(event),
                     b',"idempotency_key":', to_json(idempotency_key), b"}"))
    return EncodedEvent(event_id, event.event_type, event.aggregate_type, aggregate_id, data,
                        event.expires_no_sooner_than(), event.append_headroom())


def upcast_payload(event_type: str, schema_version: int, payload: dict[str, Any]) -> dict[str, Any]:
    """A payload in its current version's shape, upcast step by step from an older one."""
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        raise UnknownEvent(f"unknown event type {event_type!r}")
    version = schema_version
    if version > cls.schema_version:
        raise NewerThanReader(f"{event_type} v{version} is newer than this reader (v{cls.schema_version})")
    while version < cls.schema_version:
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise UnknownEvent(f"no upcaster for {event_type} v{version}")
        payload, version = step(dict(payload)), version + 1
    return payload


def decode_event(event_type: str, schema_version: int, payload: dict[str, Any]) -> Event:
    """A payload as its current event model."""
    current = upcast_payload(event_type, schema_version, payload)  # raises UnknownEvent first
    return EVENT_TYPES[event_type].model_validate(current)
