"""A runner's poll of deployments (BEHAVIOUR DP-17, ST-3), recorded as the pool poll is: the
service answers `GetScheduledFlowRunsForDeployments` from the read model, then sends
`RecordDeploymentsPolled`, one command and one event per poll whatever the number of
deployments. The deployments become READY with `last_polled` in the read model; the
deployment aggregate is not written, so their `updated` stays as it was (Prefect keeps it so
that a poll does not look like a change to the scheduler).

A deployment's status is a read-side fact (as a queue poll's effect on deployments is), so the
poll has an aggregate of its own, one per set of deployments polled (`poll_id`): a runner
polls the same set again and again, and its polls take turns there, as Prefect keys its
`mark_deployments_ready` task by the sorted ids. The foreman's NOT_READY of deployments
without a queue (no pool to record it in) lives there too.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar

from pydantic import Field

from . import messages, work_pools
from .bounds import UtcDatetime
from .decisions import Decision, NewEvent
from .deployments import Deployment
from .events import register_event, register_upcaster
from .messages import Command, DecisionContext, Event
from .work_pools import last_polled_of

DEPLOYMENT_POLL = "deployment_poll"
# A runner serves a handful of deployments; a poll's record loads each one it names.
MAX_DEPLOYMENTS_PER_POLL = 1000
_POLL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "runledger:deployment-poll")


def poll_id(deployment_ids: list[uuid.UUID]) -> str:
    """The aggregate of a set of deployments as a command names them: the same set, in any
    order, is the same one."""
    return str(uuid.uuid5(_POLL_NAMESPACE, ",".join(sorted({str(i) for i in deployment_ids}))))


class _PollEvent(Event):
    aggregate_type: ClassVar[str] = DEPLOYMENT_POLL


@register_event
class DeploymentsPolled(_PollEvent):
    """A runner polled these deployments at `polled`: each becomes READY with `last_polled`. A
    `routine` poll (every one was READY already as the service read them when it answered)
    changes no status: it moves the `last_polled` of the READY ones only, and expires from the
    log (`Settings.routine_retention_seconds`), but not before they would be marked NOT_READY
    without a newer poll: by then a newer poll, or the foreman's not-ready event (kept, with
    each deployment's last poll), says what it said. A runner polls every 10 s or so: ~8,600
    events a day each, for ever, without this."""

    event_type: ClassVar[str] = "DeploymentsPolled"
    schema_version: ClassVar[int] = 2
    deployment_ids: list[uuid.UUID]
    polled: datetime
    routine: bool = False

    def expires_no_sooner_than(self) -> float | None:
        if not self.routine:
            return None
        return work_pools.NOT_READY_AFTER.total_seconds() + messages.EXPIRY_MARGIN_SECONDS


@register_upcaster("DeploymentsPolled", 1)
def _deployments_polled_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 added `routine`; a v1 poll was kept for ever and made its deployments READY, which the
    default (False) means."""
    return payload


@register_event
class QueuelessDeploymentsNotReady(_PollEvent):
    """The deployments without a queue that were READY and last polled more than 60 seconds
    before `checked` become NOT_READY; `deployment_ids` are the candidates, the read model
    keeps only those still READY, stale and without a queue. `last_polled`: each one's last
    poll (absent before v2: `work_pools.last_polled_of`)."""

    event_type: ClassVar[str] = "QueuelessDeploymentsNotReady"
    schema_version: ClassVar[int] = 2
    deployment_ids: list[uuid.UUID]
    checked: datetime
    last_polled: dict[uuid.UUID, datetime] = {}


@register_upcaster("QueuelessDeploymentsNotReady", 1)
def _queueless_not_ready_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 added `last_polled`; empty (leave the deployments' as they are) is what v1 meant."""
    return payload


class RecordDeploymentsPolled(Command):
    """A runner polled these deployments (unknown ids are ignored): sent by the service after
    it answers the poll. `all_ready`: every one was READY as the service read them when it
    answered, so the poll moves nothing but their last poll (a routine poll, which leaves the
    log after a while)."""

    deployment_ids: Annotated[list[uuid.UUID], Field(min_length=1, max_length=MAX_DEPLOYMENTS_PER_POLL)]
    all_ready: bool = False


class MarkQueuelessDeploymentsNotReady(Command):
    """The foreman's: READY deployments without a queue, polled more than 60 s ago, become
    NOT_READY (those that have a queue, or are gone, are left alone)."""

    deployment_ids: Annotated[list[uuid.UUID], Field(min_length=1, max_length=MAX_DEPLOYMENTS_PER_POLL)]
    # Each one's last poll as the foreman read it (`QueuelessDeploymentsNotReady.last_polled`).
    last_polled: Annotated[dict[uuid.UUID, UtcDatetime], Field(max_length=MAX_DEPLOYMENTS_PER_POLL)] = {}


def evolve(state: Any, event: Event) -> None:
    """Nothing to remember: a poll's aggregate is loaded only for its expected sequence."""
    return None


def _existing(ids: list[uuid.UUID], found: Mapping[uuid.UUID, Deployment | None]) -> list[uuid.UUID]:
    return [i for i in dict.fromkeys(ids) if found.get(i) is not None]


def decide_record_polls(cmd: RecordDeploymentsPolled, found: Mapping[uuid.UUID, Deployment | None],
                        ctx: DecisionContext) -> Decision:
    """Every deployment that exists is polled now; unknown ids are ignored, as Prefect's update
    matches no row for them."""
    ids = _existing(cmd.deployment_ids, found)
    if not ids:
        return Decision(events=[], result=None)
    event = DeploymentsPolled(deployment_ids=ids, polled=ctx.now, routine=cmd.all_ready)
    return Decision(events=[NewEvent(poll_id(cmd.deployment_ids), event)], result=None)


def decide_mark_queueless_not_ready(cmd: MarkQueuelessDeploymentsNotReady,
                                    found: Mapping[uuid.UUID, Deployment | None], ctx: DecisionContext) -> Decision:
    """Only deployments without a queue (a deleted one counts as none: `found` holds them as
    `without_deleted_queue` leaves them): one with a queue is the pool's to mark, with its
    queue's last poll. Whether each is still READY and stale is the read model's to check."""
    ids = [i for i in dict.fromkeys(cmd.deployment_ids)
           if (d := found.get(i)) is not None and d.work_queue_id is None]
    if not ids:
        return Decision(events=[], result=None)
    event = QueuelessDeploymentsNotReady(deployment_ids=ids, checked=ctx.now,
                                         last_polled=last_polled_of(ids, cmd.last_polled, ctx.now))
    return Decision(events=[NewEvent(poll_id(cmd.deployment_ids), event)], result=None)
