"""Task tag concurrency limits, pure: the limit's deciders (create as an upsert by tag, delete,
reset), and the slots task runs take and give back (SL-8): the rule at RUNNING (OR-17: a limit
of 0 aborts, a full tag waits 10 s, one slot per limited tag, never a second one for a holder)
and the release on any other written state, forced ones too (OR-18), and on delete."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from runledger.commands import tag_concurrency_limits as tcl
from runledger.commands import task_run_rules as rules
from runledger.commands import task_runs as tr
from runledger.commands import unique_keys as uk
from runledger.commands.decisions import Decision, Outcome
from runledger.commands.messages import DecisionContext, Rejection
from runledger.commands.states import StateCreate, StateDetails, StateType

T = StateType
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(minutes=5)
_ids = (uuid.UUID(int=i) for i in itertools.count(900_000))


def ctx(now: datetime = NOW) -> DecisionContext:
    return DecisionContext.fixed(now, _ids)


def a_limit(tag: str, concurrency_limit: int, *holders: uuid.UUID) -> tcl.TagConcurrencyLimit:
    return tcl.TagConcurrencyLimit(id=uuid.uuid4(), created=EARLIER, updated=EARLIER, tag=tag,
                                   concurrency_limit=concurrency_limit, active_slots=list(holders))


def a_run(state: T = T.PENDING, tags: tuple[str, ...] = ("db",), **fields: Any) -> tr.TaskRun:
    cmd = tr.CreateTaskRun(task_key="k", dynamic_key=str(uuid.uuid4()), tags=list(tags),
                           state=StateCreate(type=state), **fields)
    return tr.decide_create_task_run(cmd, None, None, None, None, ctx(EARLIER)).result


def propose(run: tr.TaskRun, state: StateCreate | T, *limits: tcl.TagConcurrencyLimit, force: bool = False,
            now: datetime = NOW) -> Decision:
    proposed = StateCreate(type=state) if isinstance(state, T) else state
    facts = rules.TaskFacts(tag_limits={limit.tag: limit for limit in limits})
    return tr.decide_set_task_run_state(tr.SetTaskRunState(id=run.id, state=proposed, force=force), run, ctx(now),
                                        facts)


def slot_events(d: Decision) -> list[tuple[str, str, list[uuid.UUID]]]:
    """(event type, tag, the limit's slots after) of each tag-limit event of a decision."""
    return [(type(e.event).__name__, e.event.limit.tag, e.event.limit.active_slots) for e in d.events
            if e.aggregate_type == tcl.TAG_CONCURRENCY_LIMIT]


def then(run: tr.TaskRun, d: Decision) -> tr.TaskRun:
    return d.after.get(str(run.id), run)


def waited(d: Decision) -> list[str | None]:
    """The waiting reason each event of a decision records, if it records nothing else."""
    assert all(isinstance(e.event, tr.TaskRunWaiting) for e in d.events), d.events
    return [e.event.run.waiting_reason for e in d.events]


def after(limit: tcl.TagConcurrencyLimit, d: Decision) -> tcl.TagConcurrencyLimit | None:
    state: tcl.TagConcurrencyLimit | None = limit
    for e in d.events:
        if e.aggregate_id == tcl.limit_id(limit.tag):
            state = tcl.evolve(state, e.event)
    return state


# ---------------------------------------------------------------------------------------------
# The limit


def test_a_tag_is_one_aggregate_whose_id_fits_a_subject_token():
    assert tcl.limit_id("db") == tcl.limit_id("db") != tcl.limit_id("db ")
    for tag in ("db", "with.dots and spaces", "*", ">", "ünïcødé", ""):
        assert tcl.limit_id(tag).startswith("tag-") and len(tcl.limit_id(tag)) == 44
        assert all(c.isalnum() or c == "-" for c in tcl.limit_id(tag))


def test_create_is_an_upsert_by_tag_that_keeps_the_slots():
    d = tcl.decide_create_tag_concurrency_limit(tcl.CreateTagConcurrencyLimit(tag="db", concurrency_limit=2), None,
                                                ctx())
    created = d.result
    assert d.created is True and (created.tag, created.concurrency_limit, created.active_slots) == ("db", 2, [])
    assert [(e.aggregate_id, type(e.event).__name__) for e in d.events] == [
        (tcl.limit_id("db"), "TagConcurrencyLimitCreated")]
    holder = uuid.UUID(int=1)
    held = created.model_copy(update={"active_slots": [holder]})
    same = tcl.decide_create_tag_concurrency_limit(tcl.CreateTagConcurrencyLimit(tag="db", concurrency_limit=2), held,
                                                   ctx())
    assert same.created is False and same.events == [] and same.result == held
    raised = tcl.decide_create_tag_concurrency_limit(tcl.CreateTagConcurrencyLimit(tag="db", concurrency_limit=5),
                                                     held, ctx())
    assert raised.created is False and [type(e.event).__name__ for e in raised.events] == [
        "TagConcurrencyLimitUpdated"]
    assert (raised.result.id, raised.result.concurrency_limit, raised.result.active_slots) == (held.id, 5, [holder])
    assert raised.events[0].event.changes["concurrency_limit"].model_dump() == {"old": 2, "new": 5}


def test_delete_and_reset_need_a_limit():
    for decide in (lambda e: tcl.decide_delete_tag_concurrency_limit(tcl.DeleteTagConcurrencyLimit(tag="db"), e),
                   lambda e: tcl.decide_reset_tag_concurrency_limit(tcl.ResetTagConcurrencyLimit(tag="db"), e, ctx())):
        with pytest.raises(Rejection) as e:
            decide(None)
        assert (e.value.code, e.value.message) == ("not_found", "Concurrency limit not found")
    limit = a_limit("db", 1, uuid.UUID(int=1))
    d = tcl.decide_delete_tag_concurrency_limit(tcl.DeleteTagConcurrencyLimit(tag="db"), limit)
    assert after(limit, d) is None


def test_reset_replaces_the_holders_by_the_override_or_by_none():
    a, b = uuid.UUID(int=1), uuid.UUID(int=2)
    limit = a_limit("db", 3, a)
    d = tcl.decide_reset_tag_concurrency_limit(tcl.ResetTagConcurrencyLimit(tag="db", slot_override=[b, b]), limit,
                                               ctx())
    assert d.result.active_slots == [b] and after(limit, d) == d.result
    cleared = tcl.decide_reset_tag_concurrency_limit(tcl.ResetTagConcurrencyLimit(tag="db"), limit, ctx())
    assert cleared.result.active_slots == [] and cleared.result.id == limit.id
    again = tcl.decide_reset_tag_concurrency_limit(tcl.ResetTagConcurrencyLimit(tag="db", slot_override=[a]), limit,
                                                   ctx())
    assert again.events == []


@pytest.mark.parametrize("body", [
    {"tag": "db", "concurrency_limit": -1},
    {"tag": "db", "concurrency_limit": 2**31},
    {"tag": "db"},
    {"concurrency_limit": 1},
    {"tag": "x" * 256, "concurrency_limit": 1},
    {"tag": "nul\x00", "concurrency_limit": 1},
    {"tag": "db", "concurrency_limit": 1, "active_slots": []},
])
def test_bad_creates_are_invalid(body):
    with pytest.raises(ValidationError):
        tcl.CreateTagConcurrencyLimit.model_validate(body)


def test_a_reset_names_at_most_1000_runs():
    with pytest.raises(ValidationError):
        tcl.ResetTagConcurrencyLimit(tag="db", slot_override=[uuid.uuid4() for _ in range(1001)])


# ---------------------------------------------------------------------------------------------
# Taking slots at RUNNING


def test_a_limit_of_0_aborts_the_start():
    run = a_run()
    d = propose(run, T.RUNNING, a_limit("db", 0))
    reason = 'The concurrency limit on tag "db" is 0 and will deadlock if the task tries to run again.'
    assert d.orchestration.status is Outcome.ABORT and d.orchestration.reason == reason
    assert waited(d) == [reason] and then(run, d).state == run.state  # only why it is held back: the run stays


def test_a_full_tag_waits_10_seconds_and_takes_nothing():
    run = a_run(tags=("api", "db"))
    d = propose(run, T.RUNNING, a_limit("api", 5), a_limit("db", 1, uuid.UUID(int=1)))
    assert d.orchestration.status is Outcome.WAIT and d.orchestration.delay_seconds == 10
    assert d.orchestration.reason == "Concurrency limit for the db tag has been reached"
    assert slot_events(d) == []  # the free tag's slot is not taken either
    assert waited(d) == ["Concurrency limit for the db tag has been reached"]


def test_a_start_held_back_by_a_full_tag_records_why_once_and_the_next_written_state_clears_it():
    """A task worker proposes a waiting run again after each wait: its reason is recorded the
    first time only (the run's last event carries it), and is gone with the next state."""
    run, full = a_run(), a_limit("db", 1, uuid.UUID(int=1))
    first = propose(run, T.RUNNING, full)
    reason = "Concurrency limit for the db tag has been reached"
    assert first.orchestration.status is Outcome.WAIT and waited(first) == [reason]
    waiting = then(run, first)
    assert waiting.waiting_reason == reason and waiting.state == run.state and waiting.updated == NOW
    assert tr.evolve(run, first.events[0].event) == waiting
    assert tr.records_waiting_only(first)

    again = propose(waiting, T.RUNNING, full)
    assert again.orchestration.status is Outcome.WAIT and again.events == [] and then(waiting, again) == waiting
    assert not tr.records_waiting_only(again)

    other = propose(waiting, T.RUNNING, a_limit("db", 0))  # another reason is recorded
    assert other.orchestration.status is Outcome.ABORT and then(waiting, other).waiting_reason.startswith(
        'The concurrency limit on tag "db" is 0')

    started = propose(waiting, T.RUNNING, a_limit("db", 1))
    assert started.orchestration.status is Outcome.ACCEPT and then(waiting, started).waiting_reason is None
    assert not tr.records_waiting_only(started)
    for state, force in ((T.CANCELLED, False), (T.FAILED, True)):  # any state written clears it, forced too
        assert then(waiting, propose(waiting, state, full, force=force)).waiting_reason is None


def test_a_start_held_back_by_another_rule_records_nothing():
    run = a_run(tags=())  # no tags: nothing read, nothing recorded
    waiting = then(run, propose(run, StateCreate(type=T.SCHEDULED, state_details=StateDetails(
        scheduled_time=NOW + timedelta(hours=1)))))
    d = propose(waiting, T.RUNNING)
    assert d.orchestration.status is Outcome.WAIT and d.events == [] and then(waiting, d).waiting_reason is None


def test_a_limit_of_0_on_any_tag_aborts_even_when_another_tag_is_full():
    run = a_run(tags=("a", "z"))
    d = propose(run, T.RUNNING, a_limit("a", 1, uuid.UUID(int=1)), a_limit("z", 0))
    assert d.orchestration.status is Outcome.ABORT and '"z"' in d.orchestration.reason


def test_a_start_takes_one_slot_of_each_limited_tag():
    run = a_run(tags=("db", "api", "free"))
    other = uuid.UUID(int=1)
    db, api = a_limit("db", 2, other), a_limit("api", 1)
    d = propose(run, T.RUNNING, db, api)
    assert d.orchestration.status is Outcome.ACCEPT and then(run, d).state_type is T.RUNNING
    assert slot_events(d) == [("TagConcurrencyLimitSlotTaken", "db", [other, run.id]),
                              ("TagConcurrencyLimitSlotTaken", "api", [run.id])]
    assert [e.aggregate_id for e in d.events][1:] == [tcl.limit_id("db"), tcl.limit_id("api")]
    assert {e.event.task_run_id for e in d.events[1:]} == {run.id}


def test_a_run_holding_its_slot_enters_running_again_without_a_second_slot_even_when_full():
    run = a_run()
    limit = a_limit("db", 1)
    started = propose(run, T.RUNNING, limit)
    running, limit = then(run, started), after(limit, started)
    assert limit is not None and limit.active_slots == [run.id]
    again = propose(running, T.RUNNING, limit)
    assert again.orchestration.status is Outcome.ACCEPT and slot_events(again) == []


def test_a_run_without_limited_tags_runs_freely():
    run = a_run(tags=())
    d = propose(run, T.RUNNING, a_limit("db", 0))
    assert d.orchestration.status is Outcome.ACCEPT and slot_events(d) == []


def test_a_later_rule_that_holds_the_run_back_takes_nothing():
    run = a_run(state=T.SCHEDULED)  # due now: EARLIER's scheduled time is the create's
    waiting = then(run, propose(run, StateCreate(type=T.SCHEDULED,
                                                 state_details=StateDetails(scheduled_time=NOW + timedelta(hours=1)))))
    d = propose(waiting, T.RUNNING, a_limit("db", 3))
    assert d.orchestration.status is Outcome.WAIT and d.orchestration.reason == "Scheduled time is in the future"
    assert d.events == []


def test_forced_and_background_starts_and_creates_take_no_slot():
    limit = a_limit("db", 1, uuid.UUID(int=1))  # full: they are not held back either
    forced = propose(a_run(), T.RUNNING, limit, force=True)
    assert forced.orchestration.status is Outcome.ACCEPT and slot_events(forced) == []
    deferred = StateCreate(type=T.RUNNING, state_details=StateDetails(deferred=True))
    background = propose(a_run(), deferred, limit)
    assert background.orchestration.status is Outcome.ACCEPT and slot_events(background) == []
    created = tr.decide_create_task_run(tr.CreateTaskRun(task_key="k", dynamic_key="c", tags=["db"],
                                                         state=StateCreate(type=T.RUNNING)),
                                        None, None, None, None, ctx(),
                                        rules.TaskFacts(tag_limits={"db": limit}))
    assert created.result.state_type is T.RUNNING and slot_events(created) == []


# ---------------------------------------------------------------------------------------------
# Giving slots back


def _holding(*tags: str) -> tuple[tr.TaskRun, list[tcl.TagConcurrencyLimit]]:
    run = a_run(tags=tags)
    limits = [a_limit(tag, 2) for tag in tags]
    d = propose(run, T.RUNNING, *limits)
    held = [after(limit, d) for limit in limits]
    assert all(h is not None and h.active_slots == [run.id] for h in held)
    return then(run, d), held  # type: ignore[return-value]


@pytest.mark.parametrize("state", [T.COMPLETED, T.FAILED, T.CRASHED, T.CANCELLED, T.PENDING, T.SCHEDULED, T.PAUSED])
@pytest.mark.parametrize("force", [False, True])
def test_leaving_running_for_any_state_but_cancelling_gives_every_slot_back_forced_or_not(state, force):
    running, limits = _holding("db", "api")
    d = propose(running, state, *limits, force=force)
    assert d.result.type is state
    assert slot_events(d) == [("TagConcurrencyLimitSlotReleased", "db", []),
                              ("TagConcurrencyLimitSlotReleased", "api", [])]


def test_cancelling_keeps_the_slot_until_cancelled():
    running, (limit,) = _holding("db")
    d = propose(running, T.CANCELLING, limit)
    assert d.result.type is T.CANCELLING and slot_events(d) == []
    cancelled = propose(then(running, d), T.CANCELLED, limit)
    assert slot_events(cancelled) == [("TagConcurrencyLimitSlotReleased", "db", [])]


def test_a_retry_gives_the_slot_back_with_its_awaiting_retry_state():
    run = a_run(empirical_policy={"retries": 1})
    limit = a_limit("db", 1)
    started = propose(run, T.RUNNING, limit)
    d = propose(then(run, started), T.FAILED, after(limit, started))  # type: ignore[arg-type]
    assert d.orchestration.status is Outcome.REJECT and d.result.name == "AwaitingRetry"
    assert slot_events(d) == [("TagConcurrencyLimitSlotReleased", "db", [])]


def test_a_run_that_holds_no_slot_gives_nothing_back():
    run = a_run()
    d = propose(run, T.COMPLETED, a_limit("db", 1, uuid.UUID(int=1)))
    assert d.result.type is T.COMPLETED and slot_events(d) == []


def test_a_deleted_run_gives_its_slots_back():
    running, limits = _holding("db", "api")
    d = tr.decide_delete_task_run(tr.DeleteTaskRun(id=running.id), running,
                                  {limit.tag: limit for limit in limits})
    assert [type(e.event).__name__ for e in d.events] == [
        "TaskRunDeleted", "TagConcurrencyLimitSlotReleased", "TagConcurrencyLimitSlotReleased"]
    assert all(e.event.limit.active_slots == [] for e in d.events[1:])


def test_a_limit_deleted_or_reset_meanwhile_is_left_alone():
    running, (limit,) = _holding("db")
    reset = limit.model_copy(update={"active_slots": []})
    assert slot_events(propose(running, T.COMPLETED, reset)) == []
    assert slot_events(propose(running, T.COMPLETED)) == []  # no limit any more


# ---------------------------------------------------------------------------------------------
# Global limits named `tag:<tag>`


def a_global(tag: str, limit: int, *holders: uuid.UUID, active: bool = True, taken: int | None = None,
             occupancy: float = 2.0) -> tcl.GlobalTagLimit:
    from runledger.commands import concurrency_limits as cl
    lid = uuid.uuid4()
    return tcl.GlobalTagLimit(
        cl.ConcurrencyLimit(id=lid, created=EARLIER, updated=EARLIER, name=tcl.global_limit_name(tag), limit=limit,
                            active=active, active_slots=len(holders) if taken is None else taken,
                            avg_slot_occupancy_seconds=occupancy),
        tcl.GlobalTagSlots(limit_id=lid, task_run_ids=list(holders)))


def propose_with(run: tr.TaskRun, state: StateCreate | T, classic: tuple[tcl.TagConcurrencyLimit, ...] = (),
                 globals_: tuple[tuple[str, tcl.GlobalTagLimit], ...] = (), force: bool = False) -> Decision:
    proposed = StateCreate(type=state) if isinstance(state, T) else state
    facts = rules.TaskFacts(tag_limits={limit.tag: limit for limit in classic}, global_tag_limits=dict(globals_))
    return tr.decide_set_task_run_state(tr.SetTaskRunState(id=run.id, state=proposed, force=force), run, ctx(), facts)


def global_events(d: Decision) -> list[tuple[str, str, Any]]:
    return [(type(e.event).__name__, e.aggregate_id,
             e.event.limit.active_slots if hasattr(e.event, "limit") else e.event.slots.task_run_ids)
            for e in d.events if e.aggregate_type in ("concurrency_limit", tcl.GLOBAL_TAG_SLOTS)]


def test_an_active_global_tag_limit_replaces_the_classic_one_and_takes_its_slot():
    run = a_run(tags=("db", "api"))
    g = a_global("db", 1)
    d = propose_with(run, T.RUNNING, (a_limit("db", 0), a_limit("api", 2)), (("db", g),))
    assert d.orchestration.status is Outcome.ACCEPT  # the classic `db` limit of 0 is not read
    assert global_events(d) == [("ConcurrencyLimitSlotTaken", str(g.limit.id), 1),
                                ("GlobalTagSlotTaken", tcl.global_slots_id(g.limit.id), [run.id])]
    assert slot_events(d) == [("TagConcurrencyLimitSlotTaken", "api", [run.id])]
    running = then(run, d)
    holding = tcl.global_limits_after({"db": g}, d.events)["db"]
    assert holding.holds(run.id) and holding.limit.active_slots == 1
    again = propose_with(running, T.RUNNING, (), (("db", holding),))
    assert again.orchestration.status is Outcome.ACCEPT and global_events(again) == []  # one slot per run


def test_a_full_global_tag_limit_waits_a_random_delay_around_its_occupancy_and_0_aborts():
    run = a_run()
    d = propose_with(run, T.RUNNING, (), (("db", a_global("db", 1, uuid.uuid4(), occupancy=4.0)),))
    assert d.orchestration.status is Outcome.WAIT and global_events(d) == []
    assert d.orchestration.reason == "Concurrency limit reached for tags: db"
    assert waited(d) == ["Concurrency limit reached for tags: db"]
    again = propose_with(then(run, d), T.RUNNING, (), (("db", a_global("db", 1, uuid.uuid4(), occupancy=4.0)),))
    assert again.orchestration.status is Outcome.WAIT and again.events == []  # the same reason: nothing more
    assert 3 <= d.orchestration.delay_seconds <= 6  # Prefect's clamped Poisson interval around 4 s
    long = propose_with(a_run(), T.RUNNING, (), (("db", a_global("db", 1, taken=1, occupancy=100.0)),))
    assert 7 <= long.orchestration.delay_seconds <= 13  # around at most 10 s
    zero = propose_with(a_run(tags=("db", "zz")), T.RUNNING, (a_limit("zz", 1),), (("db", a_global("db", 0)),))
    assert zero.orchestration.status is Outcome.ABORT and zero.orchestration.reason == (
        'The concurrency limit on tag "db" is 0 and will deadlock if the task tries to run again.')


def test_an_inactive_global_tag_limit_holds_nothing_back_but_its_slot_is_still_given_back():
    run = a_run()
    d = propose_with(run, T.RUNNING, (a_limit("db", 1),), (("db", a_global("db", 0, active=False)),))
    assert d.orchestration.status is Outcome.ACCEPT and global_events(d) == []
    assert slot_events(d) == [("TagConcurrencyLimitSlotTaken", "db", [run.id])]
    running = then(run, d)
    g = a_global("db", 1, running.id, active=False)
    done = propose_with(running, T.COMPLETED, (a_limit("db", 1, running.id),), (("db", g),), force=True)
    assert global_events(done) == [("ConcurrencyLimitSlotReleased", str(g.limit.id), 0),
                                   ("GlobalTagSlotReleased", tcl.global_slots_id(g.limit.id), [])]
    assert slot_events(done) == [("TagConcurrencyLimitSlotReleased", "db", [])]
    gone = tr.decide_delete_task_run(tr.DeleteTaskRun(id=running.id), running, {}, {"db": g})
    assert [n for n, _, _ in global_events(gone)] == ["ConcurrencyLimitSlotReleased", "GlobalTagSlotReleased"]


def test_a_run_holding_a_tag_s_slot_of_either_kind_re_enters_running_without_a_second_one():
    """A run that took the classic slot before a `tag:<tag>` global limit was made active (or
    the global one before it was made inactive) holds the tag: RUNNING again neither waits on a
    full limit of the other kind nor takes a second slot."""
    run = a_run()
    running = then(run, propose_with(run, T.RUNNING, (a_limit("db", 5),)))
    classic = a_limit("db", 5, running.id)
    full = propose_with(running, T.RUNNING, (classic,), (("db", a_global("db", 1, uuid.uuid4())),))
    assert full.orchestration.status is Outcome.ACCEPT and global_events(full) == [] and slot_events(full) == []
    roomy = propose_with(running, T.RUNNING, (classic,), (("db", a_global("db", 2)),))
    assert roomy.orchestration.status is Outcome.ACCEPT and global_events(roomy) == []
    held = a_global("db", 1, running.id, active=False)  # the global one, made inactive since
    back = propose_with(running, T.RUNNING, (a_limit("db", 1, uuid.uuid4()),), (("db", held),))
    assert back.orchestration.status is Outcome.ACCEPT and slot_events(back) == [] and global_events(back) == []


def test_slots_of_gone_or_stopped_holders_are_released_and_running_ones_kept():
    gone, stopped, running, unread = (uuid.uuid4() for _ in range(4))
    classic = a_limit("db", 5, gone, stopped, running, unread)
    g = a_global("db", 5, gone, running)
    states = {gone: None, stopped: T.COMPLETED, running: T.RUNNING}
    cmd = tcl.ReleaseTagSlotsOfGoneTaskRuns(tag="db")
    assert tcl.holders_to_check(cmd, classic, g) == [gone, stopped, running, unread]
    d = tcl.decide_release_gone_tag_slots(cmd, classic, g, states)
    assert d.result == {"released": [str(gone), str(stopped)]}
    assert slot_events(d) == [("TagConcurrencyLimitSlotReleased", "db", [stopped, running, unread]),
                              ("TagConcurrencyLimitSlotReleased", "db", [running, unread])]
    assert [(n, s) for n, _, s in global_events(d)] == [("ConcurrencyLimitSlotReleased", 1),
                                                        ("GlobalTagSlotReleased", [running])]
    only = tcl.ReleaseTagSlotsOfGoneTaskRuns(tag="db", task_run_ids=[running, gone])
    assert tcl.holders_to_check(only, classic, None) == [gone, running]
    assert tcl.decide_release_gone_tag_slots(only, None, None, {}).events == []
    with pytest.raises(ValidationError):
        tcl.ReleaseTagSlotsOfGoneTaskRuns(tag="db", task_run_ids=[uuid.uuid4() for _ in range(1001)])


def test_a_v1_slot_event_of_a_global_limit_reads_as_a_flow_runs():
    from runledger.commands import concurrency_limits as cl
    from runledger.commands.events import decode_event
    g = a_global("x", 3, taken=1)
    payload = {"limit": g.limit.model_dump(mode="json"), "flow_run_id": str(uuid.UUID(int=1)),
               "lease_id": str(uuid.UUID(int=2))}
    for name in ("ConcurrencyLimitSlotTaken", "ConcurrencyLimitSlotReleased"):
        event = decode_event(name, 1, payload)
        assert isinstance(event, cl.ConcurrencyLimitSlotTaken | cl.ConcurrencyLimitSlotReleased)
        assert (event.flow_run_id, event.lease_id, event.task_run_id) == (uuid.UUID(int=1), uuid.UUID(int=2), None)


# ---------------------------------------------------------------------------------------------
# The room a decision makes for the runs waiting for a tag (announced to the task workers)


def test_room_is_made_by_each_slot_given_back_and_by_an_operator_raising_resetting_or_deleting_a_limit():
    running, (db, api) = _holding("db", "api")
    assert tcl.room_made(propose(running, T.COMPLETED, db, api).events) == {"db": 1, "api": 1}
    full = a_limit("db", 1, uuid.UUID(int=1))

    def create(limit: int) -> Decision:
        return tcl.decide_create_tag_concurrency_limit(tcl.CreateTagConcurrencyLimit(tag="db", concurrency_limit=limit),
                                                       full, ctx())

    assert tcl.room_made(create(3).events) == {"db": 2}  # 3 slots, 1 held
    assert tcl.room_made(create(0).events) == {}  # lowered: no room
    assert tcl.room_made(tcl.decide_reset_tag_concurrency_limit(tcl.ResetTagConcurrencyLimit(tag="db"), full,
                                                                ctx()).events) == {"db": 1}
    assert tcl.room_made(tcl.decide_delete_tag_concurrency_limit(tcl.DeleteTagConcurrencyLimit(tag="db"), full).events
                         ) == {"db": tcl.EVERY_WAITER}
    assert tcl.room_made(propose(a_run(), T.RUNNING, a_limit("db", 2)).events) == {}  # a slot taken


def test_room_is_made_in_a_global_tag_limit_raised_made_inactive_renamed_deleted_created_or_given_back():
    from runledger.commands import concurrency_limits as cl
    run = a_run()
    g = a_global("db", 1, run.id)

    def update(**changes: Any) -> Decision:
        return cl.decide_update_concurrency_limit(cl.UpdateConcurrencyLimit(id=g.limit.id, **changes), g.limit,
                                                  None, ctx())

    assert tcl.room_made(update(limit=3).events) == {"db": 2}
    assert tcl.room_made(update(active=False).events) == {"db": tcl.EVERY_WAITER}
    assert tcl.room_made(update(slot_decay_per_second=1.0).events) == {}  # still full
    deleted = cl.decide_delete_concurrency_limit(cl.DeleteConcurrencyLimit(id=g.limit.id), g.limit, ctx())
    assert tcl.room_made(deleted.events) == {"db": tcl.EVERY_WAITER}
    running = a_run(state=T.RUNNING)
    held = a_global("db", 1, running.id)
    done = propose_with(running, T.COMPLETED, (), (("db", held),))
    assert tcl.room_made(done.events) == {"db": 1}
    renamed = cl.decide_update_concurrency_limit(cl.UpdateConcurrencyLimit(id=g.limit.id, new_name="tag:api"), g.limit,
                                                 uk.UniqueKeyClaim(), ctx())
    assert tcl.room_made(renamed.events) == {"db": tcl.EVERY_WAITER}  # `db` is no longer held back; `api` is full

    def create(**fields: Any) -> Decision:
        return cl.decide_create_concurrency_limit(cl.CreateConcurrencyLimit(name="tag:db", **fields),
                                                  uk.UniqueKeyClaim(), ctx())

    # It replaces the tag's classic limit, which may be the full one: its room is announced.
    assert tcl.room_made(create(limit=2, active_slots=1).events) == {"db": 1}
    assert tcl.room_made(create(limit=1, active_slots=1).events) == {}
    assert tcl.room_made(create(limit=5, active=False).events) == {}  # holds nothing back, replaces nothing
    other = a_global("db", 1, run.id).limit.model_copy(update={"name": "not-a-tag"})
    assert tcl.room_made(cl.decide_delete_concurrency_limit(cl.DeleteConcurrencyLimit(id=other.id), other,
                                                            ctx()).events) == {}
