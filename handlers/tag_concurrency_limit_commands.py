"""The task tag concurrency limit command table: each command loads its tag's limit, found by
the tag alone (`tag_concurrency_limits.limit_id`), and locks it, so it takes turns with the
task runs claiming that tag's slots (`task_run_commands.tag_limits_of`)."""

from __future__ import annotations

import asyncio
from typing import Any

from runledger.commands import tag_concurrency_limits as tcl
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext
from runledger.infra.aggregates import AggregateKind

from .command_bus import AggregateKey, CommandSpec, Unit
from .task_run_commands import load_task_run, tag_limits_of_tag

AGGREGATE_KINDS = [
    # Every event carries the whole limit (slot events too): its last event is its state.
    AggregateKind(tcl.TAG_CONCURRENCY_LIMIT, lambda: None, tcl.evolve, last_event_only=True),
]


async def _limit(unit: Unit, tag: str) -> tcl.TagConcurrencyLimit | None:
    return await unit.load(tcl.TAG_CONCURRENCY_LIMIT, tcl.limit_id(tag))


async def create_tag_concurrency_limit(unit: Unit, cmd: tcl.CreateTagConcurrencyLimit,
                                       ctx: DecisionContext) -> Decision:
    return tcl.decide_create_tag_concurrency_limit(cmd, await _limit(unit, cmd.tag), ctx)


async def delete_tag_concurrency_limit(unit: Unit, cmd: tcl.DeleteTagConcurrencyLimit,
                                       ctx: DecisionContext) -> Decision:
    return tcl.decide_delete_tag_concurrency_limit(cmd, await _limit(unit, cmd.tag))


async def reset_tag_concurrency_limit(unit: Unit, cmd: tcl.ResetTagConcurrencyLimit,
                                      ctx: DecisionContext) -> Decision:
    return tcl.decide_reset_tag_concurrency_limit(cmd, await _limit(unit, cmd.tag), ctx)


async def release_tag_slots_of_gone_task_runs(unit: Unit, cmd: tcl.ReleaseTagSlotsOfGoneTaskRuns,
                                              ctx: DecisionContext) -> Decision:
    """The tag's limits first (locked), then each holder asked about, from the log: a run's
    start and its slot are stored in one atomic batch, so a holder read after the limits and
    found gone or not running holds no slot the limits do not show yet (a later start of it
    would write to the limits, and this decision's append then fails its sequence check)."""
    limit, global_limit = await tag_limits_of_tag(unit, cmd.tag)
    holders = tcl.holders_to_check(cmd, limit, global_limit)
    runs = await asyncio.gather(*(load_task_run(unit, r, fresh=True) for r in holders))
    states = {r: run.state_type if run is not None else None for r, run in zip(holders, runs, strict=True)}
    return tcl.decide_release_gone_tag_slots(cmd, limit, global_limit, states)


def _by_tag(cmd: Any) -> list[AggregateKey]:
    return [(tcl.TAG_CONCURRENCY_LIMIT, tcl.limit_id(cmd.tag))]


def _limit_reply(limit: tcl.TagConcurrencyLimit) -> dict[str, Any]:
    return limit.reply()


def _nothing(_: Any) -> None:
    return None


def _identity(result: Any) -> Any:
    return result


COMMANDS = {
    "CreateTagConcurrencyLimit": CommandSpec(tcl.CreateTagConcurrencyLimit, create_tag_concurrency_limit,
                                             _limit_reply, _by_tag),
    "DeleteTagConcurrencyLimit": CommandSpec(tcl.DeleteTagConcurrencyLimit, delete_tag_concurrency_limit,
                                             _nothing, _by_tag),
    "ResetTagConcurrencyLimit": CommandSpec(tcl.ResetTagConcurrencyLimit, reset_tag_concurrency_limit,
                                            _limit_reply, _by_tag),
    # Locks nothing of its own: it locks the tag's limits as a run's commands do, classic then
    # global (`task_run_commands.tag_limits_of_tag`), never waiting while holding one.
    "ReleaseTagSlotsOfGoneTaskRuns": CommandSpec(tcl.ReleaseTagSlotsOfGoneTaskRuns,
                                                 release_tag_slots_of_gone_task_runs, _identity, lambda cmd: []),
}
