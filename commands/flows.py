"""Flows: the named functions that deployments and runs belong to. A flow is created by name
and a second create of the same name returns the first (`created: false`, unchanged), as
Prefect's `POST /flows/` does; its name is a unique key (`commands/unique_keys.py`).

`Flow` is the one definition of a flow's shape: the aggregate's state, the payload of
`FlowCreated`, the read model's row and both replies (command and query).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from .bounds import JsonDocument, StoredText, UtcDatetime
from .decisions import Decision, NewEvent
from .events import register_event
from .messages import Command, DecisionContext, Event, not_found
from .names import MAX_NAME_LENGTH, check_object_name
from .unique_keys import FLOW_NAME, UniqueKeyClaim

FLOW = "flow"

FlowName = Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH), AfterValidator(check_object_name)]
Tag = Annotated[StoredText, StringConstraints(max_length=MAX_NAME_LENGTH)]
Tags = Annotated[list[Tag], Field(max_length=1_000)]


class Flow(BaseModel):
    """A flow, as stored, projected and answered (Prefect's field names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    created: UtcDatetime
    updated: UtcDatetime
    name: str
    tags: list[str] = []
    labels: dict[str, Any] = {}

    def reply(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class _FlowEvent(Event):
    aggregate_type: ClassVar[str] = FLOW


@register_event
class FlowCreated(_FlowEvent):
    event_type: ClassVar[str] = "FlowCreated"
    flow: Flow


@register_event
class FlowDeleted(_FlowEvent):
    event_type: ClassVar[str] = "FlowDeleted"
    flow_id: uuid.UUID
    name: str
    deleted: datetime


class CreateFlow(Command):
    name: FlowName
    tags: Tags = []
    labels: JsonDocument = {}


class DeleteFlow(Command):
    id: uuid.UUID


def evolve(flow: Flow | None, event: Event) -> Flow | None:
    match event:
        case FlowCreated(flow=created):
            return created
        case FlowDeleted():
            return None
    return flow


def flow_not_found(flow_id: uuid.UUID) -> Exception:
    return not_found(f"Flow {flow_id} not found.")


def decide_create_flow(cmd: CreateFlow, claim: UniqueKeyClaim, existing: Flow | None, ctx: DecisionContext) -> Decision:
    """A taken name answers with the flow that holds it, unchanged (`existing`: the claim's
    owner, loaded by the handler)."""
    if claim.owner_id is not None:
        if existing is None:  # the claim and its owner are written together; never apart
            raise RuntimeError(f"flow name {cmd.name!r} is claimed by {claim.owner_id}, which does not exist")
        return Decision(events=[], result=existing, created=False)
    flow = Flow(id=ctx.new_id(), created=ctx.now, updated=ctx.now, name=cmd.name, tags=list(dict.fromkeys(cmd.tags)),
                labels=cmd.labels)
    return Decision(
        events=[FLOW_NAME.claim(flow.id, flow.name), NewEvent(str(flow.id), FlowCreated(flow=flow))],
        result=flow, created=True, after={str(flow.id): flow},
    )


def decide_delete_flow(cmd: DeleteFlow, flow: Flow | None, claim: UniqueKeyClaim | None,
                       ctx: DecisionContext) -> Decision:
    """The name is free again at once: a later create of it makes a new flow."""
    if flow is None:
        raise flow_not_found(cmd.id)
    releases = [FLOW_NAME.release(flow.id, flow.name)] if claim is not None and claim.owner_id == flow.id else []
    return Decision(
        events=[*releases,
                NewEvent(str(flow.id), FlowDeleted(flow_id=flow.id, name=flow.name, deleted=ctx.now))],
        result=None,
    )
