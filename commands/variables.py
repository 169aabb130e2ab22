"""Variables: named JSON values that flows read at run time (Prefect's `Variable`; parameter
hydration's `workspace_variable`, BEHAVIOUR DP-13). A name is held by one variable at a time,
as a unique key (`commands/unique_keys.py`, scope `variable_name`): a create of a taken name
is a `conflict`, as Prefect's 409. Variables are addressed by name for updates and deletes
(Prefect's `/variables/name/{name}`), by id or name for reads.

`Variable` is the one definition of a variable's shape: the aggregate's state, the payload of
its events, the read model's row and both replies (command and query).
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from .bounds import StoredText, UtcDatetime, check_json_document
from .decisions import Decision, NewEvent
from .events import register_event
from .messages import Command, DecisionContext, Event, conflict, not_found
from .unique_keys import UniqueKeyClaim, UniqueKeyScope
from .work_pools import Change

VARIABLE = "variable"
VARIABLE_NAME = UniqueKeyScope("variable_name")

# Prefect's MAX_VARIABLE_NAME_LENGTH and MAX_VARIABLE_VALUE_LENGTH.
MAX_VARIABLE_NAME_LENGTH = 255
MAX_VARIABLE_VALUE_LENGTH = 5000


def check_variable_name(value: str) -> str:
    """Prefect's rule (`raise_on_name_alphanumeric_dashes_underscores_only`): lowercase
    letters, digits, `-` and `_` only; like Prefect, the empty name is allowed."""
    if not all(c in "abcdefghijklmnopqrstuvwxyz0123456789-_" for c in value):
        raise ValueError("Variable name must only contain lowercase letters, numbers, and dashes or underscores.")
    return value


def check_variable_value(value: Any) -> Any:
    """Any JSON (Prefect's `StrictVariableValue`), at most 5000 characters as compact JSON,
    and storable by the read model's `jsonb` (no NUL, finite numbers; commands/bounds.py)."""
    check_json_document({"value": value})
    if value is not None and len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()) > MAX_VARIABLE_VALUE_LENGTH:
        raise ValueError(f"Variable value must be less than {MAX_VARIABLE_VALUE_LENGTH} characters")
    return value


VariableName = Annotated[str, StringConstraints(max_length=MAX_VARIABLE_NAME_LENGTH), AfterValidator(check_variable_name)]
VariableValue = Annotated[Any, AfterValidator(check_variable_value)]
Tag = Annotated[StoredText, StringConstraints(max_length=MAX_VARIABLE_NAME_LENGTH)]
Tags = Annotated[list[Tag], Field(max_length=1_000)]


class Variable(BaseModel):
    """A variable, as stored, projected and answered (Prefect's field names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    created: UtcDatetime
    updated: UtcDatetime
    name: str
    value: Any = None
    tags: list[str] = []

    def reply(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class _VariableEvent(Event):
    aggregate_type: ClassVar[str] = VARIABLE


@register_event
class VariableCreated(_VariableEvent):
    event_type: ClassVar[str] = "VariableCreated"
    variable: Variable


@register_event
class VariableUpdated(_VariableEvent):
    event_type: ClassVar[str] = "VariableUpdated"
    variable: Variable  # after the update
    changes: dict[str, Change]


@register_event
class VariableDeleted(_VariableEvent):
    event_type: ClassVar[str] = "VariableDeleted"
    variable: Variable  # as it was: Prefect's `prefect.variable.deleted` carries its value


class CreateVariable(Command):
    name: VariableName
    value: VariableValue
    tags: Tags = []


class UpdateVariable(Command):
    """Partial: only the fields given change. `new_name` renames (Prefect's body `name`); an
    explicit null `value` stores null, a null `new_name` or `tags` leaves them."""

    name: VariableName
    new_name: VariableName | None = None
    value: VariableValue = None
    tags: Tags | None = None


class DeleteVariable(Command):
    name: VariableName


def evolve(variable: Variable | None, event: Event) -> Variable | None:
    match event:
        case VariableCreated(variable=created) | VariableUpdated(variable=created):
            return created
        case VariableDeleted():
            return None
    return variable


def variable_not_found(what: uuid.UUID | str) -> Exception:
    return not_found(f"Variable {what!r} not found." if isinstance(what, str) else f"Variable {what} not found.")


def name_taken(name: str) -> Exception:
    return conflict(f"A variable with the name {name!r} already exists.")


def _owned(claim: UniqueKeyClaim, variable: Variable | None, name: str) -> Variable | None:
    """The variable that holds `name`, or None: the claim and its owner are written together."""
    if claim.owner_id is None:
        return None
    if variable is None or variable.id != claim.owner_id:
        raise RuntimeError(f"variable name {name!r} is claimed by {claim.owner_id}, which was not loaded")
    return variable


def decide_create_variable(cmd: CreateVariable, claim: UniqueKeyClaim, ctx: DecisionContext) -> Decision:
    if claim.owner_id is not None:
        raise name_taken(cmd.name)
    variable = Variable(id=ctx.new_id(), created=ctx.now, updated=ctx.now, name=cmd.name, value=cmd.value,
                        tags=list(cmd.tags))
    return Decision(
        events=[VARIABLE_NAME.claim(variable.id, variable.name),
                NewEvent(str(variable.id), VariableCreated(variable=variable))],
        result=variable, created=True, after={str(variable.id): variable},
    )


def decide_update_variable(cmd: UpdateVariable, claim: UniqueKeyClaim, variable: Variable | None,
                           new_claim: UniqueKeyClaim | None, ctx: DecisionContext) -> Decision:
    """`claim`: the key of `cmd.name`, `variable` its owner; `new_claim`: the key of
    `cmd.new_name` when it renames. A rename releases the old name and claims the new one in
    the same batch, so no other variable can take either meanwhile."""
    current = _owned(claim, variable, cmd.name)
    if current is None:
        raise variable_not_found(cmd.name)
    given = cmd.explicitly_set()
    values: dict[str, Any] = {}
    if "value" in given:
        values["value"] = cmd.value
    if cmd.tags is not None:
        values["tags"] = list(cmd.tags)
    if cmd.new_name is not None:
        values["name"] = cmd.new_name
    changes = {k: Change(old=getattr(current, k), new=v) for k, v in values.items() if getattr(current, k) != v}
    if not changes:
        return Decision(events=[], result=current)
    events: list[NewEvent] = []
    if "name" in changes:
        if new_claim is None:
            raise RuntimeError("a rename decides with the new name's claim")
        if new_claim.owner_id is not None:
            raise name_taken(cmd.new_name or "")
        events += [VARIABLE_NAME.release(current.id, current.name), VARIABLE_NAME.claim(current.id, values["name"])]
    updated = current.model_copy(update={**values, "updated": ctx.now})
    events.append(NewEvent(str(current.id), VariableUpdated(variable=updated, changes=changes)))
    return Decision(events=events, result=updated, after={str(current.id): updated})


def decide_delete_variable(cmd: DeleteVariable, claim: UniqueKeyClaim, variable: Variable | None,
                           ctx: DecisionContext) -> Decision:
    """The name is free again at once: a later create of it makes a new variable."""
    current = _owned(claim, variable, cmd.name)
    if current is None:
        raise variable_not_found(cmd.name)
    return Decision(
        events=[VARIABLE_NAME.release(current.id, current.name),
                NewEvent(str(current.id), VariableDeleted(variable=current))],
        result=None,
    )
