"""Flow-run orchestration: what is written when a state is proposed (BEHAVIOUR §7).

Prefect's shape, kept pure. Each rule is a small named function that says which transitions
it governs (`from_states` x `to_states`, `None` = the run has no state yet) and, in its
docstring, why. A policy is an ordered list of rules. For a proposal, `orchestrate`:

1. completes the proposal (FR-1: default name, a SCHEDULED state's `scheduled_time`);
2. selects the policy's rules for the *intended* transition (current type, proposed type)
   and asks each in order for a `Verdict`: go on (possibly renamed, annotated, with a change
   to `empirical_policy`), reject (a replacement state, or nothing written), wait or abort;
3. FR-4: once a rule changes the proposed *type*, the later rules selected for the original
   transition no longer apply, and an earlier rule's policy change is undone ("fizzled");
4. writes the result: a new id and timestamp, then FR-6 bookkeeping on the run, then the
   rules' after-write policy changes (Prefect's `after_transition`), in reverse order.

Nothing is read or written here: the run comes in, the clock and ids come through
`DecisionContext`, and the run after the written state comes out (`Transition`). When no
state is written the run is unchanged: Prefect would still keep a policy change of a rule
that refused (OR-10 marks a run `resuming` even when it refuses to resume it); we do not.

Slots: a rule reads the limits a claim touches (`RuleContext.limits`, loaded by the caller:
`commands/slots.py`) and refuses when one is full; the counts themselves follow from what is
written (`slots.slot_events`, bookkeeping that never refuses), so a forced transition still
takes and gives back slots (OR-13 holds under `force` too). Copying a subflow's state onto its
parent task run (FR-6, last line) crosses aggregates: `subflows.py`, called by the handlers.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .decisions import Orchestration, Outcome
from .messages import DecisionContext
from .slots import (
    DEPLOYMENT_SLOT_STATES,
    DEPLOYMENT_SLOT_WAIT_SECONDS,
    NO_LIMITS,
    POOL_SLOT_STATES,
    Limits,
    deployment_lease,
    holds_pool_slot,
    lease_of,
    new_lease_id,
)
from .states import TERMINAL, State, StateCreate, StateDetails, StateType, default_name

if TYPE_CHECKING:
    from .flow_runs import FlowRun, FlowRunPolicy

# Every state type a transition can come from or go to; `None`: the run has no state yet.
ALL_STATES: frozenset[StateType | None] = frozenset({*StateType, None})
TERMINAL_STATES: frozenset[StateType | None] = frozenset(TERMINAL)
_ONE_MICROSECOND = timedelta(microseconds=1)


# ---------------------------------------------------------------------------------------------
# What a rule sees and what it answers


@dataclass(frozen=True)
class RuleContext:
    """What a rule may read. `run` carries the `empirical_policy` as earlier rules left it;
    `proposed` is the proposal as earlier rules renamed or annotated it. `limits`: the pool,
    queue and deployment limits the run's claim touches, with their counts."""

    run: FlowRun
    proposed: StateCreate
    now: datetime
    new_id: Callable[[], uuid.UUID]
    limits: Limits = NO_LIMITS
    claimant: str | None = None  # the worker that proposes the state, when it names itself
    # What else the caller loaded for this kind of run's rules (task runs: `TaskFacts`).
    facts: Any = None

    @property
    def current(self) -> State | None:
        return self.run.state


@dataclass(frozen=True)
class Verdict:
    """A rule's answer. ACCEPT means "go on": `state`, when given, replaces the proposal with
    the same type (renamed or annotated). REJECT writes `state` instead (None: nothing);
    WAIT and ABORT write nothing.

    `policy`: fields of `empirical_policy` set at once, before the state is written (undone
    if a later rule changes the proposed type). `policy_after`: fields set after the state is
    written and booked, when what is written is of the type first proposed."""

    status: Outcome = Outcome.ACCEPT
    state: StateCreate | None = None
    reason: str | None = None
    delay_seconds: int | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    policy_after: dict[str, Any] = field(default_factory=dict)
    # More for the reply's `details`, when refused (e.g. which worker holds the run).
    details: dict[str, Any] = field(default_factory=dict)


GO_ON = Verdict()


def go_on(state: StateCreate | None = None, *, policy: dict[str, Any] | None = None,
          policy_after: dict[str, Any] | None = None) -> Verdict:
    return Verdict(state=state, policy=policy or {}, policy_after=policy_after or {})


def reject(reason: str, state: StateCreate | None = None, *, policy: dict[str, Any] | None = None,
           policy_after: dict[str, Any] | None = None, details: dict[str, Any] | None = None) -> Verdict:
    return Verdict(Outcome.REJECT, state=state, reason=reason, policy=policy or {},
                   policy_after=policy_after or {}, details=details or {})


def wait(delay_seconds: int, reason: str) -> Verdict:
    return Verdict(Outcome.WAIT, reason=reason, delay_seconds=delay_seconds)


def abort(reason: str) -> Verdict:
    return Verdict(Outcome.ABORT, reason=reason)


@dataclass(frozen=True)
class Rule:
    """One orchestration rule: it applies to the transitions `from_states` x `to_states`;
    `cites` names the BEHAVIOUR rule; `doc` says why it exists."""

    name: str
    cites: str
    from_states: frozenset[StateType | None]
    to_states: frozenset[StateType | None]
    decide: Callable[[RuleContext], Verdict]

    @property
    def doc(self) -> str:
        return self.decide.__doc__ or ""

    def applies_to(self, from_type: StateType | None, to_type: StateType | None) -> bool:
        return from_type in self.from_states and to_type in self.to_states


def rule(cites: str, *, from_states: Iterable[StateType | None],
         to_states: Iterable[StateType | None]) -> Callable[[Callable[[RuleContext], Verdict]], Rule]:
    def make(decide: Callable[[RuleContext], Verdict]) -> Rule:
        return Rule(decide.__name__, cites, frozenset(from_states), frozenset(to_states), decide)

    return make


def _has_persisted_result(data: Any) -> bool:
    """Prefect's test for result metadata: a dict whose `type` is not "unpersisted"."""
    return isinstance(data, dict) and data.get("type") != "unpersisted"


def _replaces_persisted_result(current: State, proposed: StateCreate) -> bool:
    return (current.type is StateType.COMPLETED and proposed.type is StateType.COMPLETED
            and bool(current.data) and _has_persisted_result(current.data)
            and not _has_persisted_result(proposed.data))


_DATA_LOSS = ("Cannot overwrite a COMPLETED state that carries persisted result data with one "
              "that does not.")


def _with_details(state: StateCreate, **details: Any) -> StateCreate:
    return state.model_copy(update={"state_details": state.state_details.model_copy(update=details)})


# ---------------------------------------------------------------------------------------------
# The core flow rules (Prefect's CoreFlowPolicy), in priority order


@rule("OR-1", from_states=ALL_STATES, to_states=ALL_STATES)
def prevent_duplicate_transitions(c: RuleContext) -> Verdict:
    """Prefect's PreventDuplicateTransitions. A client whose request was accepted but whose
    reply was lost retries with the same `transition_id`: it gets the current state back
    instead of making the transition twice."""
    current = c.current
    if current is None:
        return GO_ON
    seen = current.state_details.transition_id
    if seen is not None and seen == c.proposed.state_details.transition_id:
        return reject("This run has already made this state transition.")
    return GO_ON


@rule("OR-2", from_states=TERMINAL_STATES, to_states=ALL_STATES)
def handle_flow_terminal_state_transitions(c: RuleContext) -> Verdict:
    """Prefect's HandleFlowTerminalStateTransitions. A finished run may be run again (a
    manual retry), but it cannot be cancelled, paused or crashed after the fact, a completed
    run keeps its persisted result, and only a deployment can reschedule it. Leaving a
    terminal state starts afresh: pauses seen so far no longer count."""
    current, proposed = c.current, c.proposed
    if current is None:
        return GO_ON
    if proposed.type in (StateType.CANCELLING, StateType.PAUSED, StateType.CRASHED):
        return abort(f"Run is already in terminal state {current.type.value}.")
    completed_with_result = (current.type is StateType.COMPLETED and bool(current.data)
                             and _has_persisted_result(current.data))
    if completed_with_result and proposed.type not in TERMINAL:
        return reject("Run is already COMPLETED.")
    if _replaces_persisted_result(current, proposed):
        return reject(_DATA_LOSS)
    if proposed.type is StateType.SCHEDULED and c.run.deployment_id is None:
        return abort("Cannot reschedule a run without an associated deployment.")
    if proposed.type not in TERMINAL:
        retry_type = "reschedule" if proposed.type is StateType.SCHEDULED else None
        return go_on(policy={"resuming": False, "pause_keys": [], "retry_type": retry_type})
    return GO_ON


@rule("OR-2b", from_states=TERMINAL_STATES, to_states=TERMINAL_STATES)
def prevent_result_data_loss(c: RuleContext) -> Verdict:
    """Prefect's PreventResultDataLoss: the COMPLETED -> COMPLETED part of OR-2, on its own
    so that a forced transition (FR-5) cannot discard a persisted result either."""
    if c.current is not None and _replaces_persisted_result(c.current, c.proposed):
        return reject(_DATA_LOSS)
    return GO_ON


@rule("OR-3", from_states={StateType.CANCELLING}, to_states=ALL_STATES - {StateType.CANCELLED})
def enforce_cancelling_to_cancelled_transition(c: RuleContext) -> Verdict:
    """Prefect's EnforceCancellingToCancelledTransition. A cancelling run is tearing down its
    infrastructure; the only way out is to report that it is cancelled."""
    return reject("Cannot transition flows that are cancelling to a state other than Cancelled.")


@rule("OR-4", from_states={StateType.SCHEDULED, StateType.PAUSED}, to_states={StateType.CANCELLING})
def bypass_cancelling_flow_runs_with_no_infra(c: RuleContext) -> Verdict:
    """Prefect's BypassCancellingFlowRunsWithNoInfra. `Cancelling` exists so a worker tears
    down infrastructure; a scheduled run without a process id (or `Resuming`, which had its
    infrastructure torn down when suspended) and a suspended run have none, so nobody would
    ever move them on: they are `Cancelled` at once."""
    current = c.current
    if current is None:
        return GO_ON
    if (current.type is StateType.SCHEDULED and not c.run.infrastructure_pid) or current.name == "Resuming":
        return reject("Scheduled flow run has no infrastructure to terminate.",
                      StateCreate(type=StateType.CANCELLED, name="Cancelled"))
    if current.type is StateType.PAUSED and current.state_details.pause_reschedule:
        return reject("Suspended flow run has no infrastructure to terminate.",
                      StateCreate(type=StateType.CANCELLED, name="Cancelled"))
    return GO_ON


@rule("OR-5", from_states={StateType.PENDING, StateType.CANCELLING, StateType.RUNNING, StateType.CANCELLED},
      to_states={StateType.PENDING})
def prevent_pending_transitions(c: RuleContext) -> Verdict:
    """Prefect's PreventPendingTransitions. A worker puts a run in PENDING before submitting
    it; a second worker that finds it PENDING or RUNNING already must not submit it again.
    Cancelled runs are rerun through SCHEDULED (deployments) or RUNNING (ad hoc). Named
    PENDING sub-states (`Submitting`, `InfrastructurePending`) may follow each other, keeping
    what the first PENDING state recorded, but not a deployment slot's lease that expired: that
    slot was given back (perhaps to another run), so carrying its id would count it as taken
    again without a check; the run holds none until OR-6 decides at its RUNNING."""
    current, proposed = c.current, c.proposed
    if current is None:
        return GO_ON
    if (current.type is StateType.PENDING and current.name != proposed.name
            and proposed.name != "Pending"):
        carried = current.state_details
        lease = None if c.run.deployment_lease_expired else carried.deployment_concurrency_lease_id
        return go_on(_with_details(proposed, scheduled_time=carried.scheduled_time,
                                   deployment_concurrency_lease_id=lease))
    return abort(f"This run is in a {current.type.name} state and cannot transition to a PENDING state.")


_CLAIMING_FROM = ALL_STATES - POOL_SLOT_STATES


@rule("WK-1", from_states=_CLAIMING_FROM, to_states=POOL_SLOT_STATES)
def claims_need_an_online_worker(c: RuleContext) -> Verdict:
    """Beyond Prefect, whose runs stay PENDING or RUNNING for ever when their worker dies: a
    worker that names itself claims the run for as long as it sends heartbeats, so it must be
    an ONLINE worker of the run's pool. Once it goes offline, its runs are crashed and their
    slots given back."""
    if c.claimant is None:
        return GO_ON
    pool = c.limits.pool
    if pool is None:
        return reject(f"Worker {c.claimant!r} cannot claim a run that is not in a work pool.")
    if c.claimant not in pool.online_workers:
        return reject(f"Worker {c.claimant!r} is not online in work pool {pool.name!r}: send a heartbeat first.")
    return GO_ON


@rule("SL-1/SL-2", from_states=_CLAIMING_FROM, to_states=POOL_SLOT_STATES)
def respect_pool_and_queue_limits(c: RuleContext) -> Verdict:
    """Beyond Prefect, which only caps what a poll returns, so two workers polling at once can
    both submit past a limit: a run takes a slot of its queue and pool when it enters PENDING
    or RUNNING, decided against the counts it changes. When either is full nothing is written;
    the run stays where it is, in its place in the poll, and its read model says why it waits.
    A run that a release handed the slot it freed holds it already (`slots.hand_over`)."""
    if holds_pool_slot(c.run):
        return GO_ON
    full = c.limits.pool_or_queue_full(c.run)
    return reject(full) if full is not None else GO_ON


DEPLOYMENT_LIMIT_REACHED = "Deployment concurrency limit reached."


@rule("OR-6", from_states={StateType.PENDING}, to_states={StateType.RUNNING})
def take_a_deployment_slot_again_after_its_lease_expired(c: RuleContext) -> Verdict:
    """Prefect's ValidateDeploymentConcurrencyAtRunning. A run that stayed PENDING longer than
    its deployment slot's lease gave the slot back (its infrastructure was slow to come up);
    starting without one would run past the limit. It takes a slot again when one is free;
    otherwise it cannot wait (its infrastructure is up) and is cancelled."""
    limits = c.limits
    limit = limits.deployment_limit
    if not c.run.deployment_lease_expired or limit is None or not limits.deployment_limit_applies:
        return GO_ON
    if limit.active_slots < limit.limit:
        return go_on(_with_details(c.proposed, deployment_concurrency_lease_id=new_lease_id(limit, c.new_id())))
    return reject("Deployment concurrency limit reached after lease expiry.",
                  StateCreate(type=StateType.CANCELLED, name="Cancelled",
                              message="Deployment concurrency slot lost during provisioning - no slots available "
                                      "to continue execution"))


@rule("OR-7", from_states=ALL_STATES - DEPLOYMENT_SLOT_STATES, to_states={StateType.PENDING})
def secure_flow_concurrency_slots(c: RuleContext) -> Verdict:
    """Prefect's SecureFlowConcurrencySlots. A worker claims a deployment slot before it
    provisions infrastructure, so a full deployment costs nothing to try. The slot's lease id
    is recorded on the PENDING state (and carried while the run holds it); when none is free,
    the run waits its turn (ENQUEUE: `AwaitingConcurrencySlot`, tried again later) or is
    cancelled (CANCEL_NEW). A limit of 0 could never be met: the caller is told to stop. A
    waiter that a release handed its slot holds it already, and keeps its lease, unless the
    limit was removed and set again since: that slot is of no limit now, and the run claims
    one of the new limit like any other."""
    limits = c.limits
    if c.run.deployment_id is None:
        return GO_ON
    if not limits.deployment_found:
        return abort("Deployment not found.")
    limit = limits.deployment_limit
    handed = deployment_lease(c.run)
    if handed is not None and (limit is None or lease_of(limit, handed)):
        return GO_ON
    if limit is None or not limits.deployment_limit_applies:
        return GO_ON
    if limit.limit == 0:
        return abort("The deployment concurrency limit is 0. The flow will deadlock if submitted again.")
    if limit.active_slots < limit.limit:
        return go_on(_with_details(c.proposed, deployment_concurrency_lease_id=new_lease_id(limit, c.new_id())))
    if limits.collision_strategy == "CANCEL_NEW":
        return reject(DEPLOYMENT_LIMIT_REACHED,
                      StateCreate(type=StateType.CANCELLED, name="Cancelled", message=DEPLOYMENT_LIMIT_REACHED))
    retry_at = c.now + timedelta(seconds=DEPLOYMENT_SLOT_WAIT_SECONDS)
    return reject(DEPLOYMENT_LIMIT_REACHED,
                  StateCreate(type=StateType.SCHEDULED, name="AwaitingConcurrencySlot",
                              state_details=StateDetails(scheduled_time=retry_at)))


@rule("FR-7", from_states={StateType.SCHEDULED}, to_states={StateType.SCHEDULED})
def cancel_new_runs_that_fall_due_behind_a_full_deployment(c: RuleContext) -> Verdict:
    """Prefect's EnforceDeploymentConcurrencyOnLate, in the late-runs policy only (a client
    that proposes `Late` itself goes through the core rules). A deployment that asks to cancel
    new runs when it is full means every new run, also one that never reached PENDING because
    something else held it back (a worker-pool limit, no worker): when the clock finds such a
    run late and its deployment still full, it is cancelled instead of waiting on."""
    limits = c.limits
    limit = limits.deployment_limit
    if (c.proposed.name != "Late" or limit is None or not limits.deployment_limit_applies
            or limits.collision_strategy != "CANCEL_NEW" or limit.active_slots < limit.limit):
        return GO_ON
    return reject("Deployment concurrency limit is full and uses the CANCEL_NEW strategy.",
                  StateCreate(type=StateType.CANCELLED, name="Cancelled", message=DEPLOYMENT_LIMIT_REACHED))


# The rules that refuse a run because a limit is full: the reason they give is why it waits.
LIMIT_RULES = frozenset({"respect_pool_and_queue_limits", "secure_flow_concurrency_slots"})


@rule("OR-8", from_states=ALL_STATES, to_states={StateType.SCHEDULED})
def ensure_only_scheduled_flows_marked_late(c: RuleContext) -> Verdict:
    """Prefect's EnsureOnlyScheduledFlowsMarkedLate. `Late` annotates a run still waiting
    past its time; the late-runs job races with workers and with itself, so marking a run
    that has moved on, or is already late, is refused."""
    current = c.current
    if current is None or c.proposed.name != "Late":
        return GO_ON
    if current.type is not StateType.SCHEDULED:
        return reject("Only scheduled flows can be marked late.")
    if current.name == "Late":
        return reject("This flow run is already marked late.")
    return GO_ON


# FR-7: how long past its time a run still `Scheduled` is late (the clock looks for such runs).
LATE_AFTER = timedelta(seconds=15)


@rule("FR-7", from_states=ALL_STATES, to_states={StateType.SCHEDULED})
def mark_late_only_runs_still_scheduled_past_their_time(c: RuleContext) -> Verdict:
    """Prefect's late-runs job marks only runs whose state is named `Scheduled` exactly and
    that were due `LATE_AFTER` ago; it picks them in the same statement. The clock here picks
    them from a read model that may lag the log: a run that has since been sent to wait for a
    slot (renamed, it would lose its place among its limit's waiters), to retry, or
    rescheduled later is not late, and nothing is written."""
    current = c.current
    if current is None or current.name != "Scheduled":
        return reject("Only runs in a state named Scheduled are marked late.")
    due = c.run.next_scheduled_start_time
    if due is None or due > c.now - LATE_AFTER:
        return reject("This flow run is not late.")
    return GO_ON


@rule("OR-9", from_states=ALL_STATES, to_states={StateType.PAUSED})
def handle_pausing_flows(c: RuleContext) -> Verdict:
    """Prefect's HandlePausingFlows. Only a running flow can pause, and each `pause_key`
    fires once (a flow re-executed after a pause passes its pause call again). Suspending
    (`pause_reschedule`) tears the infrastructure down, so only a deployment can bring the
    run back, and a subflow cannot be suspended apart from its parent."""
    current, proposed = c.current, c.proposed
    verb = "suspend" if proposed.name == "Suspended" else "pause"
    if current is None:
        return abort(f"Cannot {verb} flows with no state.")
    if current.type is not StateType.RUNNING:
        return reject(f"Cannot {verb} flows that are not currently running.")
    key = proposed.state_details.pause_key
    if key is None:
        key = str(c.new_id())
    keys = c.run.empirical_policy.pause_keys
    if key in keys:
        return reject(f"This {verb} has already fired.")
    if proposed.state_details.pause_reschedule:
        if c.run.parent_task_run_id is not None:
            return abort(f"Cannot {verb} subflows.")
        if c.run.deployment_id is None:
            return abort(f"Cannot {verb} flows without a deployment.")
    return go_on(policy_after={"pause_keys": [*keys, key]})


@rule("OR-10", from_states={StateType.PAUSED}, to_states=ALL_STATES)
def handle_resuming_paused_flows(c: RuleContext) -> Verdict:
    """Prefect's HandleResumingPausedFlows. A paused run resumes (RUNNING, or SCHEDULED when
    it was suspended) or ends; a suspended run needs a deployment to be picked up again, and
    a pause that has timed out can no longer resume: the run fails. A resumed run is marked
    `resuming`, so its next RUNNING is not counted as another run.

    Prefect's messages name the *proposed* state ("The flow was running and never resumed.",
    "... to the StateType.PENDING state ..."): kept as they are."""
    current, proposed = c.current, c.proposed
    if current is None:
        return GO_ON
    if not (proposed.type in (StateType.RUNNING, StateType.SCHEDULED) or proposed.type in TERMINAL):
        return reject(f"This run cannot transition to the StateType.{proposed.type.value} state"
                      f" from the StateType.{current.type.value} state.")
    verb = "suspend" if proposed.name == "Suspended" else "pause"
    shown = (proposed.name or proposed.type.value).lower()
    if current.state_details.pause_reschedule and c.run.deployment_id is None:
        return reject(f"Cannot reschedule a {shown} flow run without a deployment.")
    timeout = current.state_details.pause_timeout
    if timeout is not None and timeout < c.now:
        failed = StateCreate(type=StateType.FAILED, name="Failed",
                             message=f"The flow was {shown} and never resumed.")
        # `resuming` sticks only when FAILED was proposed: otherwise the rule fizzles (FR-4).
        return reject(f"The flow run {verb} has timed out and can no longer resume.", failed,
                      policy_after={"resuming": True})
    return go_on(policy_after={"resuming": True})


@rule("OR-11", from_states={StateType.SCHEDULED}, to_states={StateType.PENDING})
def copy_scheduled_time(c: RuleContext) -> Verdict:
    """Prefect's CopyScheduledTime. The pending state keeps the time the run was due, so
    `WaitForScheduledTime` can still hold it back, unless it proposes its own."""
    current = c.current
    if current is None or c.proposed.state_details.scheduled_time is not None:
        return GO_ON
    return go_on(_with_details(c.proposed, scheduled_time=current.state_details.scheduled_time))


@rule("OR-11", from_states={StateType.SCHEDULED, StateType.PENDING}, to_states={StateType.RUNNING})
def wait_for_scheduled_time(c: RuleContext) -> Verdict:
    """Prefect's WaitForScheduledTime. Runs start by the server's clock, not the client's: a
    run that would start before its scheduled time is told how long to wait (whole seconds,
    rounded as Prefect does), and nothing is written."""
    current = c.current
    if current is None or current.state_details.scheduled_time is None:
        return GO_ON
    delay = current.state_details.scheduled_time - c.now
    delay_seconds = math.floor(delay.total_seconds()) + round(delay.microseconds / 1e6)
    if delay_seconds > 0:
        return wait(delay_seconds, "Scheduled time is in the future")
    return GO_ON


@rule("OR-12", from_states={StateType.RUNNING}, to_states={StateType.FAILED})
def retry_failed_flows(c: RuleContext) -> Verdict:
    """Prefect's RetryFailedFlows. A flow with `retries` left is not failed but scheduled
    again (`AwaitingRetry`, after `retry_delay`), carrying the failure's message and data;
    the engine that failed retries it in process, so workers do not pick it up (GS-2)."""
    policy = c.run.empirical_policy
    if policy.retries is None or c.run.run_count > policy.retries:
        return go_on(policy={"retry_type": None})
    retry = StateCreate(
        type=StateType.SCHEDULED, name="AwaitingRetry", message=c.proposed.message, data=c.proposed.data,
        state_details=StateDetails(scheduled_time=c.now + timedelta(seconds=policy.retry_delay or 0)),
    )
    return reject("Retrying", retry,
                  policy={"resuming": False, "pause_keys": [], "retry_type": "in_process"})


FLOW_POLICY: list[Rule] = [
    prevent_duplicate_transitions,
    handle_flow_terminal_state_transitions,
    enforce_cancelling_to_cancelled_transition,
    bypass_cancelling_flow_runs_with_no_infra,
    prevent_pending_transitions,
    claims_need_an_online_worker,
    respect_pool_and_queue_limits,
    take_a_deployment_slot_again_after_its_lease_expired,
    secure_flow_concurrency_slots,
    ensure_only_scheduled_flows_marked_late,
    handle_pausing_flows,
    handle_resuming_paused_flows,
    copy_scheduled_time,
    wait_for_scheduled_time,
    retry_failed_flows,
]

# FR-5: what a forced transition still obeys (Prefect's MinimalFlowPolicy).
FORCED_FLOW_POLICY: list[Rule] = [
    prevent_result_data_loss,
    bypass_cancelling_flow_runs_with_no_infra,
]


# FR-7: what the clock's late marking obeys (Prefect's MarkLateRunsPolicy).
LATE_RUNS_POLICY: list[Rule] = [
    ensure_only_scheduled_flows_marked_late,
    mark_late_only_runs_still_scheduled_past_their_time,
    cancel_new_runs_that_fall_due_behind_a_full_deployment,
]


def rules_for(policy: Sequence[Rule], from_type: StateType | None, to_type: StateType | None) -> list[Rule]:
    """The policy's rules for one intended transition, in priority order."""
    return [r for r in policy if r.applies_to(from_type, to_type)]


# ---------------------------------------------------------------------------------------------
# Running a policy, and the bookkeeping on whatever is written


@dataclass(frozen=True)
class Transition:
    """The outcome of one proposal: the reply's orchestration, the state written (ACCEPT, or
    REJECT with a replacement; else None) and the run after it and its bookkeeping (the run
    unchanged when nothing is written)."""

    orchestration: Orchestration
    state: State | None
    run: Any  # a FlowRun or a TaskRun, as orchestrated
    refused_by: str | None = None  # the rule that rejected, delayed or aborted the proposal

    @property
    def waiting_for_a_slot(self) -> bool:
        """Refused because a limit is full: `orchestration.details.reason` says which."""
        return self.refused_by in LIMIT_RULES


def set_flow_run_state(run: FlowRun, proposed: StateCreate, *, force: bool,
                       ctx: DecisionContext, limits: Limits = NO_LIMITS, claimant: str | None = None) -> Transition:
    """FR-3: the core rules decide; `force` (FR-5) keeps only `FORCED_FLOW_POLICY`."""
    return orchestrate(FORCED_FLOW_POLICY if force else FLOW_POLICY, run, proposed, ctx, limits, claimant)


def mark_flow_run_late(run: FlowRun, ctx: DecisionContext, limits: Limits = NO_LIMITS) -> Transition:
    """FR-7: the clock's `Late`, keeping the time the run was due, by `LATE_RUNS_POLICY`."""
    late = StateCreate(type=StateType.SCHEDULED, name="Late",
                       state_details=StateDetails(scheduled_time=run.next_scheduled_start_time))
    return orchestrate(LATE_RUNS_POLICY, run, late, ctx, limits)


def initial_flow_run_state(run: FlowRun, proposed: StateCreate | None, ctx: DecisionContext) -> Transition:
    """FR-2: a new run's first state (Pending when none is given), applied with force
    semantics plus bookkeeping."""
    return set_flow_run_state(run, proposed or StateCreate(type=StateType.PENDING), force=True, ctx=ctx)


def orchestrate(policy: Sequence[Rule], run: Any, proposed: StateCreate,
                ctx: DecisionContext, limits: Limits = NO_LIMITS, claimant: str | None = None, *,
                facts: Any = None, book: Callable[..., tuple[State, Any]] | None = None) -> Transition:
    """Run `policy` over one proposal (the steps are in the module docstring). `run`: a flow
    run, or a task run with its own bookkeeping (`book`) and `facts` for its rules."""
    from_type = run.state.type if run.state is not None else None
    intended = proposed.type
    proposal: StateCreate | None = _completed(_server_details_only(proposed), ctx.now)
    status, reason, delay, refused_by = Outcome.ACCEPT, None, None, None
    more: dict[str, Any] = {}
    policy_so_far = run.empirical_policy
    fired: list[tuple[Rule, Verdict, StateType | None]] = []  # with the type each rule left
    seen = run  # the run as the rules see it: with the policy earlier rules changed
    for r in rules_for(policy, from_type, intended):
        if proposal is None or proposal.type is not intended:
            break  # FR-4: a rule changed the proposed type; the rest were chosen for another
        if seen.empirical_policy is not policy_so_far:  # a copy only when a rule changed it
            seen = run.model_copy(update={"empirical_policy": policy_so_far})
        verdict = r.decide(RuleContext(run=seen, proposed=proposal, now=ctx.now, new_id=ctx.new_id, limits=limits,
                                       claimant=claimant, facts=facts))
        if verdict.policy:
            policy_so_far = policy_so_far.model_copy(update=verdict.policy)
        if verdict.status is Outcome.ACCEPT:
            proposal = verdict.state if verdict.state is not None else proposal
        else:
            proposal = verdict.state if verdict.status is Outcome.REJECT else None
            status, reason, delay, refused_by = verdict.status, verdict.reason, verdict.delay_seconds, r.name
            more = verdict.details
        fired.append((r, verdict, proposal.type if proposal is not None else None))

    orchestration = Orchestration(status, reason=reason, delay_seconds=delay,
                                  details={"type": f"{status.value.lower()}_details", **more})
    if proposal is None:
        return Transition(orchestration, None, run, refused_by)

    written_type = proposal.type
    # A rule that left its own type in scope but sees another one written "fizzled": its
    # policy change is undone and its after-write change skipped (Prefect's cleanup).
    run_policy = run.empirical_policy
    for r, verdict, left in fired:
        fizzled = left in r.to_states and left is not written_type
        if verdict.policy and not fizzled:
            run_policy = run_policy.model_copy(update=verdict.policy)
    state, after = (book or _book)(run, _completed(proposal, ctx.now), run_policy, ctx)
    for _, verdict, _ in reversed(fired):
        # Prefect's after-step fires only for the transition the rule was chosen for: a rule
        # that replaced the proposal by another type (OR-10's timed-out pause) fizzled too.
        if verdict.policy_after and written_type is intended:
            after = after.model_copy(update={
                "empirical_policy": after.empirical_policy.model_copy(update=verdict.policy_after)})
    return Transition(orchestration, state, after, refused_by)


def _completed(state: StateCreate, now: datetime) -> StateCreate:
    """FR-1: a state without a name takes its type's; a SCHEDULED one without
    `scheduled_time` is due now. The client's timestamp is dropped (the state is minted)."""
    update: dict[str, Any] = {} if state.timestamp is None else {"timestamp": None}
    if state.name is None:
        update["name"] = default_name(state.type)
    if state.type is StateType.SCHEDULED and state.state_details.scheduled_time is None:
        update["state_details"] = state.state_details.model_copy(update={"scheduled_time": now})
    return state.model_copy(update=update) if update else state  # complete already: as it is


def _server_details_only(state: StateCreate) -> StateCreate:
    """A deployment slot's lease id is minted by OR-7 and carried by the bookkeeping: one
    sent by a client would count as a slot nobody took."""
    if state.state_details.deployment_concurrency_lease_id is None:
        return state
    return _with_details(state, deployment_concurrency_lease_id=None)


def _book(run: FlowRun, proposal: StateCreate, policy: FlowRunPolicy,
          ctx: DecisionContext) -> tuple[State, FlowRun]:
    """FR-6, Prefect's global flow policy: mint the state and mirror it onto the run."""
    current = run.state
    details: dict[str, Any] = {"flow_run_id": run.id}
    if run.parent_task_run_id is not None:
        details["task_run_id"] = run.parent_task_run_id
    lease = deployment_lease(run)
    if (lease is not None and proposal.type in DEPLOYMENT_SLOT_STATES
            and proposal.state_details.deployment_concurrency_lease_id is None):
        # OR-6: a run keeps its deployment slot's lease while it holds the slot, forced or not
        # (not one that expired: the slot was given back); a waiter handed the slot by a
        # release takes it into PENDING (or RUNNING).
        details["deployment_concurrency_lease_id"] = lease
    state = mint_state(current, proposal, details, ctx)
    run_count = run.run_count
    if state.type is StateType.RUNNING and not policy.resuming:
        run_count += 1
    if state.type is StateType.RUNNING or state.type in TERMINAL:
        policy = policy.model_copy(update={"resuming": False})
    # A lease that expired stays so through PENDING's sub-states (OR-5), until OR-6 decides at
    # RUNNING whether the run takes a slot again; any other state ends it.
    still_expired = (run.deployment_lease_expired and state.type is StateType.PENDING
                     and current is not None and current.type is StateType.PENDING)
    # A renewed lease runs out when its renewal said for as long as the run holds that lease.
    renewed_until = (run.deployment_lease_expiration
                     if lease is not None and state.state_details.deployment_concurrency_lease_id == lease else None)
    return state, run.model_copy(update={**booked_times(run, state), "run_count": run_count,
                                         "empirical_policy": policy, "updated": ctx.now,
                                         "deployment_lease_expired": still_expired,
                                         "deployment_lease_expiration": renewed_until, "pool_slot_reserved": False})


def mint_state(current: State | None, proposal: StateCreate, details: dict[str, Any],
               ctx: DecisionContext) -> State:
    """The written state: a new id, the server's timestamp (two states of one run never share
    one), and the run's ids in its details."""
    timestamp = ctx.now
    if current is not None and timestamp <= current.timestamp:
        timestamp = current.timestamp + _ONE_MICROSECOND
    return State(id=ctx.new_id(), type=proposal.type, name=proposal.name or default_name(proposal.type),
                 timestamp=timestamp, message=proposal.message, data=proposal.data,
                 state_details=proposal.state_details.model_copy(update=details))


def booked_times(run: Any, state: State) -> dict[str, Any]:
    """FR-6 for flow and task runs alike: the run's fields that mirror its newly written
    state, and its times (start, end, total run time, expected and next scheduled start)."""
    current = run.state
    timestamp = state.timestamp
    entering, leaving = state.type, current.type if current is not None else None
    scheduled_time = state.state_details.scheduled_time
    start_time, end_time = run.start_time, run.end_time
    if entering is StateType.RUNNING and start_time is None:
        start_time = timestamp
    if leaving in TERMINAL and entering not in TERMINAL:
        end_time = None
    if entering in TERMINAL and end_time is None:
        start_time = start_time or timestamp
        end_time = timestamp
    total_run_time = run.total_run_time
    if current is not None and leaving is StateType.RUNNING:
        total_run_time += timestamp - current.timestamp
    expected_start_time = run.expected_start_time
    if expected_start_time is None:
        expected_start_time = scheduled_time if entering is StateType.SCHEDULED else timestamp
    next_scheduled_start_time = run.next_scheduled_start_time
    if leaving is StateType.SCHEDULED:
        next_scheduled_start_time = None
    if entering is StateType.SCHEDULED:
        next_scheduled_start_time = scheduled_time
    return {"state": state, "state_id": state.id, "state_type": state.type, "state_name": state.name,
            "start_time": start_time, "end_time": end_time, "total_run_time": total_run_time,
            "expected_start_time": expected_start_time, "next_scheduled_start_time": next_scheduled_start_time}
