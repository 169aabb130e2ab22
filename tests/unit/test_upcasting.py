"""Old event versions are upcast on read, step by step; unknown ones are refused clearly."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import ClassVar

import pytest

from runledger.commands import events
from runledger.commands.events import EventEnvelope, UnknownEvent, decode_event
from runledger.commands.messages import Event


class _Renamed(Event):
    """v3 of a test event: v1 had `title`, v2 renamed it `label`, v3 added `size`."""

    event_type: ClassVar[str] = "TestRenamed"
    aggregate_type: ClassVar[str] = "test"
    schema_version: ClassVar[int] = 3
    label: str
    size: int


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(events.EVENT_TYPES, "TestRenamed", _Renamed)
    monkeypatch.setitem(events.UPCASTERS, ("TestRenamed", 1), lambda p: {"label": p["title"]})
    monkeypatch.setitem(events.UPCASTERS, ("TestRenamed", 2), lambda p: {**p, "size": 0})


def test_an_old_version_is_upcast_to_the_current_model():
    assert decode_event("TestRenamed", 1, {"title": "a"}) == _Renamed(label="a", size=0)
    assert decode_event("TestRenamed", 2, {"label": "b"}) == _Renamed(label="b", size=0)
    envelope = EventEnvelope(id=uuid.uuid4(), type="TestRenamed", schema_version=1, occurred=datetime.now(UTC),
                             aggregate_type="test", aggregate_id="x", payload={"title": "c"})
    assert envelope.decode() == _Renamed(label="c", size=0)


def test_unknown_types_and_newer_versions_are_refused():
    with pytest.raises(UnknownEvent, match="unknown event type"):
        decode_event("NoSuchEvent", 1, {})
    with pytest.raises(UnknownEvent, match="newer than this reader"):
        decode_event("TestRenamed", 4, {})
