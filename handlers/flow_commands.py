"""The flow command table: what each command loads before its pure decider runs."""

from __future__ import annotations

from typing import Any

from runledger.commands import flows as fl
from runledger.commands import unique_keys as uk
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext
from runledger.infra.aggregates import AggregateKind

from .command_bus import CommandSpec, Unit

AGGREGATE_KINDS = [
    AggregateKind(fl.FLOW, lambda: None, fl.evolve),
    # Every scope's unique keys (flow names now; deployment names, run keys next).
    AggregateKind(uk.UNIQUE_KEY, uk.UniqueKeyClaim, uk.evolve_claim, last_event_only=True),
]


async def create_flow(unit: Unit, cmd: fl.CreateFlow, ctx: DecisionContext) -> Decision:
    claim = await unit.load(uk.UNIQUE_KEY, uk.FLOW_NAME.aggregate_id(cmd.name))
    existing = await unit.load(fl.FLOW, str(claim.owner_id)) if claim.owner_id is not None else None
    return fl.decide_create_flow(cmd, claim, existing, ctx)


async def delete_flow(unit: Unit, cmd: fl.DeleteFlow, ctx: DecisionContext) -> Decision:
    flow = await unit.load(fl.FLOW, str(cmd.id))
    # The claim is released in the same batch: it must be loaded, for its expected sequence.
    claim = await unit.load(uk.UNIQUE_KEY, uk.FLOW_NAME.aggregate_id(flow.name)) if flow is not None else None
    return fl.decide_delete_flow(cmd, flow, claim, ctx)


def _flow_reply(flow: fl.Flow) -> dict[str, Any]:
    return flow.reply()


def _nothing(_: Any) -> None:
    return None


COMMANDS = {
    "CreateFlow": CommandSpec(fl.CreateFlow, create_flow, _flow_reply,
                              lambda cmd: [(uk.UNIQUE_KEY, uk.FLOW_NAME.aggregate_id(cmd.name))]),
    "DeleteFlow": CommandSpec(fl.DeleteFlow, delete_flow, _nothing, lambda cmd: [(fl.FLOW, str(cmd.id))]),
}
