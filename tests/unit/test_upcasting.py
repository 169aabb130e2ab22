"""Old event versions are upcast on read, step by step; unknown ones are refused clearly."""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import UTC, datetime
from typing import ClassVar

import pytest

from runledger.commands import deployments as dp
from runledger.commands import events
from runledger.commands import task_runs as tr
from runledger.commands.events import (
    EventEnvelope,
    NewerThanReader,
    UnknownEvent,
    decode_event,
    encode_event,
)
from runledger.commands.messages import DecisionContext, Event
from runledger.commands.states import State, StateDetails, StateType
from runledger.commands.unique_keys import UniqueKeyClaim

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _ids():
    return (uuid.UUID(int=n) for n in itertools.count(1000))


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


def test_unknown_types_are_refused_and_newer_versions_as_written_by_a_newer_version():
    with pytest.raises(UnknownEvent, match="unknown event type"):
        decode_event("NoSuchEvent", 1, {})
    with pytest.raises(NewerThanReader, match="newer than this reader"):
        decode_event("TestRenamed", 4, {})


# Events that gained a field are a new version: an older reader then refuses them as newer
# (NewerThanReader: its projections wait there) instead of failing on a field it does not
# know (events forbid extra).

def _deployment_updated() -> tuple[dp.Deployment, dp.DeploymentUpdated]:
    made = dp.decide_create_deployment(
        dp.CreateDeployment.model_validate({"name": "nightly", "flow_id": str(uuid.UUID(int=99))}),
        UniqueKeyClaim(), None, True, dp.Placement(), DecisionContext.fixed(NOW, _ids()))
    deployment = next(e.event.deployment for e in made.events if isinstance(e.event, dp.DeploymentCreated))
    paused = dp.decide_set_paused(deployment.id, True, deployment, DecisionContext.fixed(NOW, _ids()))
    event = next(e.event for e in paused.events if isinstance(e.event, dp.DeploymentUpdated))
    assert event.by_pause_or_resume
    return deployment, event


def _cache_entry(n: int = 7) -> tr.TaskCacheEntry:
    state = State(id=uuid.UUID(int=n), type=StateType.COMPLETED, name="Completed", timestamp=NOW,
                  data={"type": "json", "value": n}, state_details=StateDetails(cache_key="k"))
    return tr.TaskCacheEntry(cache_key="k", state=state)


def test_a_v1_deployment_updated_reads_as_it_did():
    deployment, _ = _deployment_updated()
    v1 = {"deployment": deployment.model_dump(mode="json"), "changed": ["description"]}
    event = decode_event("DeploymentUpdated", 1, v1)
    assert event == dp.DeploymentUpdated(deployment=deployment, changed=["description"], by_pause_or_resume=False)
    assert dp.evolve(None, event) == deployment


def test_a_v1_task_cache_entry_reads_as_it_did():
    entry = _cache_entry()
    event = decode_event("TaskCacheEntryRecorded", 1, {"entry": entry.model_dump(mode="json")})
    assert event == tr.TaskCacheEntryRecorded(entry=entry)
    assert tr.evolve_cache(None, event) == tr.TaskCache(cache_key="k", entries=(entry,))


def _task_run(**fields) -> tr.TaskRun:
    made = tr.decide_create_task_run(tr.CreateTaskRun(task_key="k", dynamic_key="d"), None, None, None, None,
                                     DecisionContext.fixed(NOW, _ids()))
    return made.result.model_copy(update=fields)


@pytest.mark.parametrize("event_type", ["TaskRunCreated", "TaskRunStateSet", "TaskRunUpdated"])
def test_a_v1_task_run_event_reads_as_a_run_that_does_not_wait(event_type):
    run = _task_run()
    v1 = run.model_dump(mode="json")
    del v1["waiting_reason"]  # v1 runs had no such field
    payload = {"run": v1, **({"changed": ["name"]} if event_type == "TaskRunUpdated" else {})}
    event = decode_event(event_type, 1, payload)
    assert event.run == run and event.run.waiting_reason is None
    assert tr.evolve(None, event) == run


@pytest.mark.parametrize("event", [
    _deployment_updated()[1], tr.TaskCacheEntryRecorded(entry=_cache_entry(), kept=(_cache_entry(6),)),
    tr.TaskRunCreated(run=_task_run()), tr.TaskRunStateSet(run=_task_run()),
    tr.TaskRunUpdated(run=_task_run(), changed=["name"])],
    ids=["DeploymentUpdated", "TaskCacheEntryRecorded", "TaskRunCreated", "TaskRunStateSet", "TaskRunUpdated"])
def test_events_with_a_new_field_are_written_at_v2_and_refused_cleanly_by_a_v1_reader(event, monkeypatch):
    encoded = json.loads(encode_event("a", event, occurred=NOW, event_id=uuid.uuid4()).data)
    assert encoded["schema_version"] == 2
    assert decode_event(event.event_type, 2, encoded["payload"]) == event
    monkeypatch.setattr(type(event), "schema_version", 1)  # a reader from before the field
    with pytest.raises(NewerThanReader, match="newer than this reader"):
        decode_event(event.event_type, 2, encoded["payload"])
