"""Task runs, pure: creates and their keys (TR-1, TR-2), the three task policies (TR-3…TR-5,
OR-14…OR-20), the bookkeeping (TR-6), what is queued on a task key (TQ-4) and the rule that a
run is started by one task worker at a time; the key encoding of the task subjects."""

from __future__ import annotations

import itertools
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from runledger.commands import flow_runs as fr
from runledger.commands import task_run_rules as rules
from runledger.commands import task_runs as tr
from runledger.commands.decisions import Outcome
from runledger.commands.messages import DecisionContext, Rejection
from runledger.commands.states import State, StateCreate, StateDetails, StateType
from runledger.commands.task_keys import MAX_ENCODED_TASK_KEY, decode_task_key, encode_task_key

T = StateType
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(minutes=5)
_ids = (uuid.UUID(int=i) for i in itertools.count(700_000))


def ctx(now: datetime = NOW) -> DecisionContext:
    return DecisionContext.fixed(now, _ids)


def create(**fields: Any) -> tr.CreateTaskRun:
    return tr.CreateTaskRun(**{"task_key": "k", "dynamic_key": "0", **fields})


def deferred(name: str = "Scheduled", at: datetime | None = None) -> StateCreate:
    return StateCreate(type=T.SCHEDULED, name=name, state_details=StateDetails(deferred=True, scheduled_time=at))


def a_run(state: StateCreate | None = None, **fields: Any) -> tr.TaskRun:
    d = tr.decide_create_task_run(create(state=state or deferred(), **fields), None, None, None,
                                  None, ctx(EARLIER))
    return d.result


def propose(run: tr.TaskRun, state: StateCreate, *, force: bool = False, worker: str | None = None,
            delivery: tr.TaskDelivery | None = None, now: datetime = NOW,
            facts: rules.TaskFacts = rules.NO_FACTS):
    cmd = tr.SetTaskRunState(id=run.id, state=state, force=force, task_worker_id=worker, delivery=delivery)
    return tr.decide_set_task_run_state(cmd, run, ctx(now), facts)


def then(run: tr.TaskRun, decision) -> tr.TaskRun:
    return decision.after.get(str(run.id), run)


def start(run: tr.TaskRun, worker: str = "w1", attempt: int = 1, message: str = "TASKS:1", **kw: Any):
    return propose(run, StateCreate(type=T.RUNNING), worker=worker,
                   delivery=tr.TaskDelivery(state_id=run.queued_state_id, attempt=attempt, message=message), **kw)


# ---------------------------------------------------------------------------------------------
# Creates


def test_a_create_claims_its_keys_and_a_deferred_scheduled_state_queues_it_on_the_scheduled_side():
    d = tr.decide_create_task_run(create(state=deferred(), parameters={"x": 1}), None, None, None, None,
                                  ctx())
    run = d.result
    assert d.created is True and run.state_type is T.SCHEDULED and run.parameters == {"x": 1}
    assert [type(e.event).__name__ for e in d.events] == ["TaskRunCreated"]  # one event: its id is its keys'
    assert run.id == tr.keys_id(None, "k", "0")
    assert [(q.task_key, q.side) for q in d.queue] == [("k", "scheduled")]
    assert run.queued_state_id == run.state.id == d.queue[0].run.queued_state_id
    assert run.state.state_details.task_run_id == run.id


def test_without_a_state_a_create_is_pending_and_not_queued():
    d = tr.decide_create_task_run(create(), None, None, None, None, ctx())
    assert d.result.state_type is T.PENDING and d.queue == []


def test_the_same_keys_return_the_existing_run_unchanged_its_state_ignored():
    existing = a_run()
    d = tr.decide_create_task_run(create(state=StateCreate(type=T.RUNNING)), existing, None,
                                  None, None, ctx())
    assert d.created is False and d.events == [] and d.result == existing and d.queue == []


def test_a_client_chosen_id_writes_a_marker_under_the_keys_id_and_frees_it_on_delete():
    chosen = uuid.UUID(int=77)
    d = tr.decide_create_task_run(create(id=chosen), None, None, None, None, ctx())
    assert d.result.id == chosen
    assert [(e.aggregate_id, type(e.event).__name__) for e in d.events] == [
        (str(tr.keys_id(None, "k", "0")), "TaskRunKeysTaken"), (str(chosen), "TaskRunCreated")]
    marker = d.events[0].event.keys
    again = tr.decide_create_task_run(create(id=uuid.UUID(int=78)), marker, d.result, None, None, ctx())
    assert again.created is False and again.result == d.result
    gone = tr.decide_delete_task_run(tr.DeleteTaskRun(id=chosen), d.result)
    assert [(e.aggregate_id, type(e.event).__name__) for e in gone.events] == [
        (str(tr.keys_id(None, "k", "0")), "TaskRunKeysReleased"), (str(chosen), "TaskRunDeleted")]


def test_a_client_id_taken_by_a_run_with_other_keys_is_a_conflict():
    other = a_run()
    with pytest.raises(Rejection) as e:
        tr.decide_create_task_run(create(id=other.id, dynamic_key="1"), None, None, other, None, ctx())
    assert e.value.code == "conflict"


def test_a_null_flow_run_is_a_key_value_of_its_own():
    assert tr.keys_id(None, "k", "0") != tr.keys_id(uuid.UUID(int=1), "k", "0")
    assert tr.keys_id(None, "k", "0") == tr.keys_id(None, "k", "0")
    assert tr.keys_id(None, "a.b", "c") != tr.keys_id(None, "a", "b.c")


def test_a_flow_run_that_does_not_exist_is_not_found_and_one_that_does_gives_its_labels():
    fid = uuid.UUID(int=5)
    with pytest.raises(Rejection) as e:
        tr.decide_create_task_run(create(flow_run_id=fid), None, None, None, None, ctx())
    assert e.value.code == "not_found"
    flow_run = fr.FlowRun(id=fid, created=NOW, updated=NOW, name="f", flow_id=uuid.UUID(int=6), labels={"team": "a"})
    d = tr.decide_create_task_run(create(flow_run_id=fid, labels={"x": "y"}), None, None, None,
                                  flow_run, ctx())
    assert d.result.labels == {"team": "a", "prefect.flow-run.id": str(fid), "prefect.flow.id": str(flow_run.flow_id),
                               "x": "y"}


@pytest.mark.parametrize("policy, message", [
    ({"retry_delay": [1] * 51}, "Can not configure more than 50 retry delays per task."),
    ({"retry_jitter_factor": -1}, "`retry_jitter_factor` must be >= 0."),
])
def test_bad_retry_policies_are_invalid(policy, message):
    with pytest.raises(ValidationError, match=message.replace("`", ".")):
        create(empirical_policy=policy)


def test_a_cache_key_over_2000_characters_is_invalid():
    with pytest.raises(ValidationError):
        create(cache_key="x" * 2001)


# ---------------------------------------------------------------------------------------------
# Starting: one task worker at a time


def test_a_delivery_starts_a_waiting_run_and_its_worker_holds_it_while_it_runs():
    run = a_run()
    d = start(run, "w1")
    assert d.orchestration.status is Outcome.ACCEPT
    running = then(run, d)
    assert running.state_type is T.RUNNING and running.task_worker_id == "w1" and running.run_count == 1
    done = then(running, propose(running, StateCreate(type=T.COMPLETED), worker="w1"))
    assert done.state_type is T.COMPLETED and done.task_worker_id is None


def test_a_copy_delivered_to_another_worker_while_it_runs_is_refused_as_a_copy():
    running = then(run := a_run(), start(run, "w1"))
    assert running.task_message == "TASKS:1"
    for attempt in (1, 2):  # a copy stays a copy however often it is delivered
        d = start(running, "w2", attempt=attempt, message="TASKS:7")
        assert d.orchestration.status is Outcome.REJECT and d.events == []
        assert d.orchestration.details == {"type": "reject_details", "task_worker_id": "w1", "copy": True}
    # The message it runs from, delivered to another worker without a redelivery: not a takeover.
    d = start(running, "w2", attempt=1)
    assert d.orchestration.status is Outcome.REJECT and not d.orchestration.details.get("copy")


def test_a_message_superseded_by_a_later_queuing_does_not_start_the_run():
    run = a_run(empirical_policy={"retries": 1})
    running = then(run, start(run))
    waiting = then(running, propose(running, StateCreate(type=T.FAILED), worker="w1"))
    requeued = then(waiting, propose(waiting, deferred("AwaitingRetry", NOW)))
    stale = propose(requeued, StateCreate(type=T.RUNNING), worker="w2",  # the first message, back after a crash
                    delivery=tr.TaskDelivery(state_id=run.queued_state_id, attempt=2, message="TASKS:1"))
    assert stale.orchestration.status is Outcome.REJECT and stale.orchestration.details["copy"] is True
    fresh = propose(requeued, StateCreate(type=T.RUNNING), worker="w2",
                    delivery=tr.TaskDelivery(state_id=requeued.queued_state_id, message="TASK_RETRIES:1"))
    assert fresh.orchestration.status is Outcome.ACCEPT


def test_a_worker_reports_only_on_runs_it_holds():
    running = then(run := a_run(), start(run, "w1"))
    cancelled = then(running, propose(running, StateCreate(type=T.CANCELLED), force=True))
    d = propose(cancelled, StateCreate(type=T.COMPLETED, data={"type": "json", "value": 1}), worker="w1")
    assert d.orchestration.status is Outcome.REJECT and d.events == []


def test_a_redelivery_is_taken_over_by_the_next_worker_unless_the_broker_just_restarted():
    running = then(run := a_run(), start(run, "w1"))
    d = start(running, "w2", attempt=2)
    assert d.orchestration.status is Outcome.ACCEPT
    taken = then(running, d)
    assert taken.task_worker_id == "w2" and taken.state_name == "Rerunning" and taken.run_count == 2
    waited = start(running, "w2", attempt=2, facts=rules.TaskFacts(takeover_allowed=False))
    assert waited.orchestration.status is Outcome.WAIT and waited.events == []


def test_a_finished_run_is_not_started_again_by_a_late_delivery():
    running = then(run := a_run(), start(run, "w1"))
    done = then(running, propose(running, StateCreate(type=T.COMPLETED), worker="w1"))
    d = start(done, "w2", attempt=2)
    assert d.orchestration.status is Outcome.REJECT and d.events == [] and d.orchestration.details["copy"] is True


def test_only_the_holder_reports_on_a_running_run():
    running = then(run := a_run(), start(run, "w1"))
    d = propose(running, StateCreate(type=T.COMPLETED), worker="w2")
    assert d.orchestration.status is Outcome.REJECT and d.events == []


# ---------------------------------------------------------------------------------------------
# The rules


def test_or19_retries_with_a_delay_list_then_fail():
    run = a_run(empirical_policy={"retries": 2, "retry_delay": [2, 3]})
    running = then(run, start(run))
    d = propose(running, StateCreate(type=T.FAILED, message="boom"), worker="w1")
    assert d.orchestration.status is Outcome.REJECT
    retry = d.result
    assert retry.name == "AwaitingRetry" and retry.message == "boom"
    assert retry.state_details.scheduled_time == NOW + timedelta(seconds=2)
    assert d.queue == []  # the failure's call does not queue it (TQ-4): the worker does
    waiting = then(running, d)
    queued = propose(waiting, deferred("AwaitingRetry", retry.state_details.scheduled_time))
    assert [(q.side) for q in queued.queue] == ["retry"]
    second = then(waiting, queued)
    early = start(second, now=NOW)
    assert early.orchestration.status is Outcome.WAIT and early.orchestration.delay_seconds == 2
    running2 = then(second, start(second, now=NOW + timedelta(seconds=3)))
    assert running2.state_name == "Retrying" and running2.run_count == 2
    d2 = propose(running2, StateCreate(type=T.FAILED), worker="w1")
    assert d2.result.state_details.scheduled_time == NOW + timedelta(seconds=3)
    running3 = then(then(running2, d2), start(then(running2, d2), now=NOW + timedelta(seconds=9)))
    final = propose(running3, StateCreate(type=T.FAILED), worker="w1")
    assert final.orchestration.status is Outcome.ACCEPT and final.result.type is T.FAILED


@pytest.mark.parametrize("policy", [{"retries": -1}, {"retries": -1, "retry_delay": 5}, {"max_retries": -3}])
def test_or19_a_negative_retry_count_is_accepted_and_retries_nothing(policy):
    run = a_run(empirical_policy=policy)
    running = then(run, start(run))
    d = propose(running, StateCreate(type=T.FAILED), worker="w1")
    assert d.orchestration.status is Outcome.ACCEPT and d.result.type is T.FAILED


def test_or19_a_negative_delay_is_accepted_and_the_retry_is_due_at_once():
    """As Prefect: the retry is scheduled `delay` seconds from now, so in the past: it starts
    at once, as after a delay of 0."""
    run = a_run(empirical_policy={"retries": 2, "retry_delay": [1, -2], "retry_delay_seconds": -1})
    running = then(run, start(run))
    first = propose(running, StateCreate(type=T.FAILED), worker="w1")
    assert first.result.state_details.scheduled_time == NOW + timedelta(seconds=1)
    waiting = then(running, first)
    again = then(waiting, propose(waiting, deferred("AwaitingRetry", first.result.state_details.scheduled_time)))
    running2 = then(again, start(again, now=NOW + timedelta(seconds=1)))
    second = propose(running2, StateCreate(type=T.FAILED), worker="w1", now=NOW + timedelta(seconds=1))
    due = second.result.state_details.scheduled_time
    assert second.result.name == "AwaitingRetry" and due == NOW - timedelta(seconds=1)
    queued = then(then(running2, second), propose(then(running2, second), deferred("AwaitingRetry", due),
                                                  now=NOW + timedelta(seconds=1)))
    assert start(queued, now=NOW + timedelta(seconds=1)).orchestration.status is Outcome.ACCEPT


def test_or19_a_failure_that_is_not_retriable_is_accepted():
    run = a_run(empirical_policy={"retries": 5})
    running = then(run, start(run))
    d = propose(running, StateCreate(type=T.FAILED, state_details=StateDetails(retriable=False)), worker="w1")
    assert d.orchestration.status is Outcome.ACCEPT


def test_or19_the_last_delay_repeats_and_jitter_is_prefects_clamped_poisson_interval():
    policy = tr.TaskRunPolicy(retries=9, retry_delay=[2, 3, 5, 7])
    assert rules.retry_delay_seconds(policy, 6, 0) == 7
    jittered = tr.TaskRunPolicy(retries=1, retry_delay=10, retry_jitter_factor=0.5)
    delays = {rules.retry_delay_seconds(jittered, 1, n) for n in range(0, 1_000_001, 50_000)}
    assert min(delays) >= 5 and max(delays) == pytest.approx(15) and len(delays) > 5
    # Prefect's bounds: at most delay x (1 + factor); at least delay x log2(2^k / (2^k - 1)), k = 1 + factor.
    wide = tr.TaskRunPolicy(retries=3, retry_delay=10, retry_jitter_factor=2.0)
    vals = [rules.retry_delay_seconds(wide, 1, e) for e in range(0, 1_000_001, 1000)]
    assert min(vals) == pytest.approx(10 * math.log2(8 / 7)) and max(vals) == pytest.approx(30)
    assert rules.retry_delay_seconds(wide, 1, 12345) == rules.retry_delay_seconds(wide, 1, 12345)  # replays


@pytest.mark.parametrize("policy", [{"retries": 0, "max_retries": 2}, {"max_retries": 2}])
def test_or19_the_deprecated_max_retries_counts_when_retries_is_unset_or_0(policy):
    run = a_run(empirical_policy={**policy, "retry_delay": 0, "retry_delay_seconds": 4})
    running = then(run, start(run))
    d = propose(running, StateCreate(type=T.FAILED), worker="w1")
    assert d.orchestration.status is Outcome.REJECT and d.result.name == "AwaitingRetry"
    assert d.result.state_details.scheduled_time == NOW + timedelta(seconds=4)


def test_or15_a_finished_run_cannot_be_cancelled_and_a_rerun_counts_from_zero():
    run = a_run(state=StateCreate(type=T.PENDING))
    running = then(run, propose(run, StateCreate(type=T.RUNNING)))
    done = then(running, propose(running, StateCreate(type=T.COMPLETED)))
    assert propose(done, StateCreate(type=T.CANCELLING)).orchestration.status is Outcome.ABORT
    rerun = then(done, propose(done, StateCreate(type=T.RUNNING)))
    assert rerun.run_count == 1 and rerun.state_name == "Running"


def test_or15_a_persisted_result_is_kept():
    run = a_run(state=StateCreate(type=T.PENDING))
    running = then(run, propose(run, StateCreate(type=T.RUNNING)))
    done = then(running, propose(running, StateCreate(type=T.COMPLETED, data={"type": "json", "value": 1})))
    d = propose(done, StateCreate(type=T.RUNNING))
    assert d.orchestration.status is Outcome.REJECT and d.events == []
    assert d.orchestration.reason == "This run is already completed."


def test_or11_pending_keeps_the_scheduled_time_and_running_waits_for_it():
    later = NOW + timedelta(minutes=5)
    for state in (StateCreate(type=T.SCHEDULED, state_details=StateDetails(scheduled_time=later)), deferred(at=later)):
        run = a_run(state=state)
        pending = propose(run, StateCreate(type=T.PENDING, state_details=StateDetails(deferred=state.state_details.deferred)))
        assert pending.orchestration.status is Outcome.ACCEPT
        assert pending.result.state_details.scheduled_time == later
        d = propose(then(run, pending), StateCreate(type=T.RUNNING))
        assert d.orchestration.status is Outcome.WAIT and d.orchestration.delay_seconds == 300
    own = propose(a_run(state=StateCreate(type=T.SCHEDULED, state_details=StateDetails(scheduled_time=later))),
                  StateCreate(type=T.PENDING, state_details=StateDetails(scheduled_time=NOW)))
    assert own.result.state_details.scheduled_time == NOW


def test_or20_a_rerun_is_renamed_whatever_name_was_proposed():
    run = a_run(state=StateCreate(type=T.PENDING))
    running = then(run, propose(run, StateCreate(type=T.RUNNING, name="Working")))
    assert running.state_name == "Working"  # a first run keeps the name proposed
    again = propose(running, StateCreate(type=T.RUNNING, name="Working"))
    assert again.result.name == "Rerunning"


def test_or16_a_task_of_a_flow_run_runs_only_while_its_flow_run_runs():
    fid = uuid.UUID(int=42)

    def flow_run(state_type: StateType | None, **details: Any) -> fr.FlowRun:
        state = (State(id=uuid.uuid4(), type=state_type, name=state_type.value.title(), timestamp=EARLIER,
                       state_details=StateDetails(**details)) if state_type else None)
        return fr.FlowRun(id=fid, created=EARLIER, updated=EARLIER, name="f", flow_id=uuid.UUID(int=1), state=state,
                          run_count=1)

    run = tr.decide_create_task_run(create(flow_run_id=fid), None, None, None, flow_run(T.RUNNING),
                                    ctx(EARLIER)).result
    for state_type in (None, T.COMPLETED):
        d = propose(run, StateCreate(type=T.RUNNING), facts=rules.TaskFacts(flow_run=flow_run(state_type)))
        assert d.orchestration.status is Outcome.ABORT
        assert d.orchestration.reason == "The enclosing flow must be running to begin task execution."
    paused = propose(run, StateCreate(type=T.RUNNING),
                     facts=rules.TaskFacts(flow_run=flow_run(T.PAUSED, pause_reschedule=True)))
    assert paused.orchestration.status is Outcome.REJECT and paused.result.name == "NotReady"
    assert paused.orchestration.reason == (
        f"The flow is paused, new tasks can execute after resuming flow run: {fid}.")
    ok = propose(run, StateCreate(type=T.RUNNING), facts=rules.TaskFacts(flow_run=flow_run(T.RUNNING)))
    assert ok.orchestration.status is Outcome.ACCEPT and then(run, ok).flow_run_run_count == 1


def test_a_forced_running_state_does_not_track_the_flow_run_attempt():
    """Prefect's UpdateFlowRunTrackerOnTasks is in the core and background policies only: a
    forced RUNNING (the minimal policy) leaves `flow_run_run_count` as it was."""
    fid = uuid.UUID(int=43)
    state = State(id=uuid.uuid4(), type=T.RUNNING, name="Running", timestamp=EARLIER)
    flow_run = fr.FlowRun(id=fid, created=EARLIER, updated=EARLIER, name="f", flow_id=uuid.UUID(int=1),
                          state=state, run_count=3)
    run = tr.decide_create_task_run(create(flow_run_id=fid), None, None, None, flow_run, ctx(EARLIER)).result
    facts = rules.TaskFacts(flow_run=flow_run)
    forced = propose(run, StateCreate(type=T.RUNNING), force=True, facts=facts)
    assert forced.result.type is T.RUNNING and then(run, forced).flow_run_run_count == 0
    created_running = tr.decide_create_task_run(create(flow_run_id=fid, dynamic_key="1",
                                                       state=StateCreate(type=T.RUNNING)),
                                                None, None, None, flow_run, ctx(EARLIER), facts).result
    assert created_running.state_type is T.RUNNING and created_running.flow_run_run_count == 0
    assert then(run, propose(run, StateCreate(type=T.RUNNING), facts=facts)).flow_run_run_count == 3


def test_or14_a_cached_completed_state_is_handed_out_and_a_completed_one_recorded():
    run = a_run(state=StateCreate(type=T.PENDING))
    running = then(run, propose(run, StateCreate(type=T.RUNNING)))
    completed = propose(running, StateCreate(type=T.COMPLETED, data={"type": "json", "value": 9},
                                             state_details=StateDetails(cache_key="c")))
    entry_events = [e for e in completed.events if e.aggregate_type == tr.TASK_CACHE]
    assert len(entry_events) == 1 and entry_events[0].aggregate_id == tr.cache_id("c")
    cache = tr.evolve_cache(None, entry_events[0].event)
    other = a_run(state=StateCreate(type=T.PENDING), dynamic_key="1")
    wants = StateCreate(type=T.RUNNING, state_details=StateDetails(cache_key="c"))
    d = propose(other, wants, facts=rules.TaskFacts(cached=cache))
    assert d.orchestration.status is Outcome.REJECT and d.result.name == "Cached" and d.result.data["value"] == 9
    assert not [e for e in d.events if e.aggregate_type == tr.TASK_CACHE]
    refresh = StateCreate(type=T.RUNNING, state_details=StateDetails(cache_key="c", refresh_cache=True))
    assert propose(other, refresh, facts=rules.TaskFacts(cached=cache)).orchestration.status is Outcome.ACCEPT
    expired = tr.evolve_cache(None, recorded("c", expiration=NOW, at=EARLIER))
    assert propose(other, wants, facts=rules.TaskFacts(cached=expired)).orchestration.status is Outcome.ACCEPT


def recorded(key: str, *, expiration: datetime | None = None, at: datetime = EARLIER,
             value: int = 0) -> tr.TaskCacheEntryRecorded:
    state = State(id=uuid.uuid4(), type=T.COMPLETED, name="Completed", timestamp=at, data={"type": "json", "value": value},
                  state_details=StateDetails(cache_key=key, cache_expiration=expiration))
    return tr.TaskCacheEntryRecorded(entry=tr.TaskCacheEntry(cache_key=key, state=state))


def fold(cache: tr.TaskCache | None, event: tr.TaskCacheEntryRecorded) -> tr.TaskCache | None:
    """The key after `event` is recorded as the deciders record it: with what it keeps."""
    return tr.evolve_cache(cache, tr.cache_entry_recorded(event.entry, cache))


def test_or14_the_newest_unexpired_entry_answers_not_merely_the_newest():
    never = recorded("c", value=1, at=EARLIER)
    soon = recorded("c", value=2, expiration=NOW + timedelta(seconds=1), at=EARLIER + timedelta(seconds=1))
    cache = fold(fold(None, never), soon)
    other = a_run(state=StateCreate(type=T.PENDING), dynamic_key="1")
    wants = StateCreate(type=T.RUNNING, state_details=StateDetails(cache_key="c"))
    assert propose(other, wants, facts=rules.TaskFacts(cached=cache)).result.data["value"] == 2
    later = propose(other, wants, now=NOW + timedelta(seconds=2), facts=rules.TaskFacts(cached=cache))
    assert later.orchestration.status is Outcome.REJECT and later.result.name == "Cached"
    assert later.result.data["value"] == 1


def test_or14_a_key_keeps_only_the_entries_that_may_still_answer():
    def values(cache: tr.TaskCache | None) -> list[int]:
        return [e.state.data["value"] for e in cache.entries] if cache else []

    cache = None
    for event in (recorded("c", value=1, expiration=NOW + timedelta(hours=1)),  # outlived by 2
                  recorded("c", value=2),  # never expires: nothing older can answer again
                  recorded("c", value=3, expiration=NOW + timedelta(minutes=5)),
                  recorded("c", value=4, expiration=NOW + timedelta(minutes=1)),
                  recorded("c", value=5, expiration=NOW + timedelta(minutes=2))):  # outlives 4
        cache = fold(cache, event)
    assert values(cache) == [5, 3, 2]
    # Entries expired when a new one is recorded are dropped; a newer never-expiring one ends the list.
    cache = fold(cache, recorded("c", value=6, expiration=NOW + timedelta(days=1),
                                            at=NOW + timedelta(minutes=3)))
    assert values(cache) == [6, 2]
    assert values(fold(cache, recorded("c", value=7))) == [7]
    for n in range(100):  # ever sooner expirations stay bounded
        cache = fold(cache, recorded("c", value=n, expiration=NOW + timedelta(days=1, seconds=-n)))
    assert len(cache.entries) == tr.MAX_CACHE_ENTRIES_PER_KEY
    # The last event alone holds the key (it is loaded from that event), and one written before
    # events named what they keep holds its own entry alone.
    last = tr.cache_entry_recorded(recorded("c", value=8, expiration=NOW + timedelta(hours=1)).entry, cache)
    assert values(tr.evolve_cache(None, last))[:2] == [8, 99] and len(last.kept) == tr.MAX_CACHE_ENTRIES_PER_KEY - 1
    assert values(tr.evolve_cache(cache, recorded("c", value=9))) == [9]


def test_or14_a_completed_state_with_a_key_over_2000_characters_is_written_but_rejected_and_not_cached():
    running = then(a_run(state=StateCreate(type=T.PENDING)),
                   propose(a_run(state=StateCreate(type=T.PENDING)), StateCreate(type=T.RUNNING)))
    d = propose(running, StateCreate(type=T.COMPLETED, state_details=StateDetails(cache_key="x" * 2001)))
    assert d.orchestration.status is Outcome.REJECT
    assert d.orchestration.reason == "Cache key exceeded maximum allowed length of 2000 characters."
    assert d.result.type is T.COMPLETED and then(running, d).state_type is T.COMPLETED
    assert not [e for e in d.events if e.aggregate_type == tr.TASK_CACHE]
    at_limit = propose(running, StateCreate(type=T.COMPLETED, state_details=StateDetails(cache_key="x" * 2000)))
    assert at_limit.orchestration.status is Outcome.ACCEPT
    assert [e.aggregate_type for e in at_limit.events].count(tr.TASK_CACHE) == 1


def test_or14_only_a_policy_with_cache_insertion_records_an_entry():
    """Prefect's CacheInsertion is in its core and background policies, not in the minimal one
    that decides forced, non-deferred proposals (a subflow's state copied onto its parent task
    run, a run created in a state): those write the state and cache nothing."""
    def entries(d) -> int:
        return [e.aggregate_type for e in d.events].count(tr.TASK_CACHE)

    keyed = StateDetails(cache_key="c")
    running = then(a_run(state=StateCreate(type=T.PENDING)),
                   propose(a_run(state=StateCreate(type=T.PENDING)), StateCreate(type=T.RUNNING)))
    forced = propose(running, StateCreate(type=T.COMPLETED, state_details=keyed), force=True)
    assert forced.result.type is T.COMPLETED and entries(forced) == 0
    assert entries(propose(running, StateCreate(type=T.COMPLETED, state_details=keyed))) == 1
    in_background = StateDetails(cache_key="c", deferred=True)
    assert entries(propose(running, StateCreate(type=T.COMPLETED, state_details=in_background), force=True)) == 1
    created = tr.decide_create_task_run(create(state=StateCreate(type=T.COMPLETED, state_details=keyed)),
                                        None, None, None, None, ctx())
    assert created.result.state_type is T.COMPLETED and entries(created) == 0
    assert not rules.records_cache(StateCreate(type=T.COMPLETED, state_details=keyed), force=True)
    assert rules.records_cache(StateCreate(type=T.COMPLETED, state_details=in_background), force=True)


def test_tr4_the_core_policy_has_no_pending_guard_but_the_background_one_does():
    run = a_run(state=StateCreate(type=T.PENDING))
    assert propose(run, StateCreate(type=T.PENDING)).orchestration.status is Outcome.ACCEPT
    d = propose(run, StateCreate(type=T.PENDING, state_details=StateDetails(deferred=True)))
    assert d.orchestration.status is Outcome.ABORT


def test_tr3_a_deferred_state_takes_the_background_policy_even_when_forced():
    run = a_run(state=StateCreate(type=T.PENDING))
    d = propose(run, StateCreate(type=T.PENDING, state_details=StateDetails(deferred=True)), force=True)
    assert d.orchestration.status is Outcome.ABORT


def test_forced_states_skip_the_rules():
    run = a_run(empirical_policy={"retries": 3})
    running = then(run, start(run))
    d = propose(running, StateCreate(type=T.FAILED), force=True)
    assert d.orchestration.status is Outcome.ACCEPT and d.result.type is T.FAILED


def test_task_parameters_id_is_carried_into_the_states_that_start_the_run():
    pid = uuid.UUID(int=3)
    run = a_run(state=StateCreate(type=T.SCHEDULED, state_details=StateDetails(deferred=True, task_parameters_id=pid)))
    d = propose(run, StateCreate(type=T.PENDING, state_details=StateDetails(deferred=True)))
    assert d.result.state_details.task_parameters_id == pid


def test_bookkeeping_times_and_counts():
    run = a_run()
    assert run.expected_start_time == run.state.state_details.scheduled_time == EARLIER
    running = then(run, start(run, now=NOW))
    assert running.start_time == NOW and running.next_scheduled_start_time is None
    done = then(running, propose(running, StateCreate(type=T.COMPLETED), worker="w1",
                                 now=NOW + timedelta(seconds=4)))
    assert done.end_time == NOW + timedelta(seconds=4) and done.total_run_time == timedelta(seconds=4)


def test_delete_frees_the_keys():
    run = a_run()
    d = tr.decide_delete_task_run(tr.DeleteTaskRun(id=run.id), run)
    assert [type(e.event).__name__ for e in d.events] == ["TaskRunDeleted"]  # its own id was its keys'
    with pytest.raises(Rejection):
        tr.decide_delete_task_run(tr.DeleteTaskRun(id=run.id), None, None)


# ---------------------------------------------------------------------------------------------
# Task-key subjects


@pytest.mark.parametrize("key", ["plain_key-1", "my.task", "with space", "*", ">", "ünïcødé", "~tilde", "", "a.b.c>d*",
                                 "emoji 🚀", "mod.func-3f2a"])
def test_every_task_key_encodes_to_one_subject_token_and_back(key):
    token = encode_task_key(key)
    assert token and all(c.isascii() and (c.isalnum() or c in "_-~") for c in token)
    assert decode_task_key(token) == key


def test_the_encoding_keeps_plain_keys_readable_and_distinct():
    assert encode_task_key("etl_load-2") == "etl_load-2"
    assert encode_task_key("my.task") == "my~2Etask"
    assert len({encode_task_key(k) for k in ["a.b", "a~2Eb", "a b", "a_b"]}) == 4


def test_a_task_key_whose_subject_would_be_too_long_is_invalid():
    create(task_key="a" * MAX_ENCODED_TASK_KEY)
    create(task_key="é" * (MAX_ENCODED_TASK_KEY // 6))  # 2 bytes, 6 characters each
    with pytest.raises(ValidationError, match="once encoded for its subject"):
        create(task_key="é" * (MAX_ENCODED_TASK_KEY // 6 + 1))
    with pytest.raises(ValidationError):
        create(task_key="a" * (MAX_ENCODED_TASK_KEY + 1))


def test_a_task_sends_its_arguments_by_keyword_as_the_worker_calls_it():
    from runledger.client.tasks import Task

    def f(a, b=2, *rest, c, **more):
        return a

    t = Task(f, key="k")
    assert t.parameters(1, c=3, d=4) == {"a": 1, "c": 3, "d": 4}
    with pytest.raises(TypeError, match="extra positional arguments"):
        t.parameters(1, 2, 3, c=3)
    assert Task(f).key.endswith("test_task_runs.f") or Task(f).key.endswith(".f")


def test_after_a_delete_the_same_keys_make_a_run_with_a_fresh_id():
    d = tr.decide_create_task_run(create(), None, None, None, None, ctx(), keys_used_before=True)
    assert d.result.id != tr.keys_id(None, "k", "0")
    assert [type(e.event).__name__ for e in d.events] == ["TaskRunKeysTaken", "TaskRunCreated"]


def test_a_cancelling_run_stays_its_workers_until_it_reports_the_end():
    running = then(run := a_run(), start(run, "w1"))
    cancelling = then(running, propose(running, StateCreate(type=T.CANCELLING)))
    assert cancelling.state_type is T.CANCELLING and cancelling.task_worker_id == "w1"
    assert propose(cancelling, StateCreate(type=T.COMPLETED), worker="w2").orchestration.status is Outcome.REJECT
    done = propose(cancelling, StateCreate(type=T.CANCELLED), worker="w1")
    assert done.orchestration.status is Outcome.ACCEPT and then(cancelling, done).task_worker_id is None


def test_results_travel_as_json_has_them():
    from runledger.handlers.task_worker import ResultTooLarge, result_data

    assert result_data((1, 2)) == {"type": "json", "value": [1, 2]}
    assert result_data({1: "a"}) == {"type": "json", "value": {"1": "a"}}
    for unstorable in (float("nan"), "a\x00b", 2**70, object()):
        with pytest.raises(ResultTooLarge):
            result_data(unstorable)


# ---------------------------------------------------------------------------------------------
# Cancelling a task run (the rules a task worker's cancel relies on; no rule of its own)


def test_a_run_set_cancelling_while_it_waits_is_not_started_and_its_worker_may_end_it_cancelled():
    waiting = a_run()
    cancelling = then(waiting, propose(waiting, StateCreate(type=T.CANCELLING)))
    assert cancelling.state_type is T.CANCELLING and cancelling.task_worker_id is None
    refused = start(cancelling, "w1")
    assert refused.orchestration.status is Outcome.REJECT and refused.orchestration.details["copy"] is True
    ended = propose(cancelling, StateCreate(type=T.CANCELLED), worker="w1")
    assert ended.orchestration.status is Outcome.ACCEPT and then(cancelling, ended).state_type is T.CANCELLED


def test_only_the_holder_of_a_cancelling_run_ends_it_and_a_finished_run_is_not_cancelled():
    running = then(run := a_run(), start(run, "w1"))
    cancelling = then(running, propose(running, StateCreate(type=T.CANCELLING)))
    other = propose(cancelling, StateCreate(type=T.CANCELLED), worker="w2")
    assert other.orchestration.status is Outcome.REJECT
    assert other.orchestration.details["task_worker_id"] == "w1"
    done = then(running, propose(running, StateCreate(type=T.COMPLETED), worker="w1"))
    assert propose(done, StateCreate(type=T.CANCELLING)).orchestration.status is Outcome.ABORT


def test_a_cancelled_run_raises_task_cancelled_saying_so():
    from runledger.client.models import TaskRun as ClientTaskRun
    from runledger.client.tasks import TaskCancelled, TaskFailed, task_result

    waiting = a_run()
    cancelled = then(waiting, propose(waiting, StateCreate(type=T.CANCELLED, message="not needed")))
    with pytest.raises(TaskCancelled, match=f"^Task run {waiting.id} was cancelled: not needed$") as raised:
        task_result(ClientTaskRun.model_validate_json(cancelled.model_dump_json()))
    assert isinstance(raised.value, TaskFailed) and raised.value.run.id == waiting.id
    silent = then(waiting, propose(waiting, StateCreate(type=T.CANCELLED)))
    with pytest.raises(TaskCancelled, match=r"was cancelled\.$"):
        task_result(ClientTaskRun.model_validate_json(silent.model_dump_json()))


def test_a_worker_outcome_after_the_cancel_was_accepted_ends_the_run_cancelled():
    running = then(run := a_run(), start(run, "w1"))
    cancelling = then(running, propose(running, StateCreate(type=T.CANCELLING)))
    for outcome in (T.COMPLETED, T.FAILED):
        d = propose(cancelling, StateCreate(type=outcome, data={"type": "json", "value": 1}), worker="w1")
        assert d.orchestration.status is Outcome.REJECT
        ended = then(cancelling, d)
        assert ended.state_type is T.CANCELLED and "outcome was not kept" in ended.state.message
    # Not a worker's report (an operator, a client): Prefect's task rules, which let it through.
    assert propose(cancelling, StateCreate(type=T.COMPLETED)).orchestration.status is Outcome.ACCEPT


def test_a_cancelling_run_whose_worker_died_is_cancelled_by_the_redelivery_of_its_message():
    running = then(run := a_run(), start(run, "w1"))
    cancelling = then(running, propose(running, StateCreate(type=T.CANCELLING)))
    d = start(cancelling, "w2", attempt=2)
    assert d.orchestration.status is Outcome.REJECT and d.orchestration.details["copy"] is True
    assert then(cancelling, d).state_type is T.CANCELLED
    # Not a redelivery of the message it ran from, or moments after a broker restart: a copy.
    for copy in (start(cancelling, "w2", attempt=2, message="TASKS:9"), start(cancelling, "w2", attempt=1),
                 start(cancelling, "w2", attempt=2, facts=rules.TaskFacts(takeover_allowed=False))):
        assert copy.orchestration.status is Outcome.REJECT and copy.events == []


# ---------------------------------------------------------------------------------------------
# A worker's reports after a failure that is retried


def test_a_worker_failure_report_again_after_its_retry_does_not_end_the_run():
    """The worker's FAILED, answered `AwaitingRetry`, sent again (its reply was lost): the run
    is not its worker's any more and is not failed by it."""
    run = a_run(empirical_policy={"retries": 1})
    running = then(run, start(run))
    waiting = then(running, propose(running, StateCreate(type=T.FAILED), worker="w1"))
    assert waiting.state_name == "AwaitingRetry" and waiting.task_worker_id is None
    again = propose(waiting, StateCreate(type=T.FAILED), worker="w1")
    assert again.orchestration.status is Outcome.REJECT and again.events == []
    assert propose(waiting, StateCreate(type=T.COMPLETED), worker="w1").events == []


def test_a_worker_queues_the_retry_its_failure_became_but_not_one_cancelled_meanwhile():
    run = a_run(empirical_policy={"retries": 1})
    running = then(run, start(run))
    waiting = then(running, propose(running, StateCreate(type=T.FAILED), worker="w1"))
    queued = propose(waiting, deferred("AwaitingRetry", NOW), worker="w1")
    assert queued.orchestration.status is Outcome.ACCEPT and [q.side for q in queued.queue] == ["retry"]
    # Queued once: the same proposal again (no reply came back, and no record) queues nothing more.
    requeued = then(waiting, queued)
    assert propose(requeued, deferred("AwaitingRetry", NOW), worker="w1").events == []
    # Cancelled before the worker queued it: it stays cancelled, never runs again.
    cancelled = then(waiting, propose(waiting, StateCreate(type=T.CANCELLED)))
    refused = propose(cancelled, deferred("AwaitingRetry", NOW), worker="w1")
    assert refused.orchestration.status is Outcome.REJECT and refused.events == [] and refused.queue == []
