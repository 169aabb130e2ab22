"""The global concurrency limit command table: what each command loads before its pure
decider runs. A limit is found by id, or through its name's claim (`unique_key`, registered
by the flow table); a rename or a delete also loads the current name's claim, which its
events release."""

from __future__ import annotations

from typing import Any

from runledger.commands import concurrency_limits as cl
from runledger.commands import unique_keys as uk
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext
from runledger.infra.aggregates import AggregateKind

from .command_bus import CommandSpec, Unit

AGGREGATE_KINDS = [
    # Every event carries the whole limit (slot events too): its last event is its state.
    AggregateKind(cl.CONCURRENCY_LIMIT, lambda: None, cl.evolve, last_event_only=True),
]


def _claim_id(name: str) -> str:
    return cl.CONCURRENCY_LIMIT_NAME.aggregate_id(name)


async def _load(unit: Unit, cmd: cl.UpdateConcurrencyLimit | cl.DeleteConcurrencyLimit) -> cl.ConcurrencyLimit | None:
    """The limit by id or by name, with its name's claim loaded (for its expected sequence)."""
    if cmd.id is not None:
        limit = await unit.load(cl.CONCURRENCY_LIMIT, str(cmd.id))
        if limit is not None:
            await unit.load(uk.UNIQUE_KEY, _claim_id(limit.name))
        return limit
    assert cmd.name is not None
    claim = await unit.load(uk.UNIQUE_KEY, _claim_id(cmd.name))
    return await unit.load(cl.CONCURRENCY_LIMIT, str(claim.owner_id)) if claim.owner_id is not None else None


async def create_concurrency_limit(unit: Unit, cmd: cl.CreateConcurrencyLimit, ctx: DecisionContext) -> Decision:
    claim = await unit.load(uk.UNIQUE_KEY, _claim_id(cmd.name))
    return cl.decide_create_concurrency_limit(cmd, claim, ctx)


async def update_concurrency_limit(unit: Unit, cmd: cl.UpdateConcurrencyLimit, ctx: DecisionContext) -> Decision:
    limit = await _load(unit, cmd)
    new_claim = None
    if limit is not None and cmd.new_name is not None and cmd.new_name != limit.name:
        new_claim = await unit.load(uk.UNIQUE_KEY, _claim_id(cmd.new_name))
    return cl.decide_update_concurrency_limit(cmd, limit, new_claim, ctx)


async def delete_concurrency_limit(unit: Unit, cmd: cl.DeleteConcurrencyLimit, ctx: DecisionContext) -> Decision:
    return cl.decide_delete_concurrency_limit(cmd, await _load(unit, cmd), ctx)


def _locks(cmd: Any) -> list[tuple[str, str]]:
    """By id: the limit; by name: its claim; a new name: that claim too."""
    keys = [(cl.CONCURRENCY_LIMIT, str(cmd.id))] if cmd.id is not None else []
    keys += [(uk.UNIQUE_KEY, _claim_id(n)) for n in (cmd.name, getattr(cmd, "new_name", None)) if n is not None]
    return keys


def _limit_reply(limit: cl.ConcurrencyLimit) -> dict[str, Any]:
    return limit.reply()


def _nothing(_: Any) -> None:
    return None


COMMANDS = {
    "CreateConcurrencyLimit": CommandSpec(cl.CreateConcurrencyLimit, create_concurrency_limit, _limit_reply,
                                          lambda cmd: [(uk.UNIQUE_KEY, _claim_id(cmd.name))]),
    "UpdateConcurrencyLimit": CommandSpec(cl.UpdateConcurrencyLimit, update_concurrency_limit, _limit_reply, _locks),
    "DeleteConcurrencyLimit": CommandSpec(cl.DeleteConcurrencyLimit, delete_concurrency_limit, _nothing, _locks),
}
