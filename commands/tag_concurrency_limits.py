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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from . import concurrency_limits as cl
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


# ---------------------------------------------------------------------------------------------
# Global limits named `tag:<tag>` (Prefect 3's way to limit a tag): when one is active it holds
# task runs carrying the tag back instead of the tag's classic limit above. Its slots are a
# count (`ConcurrencyLimit.active_slots`, which other users of the limit share), so the task
# runs holding one are kept beside it, in an aggregate of their own per limit
# (`GlobalTagSlots`, id `tagslots-<limit id>`): a run takes at most one slot per limit and
# gives back only one it holds, and slots whose run is gone can be found and given back
# (`decide_release_gone_tag_slots`). Both are written in the same atomic batch as the run's
# state, like the classic limit's slots.

GLOBAL_TAG_SLOTS = "global_tag_slots"
GLOBAL_TAG_PREFIX = "tag:"


def global_limit_name(tag: str) -> str:
    """The name of the global limit that limits `tag`."""
    return GLOBAL_TAG_PREFIX + tag


def global_slots_id(limit_id: uuid.UUID) -> str:
    """The aggregate id of the task runs holding slots of the global limit `limit_id` (not the
    limit's own id: one decision writes both, and `Decision.after` is keyed by id alone)."""
    return f"tagslots-{limit_id}"


class GlobalTagSlots(BaseModel):
    """The task runs holding a slot of a global limit named `tag:<tag>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit_id: uuid.UUID
    task_run_ids: list[uuid.UUID] = []


class _GlobalTagSlotEvent(Event):
    aggregate_type: ClassVar[str] = GLOBAL_TAG_SLOTS
    slots: GlobalTagSlots  # after the event
    task_run_id: uuid.UUID


@register_event
class GlobalTagSlotTaken(_GlobalTagSlotEvent):
    """A task run carrying the tag entered RUNNING and took a slot of the tag's global limit
    (with the limit's `ConcurrencyLimitSlotTaken`)."""

    event_type: ClassVar[str] = "GlobalTagSlotTaken"


@register_event
class GlobalTagSlotReleased(_GlobalTagSlotEvent):
    """A task run gave its slot back (with the limit's `ConcurrencyLimitSlotReleased`): it left
    RUNNING and CANCELLING, was deleted, or is gone with its flow run."""

    event_type: ClassVar[str] = "GlobalTagSlotReleased"


def evolve_global_slots(slots: GlobalTagSlots | None, event: Event) -> GlobalTagSlots | None:
    if isinstance(event, _GlobalTagSlotEvent):
        return event.slots
    return slots


@dataclass(frozen=True)
class GlobalTagLimit:
    """A global limit named `tag:<tag>`, as a task run's rules read it: the limit and the task
    runs holding its slots (loaded by the handler from `global_slots_id(limit.id)`)."""

    limit: cl.ConcurrencyLimit
    holders: GlobalTagSlots

    @property
    def governs(self) -> bool:
        """Whether it holds runs back (and replaces the tag's classic limit): while active."""
        return self.limit.active

    def holds(self, task_run_id: uuid.UUID) -> bool:
        return task_run_id in self.holders.task_run_ids

    def full_for(self, task_run_id: uuid.UUID) -> bool:
        """No slot for this run: it holds none, and the taken ones reach the limit."""
        return not self.holds(task_run_id) and self.limit.active_slots >= self.limit.limit

    @property
    def occupancy(self) -> float:
        return self.limit.active_slots / self.limit.limit if self.limit.limit else float("inf")


def global_slot_taken(limit: GlobalTagLimit, task_run_id: uuid.UUID) -> list[NewEvent]:
    """A slot taken by a run that holds none of this limit (none when it holds one)."""
    if limit.holds(task_run_id):
        return []
    after = limit.limit.model_copy(update={"active_slots": limit.limit.active_slots + 1})
    holders = limit.holders.model_copy(update={"task_run_ids": [*limit.holders.task_run_ids, task_run_id]})
    return [NewEvent(str(after.id), cl.ConcurrencyLimitSlotTaken(limit=after, task_run_id=task_run_id)),
            NewEvent(global_slots_id(after.id), GlobalTagSlotTaken(slots=holders, task_run_id=task_run_id))]


def global_slot_released(limit: GlobalTagLimit, task_run_id: uuid.UUID) -> list[NewEvent]:
    """The run's slot given back, whether the limit is active or not (none when it holds none).
    The count never drops below 0: an update may have set it lower meanwhile."""
    if not limit.holds(task_run_id):
        return []
    return _released(limit, [task_run_id])


def _released(limit: GlobalTagLimit, task_run_ids: list[uuid.UUID]) -> list[NewEvent]:
    """Each run's slot given back, one pair of events per run (each names its run)."""
    events: list[NewEvent] = []
    current, holders = limit.limit, limit.holders
    for task_run_id in task_run_ids:
        current = current.model_copy(update={"active_slots": max(0, current.active_slots - 1)})
        holders = holders.model_copy(update={"task_run_ids": [r for r in holders.task_run_ids if r != task_run_id]})
        events += [NewEvent(str(current.id), cl.ConcurrencyLimitSlotReleased(limit=current, task_run_id=task_run_id)),
                   NewEvent(global_slots_id(current.id), GlobalTagSlotReleased(slots=holders, task_run_id=task_run_id))]
    return events


def global_limits_after(limits: Mapping[str, GlobalTagLimit], events: Iterable[NewEvent]) -> dict[str, GlobalTagLimit]:
    """`limits` as `events` (a decision's) leave them: the limit and its holders each slot
    event carries after it (a second state copied onto one task run in one decision decides
    against the first one's slots)."""
    by_id = {g.limit.id: tag for tag, g in limits.items()}
    out = dict(limits)
    for new in events:
        event = new.event
        if isinstance(event, cl.ConcurrencyLimitSlotTaken | cl.ConcurrencyLimitSlotReleased) and event.limit.id in by_id:
            tag = by_id[event.limit.id]
            out[tag] = GlobalTagLimit(event.limit, out[tag].holders)
        elif isinstance(event, _GlobalTagSlotEvent) and event.slots.limit_id in by_id:
            tag = by_id[event.slots.limit_id]
            out[tag] = GlobalTagLimit(out[tag].limit, event.slots)
    return out


# ---------------------------------------------------------------------------------------------
# Slots whose task run is gone: a flow run's deletion takes its task runs with it without an
# event of theirs, so the slots its running tasks held would stay taken for ever. The foreman
# finds such holders on the read models and sends this command; the decider gives back only
# the slots whose run the handler found, on the log, gone or no longer running.

MAX_GONE_HOLDERS = 1_000


class ReleaseTagSlotsOfGoneTaskRuns(Command):
    """Give back the slots of `tag`'s limits (its classic one and its global `tag:<tag>` one)
    held by task runs that no longer exist (deleted, or gone with their flow run) or are no
    longer RUNNING or CANCELLING. `task_run_ids`: the holders to check (the foreman's
    candidates); none given: every holder of the tag's limits. A holder still running keeps
    its slot, whatever the sender believed."""

    tag: Tag
    task_run_ids: Annotated[list[uuid.UUID], Field(max_length=MAX_GONE_HOLDERS)] | None = None


def holders_to_check(cmd: ReleaseTagSlotsOfGoneTaskRuns, limit: TagConcurrencyLimit | None,
                     global_limit: GlobalTagLimit | None) -> list[uuid.UUID]:
    """The holders of the tag's slots the command asks about (in the order the limits list
    them): the handler reads each of them from the log."""
    held = [*(limit.active_slots if limit is not None else []),
            *(global_limit.holders.task_run_ids if global_limit is not None else [])]
    asked = set(cmd.task_run_ids) if cmd.task_run_ids is not None else None
    return [r for r in dict.fromkeys(held) if asked is None or r in asked]


def decide_release_gone_tag_slots(cmd: ReleaseTagSlotsOfGoneTaskRuns, limit: TagConcurrencyLimit | None,
                                  global_limit: GlobalTagLimit | None,
                                  states: Mapping[uuid.UUID, StateType | None]) -> Decision:
    """`states`: the state type of each holder to check (`holders_to_check`), as the handler
    read it from the log after the limits, None for a run that is gone. A holder in RUNNING or
    CANCELLING, or not read, keeps its slot; the result names the runs whose slots were given
    back. Nothing is written when none was."""
    gone = [r for r in holders_to_check(cmd, limit, global_limit) if r in states and states[r] not in SLOT_STATES]
    events: list[NewEvent] = []
    if limit is not None:
        current: TagConcurrencyLimit = limit
        for task_run_id in gone:
            released = slot_released(current, task_run_id)
            if released is not None:
                events.append(released)
                assert isinstance(released.event, _TagLimitEvent)
                current = released.event.limit
    if global_limit is not None:
        events += _released(global_limit, [r for r in gone if global_limit.holds(r)])
    return Decision(events=events, result={"released": [str(r) for r in gone]})


# A notice's `freed` for a limit that no longer holds anything back (deleted, or a global one
# made inactive): every run waiting for the tag may start (a worker wakes at most this many).
EVERY_WAITER = 10_000


def _governed_tag(limit_name: str) -> str | None:
    """The tag a global limit of this name holds back (`tag:<tag>`), if any."""
    return limit_name[len(GLOBAL_TAG_PREFIX):] if limit_name.startswith(GLOBAL_TAG_PREFIX) else None


def room_made(events: Iterable[NewEvent]) -> dict[str, int]:
    """The tags whose limits have more room after these events (a decision's), with how many
    more runs may start: what the service announces to the task workers that keep runs waiting
    for a tag (handlers/task_dispatch.py), so that those start at once rather than after their
    WAIT's delay (10 s for a classic limit).

    Slots given back: a classic limit's `TagConcurrencyLimitSlotReleased`, and a global
    `tag:<tag>` limit's `ConcurrencyLimitSlotReleased` (written with its `GlobalTagSlotReleased`,
    which names the limit only by id), whatever released them (a run leaving RUNNING, a deleted
    run, a subflow's state copied onto its parent task run, the foreman's
    `ReleaseTagSlotsOfGoneTaskRuns`). And an operator's change that makes room: a limit raised,
    its slots reset, a global one created with room (it replaces the classic one), made
    inactive or renamed away from `tag:<tag>`, or either kind deleted."""
    freed: dict[str, int] = {}

    def add(tag: str, count: int) -> None:
        if count > 0:
            freed[tag] = min(EVERY_WAITER, freed.get(tag, 0) + count)

    for new in events:
        match new.event:
            case TagConcurrencyLimitSlotReleased(limit=limit):
                add(limit.tag, 1)
            case TagConcurrencyLimitUpdated(limit=limit) | TagConcurrencyLimitReset(limit=limit):
                add(limit.tag, limit.concurrency_limit - len(limit.active_slots))
            case TagConcurrencyLimitDeleted(limit=limit):
                add(limit.tag, EVERY_WAITER)
            case cl.ConcurrencyLimitSlotReleased(limit=glimit) if (tag := _governed_tag(glimit.name)) is not None:
                add(tag, 1)
            case cl.ConcurrencyLimitCreated(limit=glimit) if (tag := _governed_tag(glimit.name)) is not None:
                # It replaces the tag's classic limit, which may have been the full one.
                add(tag, glimit.limit - glimit.active_slots if glimit.active else 0)
            case cl.ConcurrencyLimitUpdated(limit=glimit, changes=changes):
                tag = _governed_tag(glimit.name)
                before = _governed_tag(changes["name"].old) if "name" in changes else tag
                if before is not None and before != tag:
                    add(before, EVERY_WAITER)  # renamed away: it no longer holds that tag back
                if tag is not None:
                    add(tag, glimit.limit - glimit.active_slots if glimit.active else EVERY_WAITER)
            case cl.ConcurrencyLimitDeleted(limit=glimit) if (tag := _governed_tag(glimit.name)) is not None:
                add(tag, EVERY_WAITER)
    return freed
