"""Why a scheduled flow run is not handed to a worker now, when no refused claim said so.

A run's stored `waiting_reason` is written only by a claim its limits refused; but the pool
poll (projections/scheduled_runs.py) leaves out runs of paused pools and queues, of queues and
pools at their limits and of deployments at theirs, so no worker ever tries to claim them
and nothing says why they wait (Prefect #12035). `why_waiting` answers from the read models'
facts, at query time: nothing is written, so the read models stay a replay of the log. It
reads the facts as the poll reads them (the same counts, the same exemptions), so each reason
is one the poll acts on, and it words them as the claim's refusals do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .flow_runs import FlowRun
from .orchestration_rules import DEPLOYMENT_LIMIT_REACHED
from .states import StateType
from .work_pools import NOT_READY_AFTER


@dataclass(frozen=True)
class QueueFacts:
    """The run's queue and pool as the poll sees them. `*_slots_taken`: as the poll counts
    them, the PENDING and RUNNING runs plus the runs a release handed a slot; the pool's over
    its unpaused queues only."""

    pool_name: str
    pool_paused: bool
    pool_limit: int | None
    pool_slots_taken: int
    queue_name: str
    queue_paused: bool
    queue_limit: int | None
    queue_slots_taken: int
    last_polled: datetime | None


@dataclass(frozen=True)
class DeploymentLimitFacts:
    """The run's deployment's concurrency limit, as the read model holds it."""

    limit: int
    slots_taken: int
    active: bool
    collision_strategy: str  # ENQUEUE (Prefect's default) or CANCEL_NEW


def _slots(taken: int, limit: int) -> str:
    return f"{taken} of {limit} slot{'s' if limit != 1 else ''} taken"


def queue_gone(run: FlowRun) -> str | None:
    """Why a SCHEDULED run whose work queue no longer exists (deleted, or its pool was) waits:
    no poll will ever offer it, and without a word it would look like a run about to go."""
    if run.state_type is not StateType.SCHEDULED or run.empirical_policy.retry_type == "in_process":
        return None
    named = f" {run.work_queue_name!r}" if run.work_queue_name else ""
    return (f"Its work queue{named} no longer exists (it, or its work pool, was deleted): no worker's poll will offer "
            "this run; cancel or delete it, or make its runs anew in a queue that exists.")


def why_waiting(run: FlowRun, queue: QueueFacts | None, deployment_limit: DeploymentLimitFacts | None,
                now: datetime) -> str | None:
    """The first thing that keeps a SCHEDULED run from the pool poll now, broadest first: a
    paused pool, a paused queue, a full queue, a full pool (in the claim's order), a full deployment, a time not come
    yet, a queue no worker polls. None when nothing does (a worker's next poll may offer it:
    room permitting, after the runs ahead of it in the poll's order), and
    for a run the pool poll never offers: not SCHEDULED, retried in its own process, or in no
    queue (`queue` None: a runner's poll, which consults no limit, serves it, or nothing does).

    A deployment's pause is not among them: it deletes the runs its schedules made, and the
    poll offers the others as it offers any run. A run that a release handed its queue's and
    pool's slot (`pool_slot_reserved`), or its deployment's (a lease on its state), is offered
    whatever those limits, as the poll offers it."""
    if (run.state_type is not StateType.SCHEDULED or run.empirical_policy.retry_type == "in_process"
            or run.work_queue_id is None or queue is None):
        return None
    pool = f"Work pool {queue.pool_name!r}"
    of_queue = f"queue {queue.queue_name!r} of work pool {queue.pool_name!r}"
    if queue.pool_paused:
        return f"{pool} is paused."
    if queue.queue_paused:
        return f"Work {of_queue} is paused."
    if not run.pool_slot_reserved:
        # The words of the claim's refusal (commands/slots.py `Limits.pool_or_queue_full`).
        # The queue first, as the claim checks them.
        if queue.queue_limit is not None and queue.queue_slots_taken >= queue.queue_limit:
            return (f"Work {of_queue} is at its concurrency limit ({queue.queue_limit}): "
                    f"{_slots(queue.queue_slots_taken, queue.queue_limit)}.")
        if queue.pool_limit is not None and queue.pool_slots_taken >= queue.pool_limit:
            return (f"{pool} is at its concurrency limit ({queue.pool_limit}): "
                    f"{_slots(queue.pool_slots_taken, queue.pool_limit)}.")
    handed_deployment_slot = run.state is not None and run.state.state_details.deployment_concurrency_lease_id
    limit = deployment_limit
    if (limit is not None and limit.active and limit.slots_taken >= limit.limit and not handed_deployment_slot
            and limit.collision_strategy != "CANCEL_NEW"):
        # A CANCEL_NEW deployment's runs are offered: their claim cancels them.
        return (f"{DEPLOYMENT_LIMIT_REACHED} ({_slots(limit.slots_taken, limit.limit)}; collision strategy "
                f"{limit.collision_strategy}: the run waits for a slot.)")
    due = run.next_scheduled_start_time
    if due is not None and due > now:
        return f"Not due yet: scheduled for {due.isoformat()}."
    if queue.last_polled is None or now - queue.last_polled > NOT_READY_AFTER:
        seconds = int(NOT_READY_AFTER.total_seconds())
        last = "never polled" if queue.last_polled is None else f"last polled {queue.last_polled.isoformat()}"
        return f"No worker has polled work {of_queue} in the last {seconds} seconds ({last})."
    return None
