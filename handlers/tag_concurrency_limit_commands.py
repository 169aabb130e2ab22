"""The task tag concurrency limit command table: each command loads its tag's limit, found by
the tag alone (`tag_concurrency_limits.limit_id`), and locks it, so it takes turns with the
task runs claiming that tag's slots (`task_run_commands.tag_limits_of`)."""

from __future__ import annotations

from typing import Any

from runledger.commands import tag_concurrency_limits as tcl
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext
from runledger.infra.aggregates import AggregateKind

from .command_bus import AggregateKey, CommandSpec, Unit

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


def _by_tag(cmd: Any) -> list[AggregateKey]:
    return [(tcl.TAG_CONCURRENCY_LIMIT, tcl.limit_id(cmd.tag))]


def _limit_reply(limit: tcl.TagConcurrencyLimit) -> dict[str, Any]:
    return limit.reply()


def _nothing(_: Any) -> None:
    return None


COMMANDS = {
    "CreateTagConcurrencyLimit": CommandSpec(tcl.CreateTagConcurrencyLimit, create_tag_concurrency_limit,
                                             _limit_reply, _by_tag),
    "DeleteTagConcurrencyLimit": CommandSpec(tcl.DeleteTagConcurrencyLimit, delete_tag_concurrency_limit,
                                             _nothing, _by_tag),
    "ResetTagConcurrencyLimit": CommandSpec(tcl.ResetTagConcurrencyLimit, reset_tag_concurrency_limit,
                                            _limit_reply, _by_tag),
}
