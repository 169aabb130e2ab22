"""The task-run command table: what each command loads before its pure decider runs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from runledger.commands import concurrency_limits as cl
from runledger.commands import flow_runs as fr
from runledger.commands import tag_concurrency_limits as tcl
from runledger.commands import task_run_rules as rules
from runledger.commands import task_runs as tr
from runledger.commands import unique_keys as uk
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext, forbidden
from runledger.commands.states import State, StateCreate, StateType
from runledger.infra.aggregates import AggregateKind
from runledger.infra.broker_auth import TASK_WORKER_ACCOUNT, bound_task_worker_name

from .command_bus import AggregateKey, BulkSpec, CommandSpec, Unit
from .endpoint import current_caller

# Every event of a task run carries the whole run, and every event of a cache key the entries
# it keeps: the last event is the state.
AGGREGATE_KINDS = [
    AggregateKind(tr.TASK_RUN, lambda: None, tr.evolve, last_event_only=True, max_cached=tr.CACHED_TASK_RUNS),
    AggregateKind(tr.TASK_CACHE, lambda: None, tr.evolve_cache, last_event_only=True, max_cached=10_000),
    # The task runs holding slots of a global `tag:<tag>` limit: every event carries them all.
    AggregateKind(tcl.GLOBAL_TAG_SLOTS, lambda: None, tcl.evolve_global_slots, last_event_only=True),
]


async def _facts(unit: Unit, run: tr.TaskRun | tr.CreateTaskRun, proposed: StateCreate | None,
                 takeover_allowed: bool) -> rules.TaskFacts:
    """What the task rules read besides the run: its flow run, and the cache entry under the
    proposed state's cache key when the run is about to start, or completes (its state then
    joins them, appended after the ones loaded)."""
    flow_run = await unit.load(fr.FLOW_RUN, str(run.flow_run_id)) if run.flow_run_id is not None else None
    cached = None
    if (proposed is not None and proposed.type in (StateType.RUNNING, StateType.COMPLETED)
            and proposed.state_details.cache_key is not None):
        cached = await unit.load(tr.TASK_CACHE, tr.cache_id(proposed.state_details.cache_key))
    return rules.TaskFacts(flow_run=flow_run, cached=cached, takeover_allowed=takeover_allowed)


@dataclass(frozen=True)
class TagLimits:
    """The concurrency limits of a run's tags, by tag, tags without one left out: the classic
    ones (`TaskFacts.tag_limits`) and the global ones named `tag:<tag>`, active or not
    (`TaskFacts.global_tag_limits`)."""

    classic: dict[str, tcl.TagConcurrencyLimit] = field(default_factory=dict)
    global_: dict[str, tcl.GlobalTagLimit] = field(default_factory=dict)

    def into(self, facts: rules.TaskFacts) -> rules.TaskFacts:
        return replace(facts, tag_limits=self.classic, global_tag_limits=self.global_)


async def tag_limits_of(unit: Unit, run: tr.TaskRun, proposed: StateCreate | None, *,
                        lock_global: bool = True) -> TagLimits:
    """The concurrency limits of the run's tags: for each tag, its classic limit and the
    global limit named `tag:<tag>` (found through its name's claim) with the runs holding its
    slots. Those that exist are locked for the rest of the command, so that runs claiming one
    tag's slots take turns, each deciding against the state the one before left (chained):
    the classic limits first, then the global ones (`_lock_tag_limits`). `lock_global=False`:
    the global ones are not locked, only checked by their expected sequence when written, for
    a command that has locked other tags' classic limits already (a subflow's parent task
    runs, `flow_run_commands.parent_task`), which would otherwise take global ones in another
    order than a run's own commands.
    A run without tags reads nothing; a tagged one reads each tag's classic limit and name
    claim side by side, so a tag without limits costs no more time than before. When the run
    may take a slot (it proposes RUNNING) or give one back (it is RUNNING or CANCELLING),
    what this instance may hold out of date unnoticed is read again from the log
    (`_maybe_stale`, `_claim_maybe_stale`, `_global_maybe_stale`)."""
    if not run.tags:
        return TagLimits()
    starts = proposed is not None and proposed.type is StateType.RUNNING
    slots_may_change = starts or run.state_type in tcl.SLOT_STATES
    tags = list(dict.fromkeys(run.tags))

    async def classic(tag: str) -> tcl.TagConcurrencyLimit | None:
        key = (tcl.TAG_CONCURRENCY_LIMIT, tcl.limit_id(tag))
        known = unit.repo.cached(*key)
        fresh = slots_may_change and known is not None and _maybe_stale(known.state, run)
        return await unit.load(*key, fresh=fresh)

    async def claim(tag: str) -> uk.UniqueKeyClaim:
        key = _claim_key(tag)
        known = unit.repo.cached(*key)
        fresh = slots_may_change and known is not None and known.state.owner_id is None
        return await unit.load(*key, fresh=fresh)

    classic_limits, claims = await asyncio.gather(asyncio.gather(*(classic(tag) for tag in tags)),
                                                  asyncio.gather(*(claim(tag) for tag in tags)))
    classic_found = dict(zip(tags, classic_limits, strict=True))
    owners = {tag: c.owner_id for tag, c in zip(tags, claims, strict=True) if c.owner_id is not None}
    global_found = {tag: g for tag, g in zip(owners, await asyncio.gather(
        *(_global_limit(unit, run, tag, owner, fresh_when_stale=slots_may_change) for tag, owner in owners.items())),
        strict=True) if g is not None}
    classic_keys = [(tcl.TAG_CONCURRENCY_LIMIT, tcl.limit_id(tag)) for tag, limit in classic_found.items()
                    if limit is not None]
    global_keys = [key for g in global_found.values() for key in _global_keys(g.limit.id)]
    if not classic_keys and not global_keys:
        return TagLimits()
    await _lock_tag_limits(unit, classic_keys, global_keys if lock_global else [])
    # As the lock found them.
    limits = {tag: await unit.load(tcl.TAG_CONCURRENCY_LIMIT, tcl.limit_id(tag)) for tag, limit in classic_found.items()
              if limit is not None}
    globals_ = {tag: await _global_limit(unit, run, tag, g.limit.id) for tag, g in global_found.items()}
    return TagLimits({tag: limit for tag, limit in limits.items() if limit is not None},
                     {tag: g for tag, g in globals_.items() if g is not None})


async def _lock_tag_limits(unit: Unit, classic_keys: list[AggregateKey], global_keys: list[AggregateKey]) -> None:
    """Every command locks tag limits in one order: its classic ones (each call to `Unit.lock`
    takes its keys sorted), then its global ones, so no command holds a global limit while it
    waits for a classic one another command holds while waiting for that global one."""
    if classic_keys:
        await unit.lock(classic_keys)
    if global_keys:
        await unit.lock(global_keys)


def _claim_key(tag: str) -> AggregateKey:
    return (uk.UNIQUE_KEY, cl.CONCURRENCY_LIMIT_NAME.aggregate_id(tcl.global_limit_name(tag)))


def _global_keys(limit_id: uuid.UUID) -> list[AggregateKey]:
    return [(cl.CONCURRENCY_LIMIT, str(limit_id)), (tcl.GLOBAL_TAG_SLOTS, tcl.global_slots_id(limit_id))]


async def _global_limit(unit: Unit, run: tr.TaskRun | None, tag: str, limit_id: uuid.UUID, *,
                        fresh_when_stale: bool = False) -> tcl.GlobalTagLimit | None:
    """The global limit `limit_id` and the runs holding its slots, if it is still the tag's
    (it may have been renamed or deleted since its name's claim was read)."""
    limit_key, slots_key = _global_keys(limit_id)
    known = unit.repo.cached(*limit_key)
    limit = await unit.load(*limit_key, fresh=fresh_when_stale and known is not None and _global_maybe_stale(known.state))
    if limit is None or limit.name != tcl.global_limit_name(tag):
        return None
    known = unit.repo.cached(*slots_key)
    fresh = (fresh_when_stale and run is not None and known is not None
             and _holders_maybe_stale(known.state, run))
    holders = await unit.load(*slots_key, fresh=fresh)
    return tcl.GlobalTagLimit(limit, holders or tcl.GlobalTagSlots(limit_id=limit_id))


def _maybe_stale(limit: tcl.TagConcurrencyLimit | None, run: tr.TaskRun) -> bool:
    """Whether a cached limit may be out of date in a way no expected-sequence check would
    catch, because the decision would then write nothing to it: another instance may have
    limited a tag this one knows without a limit, or taken or given back the run's slot (the
    cache then disagrees with the run's state, which is checked). A slot the cache shows
    wrongly is caught when the decision writes to the limit, or, for a start refused as full,
    when the bus decides again on the log. A name's claim (`tag:<tag>`) cached as free is read
    again for the same reason."""
    if limit is None:
        return True
    return (run.id in limit.active_slots) != (run.state_type in tcl.SLOT_STATES)


def _global_maybe_stale(limit: cl.ConcurrencyLimit | None) -> bool:
    """A global limit cached as inactive (or gone) may have been made active elsewhere: the
    decision would then take no slot of it, and write nothing that would tell."""
    return limit is None or not limit.active


def _holders_maybe_stale(holders: tcl.GlobalTagSlots | None, run: tr.TaskRun) -> bool:
    """As `_maybe_stale`, for the runs holding a global limit's slots."""
    held = holders is not None and run.id in holders.task_run_ids
    return held != (run.state_type in tcl.SLOT_STATES)


def _run_reply(run: tr.TaskRun) -> dict[str, Any]:
    return tr.reply(run)


# What a bulk create answers of each run: enough to follow it, small enough that a thousand
# fit a reply whatever their parameters (a run's whole reply carries them back).
_SHORT_FIELDS = ("id", "task_key", "dynamic_key", "flow_run_id", "state_type", "state_name")


def _short_reply(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        return {"ok": False, "error": reply["error"]}
    run = reply["result"]
    return {"ok": True, "result": {k: run.get(k) for k in _SHORT_FIELDS}, "created": reply.get("created")}


def _state_reply(state: State | None) -> dict[str, Any] | None:
    return state.reply() if state is not None else None


def _short_state_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """An item of `SetTaskRunStates`' reply: the item's reply without the state's `data` (a
    result of up to 256 KiB each would make a hundred too large for one reply)."""
    state = reply.get("result")
    if not reply.get("ok") or not isinstance(state, dict):
        return reply
    return {**reply, "result": {k: v for k, v in state.items() if k != "data"}}


def _nothing(_: Any) -> None:
    return None


def _create_locks(cmd: tr.CreateTaskRun) -> Iterable[AggregateKey]:
    """A create locks the id its keys make (and the id it asks for)."""
    locks = [(tr.TASK_RUN, str(tr.keys_id(cmd.flow_run_id, cmd.task_key, cmd.dynamic_key)))]
    return [*locks, (tr.TASK_RUN, str(cmd.id))] if cmd.id is not None else locks


def _by_id(cmd: Any) -> Iterable[AggregateKey]:
    return [(tr.TASK_RUN, str(cmd.id))]


async def load_task_run(unit: Unit, task_run_id: Any, *, fresh: bool = False) -> tr.TaskRun | None:
    """The task run, unless it went with its deleted flow run (`task_runs.still_there`). The
    marker a set of keys leaves under the id they make is not a run. `fresh`: both read from
    the log, whatever the cache holds (`Unit.load`)."""
    run = await unit.load(tr.TASK_RUN, str(task_run_id), fresh=fresh)
    if not isinstance(run, tr.TaskRun):
        return None
    if run.flow_run_id is None:
        return run
    return tr.still_there(run, await unit.load(fr.FLOW_RUN, str(run.flow_run_id), fresh=fresh) is not None)


async def tag_limits_of_tag(unit: Unit, tag: str) -> tuple[tcl.TagConcurrencyLimit | None, tcl.GlobalTagLimit | None]:
    """The tag's classic limit and its global limit named `tag:<tag>` with the runs holding
    its slots, locked in the order a run's commands lock them (`_lock_tag_limits`). For
    commands about a tag rather than a run (`ReleaseTagSlotsOfGoneTaskRuns`), which lock
    nothing of their own."""
    classic_key = (tcl.TAG_CONCURRENCY_LIMIT, tcl.limit_id(tag))
    claim = await unit.load(*_claim_key(tag))
    await _lock_tag_limits(unit, [classic_key], _global_keys(claim.owner_id) if claim.owner_id is not None else [])
    limit = await unit.load(*classic_key)
    return limit, (await _global_limit(unit, None, tag, claim.owner_id) if claim.owner_id is not None else None)


def decided_on_the_log_before_it_waits(unit: Unit, decision: Decision) -> Decision:
    """A start refused because a tag is full, decided on what this instance cached, is decided
    again on the log before its run records why it waits: another instance may have freed the
    slot, and the run's `TaskRunWaiting` is checked against the run alone, not the limit. A
    refusal that writes nothing is decided again so by the bus (`CommandBus._execute`), and so
    is this one, handed back without its event; decided on the log, it is written."""
    if unit.from_cache and tr.records_waiting_only(decision):
        return replace(decision, events=[], after={})
    return decision


def keys_of_caller(bound: Mapping[str, Sequence[str]]) -> frozenset[str] | None:
    """The task keys the sender of the command being answered may report on: None (any) for
    a client, the service itself and the task worker role's own user; a bound task worker's
    keys (`bound`: Settings.task_worker_keys) for its user. Any other user of the task worker's
    account, or one the broker did not name while task workers are bound to keys (a broker
    configuration older than the service's), may report on none: the broker and the service
    were not given the same bound task workers, and the narrower reading is the safe one."""
    caller = current_caller()
    if caller.account != TASK_WORKER_ACCOUNT or caller.user == "task_worker":
        return None
    if caller.user is None and not bound:
        return None
    name = bound_task_worker_name(caller.user)
    return frozenset(bound[name]) if name is not None and name in bound else frozenset()


def hold_to_its_keys(cmd: tr.SetTaskRunState, run: tr.TaskRun | None, allowed: frozenset[str] | None) -> None:
    """A task worker bound to keys reports on its keys' runs only, and never forces a state:
    its credentials are meant for one set of tasks, and a report on another's run, or a forced
    one, could end a run it does not hold."""
    if allowed is None:
        return
    if cmd.force:
        raise forbidden("A task worker bound to task keys may not force a state.")
    if run is not None and run.task_key not in allowed:
        raise forbidden(f"This task worker may report only on runs of the task keys {sorted(allowed)}, "
                        f"not {run.task_key!r}.")


def command_specs(takeover_allowed: Callable[[], bool] = lambda: True,
                  bound_task_workers: Mapping[str, Sequence[str]] | None = None) -> dict[str, CommandSpec | BulkSpec]:
    """`takeover_allowed`: False while the service's broker connection is fresh (a broker
    restart redelivers every task at once; see `task_run_rules.TAKEOVER_GRACE_SECONDS`).
    `bound_task_workers`: the task workers bound to keys (Settings.task_worker_keys)."""
    bound = dict(bound_task_workers or {})

    async def create_task_run(unit: Unit, cmd: tr.CreateTaskRun, ctx: DecisionContext) -> Decision:
        at = tr.keys_id(cmd.flow_run_id, cmd.task_key, cmd.dynamic_key)
        # Keys seen before are in the cache or, rarely, only in the log: their append's check
        # finds them (`Unit.load`). A submission's keys are almost always new (a fresh dynamic key).
        at_keys = await unit.load(tr.TASK_RUN, str(at), presumed_new=True)
        holder = (await unit.load(tr.TASK_RUN, str(at_keys.task_run_id))
                  if isinstance(at_keys, tr.TaskRunKeys) else None)
        same_id = None
        if at_keys is None and cmd.id is not None and cmd.id != at:
            same_id = await unit.load(tr.TASK_RUN, str(cmd.id))
        facts = await _facts(unit, cmd, cmd.state, takeover_allowed())
        # The keys' subject has events yet holds nothing: a run that held them was deleted.
        loaded_at = unit.loaded.get((tr.TASK_RUN, str(at)))
        used = loaded_at is not None and loaded_at != 0
        return tr.decide_create_task_run(cmd, at_keys, holder, same_id if isinstance(same_id, tr.TaskRun) else None,
                                         facts.flow_run, ctx, facts, keys_used_before=used)

    async def set_task_run_state(unit: Unit, cmd: tr.SetTaskRunState, ctx: DecisionContext) -> Decision:
        run = await load_task_run(unit, cmd.id)
        hold_to_its_keys(cmd, run, keys_of_caller(bound))
        if run is None:
            return tr.decide_set_task_run_state(cmd, run, ctx)
        facts = await _facts(unit, run, cmd.state, takeover_allowed())
        facts = (await tag_limits_of(unit, run, cmd.state)).into(facts)
        return decided_on_the_log_before_it_waits(unit, tr.decide_set_task_run_state(cmd, run, ctx, facts))

    async def update_task_run(unit: Unit, cmd: tr.UpdateTaskRun, ctx: DecisionContext) -> Decision:
        return tr.decide_update_task_run(cmd, await load_task_run(unit, cmd.id), ctx)

    async def deletion_inputs(unit: Unit, run: tr.TaskRun) -> TagLimits:
        """What a run's deletion writes to besides the run: its keys' marker (released in the
        same append: read, for its sequence check) and its tags' limits."""
        if run.id != tr.keys_id(run.flow_run_id, run.task_key, run.dynamic_key):
            await unit.load(tr.TASK_RUN, str(tr.keys_id(run.flow_run_id, run.task_key, run.dynamic_key)))
        return await tag_limits_of(unit, run, None)

    async def delete_task_run(unit: Unit, cmd: tr.DeleteTaskRun, ctx: DecisionContext) -> Decision:
        run = await load_task_run(unit, cmd.id)
        if run is None:
            return tr.decide_delete_task_run(cmd, run)
        limits = await deletion_inputs(unit, run)
        return tr.decide_delete_task_run(cmd, run, limits.classic, limits.global_)

    async def delete_finished_task_run(unit: Unit, cmd: tr.DeleteFinishedTaskRun, ctx: DecisionContext) -> Decision:
        run = await load_task_run(unit, cmd.id)
        if run is None:
            return tr.decide_delete_finished_task_run(cmd, run)
        limits = await deletion_inputs(unit, run)
        return tr.decide_delete_finished_task_run(cmd, run, limits.classic, limits.global_)

    return {
        "CreateTaskRun": CommandSpec(tr.CreateTaskRun, create_task_run, _run_reply, _create_locks),
        "SetTaskRunState": CommandSpec(tr.SetTaskRunState, set_task_run_state, _state_reply, _by_id),
        "UpdateTaskRun": CommandSpec(tr.UpdateTaskRun, update_task_run, _nothing, _by_id),
        "DeleteTaskRun": CommandSpec(tr.DeleteTaskRun, delete_task_run, _nothing, _by_id),
        "DeleteFinishedTaskRun": CommandSpec(tr.DeleteFinishedTaskRun, delete_finished_task_run, _nothing, _by_id),
        "CreateTaskRuns": BulkSpec(tr.CreateTaskRuns, "CreateTaskRun", lambda cmd: cmd.task_runs, _short_reply),
        "SetTaskRunStates": BulkSpec(tr.SetTaskRunStates, "SetTaskRunState", lambda cmd: cmd.states,
                                     _short_state_reply),
    }
