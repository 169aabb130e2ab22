"""Task-run orchestration: what is written when a state is proposed for a task run (BEHAVIOUR
§7, TR-3…TR-6), in the shape of the flow rules (`orchestration_rules.py`, whose `orchestrate`
runs these policies too): small named rules, each with the transitions it governs and why.

Three policies, chosen by the proposal (TR-3): a `deferred` state (a background task, queued
for a task worker) takes the background policy even when forced; else `force` keeps only
the minimal one; else the core one. Nothing is read or written here: what the rules need
beyond the run (its flow run, the cache entry of its key, who proposes the state) comes in
`TaskFacts`, loaded by the caller.

Tag slots (Prefect's classic task tag limits, `tag_concurrency_limits.py`) follow the flow
runs' shape: a rule refuses a run whose tag is full, and the slots themselves follow from what
is written (`TaskTransition.takes_tag_slots`, and `task_runs.tag_slot_events`), so a forced
state still gives them back.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from .messages import DecisionContext
from .orchestration_rules import (
    ALL_STATES,
    TERMINAL_STATES,
    Rule,
    RuleContext,
    Transition,
    Verdict,
    abort,
    booked_times,
    copy_scheduled_time,
    go_on,
    mint_state,
    orchestrate,
    prevent_pending_transitions,
    reject,
    rule,
    wait,
    wait_for_scheduled_time,
)
from .states import TERMINAL, State, StateCreate, StateDetails, StateType

if TYPE_CHECKING:
    from .flow_runs import FlowRun
    from .tag_concurrency_limits import GlobalTagLimit, TagConcurrencyLimit
    from .task_runs import TaskCache, TaskDelivery, TaskRun, TaskRunPolicy

# While the service's own connection to the broker is younger than this, a task worker may not
# take over a run another worker holds: after a broker restart every unacknowledged message is
# redelivered at once, and the worker that holds it needs a moment to reconnect and report.
TAKEOVER_GRACE_SECONDS = 10.0
TAKEOVER_WAIT_SECONDS = 2
# Prefect's `task_run_tag_concurrency_slot_wait_seconds`: when a run held back by a full tag
# tries again.
TAG_SLOT_WAIT_SECONDS = 10
# Prefect's `server.tasks.max_cache_key_length` (its default): a longer key is not cached.
MAX_CACHE_KEY_LENGTH = 2000


@dataclass(frozen=True)
class TaskFacts:
    """What the task rules read besides the run. `flow_run`: the run's flow run (None for a
    background task); `cached`: the cache entries under the proposed state's cache key;
    `takeover_allowed`: False while a broker restart is recent (see `TAKEOVER_GRACE_SECONDS`);
    `claimant` and `delivery`: the task worker proposing the state and the message it took
    the run from; `tag_limits`: the concurrency limits of the run's tags, by tag (tags
    without a limit are left out); `global_tag_limits`: the global limits named `tag:<tag>`
    of the run's tags, active or not, by tag (the same)."""

    flow_run: FlowRun | None = None
    cached: TaskCache | None = None
    takeover_allowed: bool = True
    claimant: str | None = None
    delivery: TaskDelivery | None = None
    tag_limits: Mapping[str, TagConcurrencyLimit] = field(default_factory=dict)
    global_tag_limits: Mapping[str, GlobalTagLimit] = field(default_factory=dict)

    def with_claim(self, claimant: str | None, delivery: TaskDelivery | None) -> TaskFacts:
        return replace(self, claimant=claimant, delivery=delivery)


NO_FACTS = TaskFacts()


def cache_id(cache_key: str) -> str:
    """The aggregate id of a cache key's entry."""
    return "cache-" + hashlib.sha256(cache_key.encode()).hexdigest()[:40]


def _run(c: RuleContext) -> TaskRun:
    """The task run a task rule sees (rule contexts are typed for flow runs)."""
    return cast("TaskRun", c.run)


def _facts(c: RuleContext) -> TaskFacts:
    facts = c.facts
    assert isinstance(facts, TaskFacts)
    return facts


def _has_persisted_result(data: Any) -> bool:
    return isinstance(data, dict) and data.get("type") != "unpersisted"


# ---------------------------------------------------------------------------------------------
# Rules


@rule("TQ-6", from_states=ALL_STATES, to_states=ALL_STATES)
def one_task_worker_at_a_time(c: RuleContext) -> Verdict:
    """Beyond Prefect, whose queue lives in one process: a task run's message is delivered
    again when it is not acknowledged in time, and a run may be queued twice (a recovered
    publish, a retry queued by a worker that died before it acknowledged). So a task worker
    starts a run only from the message that queued it last, while the run still waits; it
    takes over a running run only when JetStream delivers it the very message the run was
    started from again (the worker that started it stopped acknowledging it: it died), and
    not right after a broker restart, when every worker's messages come back at once. Any
    other copy is refused, saying it is one (`details.copy`), so that its worker drops it.
    A worker reports only on the runs it holds: one cancelled meanwhile is not its any more."""
    facts = _facts(c)
    run = _run(c)
    current = c.current
    holder = (run.task_worker_id if current is not None and current.type in (StateType.RUNNING, StateType.CANCELLING)
              else None)
    if facts.claimant is None:
        return go_on()
    delivery = facts.delivery
    if c.proposed.type is not StateType.RUNNING or delivery is None:
        if holder == facts.claimant or current is None or (holder is None and _unheld_report_allowed(c)):
            return go_on()
        what = f"held by task worker {holder!r}" if holder is not None else f"{current.type.value}"
        return reject(f"Task run is {what}: this task worker no longer holds it.",
                      details={"task_worker_id": holder})
    if current is None or current.type is StateType.PENDING:
        return go_on()
    if current.type is StateType.SCHEDULED:
        if run.queued_state_id is not None and delivery.state_id != run.queued_state_id:
            return reject("A later state queued this task run again: that message runs it, not this one.",
                          details={"copy": True})
        return go_on()
    if current.type is StateType.RUNNING:
        same_message = delivery.message is not None and delivery.message == run.task_message
        if not same_message:
            return reject(f"Task run is already running on task worker {holder!r}; this message is a copy.",
                          details={"task_worker_id": holder, "copy": True})
        if holder == facts.claimant:
            # The holder sending its start again (its reply was lost, or it restarted under the
            # same name) learns from `details.task_worker_id` that the run is its own.
            return reject(f"Task run is already running on task worker {holder!r}.",
                          details={"task_worker_id": holder})
        if delivery.attempt <= 1:
            return reject(f"Task run is already running on task worker {holder!r}.",
                          details={"task_worker_id": holder})
        if not facts.takeover_allowed:
            return wait(TAKEOVER_WAIT_SECONDS, "The broker restarted moments ago: the run's worker may still report.")
        return go_on()
    if (current.type is StateType.CANCELLING and holder is not None and holder != facts.claimant
            and delivery.attempt > 1 and delivery.message is not None and delivery.message == run.task_message
            and facts.takeover_allowed):
        # Its worker died while the run was being cancelled: nobody else would ever end it.
        return reject("The task run was being cancelled and its task worker stopped: it is cancelled.",
                      StateCreate(type=StateType.CANCELLED,
                                  message=f"Cancelled: task worker {holder!r} stopped before it ended the run."),
                      details={"copy": True})
    return reject(f"Task run is {current.type.value}: this delivery is not needed any more.", details={"copy": True})


def _unheld_report_allowed(c: RuleContext) -> bool:
    """The reports a task worker makes on a run nobody holds: its start without a delivery
    (a message that names no state), the end of a cancel that came while the run waited (its
    CANCELLED, from CANCELLING), and the queuing of the retry its failure became (a deferred
    `AwaitingRetry`, from the `AwaitingRetry` not yet queued). Nothing else: an outcome sent
    again after its run was retried or cancelled would fail or end a run that is not its
    worker's any more, and a retry queued after a cancel would run a cancelled run again."""
    current, proposed = c.current, c.proposed
    assert current is not None
    if proposed.type is StateType.RUNNING:
        return current.type is not StateType.RUNNING and current.type not in TERMINAL
    if proposed.type is StateType.CANCELLED:
        return current.type is StateType.CANCELLING
    return (proposed.type is StateType.SCHEDULED and proposed.name == "AwaitingRetry"
            and bool(proposed.state_details.deferred) and current.type is StateType.SCHEDULED
            and current.name == "AwaitingRetry" and not current.state_details.deferred)


@rule("OR-3", from_states={StateType.CANCELLING}, to_states=TERMINAL_STATES - {StateType.CANCELLED})
def cancelling_task_runs_end_cancelled(c: RuleContext) -> Verdict:
    """Beyond Prefect (whose flow runs have this rule, its task runs not): a task run being
    cancelled ends CANCELLED, whatever its worker reports. The worker is told of the cancel by
    a notice that is not stored; one that missed it, or whose outcome crossed the cancel,
    reports an outcome that would otherwise undo a cancel already accepted."""
    if _facts(c).claimant is None:
        return go_on()  # not a worker's report: Prefect's own rules apply
    return reject("The task run was being cancelled: it is cancelled, whatever its outcome.",
                  StateCreate(type=StateType.CANCELLED, message="Cancelled while it ran; its outcome was not kept."))


@rule("OR-14", from_states=ALL_STATES, to_states={StateType.RUNNING})
def cache_retrieval(c: RuleContext) -> Verdict:
    """Prefect's CacheRetrieval. A task whose inputs were computed before (same cache key, an
    unexpired COMPLETED state) is not run again: it is given a copy of that state, `Cached`.
    The newest state still unexpired answers, so an entry expiring soon does not hide an older
    one that never expires."""
    details = c.proposed.state_details
    cached = _facts(c).cached
    if details.cache_key is None or details.refresh_cache or cached is None or cached.cache_key != details.cache_key:
        return go_on()
    entry = cached.newest_unexpired(c.now)
    if entry is None:
        return go_on()
    old = entry.state
    return reject("Retrieved state from cache", StateCreate(
        type=StateType.COMPLETED, name="Cached", message=old.message, data=old.data,
        state_details=old.state_details.model_copy(update={"flow_run_id": None, "task_run_id": None,
                                                           "transition_id": None})))


@rule("OR-15", from_states=TERMINAL_STATES, to_states=ALL_STATES)
def handle_task_terminal_state_transitions(c: RuleContext) -> Verdict:
    """Prefect's HandleTaskTerminalStateTransitions. A finished task may be run again (its
    run count starts over), but it cannot be cancelled, paused or crashed after the fact, and
    a completed task keeps its persisted result. A task run again because its flow run
    retried says so (`Retrying`)."""
    current, proposed = c.current, c.proposed
    if current is None:
        return go_on()
    if proposed.type in (StateType.CANCELLING, StateType.PAUSED, StateType.CRASHED):
        return abort(f"Run is already {current.type.value}.")
    if current.type is StateType.COMPLETED and bool(current.data) and _has_persisted_result(current.data):
        return reject("This run is already completed.")
    flow_run = _facts(c).flow_run
    if (proposed.type is StateType.RUNNING and flow_run is not None
            and _run(c).flow_run_run_count < flow_run.run_count):
        return go_on(proposed.model_copy(update={"name": "Retrying"}))
    return go_on()


@rule("OR-16", from_states=ALL_STATES, to_states={StateType.RUNNING})
def prevent_running_tasks_from_stopped_flows(c: RuleContext) -> Verdict:
    """Prefect's PreventRunningTasksFromStoppedFlows. A task of a flow run runs only while its
    flow run runs; one of a paused flow run waits with it (`NotReady`). Background tasks have
    no flow run and are not held back."""
    if _run(c).flow_run_id is None:
        return go_on()
    flow_run = _facts(c).flow_run
    flow_state = flow_run.state if flow_run is not None else None
    if flow_run is not None and flow_state is not None and flow_state.type is StateType.PAUSED:
        d = flow_state.state_details
        return reject(f"The flow is paused, new tasks can execute after resuming flow run: {flow_run.id}.", StateCreate(
            type=StateType.PAUSED, name="NotReady",
            state_details=StateDetails(pause_timeout=d.pause_timeout, pause_reschedule=d.pause_reschedule)))
    if flow_state is None or flow_state.type is not StateType.RUNNING:
        return abort("The enclosing flow must be running to begin task execution.")
    return go_on()


@rule("OR-17", from_states=ALL_STATES, to_states={StateType.RUNNING})
def secure_task_concurrency_slots(c: RuleContext) -> Verdict:
    """Prefect's SecureTaskConcurrencySlots. A tag's limit caps how many task runs carrying it
    run at once (say, the connections a database takes): a run starts only when each of its
    limited tags has a free slot, and otherwise tries again a little later. A limit of 0 could
    never be met, so the caller is told to stop rather than wait for ever. A run that holds a
    tag's slot already (RUNNING again) keeps it and is not counted twice, so it never waits on
    itself. The slots are taken with the state written, not here.

    A tag is limited by an active global limit named `tag:<tag>` (Prefect 3's tag limits)
    instead of its classic limit, when it has one; those are checked first, as in Prefect,
    and a run held back by one tries again after a random delay around how long its slots are
    usually held (at most `TAG_SLOT_WAIT_SECONDS`), so that waiting runs do not all come back
    at the same moment."""
    run = _run(c)
    facts = _facts(c)
    governing = governing_global_limits(run.tags, facts.global_tag_limits)
    for tag, g in governing.items():
        if g.limit.limit == 0:
            return abort(f'The concurrency limit on tag "{tag}" is 0 and will deadlock if the task tries to run again.')
    if any(g.full_for(run.id) and not holds_tag_slot(run.id, tag, facts.tag_limits, facts.global_tag_limits)
           for tag, g in governing.items()):
        blocking = max(governing.values(), key=lambda g: g.occupancy)
        average = min(blocking.limit.avg_slot_occupancy_seconds or TAG_SLOT_WAIT_SECONDS, TAG_SLOT_WAIT_SECONDS)
        delay = clamped_poisson_interval(average, 0.3, (c.new_id().int % 1_000_001) / 1_000_000)
        return wait(round(delay), f"Concurrency limit reached for tags: {', '.join(governing)}")
    limits = facts.tag_limits
    # Prefect reads the classic ones by tag; a tag under an active global limit has none here.
    limited = [(tag, limits[tag]) for tag in sorted(run.tags) if tag in limits and tag not in governing]
    for tag, limit in limited:
        if limit.concurrency_limit == 0:
            return abort(f'The concurrency limit on tag "{tag}" is 0 and will deadlock if the task tries to run again.')
    for tag, limit in limited:
        if (not holds_tag_slot(run.id, tag, limits, facts.global_tag_limits)
                and len(limit.active_slots) >= limit.concurrency_limit):
            return wait(TAG_SLOT_WAIT_SECONDS, f"Concurrency limit for the {tag} tag has been reached")
    return go_on()


def holds_tag_slot(task_run_id: Any, tag: str, limits: Mapping[str, Any], global_limits: Mapping[str, GlobalTagLimit]) -> bool:
    """Whether the run holds a slot of `tag`, of either kind: a run that took the classic slot
    before a `tag:<tag>` global limit was made active (or the global one before it was made
    inactive) holds the tag already, and re-entering RUNNING neither waits nor takes a second."""
    classic = limits.get(tag)
    return ((classic is not None and task_run_id in classic.active_slots)
            or (tag in global_limits and global_limits[tag].holds(task_run_id)))


def governing_global_limits(tags: Sequence[str], limits: Mapping[str, GlobalTagLimit]) -> dict[str, GlobalTagLimit]:
    """The run's tags under an active global `tag:<tag>` limit, by tag, in sorted order: these
    tags' classic limits do not apply (OR-17; `task_runs.tag_slot_events` takes their slots)."""
    return {tag: limits[tag] for tag in sorted(set(tags)) if tag in limits and limits[tag].governs}


@rule("TR-5", from_states={StateType.SCHEDULED, StateType.PENDING}, to_states={StateType.PENDING, StateType.RUNNING})
def copy_task_parameters_id(c: RuleContext) -> Verdict:
    """Prefect's CopyTaskParametersID: a background task's parameters are stored once, under
    the id its scheduled state names; the states that start it keep pointing there."""
    current = c.current
    if current is None or current.state_details.task_parameters_id is None:
        return go_on()
    if c.proposed.state_details.task_parameters_id is not None:
        return go_on()
    return go_on(c.proposed.model_copy(update={"state_details": c.proposed.state_details.model_copy(
        update={"task_parameters_id": current.state_details.task_parameters_id})}))


@rule("OR-19", from_states={StateType.RUNNING}, to_states={StateType.FAILED})
def retry_failed_tasks(c: RuleContext) -> Verdict:
    """Prefect's RetryFailedTasks. A task with retries left is not failed but scheduled again
    (`AwaitingRetry`) after its delay: the delay of this attempt from the list, or the one
    delay, spread by the jitter factor so that retries of many runs do not land together."""
    if c.proposed.state_details.retriable is False:
        return go_on()
    run = _run(c)
    retries = configured_retries(run.empirical_policy)
    if not retries or run.run_count > retries:
        return go_on()
    delay = retry_delay_seconds(run.empirical_policy, run.run_count, c.new_id().int)
    retry = StateCreate(type=StateType.SCHEDULED, name="AwaitingRetry", message=c.proposed.message,
                        data=c.proposed.data,
                        state_details=StateDetails(scheduled_time=c.now + timedelta(seconds=delay)))
    return reject("Retrying", retry)


def configured_retries(policy: TaskRunPolicy) -> int | None:
    """The retries a policy asks for. Prefect still honours its deprecated `max_retries` when
    `retries` is unset or 0 (its `set_run_policy_deprecated_fields`), so older clients that
    send only `max_retries` keep retrying."""
    if not policy.retries and policy.max_retries != 0:
        return policy.max_retries
    return policy.retries


def retry_delay_seconds(policy: TaskRunPolicy, run_count: int, entropy: int) -> float:
    """OR-19's delay for the attempt that just failed (`run_count`, from 1). A delay unset or 0
    falls back on the deprecated `retry_delay_seconds`, as in Prefect. `entropy`: random bits
    from the decision's context, so a decision replays to the same delay."""
    given = (policy.retry_delay_seconds if not policy.retry_delay and policy.retry_delay_seconds != 0
             else policy.retry_delay)
    if isinstance(given, list):
        delay = float(given[min(max(run_count - 1, 0), len(given) - 1)]) if given else 0.0
    else:
        delay = float(given or 0)
    jitter = policy.retry_jitter_factor
    if jitter and delay > 0:
        delay = clamped_poisson_interval(delay, jitter, (entropy % 1_000_001) / 1_000_000)
    return delay


def clamped_poisson_interval(average: float, clamping_factor: float, u: float) -> float:
    """Prefect's `clamped_poisson_interval` (`prefect/utilities/math.py`), with its uniform draw
    given (`u` in [0, 1]) instead of taken, so the delay replays. Retries of many runs that
    failed together spread out as arrivals of a Poisson process would, never later than
    `average × (1 + factor)` and never sooner than a bound chosen to keep the average about
    `average`: the delay never drops to 0, which would retry at once."""
    upper_multiple = 1 + clamping_factor
    # Prefect's `lower_clamp_multiple`: 0 for large factors, where 2**k would overflow.
    lower_multiple = 0.0 if upper_multiple >= 50 else math.log(max(2**upper_multiple / (2**upper_multiple - 1),
                                                                     1e-10), 2)
    upper_rv = _exponential_cdf(average * upper_multiple, average)
    lower_rv = _exponential_cdf(max(0.0, average * lower_multiple), average)
    drawn = lower_rv + (upper_rv - lower_rv) * u
    return -math.log(max(1 - drawn, 1e-10)) * average


def _exponential_cdf(x: float, average: float) -> float:
    return 1 - math.exp(-x / average)


@rule("OR-20", from_states=ALL_STATES, to_states={StateType.RUNNING})
def rename_reruns(c: RuleContext) -> Verdict:
    """Prefect's RenameReruns. A run that starts again says why, whatever name was proposed: a
    retry (`Retrying`) or a rerun (`Rerunning`); a first run keeps its name. A run leaving a
    finished state counts from zero again (OR-15), so it keeps its name too (OR-15's
    `Retrying` among them)."""
    current = c.current
    restarted = current is not None and current.type in TERMINAL
    if restarted or c.run.run_count <= 0:
        return go_on()
    name = "Retrying" if current is not None and current.name == "AwaitingRetry" else "Rerunning"
    return go_on(c.proposed.model_copy(update={"name": name}))


@rule("OR-14", from_states=ALL_STATES, to_states={StateType.COMPLETED})
def cache_insertion(c: RuleContext) -> Verdict:
    """Prefect's CacheInsertion (its check; the entry itself follows from what is written,
    `task_runs.cache_events`). A key past Prefect's limit is not looked up or stored: the state
    is written as proposed but the caller is told, by a REJECT, that it was not cached."""
    key = c.proposed.state_details.cache_key
    if key is not None and len(key) > MAX_CACHE_KEY_LENGTH:
        return reject(f"Cache key exceeded maximum allowed length of {MAX_CACHE_KEY_LENGTH} characters.",
                      c.proposed)
    return go_on()


CORE_TASK_POLICY: list[Rule] = [
    one_task_worker_at_a_time,
    cancelling_task_runs_end_cancelled,
    cache_retrieval,
    handle_task_terminal_state_transitions,
    prevent_running_tasks_from_stopped_flows,
    secure_task_concurrency_slots,
    copy_scheduled_time,
    wait_for_scheduled_time,
    retry_failed_tasks,
    rename_reruns,
    cache_insertion,
]

BACKGROUND_TASK_POLICY: list[Rule] = [
    one_task_worker_at_a_time,
    prevent_pending_transitions,
    cache_retrieval,
    handle_task_terminal_state_transitions,
    copy_scheduled_time,
    copy_task_parameters_id,
    wait_for_scheduled_time,
    retry_failed_tasks,
    rename_reruns,
    cache_insertion,
]

# TR-3: a forced, non-deferred proposal keeps none of the rules (only the release of tag
# slots, OR-18, which is bookkeeping here: `task_runs.tag_slot_events`).
MINIMAL_TASK_POLICY: list[Rule] = []


@dataclass(frozen=True)
class TaskTransition(Transition):
    """A task transition, whether its written state is queued for a task worker (TQ-4),
    whether the run takes a slot of each of its limited tags (it entered RUNNING past
    `secure_task_concurrency_slots`: the background and forced policies take none), and
    whether a COMPLETED state it writes becomes an entry of its cache key (`records_cache`:
    the policy that decided holds `cache_insertion`, as Prefect's core and background ones do
    and its minimal one, for forced proposals, does not; `task_runs.cache_events`)."""

    enqueue: bool = False
    takes_tag_slots: bool = False
    records_cache: bool = False

    @property
    def waiting_for_a_tag_slot(self) -> bool:
        """Refused by its tags' limits (told to WAIT, or to stop on a limit of 0) with nothing
        written: `orchestration.reason` says which tag, and is why the run waits."""
        return self.state is None and self.refused_by == secure_task_concurrency_slots.name


def task_policy(proposed: StateCreate, *, force: bool) -> Sequence[Rule]:
    """TR-3: a deferred proposal takes the background policy, even forced; else `force` the
    minimal one; else the core one."""
    if proposed.state_details.deferred:
        return BACKGROUND_TASK_POLICY
    return MINIMAL_TASK_POLICY if force else CORE_TASK_POLICY


def records_cache(proposed: StateCreate, *, force: bool) -> bool:
    """Whether the policy `proposed` takes records a COMPLETED state under its cache key: a
    handler loads the key's entries only then (a forced copy, such as a subflow's state on its
    parent task run, caches nothing in Prefect, so it neither reads nor writes the key)."""
    return cache_insertion in task_policy(proposed, force=force)


def set_task_run_state(run: TaskRun, proposed: StateCreate, *, force: bool, ctx: DecisionContext,
                       facts: TaskFacts = NO_FACTS) -> TaskTransition:
    """TR-3: the policy is chosen by the proposal (`task_policy`)."""
    deferred = bool(proposed.state_details.deferred)
    policy = task_policy(proposed, force=force)

    tracks_flow_run = policy is not MINIMAL_TASK_POLICY

    def book(r: TaskRun, proposal: StateCreate, run_policy: Any, c: DecisionContext) -> tuple[State, TaskRun]:
        return _book(r, proposal, facts, c, tracks_flow_run=tracks_flow_run)

    t = orchestrate(policy, run, proposed, ctx, facts=facts, book=book)
    enqueue = (deferred and proposed.type is StateType.SCHEDULED and t.state is not None
               and bool(t.state.state_details.deferred))
    after = t.run
    if enqueue and t.state is not None:
        after = after.model_copy(update={"queued_state_id": t.state.id})
    # A RUNNING state written for a RUNNING proposal got past every rule for RUNNING, this one too.
    takes_tag_slots = (secure_task_concurrency_slots in policy and proposed.type is StateType.RUNNING
                       and t.state is not None and t.state.type is StateType.RUNNING)
    return TaskTransition(t.orchestration, t.state, after, t.refused_by, enqueue=enqueue,
                          takes_tag_slots=takes_tag_slots, records_cache=cache_insertion in policy)


def _book(run: TaskRun, proposal: StateCreate, facts: TaskFacts, ctx: DecisionContext, *,
          tracks_flow_run: bool) -> tuple[State, TaskRun]:
    """FR-6 and TR-6 for task runs: mint the state, mirror it and the times onto the run (a
    state written ends any wait its tags' limits caused: `waiting_reason` is cleared); every
    entry into RUNNING counts a run (a run leaving a finished state starts counting again, OR-15)
    and, under the core and background policies (`tracks_flow_run`: Prefect's
    UpdateFlowRunTrackerOnTasks is in those, not in the minimal one a forced state takes),
    copies its flow run's count; the task worker that starts it holds it while it runs."""
    current = run.state
    details: dict[str, Any] = {"task_run_id": run.id, "flow_run_id": run.flow_run_id}
    state = mint_state(current, proposal, details, ctx)
    leaving = current.type if current is not None else None
    run_count, flow_run_run_count = run.run_count, run.flow_run_run_count
    if leaving in TERMINAL and state.type not in TERMINAL:
        run_count = 0
    worker, message = run.task_worker_id, run.task_message
    if state.type is StateType.RUNNING:
        run_count += 1
        if tracks_flow_run and facts.flow_run is not None:
            flow_run_run_count = facts.flow_run.run_count
        worker = facts.claimant or (worker if leaving is StateType.RUNNING else None)
        if facts.delivery is not None:
            message = facts.delivery.message
        elif leaving is not StateType.RUNNING:
            message = None
    elif not (state.type is StateType.CANCELLING and leaving in (StateType.RUNNING, StateType.CANCELLING)):
        worker, message = None, None  # a cancelling run is still its worker's: it reports the end
    return state, run.model_copy(update={**booked_times(run, state), "run_count": run_count,
                                         "flow_run_run_count": flow_run_run_count, "task_worker_id": worker,
                                         "task_message": message, "waiting_reason": None,
                                         "updated": ctx.now})
