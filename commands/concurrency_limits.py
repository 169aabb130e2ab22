"""Global concurrency limits (Prefect's v2 concurrency limits, `/v2/concurrency_limits`): a
named number of slots that runs take and give back. A name is held by one limit at a time, as
a unique key (`commands/unique_keys.py`, scope `concurrency_limit_name`): a create of a taken
name is a `conflict`, as Prefect's 409. Updates and deletes address a limit by id or by name.

A deployment's `concurrency_limit` is a limit of this kind named `deployment:<deployment id>`
(BEHAVIOUR SL-7). The deployment decider writes it in its own decisions with the pure helpers
at the end of this file (`new_limit_events`, `update_limit_events`, `delete_limit_events`).

Taking and giving back slots comes with runs: `active_slots` is kept in the state for it, and
is 0 unless a create or update sets it (Prefect lets both do so).

`ConcurrencyLimit` is the one definition of a limit's shape: the aggregate's state, the
payload of its events, the read model's row and both replies (command and query).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from .bounds import NonNegativeInt32, UtcDatetime
from .decisions import Decision, NewEvent
from .events import register_event, register_upcaster
from .messages import Command, DecisionContext, Event, conflict, not_found
from .names import MAX_NAME_LENGTH, check_object_name
from .unique_keys import UniqueKeyClaim, UniqueKeyScope
from .work_pools import Change

CONCURRENCY_LIMIT = "concurrency_limit"
CONCURRENCY_LIMIT_NAME = UniqueKeyScope("concurrency_limit_name")

# Prefect's default for a limit's average slot occupancy (not settable through its API).
DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS = 2.0

LimitName = Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH), AfterValidator(check_object_name)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class ConcurrencyLimit(BaseModel):
    """A global concurrency limit, as stored, projected and answered (Prefect's
    `ConcurrencyLimitV2` field names and defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    created: UtcDatetime
    updated: UtcDatetime
    name: str
    limit: int
    active: bool = True
    active_slots: int = 0
    denied_slots: int = 0
    slot_decay_per_second: float = 0.0
    avg_slot_occupancy_seconds: float = DEFAULT_AVG_SLOT_OCCUPANCY_SECONDS

    def reply(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class _LimitEvent(Event):
    aggregate_type: ClassVar[str] = CONCURRENCY_LIMIT


@register_event
class ConcurrencyLimitCreated(_LimitEvent):
    event_type: ClassVar[str] = "ConcurrencyLimitCreated"
    limit: ConcurrencyLimit


@register_event
class ConcurrencyLimitUpdated(_LimitEvent):
    event_type: ClassVar[str] = "ConcurrencyLimitUpdated"
    limit: ConcurrencyLimit  # after the update
    changes: dict[str, Change]


@register_event
class ConcurrencyLimitDeleted(_LimitEvent):
    event_type: ClassVar[str] = "ConcurrencyLimitDeleted"
    limit: ConcurrencyLimit  # as it was: Prefect's `prefect.concurrency-limit.deleted` carries it


@register_event
class ConcurrencyLimitSlotTaken(_LimitEvent):
    """A run took a slot of a global limit: a flow run of a deployment's when it entered
    PENDING (`flow_run_id`, `lease_id`), or a task run one of a `tag:<tag>` limit when it
    entered RUNNING (`task_run_id`; `tag_concurrency_limits.global_slot_taken`)."""

    event_type: ClassVar[str] = "ConcurrencyLimitSlotTaken"
    # v2: `flow_run_id` and `lease_id` may be null, and `task_run_id` was added (task runs
    # take slots of `tag:<tag>` limits); a v1 event is a flow run's, read as it is.
    schema_version: ClassVar[int] = 2
    limit: ConcurrencyLimit  # after: `active_slots` counts it
    flow_run_id: uuid.UUID | None = None
    lease_id: uuid.UUID | None = None
    task_run_id: uuid.UUID | None = None


@register_event
class ConcurrencyLimitSlotReleased(_LimitEvent):
    """A run gave its slot back (the same runs as `ConcurrencyLimitSlotTaken`)."""

    event_type: ClassVar[str] = "ConcurrencyLimitSlotReleased"
    schema_version: ClassVar[int] = 2  # as `ConcurrencyLimitSlotTaken`
    limit: ConcurrencyLimit  # after
    flow_run_id: uuid.UUID | None = None
    lease_id: uuid.UUID | None = None
    task_run_id: uuid.UUID | None = None


@register_upcaster("ConcurrencyLimitSlotTaken", 1)
@register_upcaster("ConcurrencyLimitSlotReleased", 1)
def _slot_event_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 only made the flow run's fields optional and added `task_run_id`: a v1 payload (a
    flow run's slot) reads as it is."""
    return payload


class CreateConcurrencyLimit(Command):
    """Prefect's `ConcurrencyLimitV2Create`."""

    name: LimitName
    limit: NonNegativeInt32
    active: bool = True
    active_slots: NonNegativeInt32 = 0
    denied_slots: NonNegativeInt32 = 0
    slot_decay_per_second: NonNegativeFloat = 0.0


class _ByIdOrName(Command):
    """A limit by `id` or by `name`: exactly one of them."""

    id: uuid.UUID | None = None
    name: LimitName | None = None

    @model_validator(mode="after")
    def _one_of_id_or_name(self) -> _ByIdOrName:
        if (self.id is None) == (self.name is None):
            raise ValueError("give either id or name (exactly one)")
        return self


class UpdateConcurrencyLimit(_ByIdOrName):
    """Prefect's `ConcurrencyLimitV2Update`, partial (only the fields given change): `new_name` renames (Prefect's body
    `name`); a null leaves a field as it is (none of them may be null)."""

    new_name: LimitName | None = None
    limit: NonNegativeInt32 | None = None
    active: bool | None = None
    active_slots: NonNegativeInt32 | None = None
    denied_slots: NonNegativeInt32 | None = None
    slot_decay_per_second: NonNegativeFloat | None = None


class DeleteConcurrencyLimit(_ByIdOrName):
    pass


_UPDATE_FIELDS = ("limit", "active", "active_slots", "denied_slots", "slot_decay_per_second")


def evolve(limit: ConcurrencyLimit | None, event: Event) -> ConcurrencyLimit | None:
    match event:
        case (ConcurrencyLimitCreated(limit=created) | ConcurrencyLimitUpdated(limit=created)
              | ConcurrencyLimitSlotTaken(limit=created) | ConcurrencyLimitSlotReleased(limit=created)):
            return created
        case ConcurrencyLimitDeleted():
            return None
    return limit


def limit_not_found(what: uuid.UUID | str) -> Exception:
    return not_found(f"Concurrency limit {what!r} not found." if isinstance(what, str)
                     else f"Concurrency limit {what} not found.")


def name_taken(name: str) -> Exception:
    return conflict(f"A concurrency limit with the name {name!r} already exists.")


# ---------------------------------------------------------------------------------------------
# Pure helpers: the events of one change to a limit, for this file's deciders and for other
# aggregates' (a deployment's limit). Every aggregate these events touch must have been loaded
# by the caller's handler, for its expected sequence: the name's claim
# (`unit.load(UNIQUE_KEY, CONCURRENCY_LIMIT_NAME.aggregate_id(name))`, also before a create: a
# name released earlier has events) and, to update or delete, the limit itself. The caller's
# `CommandSpec.locks` should name the claim too.

def new_limit_events(limit_id: uuid.UUID, name: str, limit: int, ctx: DecisionContext,
                     **fields: Any) -> list[NewEvent]:
    """Claim `name` and create the limit (Prefect's defaults, or `fields`). The caller has
    loaded the name's claim and found it free (`owner_id is None`; else `name_taken(name)`):
    the claim's expected sequence makes a racing create of the same name lose."""
    created = ConcurrencyLimit(id=limit_id, created=ctx.now, updated=ctx.now, name=name, limit=limit, **fields)
    return [CONCURRENCY_LIMIT_NAME.claim(limit_id, name), NewEvent(str(limit_id), ConcurrencyLimitCreated(limit=created))]


def changed_limit_events(existing: ConcurrencyLimit, values: dict[str, Any],
                         ctx: DecisionContext) -> list[NewEvent]:
    """The events that set `values` on `existing` (none when nothing changes). A new `name`
    releases the old one's claim and claims the new one: the caller has checked it is free."""
    changes = {k: Change(old=getattr(existing, k), new=v) for k, v in values.items() if getattr(existing, k) != v}
    if not changes:
        return []
    events: list[NewEvent] = []
    if "name" in changes:
        events += [CONCURRENCY_LIMIT_NAME.release(existing.id, existing.name),
                   CONCURRENCY_LIMIT_NAME.claim(existing.id, values["name"])]
    after = existing.model_copy(update={**{k: values[k] for k in changes}, "updated": ctx.now})
    events.append(NewEvent(str(existing.id), ConcurrencyLimitUpdated(limit=after, changes=changes)))
    return events


def update_limit_events(existing: ConcurrencyLimit, limit: int, ctx: DecisionContext) -> list[NewEvent]:
    """Set the number of slots (a deployment's `concurrency_limit` changed); none when equal."""
    return changed_limit_events(existing, {"limit": limit}, ctx)


def delete_limit_events(limit: ConcurrencyLimit) -> list[NewEvent]:
    """Release the name and delete the limit."""
    return [CONCURRENCY_LIMIT_NAME.release(limit.id, limit.name),
            NewEvent(str(limit.id), ConcurrencyLimitDeleted(limit=limit))]


def limit_after(events: list[NewEvent], limit_id: uuid.UUID) -> ConcurrencyLimit | None:
    """The limit's state after `events` (for `Decision.after`), when they change it."""
    state = None
    for new in events:
        if new.aggregate_id == str(limit_id) and isinstance(new.event, ConcurrencyLimitCreated | ConcurrencyLimitUpdated):
            state = new.event.limit
    return state


# ---------------------------------------------------------------------------------------------
# Deciders

def decide_create_concurrency_limit(cmd: CreateConcurrencyLimit, claim: UniqueKeyClaim,
                                    ctx: DecisionContext) -> Decision:
    if claim.owner_id is not None:
        raise name_taken(cmd.name)
    fields = cmd.model_dump(include={"active", "active_slots", "denied_slots", "slot_decay_per_second"})
    limit_id = ctx.new_id()
    events = new_limit_events(limit_id, cmd.name, cmd.limit, ctx, **fields)
    created = limit_after(events, limit_id)
    assert created is not None
    return Decision(events=events, result=created, created=True, after={str(created.id): created})


def _found(cmd: _ByIdOrName, limit: ConcurrencyLimit | None) -> ConcurrencyLimit:
    """`limit`: loaded by the handler by id, or through the name's claim (None: unclaimed)."""
    if limit is None:
        raise limit_not_found(cmd.id if cmd.id is not None else cmd.name or "")
    return limit


def decide_update_concurrency_limit(cmd: UpdateConcurrencyLimit, limit: ConcurrencyLimit | None,
                                    new_claim: UniqueKeyClaim | None, ctx: DecisionContext) -> Decision:
    """`new_claim`: the key of `cmd.new_name` when it renames, loaded by the handler."""
    current = _found(cmd, limit)
    values = {k: getattr(cmd, k) for k in _UPDATE_FIELDS if getattr(cmd, k) is not None}
    if cmd.new_name is not None and cmd.new_name != current.name:
        if new_claim is None:
            raise RuntimeError("a rename decides with the new name's claim")
        if new_claim.owner_id is not None:
            raise name_taken(cmd.new_name)
        values["name"] = cmd.new_name
    events = changed_limit_events(current, values, ctx)
    after = limit_after(events, current.id) or current
    return Decision(events=events, result=after, after={str(current.id): after} if events else {})


def decide_delete_concurrency_limit(cmd: DeleteConcurrencyLimit, limit: ConcurrencyLimit | None,
                                    ctx: DecisionContext) -> Decision:
    """The name is free again at once."""
    return Decision(events=delete_limit_events(_found(cmd, limit)), result=None)
