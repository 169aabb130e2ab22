"""Flow-run orchestration (BEHAVIOUR §7: FR-2, FR-4..FR-6, OR-1..OR-5, OR-8..OR-12), pure: no
I/O. The whole transition matrix is walked against a table written out below; then each rule
with the cases BEHAVIOUR names, with Prefect's messages; then the bookkeeping."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from runledger.commands import concurrency_limits as cl
from runledger.commands import orchestration_rules as orch
from runledger.commands import slots as sl
from runledger.commands.decisions import Outcome
from runledger.commands.flow_runs import FlowRun, FlowRunPolicy
from runledger.commands.messages import DecisionContext
from runledger.commands.states import State, StateCreate, StateDetails, StateType

T = StateType
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(hours=1)
RUN_ID = uuid.UUID(int=7)
FLOW_ID = uuid.UUID(int=8)
DEPLOYMENT_ID = uuid.UUID(int=9)
PARENT_TASK_RUN_ID = uuid.UUID(int=10)
_ids = (uuid.UUID(int=i) for i in itertools.count(100_000))


def ctx(now: datetime = NOW) -> DecisionContext:
    return DecisionContext.fixed(now, _ids)


def a_run(**fields: Any) -> FlowRun:
    return FlowRun.model_validate({"id": RUN_ID, "created": EARLIER, "updated": EARLIER, "name": "calm-otter",
                                   "flow_id": FLOW_ID, **fields})


def written(type_: StateType, *, name: str | None = None, at: datetime = EARLIER, data: Any = None,
            **details: Any) -> State:
    """A state as the service wrote it earlier (a SCHEDULED one is due an hour ago)."""
    if type_ is T.SCHEDULED:
        details.setdefault("scheduled_time", EARLIER)
    return State(id=uuid.uuid4(), type=type_, name=name or type_.value.title(), timestamp=at, data=data,
                 state_details=StateDetails(flow_run_id=RUN_ID, **details))


def run_in(state: State | None, **fields: Any) -> FlowRun:
    if state is None:
        return a_run(**fields)
    return a_run(state=state, state_id=state.id, state_type=state.type, state_name=state.name, **fields)


def propose(type_: StateType, name: str | None = None, **fields: Any) -> StateCreate:
    details = fields.pop("details", {})
    return StateCreate(type=type_, name=name, state_details=StateDetails(**details), **fields)


def set_state(run: FlowRun, proposed: StateCreate, *, force: bool = False,
              now: datetime = NOW) -> orch.Transition:
    return orch.set_flow_run_state(run, proposed, force=force, ctx=ctx(now))


def assert_nothing_written(t: orch.Transition, run: FlowRun) -> None:
    assert t.state is None
    assert t.run == run


def assert_written(t: orch.Transition, type_: StateType, name: str | None = None) -> State:
    assert t.state is not None
    assert t.state.type is type_
    if name is not None:
        assert t.state.name == name
    assert t.run.state == t.state
    assert (t.run.state_id, t.run.state_type, t.run.state_name) == (t.state.id, t.state.type, t.state.name)
    return t.state


# ---------------------------------------------------------------------------------------------
# The transition matrix: (current type or none) x (proposed type), unforced and forced


COLUMNS = (T.SCHEDULED, T.PENDING, T.RUNNING, T.COMPLETED, T.FAILED, T.CANCELLED, T.CRASHED, T.PAUSED,
           T.CANCELLING)
# What happens to a proposal with the default name, for an ad-hoc run (no deployment, no
# infrastructure pid, no retries) whose current state has its default name, no result data, a
# scheduled time an hour ago (SCHEDULED) and a plain pause (PAUSED: no timeout, no reschedule).
#   A  accepted: the proposed type written      C  rejected: a Cancelled state written instead
#   R  rejected: nothing written                X  aborted: nothing written
#                      SCH PEN RUN COM FAI CAN CRA PAU CNG
UNFORCED = {
    None:          "    A   A   A   A   A   A   A   X   A",  # OR-9: no state cannot pause
    T.SCHEDULED:   "    A   A   A   A   A   A   A   R   C",  # OR-9; OR-4 (no pid)
    T.PENDING:     "    A   X   A   A   A   A   A   R   A",  # OR-5; OR-9
    T.RUNNING:     "    A   X   A   A   A   A   A   A   A",  # OR-5
    T.COMPLETED:   "    X   A   A   A   A   A   X   X   X",  # OR-2c (no deployment); OR-2a
    T.FAILED:      "    X   A   A   A   A   A   X   X   X",
    T.CANCELLED:   "    X   X   A   A   A   A   X   X   X",  # OR-2; OR-5 (CANCELLED -> PENDING)
    T.CRASHED:     "    X   A   A   A   A   A   X   X   X",
    T.PAUSED:      "    A   R   A   A   A   A   A   R   R",  # OR-10 (PENDING, CANCELLING); OR-9
    T.CANCELLING:  "    R   R   R   R   R   A   R   R   R",  # OR-3
}
# FR-5: only OR-2b (COMPLETED -> COMPLETED with a persisted result: none here) and OR-4 remain.
FORCED = {
    None:          "    A   A   A   A   A   A   A   A   A",
    T.SCHEDULED:   "    A   A   A   A   A   A   A   A   C",  # OR-4
    T.PENDING:     "    A   A   A   A   A   A   A   A   A",
    T.RUNNING:     "    A   A   A   A   A   A   A   A   A",
    T.COMPLETED:   "    A   A   A   A   A   A   A   A   A",
    T.FAILED:      "    A   A   A   A   A   A   A   A   A",
    T.CANCELLED:   "    A   A   A   A   A   A   A   A   A",
    T.CRASHED:     "    A   A   A   A   A   A   A   A   A",
    T.PAUSED:      "    A   A   A   A   A   A   A   A   A",  # a plain pause has infrastructure
    T.CANCELLING:  "    A   A   A   A   A   A   A   A   A",
}
# The same run with a deployment: a finished run may be rescheduled (OR-2c, OR-2d).
DEPLOYED_DIFFERENCES = {(t, T.SCHEDULED, False): "A" for t in (T.COMPLETED, T.FAILED, T.CANCELLED, T.CRASHED)}

MEANING = {"A": Outcome.ACCEPT, "C": Outcome.REJECT, "R": Outcome.REJECT, "X": Outcome.ABORT}


def _matrix_cases() -> list[Any]:
    cases = []
    for deployed in (False, True):
        for force, table in ((False, UNFORCED), (True, FORCED)):
            for current, row in table.items():
                for proposed, expected in zip(COLUMNS, row.split(), strict=True):
                    if deployed:
                        expected = DEPLOYED_DIFFERENCES.get((current, proposed, force), expected)
                    name = (f"{'deployed' if deployed else 'adhoc'}-{'forced' if force else 'unforced'}-"
                            f"{current.value if current else 'NONE'}->{proposed.value}")
                    cases.append(pytest.param(current, proposed, force, deployed, expected, id=name))
    return cases


@pytest.mark.parametrize(("current", "proposed", "force", "deployed", "expected"), _matrix_cases())
def test_transition_matrix(current: StateType | None, proposed: StateType, force: bool, deployed: bool,
                           expected: str) -> None:
    run = run_in(written(current) if current else None, deployment_id=DEPLOYMENT_ID if deployed else None)
    t = set_state(run, propose(proposed), force=force)

    assert t.orchestration.status is MEANING[expected]
    if expected == "A":
        assert_written(t, proposed)
    elif expected == "C":
        assert_written(t, T.CANCELLED, "Cancelled")
    else:
        assert_nothing_written(t, run)
        assert t.orchestration.reason
    assert t.orchestration.as_reply()["details"]["type"] == f"{MEANING[expected].value.lower()}_details"


def test_the_matrix_table_covers_every_pair() -> None:
    assert set(UNFORCED) == set(FORCED) == {None, *StateType}
    assert all(len(row.split()) == len(COLUMNS) for row in [*UNFORCED.values(), *FORCED.values()])


# ---------------------------------------------------------------------------------------------
# The policies, as data


def test_flow_policy_lists_the_core_rules_in_prefects_order() -> None:
    assert [(r.cites, r.name) for r in orch.FLOW_POLICY] == [
        ("OR-1", "prevent_duplicate_transitions"),
        ("OR-2", "handle_flow_terminal_state_transitions"),
        ("OR-3", "enforce_cancelling_to_cancelled_transition"),
        ("OR-4", "bypass_cancelling_flow_runs_with_no_infra"),
        ("OR-5", "prevent_pending_transitions"),
        ("WK-1", "claims_need_an_online_worker"),
        ("SL-1/SL-2", "respect_pool_and_queue_limits"),
        ("OR-6", "take_a_deployment_slot_again_after_its_lease_expired"),
        ("OR-7", "secure_flow_concurrency_slots"),
        ("OR-8", "ensure_only_scheduled_flows_marked_late"),
        ("OR-9", "handle_pausing_flows"),
        ("OR-10", "handle_resuming_paused_flows"),
        ("OR-11", "copy_scheduled_time"),
        ("OR-11", "wait_for_scheduled_time"),
        ("OR-12", "retry_failed_flows"),
    ]
    assert [r.name for r in orch.FORCED_FLOW_POLICY] == ["prevent_result_data_loss",
                                                         "bypass_cancelling_flow_runs_with_no_infra"]
    assert [r.name for r in orch.LATE_RUNS_POLICY] == ["ensure_only_scheduled_flows_marked_late",
                                                       "mark_late_only_runs_still_scheduled_past_their_time",
                                                       "cancel_new_runs_that_fall_due_behind_a_full_deployment"]
    for r in [*orch.FLOW_POLICY, *orch.FORCED_FLOW_POLICY, *orch.LATE_RUNS_POLICY]:
        assert r.doc.strip() and r.from_states and r.to_states


def test_rules_are_chosen_by_the_intended_transition() -> None:
    chosen = orch.rules_for(orch.FLOW_POLICY, T.SCHEDULED, T.RUNNING)
    assert [r.name for r in chosen] == ["prevent_duplicate_transitions", "claims_need_an_online_worker",
                                        "respect_pool_and_queue_limits", "wait_for_scheduled_time"]
    assert orch.bypass_cancelling_flow_runs_with_no_infra.to_states == {T.CANCELLING}
    assert None in orch.handle_pausing_flows.from_states


def test_once_a_rule_changes_the_proposed_type_later_rules_do_not_apply_and_earlier_ones_fizzle() -> None:
    """FR-4, on a policy of three made-up rules."""
    called: list[str] = []

    @orch.rule("T-1", from_states=orch.ALL_STATES, to_states={T.RUNNING})
    def forget_pauses(c: orch.RuleContext) -> orch.Verdict:
        """Changes the policy, then sees another type written: undone."""
        called.append("forget_pauses")
        return orch.go_on(policy={"pause_keys": []}, policy_after={"retry_type": "reschedule"})

    @orch.rule("T-2", from_states=orch.ALL_STATES, to_states={T.RUNNING})
    def crash_instead(c: orch.RuleContext) -> orch.Verdict:
        """Replaces the proposal by another type."""
        called.append("crash_instead")
        return orch.reject("crashed instead", propose(T.CRASHED), policy={"retries": 3})

    @orch.rule("T-3", from_states=orch.ALL_STATES, to_states={T.RUNNING})
    def never_asked(c: orch.RuleContext) -> orch.Verdict:
        """Chosen for PENDING -> RUNNING, which no longer happens."""
        called.append("never_asked")
        return orch.abort("unreachable")

    run = run_in(written(T.PENDING), empirical_policy=FlowRunPolicy(pause_keys=["k"]))
    t = orch.orchestrate([forget_pauses, crash_instead, never_asked], run, propose(T.RUNNING), ctx())

    assert called == ["forget_pauses", "crash_instead"]
    assert t.orchestration.status is Outcome.REJECT and t.orchestration.reason == "crashed instead"
    assert_written(t, T.CRASHED, "Crashed")
    assert t.run.empirical_policy == FlowRunPolicy(pause_keys=["k"], retries=3)


def test_a_rule_sees_the_policy_earlier_rules_changed_and_its_after_write_change_applies() -> None:
    seen: list[FlowRunPolicy] = []

    @orch.rule("T-1", from_states=orch.ALL_STATES, to_states=orch.ALL_STATES)
    def first(c: orch.RuleContext) -> orch.Verdict:
        """Sets retries."""
        return orch.go_on(policy={"retries": 2})

    @orch.rule("T-2", from_states=orch.ALL_STATES, to_states=orch.ALL_STATES)
    def second(c: orch.RuleContext) -> orch.Verdict:
        """Reads them, renames the proposal and marks the run resuming once written."""
        seen.append(c.run.empirical_policy)
        return orch.go_on(c.proposed.model_copy(update={"name": "Renamed"}), policy_after={"resuming": True})

    t = orch.orchestrate([first, second], run_in(written(T.PENDING)), propose(T.SCHEDULED), ctx())

    assert seen == [FlowRunPolicy(retries=2)]
    assert t.orchestration.status is Outcome.ACCEPT
    assert_written(t, T.SCHEDULED, "Renamed")
    assert t.run.empirical_policy == FlowRunPolicy(retries=2, resuming=True)


# ---------------------------------------------------------------------------------------------
# OR-1 duplicate transitions


def test_or1_the_same_transition_id_again_is_rejected_with_the_current_state() -> None:
    tid = uuid.uuid4()
    run = run_in(written(T.RUNNING, transition_id=tid))
    t = set_state(run, propose(T.COMPLETED, details={"transition_id": tid}))

    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == "This run has already made this state transition."
    assert_nothing_written(t, run)


def test_or1_another_transition_id_or_force_goes_through() -> None:
    tid = uuid.uuid4()
    run = run_in(written(T.RUNNING, transition_id=tid))
    assert set_state(run, propose(T.COMPLETED, details={"transition_id": uuid.uuid4()})).state is not None
    assert set_state(run, propose(T.COMPLETED, details={"transition_id": tid}), force=True).state is not None


# ---------------------------------------------------------------------------------------------
# OR-2 leaving a terminal state


@pytest.mark.parametrize("terminal", [T.COMPLETED, T.FAILED, T.CANCELLED, T.CRASHED])
@pytest.mark.parametrize("proposed", [T.CANCELLING, T.PAUSED, T.CRASHED])
def test_or2a_a_finished_run_cannot_be_cancelled_paused_or_crashed(terminal: StateType,
                                                                   proposed: StateType) -> None:
    run = run_in(written(terminal), deployment_id=DEPLOYMENT_ID)
    t = set_state(run, propose(proposed))
    assert t.orchestration.status is Outcome.ABORT
    assert t.orchestration.reason == f"Run is already in terminal state {terminal.value}."
    assert_nothing_written(t, run)


PERSISTED = {"type": "reference", "storage_key": "/results/abc", "serializer": {"type": "json"}}


@pytest.mark.parametrize("proposed", [T.SCHEDULED, T.PENDING, T.RUNNING, T.PAUSED])
def test_or2b_a_completed_run_with_a_persisted_result_stays_completed(proposed: StateType) -> None:
    run = run_in(written(T.COMPLETED, data=PERSISTED), deployment_id=DEPLOYMENT_ID)
    t = set_state(run, propose(proposed))
    if proposed is T.PAUSED:  # OR-2a comes first
        assert t.orchestration.status is Outcome.ABORT
    else:
        assert t.orchestration.status is Outcome.REJECT
        assert t.orchestration.reason == "Run is already COMPLETED."
    assert_nothing_written(t, run)


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("new_data", [None, {"type": "unpersisted"}, 42])
def test_or2b_completed_cannot_replace_a_persisted_result_even_forced(force: bool, new_data: Any) -> None:
    run = run_in(written(T.COMPLETED, data=PERSISTED))
    t = set_state(run, propose(T.COMPLETED, data=new_data), force=force)
    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == ("Cannot overwrite a COMPLETED state that carries persisted result data "
                                      "with one that does not.")
    assert_nothing_written(t, run)


def test_or2b_what_is_not_a_persisted_result_does_not_hold_the_run() -> None:
    for data in ({"type": "unpersisted"}, {}, "a string", None):
        assert set_state(run_in(written(T.COMPLETED, data=data)), propose(T.RUNNING)).state is not None
    another = {**PERSISTED, "storage_key": "/results/def"}
    assert set_state(run_in(written(T.COMPLETED, data=PERSISTED)), propose(T.COMPLETED, data=another)).state


def test_or2c_a_run_without_deployment_cannot_be_rescheduled() -> None:
    run = run_in(written(T.FAILED))
    t = set_state(run, propose(T.SCHEDULED, "AwaitingRetry"))
    assert t.orchestration.status is Outcome.ABORT
    assert t.orchestration.reason == "Cannot reschedule a run without an associated deployment."
    assert_nothing_written(t, run)


@pytest.mark.parametrize("name", ["AwaitingRetry", "FooBar", None])
def test_or2d_a_manual_retry_resets_pauses_and_keeps_the_run_count(name: str | None) -> None:
    policy = FlowRunPolicy(retries=1, pause_keys=["a", "b"], resuming=True, retry_type="in_process")
    run = run_in(written(T.FAILED), deployment_id=DEPLOYMENT_ID, run_count=5, empirical_policy=policy)
    t = set_state(run, propose(T.SCHEDULED, name))

    assert t.orchestration.status is Outcome.ACCEPT
    assert_written(t, T.SCHEDULED, name or "Scheduled")
    assert t.run.run_count == 5  # retries do not limit a manual retry
    assert t.run.empirical_policy == FlowRunPolicy(retries=1, pause_keys=[], resuming=False,
                                                   retry_type="reschedule")


def test_or2d_rerunning_an_ad_hoc_run_clears_the_retry_type() -> None:
    policy = FlowRunPolicy(pause_keys=["a"], retry_type="reschedule")
    t = set_state(run_in(written(T.CRASHED), empirical_policy=policy, run_count=1), propose(T.RUNNING))
    assert_written(t, T.RUNNING)
    assert t.run.empirical_policy == FlowRunPolicy()
    assert t.run.run_count == 2


def test_or2d_terminal_to_terminal_keeps_the_policy() -> None:
    policy = FlowRunPolicy(pause_keys=["a"], retry_type="reschedule")
    t = set_state(run_in(written(T.FAILED), empirical_policy=policy), propose(T.COMPLETED))
    assert_written(t, T.COMPLETED)
    assert t.run.empirical_policy == policy


def test_or2d_a_later_rule_refusing_leaves_the_policy_as_it_was() -> None:
    """CANCELLED -> PENDING: OR-2 would reset the pauses, but OR-5 aborts."""
    policy = FlowRunPolicy(pause_keys=["a"], retry_type="reschedule")
    run = run_in(written(T.CANCELLED), empirical_policy=policy)
    t = set_state(run, propose(T.PENDING))
    assert t.orchestration.status is Outcome.ABORT
    assert_nothing_written(t, run)


# ---------------------------------------------------------------------------------------------
# OR-3 cancelling ends in cancelled


@pytest.mark.parametrize("proposed", [t for t in StateType if t is not T.CANCELLED])
def test_or3_a_cancelling_run_can_only_become_cancelled(proposed: StateType) -> None:
    run = run_in(written(T.CANCELLING))
    t = set_state(run, propose(proposed))
    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == "Cannot transition flows that are cancelling to a state other than Cancelled."
    assert_nothing_written(t, run)
    assert_written(set_state(run, propose(T.CANCELLED)), T.CANCELLED)


# ---------------------------------------------------------------------------------------------
# OR-4 cancelling without infrastructure


@pytest.mark.parametrize("force", [False, True])
def test_or4_a_scheduled_run_without_infrastructure_is_cancelled_at_once(force: bool) -> None:
    run = run_in(written(T.SCHEDULED))
    t = set_state(run, propose(T.CANCELLING), force=force)
    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == "Scheduled flow run has no infrastructure to terminate."
    state = assert_written(t, T.CANCELLED, "Cancelled")
    assert t.run.end_time == state.timestamp


def test_or4_a_scheduled_run_with_infrastructure_goes_to_cancelling() -> None:
    t = set_state(run_in(written(T.SCHEDULED), infrastructure_pid="1234"), propose(T.CANCELLING))
    assert t.orchestration.status is Outcome.ACCEPT
    assert_written(t, T.CANCELLING)


def test_or4_a_resuming_run_is_cancelled_at_once_even_with_a_pid() -> None:
    run = run_in(written(T.SCHEDULED, name="Resuming"), infrastructure_pid="1234")
    t = set_state(run, propose(T.CANCELLING))
    assert t.orchestration.reason == "Scheduled flow run has no infrastructure to terminate."
    assert_written(t, T.CANCELLED, "Cancelled")


@pytest.mark.parametrize("force", [False, True])
def test_or4_a_suspended_run_is_cancelled_at_once(force: bool) -> None:
    run = run_in(written(T.PAUSED, name="Suspended", pause_reschedule=True), deployment_id=DEPLOYMENT_ID)
    t = set_state(run, propose(T.CANCELLING), force=force)
    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == "Suspended flow run has no infrastructure to terminate."
    assert_written(t, T.CANCELLED, "Cancelled")


def test_or4_a_plainly_paused_run_goes_to_cancelling_when_forced() -> None:
    """OR-4 lets it through; unforced, OR-10 then refuses PAUSED -> CANCELLING (as Prefect)."""
    run = run_in(written(T.PAUSED), infrastructure_pid="1234")
    assert_written(set_state(run, propose(T.CANCELLING), force=True), T.CANCELLING)
    assert set_state(run, propose(T.CANCELLING)).orchestration.status is Outcome.REJECT


# ---------------------------------------------------------------------------------------------
# OR-5 no double submission


@pytest.mark.parametrize("current", [T.PENDING, T.RUNNING, T.CANCELLED])
def test_or5_a_submitted_run_cannot_be_pending_again(current: StateType) -> None:
    run = run_in(written(current))
    t = set_state(run, propose(T.PENDING))
    assert t.orchestration.status is Outcome.ABORT
    assert t.orchestration.reason == (f"This run is in a {current.value} state and cannot transition to a "
                                      "PENDING state.")
    assert_nothing_written(t, run)


def test_or5_pending_then_submitting_then_infrastructure_pending_carries_what_pending_recorded() -> None:
    due, lease = NOW - timedelta(minutes=1), uuid.uuid4()
    run = run_in(written(T.PENDING, scheduled_time=due, deployment_concurrency_lease_id=lease))

    t = set_state(run, propose(T.PENDING, "Submitting", details={"scheduled_time": NOW + timedelta(days=1)}))
    assert t.orchestration.status is Outcome.ACCEPT
    submitting = assert_written(t, T.PENDING, "Submitting")
    assert submitting.state_details.scheduled_time == due
    assert submitting.state_details.deployment_concurrency_lease_id == lease

    t = set_state(t.run, propose(T.PENDING, "InfrastructurePending"), now=NOW + timedelta(seconds=1))
    assert t.orchestration.status is Outcome.ACCEPT
    infra = assert_written(t, T.PENDING, "InfrastructurePending")
    assert (infra.state_details.scheduled_time, infra.state_details.deployment_concurrency_lease_id) == (due, lease)


@pytest.mark.parametrize(("current_name", "proposed_name"), [("Submitting", "Pending"), ("Submitting", None),
                                                             ("Pending", "Pending"), ("Submitting", "Submitting")])
def test_or5_back_to_pending_or_the_same_name_is_aborted(current_name: str, proposed_name: str | None) -> None:
    run = run_in(written(T.PENDING, name=current_name))
    t = set_state(run, propose(T.PENDING, proposed_name))
    assert t.orchestration.status is Outcome.ABORT
    assert t.orchestration.reason == "This run is in a PENDING state and cannot transition to a PENDING state."
    assert_nothing_written(t, run)


@pytest.mark.parametrize("current", [T.SCHEDULED, T.FAILED, T.COMPLETED, T.CRASHED])
def test_or5_other_transitions_into_pending_pass(current: StateType) -> None:
    assert_written(set_state(run_in(written(current)), propose(T.PENDING)), T.PENDING)


# ---------------------------------------------------------------------------------------------
# OR-8 late marking


def test_or8_a_scheduled_run_is_marked_late_once() -> None:
    run = run_in(written(T.SCHEDULED, scheduled_time=EARLIER))
    late = propose(T.SCHEDULED, "Late", details={"scheduled_time": EARLIER})

    t = set_state(run, late)
    assert t.orchestration.status is Outcome.ACCEPT
    state = assert_written(t, T.SCHEDULED, "Late")
    assert state.state_details.scheduled_time == EARLIER

    again = set_state(t.run, late, now=NOW + timedelta(seconds=5))
    assert again.orchestration.status is Outcome.REJECT
    assert again.orchestration.reason == "This flow run is already marked late."
    assert_nothing_written(again, t.run)


@pytest.mark.parametrize("current", [T.PENDING, T.RUNNING, T.PAUSED])
def test_or8_only_scheduled_runs_are_marked_late(current: StateType) -> None:
    run = run_in(written(current), deployment_id=DEPLOYMENT_ID)
    t = set_state(run, propose(T.SCHEDULED, "Late"))
    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == "Only scheduled flows can be marked late."
    assert_nothing_written(t, run)


def test_or8_other_scheduled_names_and_a_run_without_state_pass() -> None:
    assert_written(set_state(run_in(written(T.SCHEDULED, name="Late")), propose(T.SCHEDULED, "AwaitingRetry")),
                   T.SCHEDULED, "AwaitingRetry")
    assert_written(set_state(run_in(None), propose(T.SCHEDULED, "Late")), T.SCHEDULED, "Late")


def full_cancel_new_deployment() -> sl.Limits:
    limit = cl.ConcurrencyLimit(id=uuid.uuid4(), created=NOW, updated=NOW, name="d", limit=1, active=True,
                                active_slots=1)
    return sl.Limits(deployment_limit=limit, collision_strategy="CANCEL_NEW")


def test_fr7_a_client_proposing_late_goes_through_the_core_rules_whatever_its_deployment() -> None:
    """Prefect's EnforceDeploymentConcurrencyOnLate is in its late-runs policy only."""
    run = run_in(written(T.SCHEDULED), deployment_id=DEPLOYMENT_ID)
    t = orch.set_flow_run_state(run, propose(T.SCHEDULED, "Late"), force=False, ctx=ctx(),
                                limits=full_cancel_new_deployment())
    assert t.orchestration.status is Outcome.ACCEPT
    assert_written(t, T.SCHEDULED, "Late")


def test_fr7_the_clock_cancels_a_late_run_of_a_full_cancel_new_deployment() -> None:
    run = run_in(written(T.SCHEDULED), deployment_id=DEPLOYMENT_ID, next_scheduled_start_time=EARLIER)
    t = orch.mark_flow_run_late(run, ctx(), full_cancel_new_deployment())
    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == "Deployment concurrency limit is full and uses the CANCEL_NEW strategy."
    assert assert_written(t, T.CANCELLED, "Cancelled").message == "Deployment concurrency limit reached."
    late = assert_written(orch.mark_flow_run_late(run, ctx()), T.SCHEDULED, "Late")
    assert late.state_details.scheduled_time == EARLIER  # the time it was due
    for moved_on in (run_in(written(T.PENDING)), run_in(written(T.SCHEDULED, name="Late"))):
        assert_nothing_written(orch.mark_flow_run_late(moved_on, ctx(), full_cancel_new_deployment()), moved_on)


# ---------------------------------------------------------------------------------------------
# OR-9 pausing


def test_or9_a_pause_key_fires_once() -> None:
    run = run_in(written(T.RUNNING), run_count=1)
    t = set_state(run, propose(T.PAUSED, details={"pause_key": "step-1"}))
    assert t.orchestration.status is Outcome.ACCEPT
    assert_written(t, T.PAUSED, "Paused")
    assert t.run.empirical_policy.pause_keys == ["step-1"]

    t = set_state(t.run, propose(T.RUNNING), now=NOW + timedelta(seconds=1))
    assert_written(t, T.RUNNING)
    running = t.run
    again = set_state(running, propose(T.PAUSED, details={"pause_key": "step-1"}), now=NOW + timedelta(seconds=2))
    assert again.orchestration.status is Outcome.REJECT
    assert again.orchestration.reason == "This pause has already fired."
    assert_nothing_written(again, running)

    other = set_state(running, propose(T.PAUSED, details={"pause_key": "step-2"}), now=NOW + timedelta(seconds=2))
    assert other.run.empirical_policy.pause_keys == ["step-1", "step-2"]


def test_or9_a_pause_without_key_gets_a_fresh_one() -> None:
    key = uuid.UUID(int=4242)
    ids = iter([key, uuid.UUID(int=4243)])
    t = orch.set_flow_run_state(run_in(written(T.RUNNING)), propose(T.PAUSED), force=False,
                                ctx=DecisionContext.fixed(NOW, ids))
    assert t.run.empirical_policy.pause_keys == [str(key)]
    assert t.state is not None and t.state.id == uuid.UUID(int=4243)


@pytest.mark.parametrize(("name", "verb"), [(None, "pause"), ("Suspended", "suspend")])
def test_or9_only_running_runs_pause(name: str | None, verb: str) -> None:
    run = run_in(written(T.PENDING), deployment_id=DEPLOYMENT_ID)
    t = set_state(run, propose(T.PAUSED, name))
    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == f"Cannot {verb} flows that are not currently running."
    assert_nothing_written(t, run)

    none = run_in(None)
    t = set_state(none, propose(T.PAUSED, name))
    assert t.orchestration.status is Outcome.ABORT
    assert t.orchestration.reason == f"Cannot {verb} flows with no state."
    assert_nothing_written(t, none)


def test_or9_suspending_needs_a_deployment_and_a_top_level_run() -> None:
    suspend = propose(T.PAUSED, "Suspended", details={"pause_reschedule": True, "pause_key": "k"})

    no_deployment = run_in(written(T.RUNNING))
    t = set_state(no_deployment, suspend)
    assert t.orchestration.status is Outcome.ABORT
    assert t.orchestration.reason == "Cannot suspend flows without a deployment."
    assert_nothing_written(t, no_deployment)

    subflow = run_in(written(T.RUNNING), deployment_id=DEPLOYMENT_ID, parent_task_run_id=PARENT_TASK_RUN_ID)
    t = set_state(subflow, suspend)
    assert t.orchestration.status is Outcome.ABORT
    assert t.orchestration.reason == "Cannot suspend subflows."

    deployed = run_in(written(T.RUNNING), deployment_id=DEPLOYMENT_ID)
    t = set_state(deployed, suspend)
    assert t.orchestration.status is Outcome.ACCEPT
    assert assert_written(t, T.PAUSED, "Suspended").state_details.pause_reschedule
    assert t.run.empirical_policy.pause_keys == ["k"]


# ---------------------------------------------------------------------------------------------
# OR-10 resuming


@pytest.mark.parametrize("proposed", [T.PENDING, T.CANCELLING])
def test_or10_a_paused_run_only_resumes_or_ends(proposed: StateType) -> None:
    run = run_in(written(T.PAUSED), infrastructure_pid="1234")
    t = set_state(run, propose(proposed))
    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == (f"This run cannot transition to the StateType.{proposed.value} state from "
                                      "the StateType.PAUSED state.")
    assert_nothing_written(t, run)


def test_or10_resuming_marks_the_run_resuming() -> None:
    t = set_state(run_in(written(T.PAUSED, pause_timeout=NOW + timedelta(minutes=5))), propose(T.RUNNING))
    assert t.orchestration.status is Outcome.ACCEPT
    assert_written(t, T.RUNNING)
    assert t.run.empirical_policy.resuming is True


def test_or10_a_suspended_run_without_deployment_cannot_resume() -> None:
    run = run_in(written(T.PAUSED, name="Suspended", pause_reschedule=True))
    t = set_state(run, propose(T.SCHEDULED, "Resuming"))
    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == "Cannot reschedule a resuming flow run without a deployment."
    assert_nothing_written(t, run)


def test_or10_a_timed_out_pause_fails_the_run() -> None:
    run = run_in(written(T.PAUSED, pause_timeout=NOW - timedelta(seconds=1)), run_count=1,
                 deployment_id=DEPLOYMENT_ID)
    t = set_state(run, propose(T.RUNNING))
    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == "The flow run pause has timed out and can no longer resume."
    failed = assert_written(t, T.FAILED, "Failed")
    assert failed.message == "The flow was running and never resumed."  # Prefect names the proposal
    assert t.run.end_time == failed.timestamp
    assert t.run.run_count == 1


def test_or10_a_timed_out_pause_proposed_running_does_not_leave_the_run_resuming() -> None:
    """FR-4: the rule was chosen for PAUSED -> RUNNING and wrote FAILED, so it fizzles and its
    after-write mark is skipped; the next RUNNING counts as another run."""
    run = run_in(written(T.PAUSED, pause_timeout=NOW - timedelta(seconds=1)), run_count=1)
    t = set_state(run, propose(T.RUNNING))
    assert_written(t, T.FAILED)
    assert t.run.empirical_policy.resuming is False
    again = set_state(t.run, propose(T.RUNNING), force=True, now=NOW + timedelta(seconds=5))
    assert again.run.run_count == 2


def test_or10_a_timed_out_pause_proposed_failed_is_marked_resuming_as_prefect_does() -> None:
    run = run_in(written(T.PAUSED, pause_timeout=NOW - timedelta(seconds=1)), run_count=1)
    t = set_state(run, propose(T.FAILED))
    assert t.orchestration.status is Outcome.REJECT
    assert_written(t, T.FAILED)
    assert t.run.empirical_policy.resuming is True


def test_or10_a_suspended_run_resumes_through_scheduled_without_counting_another_run() -> None:
    run = run_in(written(T.RUNNING, at=EARLIER), deployment_id=DEPLOYMENT_ID, run_count=1, start_time=EARLIER)
    steps = [
        (propose(T.PAUSED, "Suspended", details={"pause_reschedule": True, "pause_key": "k"}), T.PAUSED),
        (propose(T.SCHEDULED, "Resuming"), T.SCHEDULED),
        (propose(T.PENDING), T.PENDING),
        (propose(T.RUNNING), T.RUNNING),
    ]
    resuming = []
    for i, (proposal, type_) in enumerate(steps):
        t = set_state(run, proposal, now=NOW + timedelta(seconds=i))
        assert t.orchestration.status is Outcome.ACCEPT
        assert_written(t, type_)
        run = t.run
        resuming.append(run.empirical_policy.resuming)
    assert resuming == [False, True, True, False]
    assert run.run_count == 1  # FR-6: not bumped when resuming
    assert run.start_time == EARLIER


def test_or10_resuming_in_place_counts_a_run_as_prefect_does() -> None:
    """Prefect books the RUNNING (run_count + 1) before OR-10 marks the run resuming; the mark
    then lasts until the next RUNNING or terminal state."""
    run = run_in(written(T.PAUSED), run_count=1)
    t = set_state(run, propose(T.RUNNING))
    assert (t.run.run_count, t.run.empirical_policy.resuming) == (2, True)
    done = set_state(t.run, propose(T.COMPLETED), now=NOW + timedelta(seconds=1))
    assert done.run.empirical_policy.resuming is False


# ---------------------------------------------------------------------------------------------
# OR-11 scheduled time


@pytest.mark.parametrize(("ahead", "delay"), [
    (timedelta(minutes=5), 300),
    (timedelta(days=1), 86400),
    (timedelta(seconds=299, microseconds=600_000), 300),
    (timedelta(seconds=299, microseconds=400_000), 299),
    (timedelta(seconds=1), 1),
])
@pytest.mark.parametrize("current", [T.SCHEDULED, T.PENDING])
def test_or11_starting_early_waits_until_the_scheduled_time(current: StateType, ahead: timedelta,
                                                            delay: int) -> None:
    run = run_in(written(current, scheduled_time=NOW + ahead))
    t = set_state(run, propose(T.RUNNING))
    assert t.orchestration.status is Outcome.WAIT
    assert t.orchestration.delay_seconds == delay
    assert t.orchestration.as_reply() == {"status": "WAIT", "details": {
        "type": "wait_details", "reason": "Scheduled time is in the future", "delay_seconds": delay}}
    assert_nothing_written(t, run)


@pytest.mark.parametrize("ahead", [timedelta(0), -timedelta(minutes=1), timedelta(microseconds=400_000)])
def test_or11_starting_on_time_or_late_goes_through(ahead: timedelta) -> None:
    run = run_in(written(T.SCHEDULED, scheduled_time=NOW + ahead))
    assert_written(set_state(run, propose(T.RUNNING)), T.RUNNING)


def test_or11_other_targets_and_forced_starts_are_not_delayed() -> None:
    run = run_in(written(T.SCHEDULED, scheduled_time=NOW + timedelta(hours=1)))
    for proposed in (T.PENDING, T.COMPLETED, T.FAILED, T.CANCELLED, T.SCHEDULED):
        assert set_state(run, propose(proposed)).orchestration.status is Outcome.ACCEPT
    assert_written(set_state(run, propose(T.RUNNING), force=True), T.RUNNING)


def test_or11_pending_copies_the_scheduled_time_unless_it_has_its_own() -> None:
    due = NOW + timedelta(minutes=5)
    run = run_in(written(T.SCHEDULED, scheduled_time=due))
    pending = assert_written(set_state(run, propose(T.PENDING)), T.PENDING)
    assert pending.state_details.scheduled_time == due

    own = NOW + timedelta(minutes=1)
    pending = assert_written(set_state(run, propose(T.PENDING, details={"scheduled_time": own})), T.PENDING)
    assert pending.state_details.scheduled_time == own


# ---------------------------------------------------------------------------------------------
# OR-12 automatic retries


def _running(run_count: int, **policy: Any) -> FlowRun:
    return run_in(written(T.RUNNING), run_count=run_count, start_time=EARLIER,
                  empirical_policy=FlowRunPolicy(**policy))


def test_or12_a_failure_with_retries_left_is_scheduled_again() -> None:
    run = _running(1, retries=1, retry_delay=10, pause_keys=["k"], resuming=True)
    t = set_state(run, propose(T.FAILED, message="boom", data={"type": "unpersisted"}))

    assert t.orchestration.status is Outcome.REJECT
    assert t.orchestration.reason == "Retrying"
    retry = assert_written(t, T.SCHEDULED, "AwaitingRetry")
    assert retry.state_details.scheduled_time == NOW + timedelta(seconds=10)
    assert (retry.message, retry.data) == ("boom", {"type": "unpersisted"})
    assert t.run.empirical_policy == FlowRunPolicy(retries=1, retry_delay=10, pause_keys=[], resuming=False,
                                                   retry_type="in_process")
    assert t.run.next_scheduled_start_time == NOW + timedelta(seconds=10)
    assert t.run.end_time is None
    assert t.run.total_run_time == NOW - EARLIER


def test_or12_retries_1_retries_the_first_run_and_fails_the_second() -> None:
    run = _running(1, retries=1)
    t = set_state(run, propose(T.FAILED))
    assert_written(t, T.SCHEDULED, "AwaitingRetry")
    assert t.state is not None and t.state.state_details.scheduled_time == NOW  # no retry_delay

    t = set_state(t.run, propose(T.RUNNING), now=NOW + timedelta(seconds=1))
    assert_written(t, T.RUNNING)
    assert t.run.run_count == 2

    t = set_state(t.run, propose(T.FAILED), now=NOW + timedelta(seconds=2))
    assert t.orchestration.status is Outcome.ACCEPT
    assert_written(t, T.FAILED)
    assert t.run.empirical_policy.retry_type is None


def test_or12_without_retries_a_failure_is_accepted_and_clears_the_retry_type() -> None:
    t = set_state(_running(1, retry_type="reschedule"), propose(T.FAILED))
    assert t.orchestration.status is Outcome.ACCEPT
    assert_written(t, T.FAILED)
    assert t.run.empirical_policy.retry_type is None


def test_or12_does_not_apply_when_forced() -> None:
    assert_written(set_state(_running(1, retries=3), propose(T.FAILED), force=True), T.FAILED)


# ---------------------------------------------------------------------------------------------
# FR-2 the first state


def test_fr2_a_run_without_a_proposed_state_starts_pending() -> None:
    run = a_run()
    t = orch.initial_flow_run_state(run, None, ctx())
    assert t.orchestration.status is Outcome.ACCEPT
    state = assert_written(t, T.PENDING, "Pending")
    assert state.timestamp == NOW
    assert state.state_details.flow_run_id == RUN_ID
    assert t.run.expected_start_time == NOW
    assert (t.run.start_time, t.run.end_time, t.run.run_count) == (None, None, 0)


def test_fr2_the_first_state_is_applied_with_force_semantics() -> None:
    t = orch.initial_flow_run_state(a_run(), propose(T.PAUSED), ctx())  # OR-9 would abort
    assert_written(t, T.PAUSED)
    t = orch.initial_flow_run_state(a_run(), propose(T.RUNNING), ctx())
    assert_written(t, T.RUNNING)
    assert (t.run.run_count, t.run.start_time) == (1, NOW)


def test_fr1_a_scheduled_state_is_due_now_unless_it_says_when() -> None:
    t = orch.initial_flow_run_state(a_run(), propose(T.SCHEDULED), ctx())
    assert t.state is not None and t.state.state_details.scheduled_time == NOW
    assert (t.run.expected_start_time, t.run.next_scheduled_start_time) == (NOW, NOW)

    later = NOW + timedelta(days=2)
    t = orch.initial_flow_run_state(a_run(), propose(T.SCHEDULED, details={"scheduled_time": later}), ctx())
    assert (t.run.expected_start_time, t.run.next_scheduled_start_time) == (later, later)


def test_fr1_the_state_is_minted_by_the_service() -> None:
    state_id = uuid.UUID(int=31337)
    proposal = propose(T.RUNNING, timestamp=NOW - timedelta(days=3), message="go", data={"x": 1})
    t = orch.set_flow_run_state(run_in(written(T.PENDING)), proposal, force=False,
                                ctx=DecisionContext.fixed(NOW, iter([state_id])))
    state = assert_written(t, T.RUNNING, "Running")
    assert (state.id, state.timestamp, state.message, state.data) == (state_id, NOW, "go", {"x": 1})
    assert t.run.updated == NOW


# ---------------------------------------------------------------------------------------------
# FR-6 bookkeeping


def _walk(run: FlowRun, *steps: tuple[StateCreate, datetime], force: bool = True) -> list[orch.Transition]:
    done = []
    for proposal, at in steps:
        t = set_state(run, proposal, force=force, now=at)
        assert t.state is not None, t.orchestration
        done.append(t)
        run = t.run
    return done


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def test_fr6_start_time_is_the_first_running_and_never_overwritten() -> None:
    ts = _walk(run_in(written(T.PENDING)), (propose(T.RUNNING), at(0)), (propose(T.PAUSED), at(10)),
               (propose(T.RUNNING), at(20)), (propose(T.COMPLETED), at(30)), force=False)
    assert [t.run.start_time for t in ts] == [at(0)] * 4


def test_fr6_end_time_is_the_first_terminal_and_cleared_when_leaving_terminal() -> None:
    ts = _walk(run_in(written(T.RUNNING, at=at(-5)), start_time=at(-5)),
               (propose(T.COMPLETED), at(0)), (propose(T.FAILED), at(10)), (propose(T.RUNNING), at(20)),
               (propose(T.CRASHED), at(30)))
    assert [t.run.end_time for t in ts] == [at(0), at(0), None, at(30)]
    assert ts[-1].run.start_time == at(-5)


def test_fr6_a_run_that_ends_without_running_gets_a_start_time() -> None:
    (t,) = _walk(run_in(written(T.SCHEDULED)), (propose(T.CANCELLED), at(0)))
    assert (t.run.start_time, t.run.end_time) == (at(0), at(0))


def test_fr6_total_run_time_accumulates_only_time_spent_running() -> None:
    ts = _walk(run_in(written(T.PENDING)), (propose(T.RUNNING), at(0)), (propose(T.PAUSED), at(10)),
               (propose(T.RUNNING), at(30)), (propose(T.COMPLETED), at(35)), (propose(T.FAILED), at(100)))
    assert [t.run.total_run_time.total_seconds() for t in ts] == [0, 10, 10, 15, 15]


def test_fr6_run_count_counts_runs_but_not_resumptions() -> None:
    policy = FlowRunPolicy(resuming=True)
    ts = _walk(run_in(written(T.PENDING), run_count=3, empirical_policy=policy),
               (propose(T.RUNNING), at(0)), (propose(T.RUNNING), at(1)))
    assert [t.run.run_count for t in ts] == [3, 4]
    assert [t.run.empirical_policy.resuming for t in ts] == [False, False]


def test_fr6_resuming_is_cleared_by_a_terminal_state_only_among_the_rest() -> None:
    policy = FlowRunPolicy(resuming=True)
    (t,) = _walk(run_in(written(T.SCHEDULED), empirical_policy=policy), (propose(T.PENDING), at(0)))
    assert t.run.empirical_policy.resuming is True
    (t,) = _walk(t.run, (propose(T.CRASHED), at(1)))
    assert t.run.empirical_policy.resuming is False


def test_fr6_expected_start_time_is_set_once() -> None:
    due = at(600)
    ts = _walk(a_run(), (propose(T.SCHEDULED, details={"scheduled_time": due}), at(0)),
               (propose(T.SCHEDULED, details={"scheduled_time": at(900)}), at(1)), (propose(T.PENDING), at(2)))
    assert [t.run.expected_start_time for t in ts] == [due, due, due]


def test_fr6_next_scheduled_start_time_follows_scheduled_states() -> None:
    ts = _walk(a_run(), (propose(T.SCHEDULED, details={"scheduled_time": at(60)}), at(0)),
               (propose(T.SCHEDULED, "Late", details={"scheduled_time": at(60)}), at(1)),
               (propose(T.PENDING), at(2)), (propose(T.SCHEDULED, "AwaitingRetry"), at(3)))
    assert [t.run.next_scheduled_start_time for t in ts] == [at(60), at(60), None, at(3)]


def test_fr6_timestamps_strictly_increase_even_when_the_clock_does_not() -> None:
    ts = _walk(run_in(written(T.PENDING, at=NOW)), (propose(T.RUNNING), NOW), (propose(T.PAUSED), NOW),
               (propose(T.RUNNING), NOW - timedelta(seconds=5)), (propose(T.COMPLETED), at(1)))
    stamps = [t.state.timestamp for t in ts if t.state is not None]
    assert stamps == [NOW + timedelta(microseconds=1), NOW + timedelta(microseconds=2),
                      NOW + timedelta(microseconds=3), at(1)]
    assert ts[-1].run.total_run_time == timedelta(microseconds=1) + (at(1) - NOW - timedelta(microseconds=3))


def test_fr6_state_details_name_the_run_and_a_subflows_parent_task() -> None:
    (t,) = _walk(run_in(written(T.PENDING), parent_task_run_id=PARENT_TASK_RUN_ID),
                 (propose(T.RUNNING, details={"flow_run_id": uuid.uuid4()}), at(0)))
    assert t.state is not None
    assert (t.state.state_details.flow_run_id, t.state.state_details.task_run_id) == (RUN_ID, PARENT_TASK_RUN_ID)


def test_fr6_a_rejection_with_a_replacement_books_the_replacement() -> None:
    run = run_in(written(T.SCHEDULED, scheduled_time=at(-60)), expected_start_time=at(-60),
                 next_scheduled_start_time=at(-60))
    t = set_state(run, propose(T.CANCELLING))
    cancelled = assert_written(t, T.CANCELLED)
    assert (t.run.next_scheduled_start_time, t.run.end_time, t.run.start_time) == (
        None, cancelled.timestamp, cancelled.timestamp)
    assert t.run.expected_start_time == at(-60)
