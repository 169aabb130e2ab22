"""Task tag concurrency limits (Prefect's classic limits, `/concurrency_limits/`): at most
`concurrency_limit` task runs carrying a tag run at once (ten tasks that each hold one of a
database's ten connections), and `active_slots` names the runs that hold a slot.

One aggregate per tag, its id derived from the tag (`limit_id`): a task run's transition finds
the limits of its tags from the tags alone, one direct get each, with no index to keep; and a
create finds the tag's limit the same way, since Prefect's create is an upsert by tag (an
existing limit gets the new number and keeps its slots). The limit's own `id` is minted at its
creation, as Prefect's: a tag limited again after a delete is a new limit.

Slots are taken and given back with task-run states, in the same atomic batch, against the
limit's expected sequence, so two runs racing for the last slot cannot both land. The rule
that refuses a run is in `task_run_rules.py`; `slot_taken` and `slot_released` at the end of
this file are the events the task-run deciders append. Every event carries the whole limit
(its last event is its state).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from .bounds import NonNegativeInt32, UtcDatetime
from .decisions import Decision, NewEvent
from .events import register_event
from .flows import Tag
from .messages import Command, DecisionContext, Event, not_found
from .states import StateType
from .work_pools import Change

TAG_CONCURRENCY_LIMIT = "tag_concurrency_limit"

# The states in which a task run keeps the slots it took on entering RUNNING.
SLOT_STATES = frozenset({StateType.RUNNING, StateType.CANCELLING})

# How many runs a reset may name: every later event of the limit carries them all.
MAX_SLOT_OVERRIDE = 1_000


def limit_id(tag: str) -> str:
    """The aggregate id of a tag's limit: `tag-` and the first 40 hex digits of the SHA-256 of
    the tag, so any tag fits in a subject token."""
    return "tag-" + hashlib.sha256(tag.encode()).hexdigest()[:40]


class TagConcurrencyLimit(BaseModel):
    """A task tag concurrency limit: at most `concurrency_limit` task runs carrying `tag` run
    at once; `active_slots` lists the task runs holding a slot (Prefect's `ConcurrencyLimit`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    created: UtcDatetime
    updated: UtcDatetime
    tag: str
    concurrency_limit: int
    active_slots: list[uuid.UUID] = []

    def reply(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class _TagLimitEvent(Event):
    aggregate_type: ClassVar[str] = TAG_CONCURRENCY_LIMIT
    limit: TagConcurrencyLimit  # after the event (as it was, for a delete)


@register_event
class TagConcurrencyLimitCreated(_TagLimitEvent):
    """A tag got a concurrency limit."""

    event_type: ClassVar[str] = "TagConcurrencyLimitCreated"


@register_event
class TagConcurrencyLimitUpdated(_TagLimitEvent):
    """A create of a tag that has a limit changed its number; its slots are kept."""

    event_type: ClassVar[str] = "TagConcurrencyLimitUpdated"
    changes: dict[str, Change]


@register_event
class TagConcurrencyLimitReset(_TagLimitEvent):
    """The runs holding the tag's slots were replaced (by the override given, or by none)."""

    event_type: ClassVar[str] = "TagConcurrencyLimitReset"


@register_event
class TagConcurrencyLimitDeleted(_TagLimitEvent):
    """The tag's limit is gone; its runs hold nothing any more."""

    event_type: ClassVar[str] = "TagConcurrencyLimitDeleted"


@register_event
class TagConcurrencyLimitSlotTaken(_TagLimitEvent):
    """A task run carrying the tag entered RUNNING and took a slot."""

    event_type: ClassVar[str] = "TagConcurrencyLimitSlotTaken"
    task_run_id: uuid.UUID


@register_event
class TagConcurrencyLimitSlotReleased(_TagLimitEvent):
    """A task run gave its slot back: it left RUNNING and CANCELLING, or was deleted."""

    event_type: ClassVar[str] = "TagConcurrencyLimitSlotReleased"
    task_run_id: uuid.UUID


class CreateTagConcurrencyLimit(Command):
    """Limit how many task runs carrying `tag` run at once. A tag that has a limit already gets
    the new number and keeps the runs holding its slots (`created: false`)."""

    tag: Tag
    concurrency_limit: NonNegativeInt32


class DeleteTagConcurrencyLimit(Command):
    """Remove a tag's limit; the runs that held its slots hold nothing any more."""

    tag: Tag


class ResetTagConcurrencyLimit(Command):
    """Replace the runs holding a tag's slots by `slot_override` (none when not given): a way
    out when runs that ended without reporting still hold slots."""

    tag: Tag
    slot_override: Annotated[list[uuid.UUID], Field(max_length=MAX_SLOT_OVERRIDE)] | None = None


def evolve(limit: TagConcurrencyLimit | None, event: Event) -> TagConcurrencyLimit | None:
    match event:
        case TagConcurrencyLimitDeleted():
            return None
        case _TagLimitEvent(limit=after):
            return after
    return limit


def limit_not_found() -> Exception:
    return not_found("Concurrency limit not found")


# ---------------------------------------------------------------------------------------------
# Deciders: `existing` is the tag's limit, loaded by the handler from `limit_id(cmd.tag)`.


def decide_create_tag_concurrency_limit(cmd: CreateTagConcurrencyLimit, existing: TagConcurrencyLimit | None,
                                        ctx: DecisionContext) -> Decision:
    if existing is None:
        created = TagConcurrencyLimit(id=ctx.new_id(), created=ctx.now, updated=ctx.now, tag=cmd.tag,
                                      concurrency_limit=cmd.concurrency_limit)
        return Decision(events=[NewEvent(limit_id(cmd.tag), TagConcurrencyLimitCreated(limit=created))],
                        result=created, created=True, after={limit_id(cmd.tag): created})
    if existing.concurrency_limit == cmd.concurrency_limit:
        return Decision(events=[], result=existing, created=False)
    after = existing.model_copy(update={"concurrency_limit": cmd.concurrency_limit, "updated": ctx.now})
    changes = {"concurrency_limit": Change(old=existing.concurrency_limit, new=cmd.concurrency_limit)}
    return Decision(events=[NewEvent(limit_id(cmd.tag), TagConcurrencyLimitUpdated(limit=after, changes=changes))],
                    result=after, created=False, after={limit_id(cmd.tag): after})


def decide_delete_tag_concurrency_limit(cmd: DeleteTagConcurrencyLimit,
                                        existing: TagConcurrencyLimit | None) -> Decision:
    if existing is None:
        raise limit_not_found()
    return Decision(events=[NewEvent(limit_id(cmd.tag), TagConcurrencyLimitDeleted(limit=existing))])


def decide_reset_tag_concurrency_limit(cmd: ResetTagConcurrencyLimit, existing: TagConcurrencyLimit | None,
                                       ctx: DecisionContext) -> Decision:
    """Nothing is written when the slots are already those."""
    if existing is None:
        raise limit_not_found()
    slots = list(dict.fromkeys(cmd.slot_override or []))
    if slots == existing.active_slots:
        return Decision(events=[], result=existing)
    after = existing.model_copy(update={"active_slots": slots, "updated": ctx.now})
    return Decision(events=[NewEvent(limit_id(cmd.tag), TagConcurrencyLimitReset(limit=after))], result=after,
                    after={limit_id(cmd.tag): after})


# ---------------------------------------------------------------------------------------------
# Slots, for the task-run deciders: a run holds at most one slot of a limit, so taking one it
# holds, or giving back one it does not hold, changes nothing.


def slot_taken(limit: TagConcurrencyLimit, task_run_id: uuid.UUID) -> NewEvent | None:
    if task_run_id in limit.active_slots:
        return None
    after = limit.model_copy(update={"active_slots": [*limit.active_slots, task_run_id]})
    return NewEvent(limit_id(limit.tag), TagConcurrencyLimitSlotTaken(limit=after, task_run_id=task_run_id))


def slot_released(limit: TagConcurrencyLimit, task_run_id: uuid.UUID) -> NewEvent | None:
    if task_run_id not in limit.active_slots:
        return None
    after = limit.model_copy(update={"active_slots": [s for s in limit.active_slots if s != task_run_id]})
    return NewEvent(limit_id(limit.tag), TagConcurrencyLimitSlotReleased(limit=after, task_run_id=task_run_id))
