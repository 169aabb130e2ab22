"""Unique keys: "at most one X with this key", decided in the log.

A key is claimed by appending a claim event to an aggregate of its own, in the same atomic
batch as the object that takes it, with the expected-sequence check that the key is free:
of two concurrent creates with one key, exactly one lands (the other's check fails, it
decides again and finds the key taken). The claim names its owner, so a create that finds
its key taken can answer with the existing object (`created: false`) instead of an error
(domain idempotency, unlike the bus's idempotency record, which replays one reply).

Keys of every scope (a flow's name; a deployment's (flow, name); a flow run's idempotency
key within its flow; later a task run's keys) are claims of one aggregate type,
`unique_key`, whose id is the scope and a hash of the key: any key fits in a subject token,
and a claim is loaded with one direct get (its last event is its state). Work-pool names
came first and keep their own aggregate and events (`work_pool_name`, `WorkPoolNameClaimed`),
which existing logs hold; they follow the same rules.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import ClassVar

from .decisions import NewEvent
from .events import register_event
from .messages import Event

UNIQUE_KEY = "unique_key"


@dataclass(frozen=True, slots=True)
class UniqueKeyClaim:
    """Who holds a key; `owner_id` is None when the key is free."""

    owner_id: uuid.UUID | None = None


class _KeyEvent(Event):
    aggregate_type: ClassVar[str] = UNIQUE_KEY
    scope: str
    key: list[str]
    owner_id: uuid.UUID


@register_event
class UniqueKeyClaimed(_KeyEvent):
    event_type: ClassVar[str] = "UniqueKeyClaimed"


@register_event
class UniqueKeyReleased(_KeyEvent):
    event_type: ClassVar[str] = "UniqueKeyReleased"


def evolve_claim(claim: UniqueKeyClaim, event: Event) -> UniqueKeyClaim:
    match event:
        case UniqueKeyClaimed(owner_id=owner):
            return UniqueKeyClaim(owner)
        case UniqueKeyReleased():
            return UniqueKeyClaim(None)
    return claim


@dataclass(frozen=True)
class UniqueKeyScope:
    """One kind of key. `name` is part of every claim's aggregate id, so two scopes never
    share a claim: keep it short, lowercase, and never change it."""

    name: str

    def __post_init__(self) -> None:
        if not self.name or not all(c.islower() or c == "_" for c in self.name):
            raise ValueError(f"a scope name is lowercase letters and underscores: {self.name!r}")

    def aggregate_id(self, *key: str) -> str:
        """`<scope>-<40 hex digits>`: the hash of the key's parts, in order, as JSON (so
        ("a.b", "c") and ("a", "b.c") differ)."""
        digest = hashlib.sha256(json.dumps([self.name, *key], ensure_ascii=False).encode()).hexdigest()
        return f"{self.name}-{digest[:40]}"

    def claim(self, owner_id: uuid.UUID, *key: str) -> NewEvent:
        return NewEvent(self.aggregate_id(*key), UniqueKeyClaimed(scope=self.name, key=list(key), owner_id=owner_id))

    def release(self, owner_id: uuid.UUID, *key: str) -> NewEvent:
        return NewEvent(self.aggregate_id(*key), UniqueKeyReleased(scope=self.name, key=list(key), owner_id=owner_id))


FLOW_NAME = UniqueKeyScope("flow_name")
