"""`replay --as-of`: the log as the stream held it at a moment, by the stream's stored times
(which follow stream order), not by each event's decision time (two service instances decide
side by side: a later event may carry an earlier `occurred`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from runledger.projections.replay import _stored_by
from runledger.projections.runner import RawEvent

MOMENT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def an_event(occurred: datetime, stored: datetime | None) -> RawEvent:
    data = json.dumps({"id": "00000000-0000-0000-0000-000000000001", "type": "FlowCreated", "schema_version": 1,
                       "aggregate_type": "flow", "aggregate_id": "a", "occurred": occurred.isoformat(),
                       "payload": {}}).encode()
    stored_ns = 0 if stored is None else int(stored.timestamp() * 1_000_000) * 1_000
    return RawEvent(1, "ns.evt.flow.a.FlowCreated", data, stored_ns)


def test_the_stored_time_decides_whatever_the_event_says_it_occurred():
    second = timedelta(seconds=1)
    assert _stored_by(an_event(MOMENT - second, MOMENT), MOMENT)
    assert not _stored_by(an_event(MOMENT - second, MOMENT + second), MOMENT)  # decided before, stored after
    assert _stored_by(an_event(MOMENT + second, MOMENT - second), MOMENT)


def test_without_a_stored_time_the_decision_time_decides():
    assert _stored_by(an_event(MOMENT, None), MOMENT)
    assert not _stored_by(an_event(MOMENT + timedelta(microseconds=1), None), MOMENT)
