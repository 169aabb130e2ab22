"""The variable command table: what each command loads before its pure decider runs. A
variable is found through its name's claim (`unique_key`, registered by the flow table)."""

from __future__ import annotations

from typing import Any

from runledger.commands import unique_keys as uk
from runledger.commands import variables as va
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext
from runledger.infra.aggregates import AggregateKind

from .command_bus import CommandSpec, Unit

AGGREGATE_KINDS = [
    AggregateKind(va.VARIABLE, lambda: None, va.evolve),
]


async def _by_name(unit: Unit, name: str) -> tuple[uk.UniqueKeyClaim, va.Variable | None]:
    """The name's claim (loaded for its expected sequence) and the variable holding it."""
    claim = await unit.load(uk.UNIQUE_KEY, va.VARIABLE_NAME.aggregate_id(name))
    variable = await unit.load(va.VARIABLE, str(claim.owner_id)) if claim.owner_id is not None else None
    return claim, variable


async def create_variable(unit: Unit, cmd: va.CreateVariable, ctx: DecisionContext) -> Decision:
    claim = await unit.load(uk.UNIQUE_KEY, va.VARIABLE_NAME.aggregate_id(cmd.name))
    return va.decide_create_variable(cmd, claim, ctx)


async def update_variable(unit: Unit, cmd: va.UpdateVariable, ctx: DecisionContext) -> Decision:
    claim, variable = await _by_name(unit, cmd.name)
    new_claim = None
    if cmd.new_name is not None and cmd.new_name != cmd.name:
        new_claim = await unit.load(uk.UNIQUE_KEY, va.VARIABLE_NAME.aggregate_id(cmd.new_name))
    return va.decide_update_variable(cmd, claim, variable, new_claim, ctx)


async def delete_variable(unit: Unit, cmd: va.DeleteVariable, ctx: DecisionContext) -> Decision:
    claim, variable = await _by_name(unit, cmd.name)
    return va.decide_delete_variable(cmd, claim, variable, ctx)


def _names(*names: str | None) -> list[tuple[str, str]]:
    return [(uk.UNIQUE_KEY, va.VARIABLE_NAME.aggregate_id(n)) for n in names if n is not None]


def _variable_reply(variable: va.Variable) -> dict[str, Any]:
    return variable.reply()


def _nothing(_: Any) -> None:
    return None


COMMANDS = {
    "CreateVariable": CommandSpec(va.CreateVariable, create_variable, _variable_reply, lambda cmd: _names(cmd.name)),
    "UpdateVariable": CommandSpec(va.UpdateVariable, update_variable, _variable_reply,
                                  lambda cmd: _names(cmd.name, cmd.new_name)),
    "DeleteVariable": CommandSpec(va.DeleteVariable, delete_variable, _nothing, lambda cmd: _names(cmd.name)),
}
