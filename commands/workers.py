"""Workers: the processes that poll a work pool, known by their heartbeats.

A worker is an aggregate of its own, keyed by (pool, name): its id is derived from the pool's
id and its name, so a heartbeat finds it without a lookup. Heartbeats are the most frequent
write of the whole system (every ~30 s per worker, many workers per pool), so

- each heartbeat appends one small event (the worker, a few fields) to the worker's own
  subject, loaded by its last event alone; it never rewrites the pool, whose events carry
  large snapshots and whose aggregate is snapshotted (a pool event per heartbeat would grow
  its history, and its snapshots, with every worker's every beat);
- heartbeats of different workers never contend for one aggregate: each appends under its own
  worker's expected sequence;
- the pool hears only of transitions (`WorkPoolWorkersChanged`: a worker came online or went
  offline or away, and the pool status that follows), in the same atomic batch as the
  worker's event, so the pool always knows which of its workers are online and decides its
  own status (a heartbeat makes a NOT_READY pool READY; the foreman makes a READY pool with
  no online worker NOT_READY) against the log alone.

A steady worker's heartbeat whose loaded state is stale (another instance marked it offline)
fails the worker's expected-sequence check and is decided again on the fresh state, which
then tells the pool.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, StringConstraints

from . import messages
from . import work_pools as wp
from .bounds import NonNegativeInt32, StoredText, UtcDatetime
from .decisions import Decision, NewEvent
from .events import register_event
from .messages import Command, DecisionContext, Event, not_found
from .names import MAX_NAME_LENGTH

WORKER = "worker"
HEARTBEAT_FALLBACK_SECONDS = 30
OFFLINE_MULTIPLIER = 3
WORKER_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "runledger:worker")
WorkerName = Annotated[StoredText, StringConstraints(max_length=MAX_NAME_LENGTH)]


class WorkerStatus(StrEnum):
    ONLINE = "ONLINE"
    OFFLINE = "OFFLINE"


class Worker(BaseModel):
    """A worker of a pool, as stored, projected and answered. Its status is stored: ONLINE on
    each heartbeat, OFFLINE once it missed three heartbeats (never computed when read)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    created: UtcDatetime
    updated: UtcDatetime
    name: str
    work_pool_id: uuid.UUID
    last_heartbeat_time: UtcDatetime
    heartbeat_interval_seconds: int | None = None
    status: WorkerStatus = WorkerStatus.OFFLINE

    def offline_after(self) -> timedelta:
        """How long after its last heartbeat an online worker counts as gone."""
        return timedelta(seconds=(self.heartbeat_interval_seconds or HEARTBEAT_FALLBACK_SECONDS) * OFFLINE_MULTIPLIER)

    def reply(self) -> dict:
        return self.model_dump(mode="json")


def worker_id(work_pool_id: uuid.UUID, name: str) -> uuid.UUID:
    """The id of the worker `name` of a pool: the same for every heartbeat."""
    return uuid.uuid5(WORKER_ID_NAMESPACE, f"{work_pool_id}/{name}")


# ---------------------------------------------------------------------------------------------
# Events


class _WorkerEvent(Event):
    aggregate_type: ClassVar[str] = WORKER


@register_event
class WorkerHeartbeatRecorded(_WorkerEvent):
    """A heartbeat: the worker as it is now (ONLINE, its last heartbeat time)."""

    event_type: ClassVar[str] = "WorkerHeartbeatRecorded"
    worker: Worker


@register_event
class WorkerHeartbeatRenewed(_WorkerEvent):
    """A routine heartbeat: the worker was ONLINE already, with the same interval; only its
    heartbeat time moved. Each carries the whole worker, so only the latest matters to its
    state: these expire from the log (`Settings.routine_retention_seconds`), but not before
    the worker would be marked offline without a newer one. A worker beating every 30 s
    would otherwise add ~2,900 events a day to the log, for ever."""

    event_type: ClassVar[str] = "WorkerHeartbeatRenewed"
    worker: Worker

    def expires_no_sooner_than(self) -> float | None:
        # A while past the moment the worker counts as offline without a newer beat: by then a
        # newer beat or the foreman's `WorkerWentOffline` (kept) says what this one said.
        return self.worker.offline_after().total_seconds() + messages.EXPIRY_MARGIN_SECONDS


@register_event
class WorkerWentOffline(_WorkerEvent):
    """The worker missed three heartbeats: OFFLINE."""

    event_type: ClassVar[str] = "WorkerWentOffline"
    worker: Worker


@register_event
class WorkerDeleted(_WorkerEvent):
    event_type: ClassVar[str] = "WorkerDeleted"
    worker_id: uuid.UUID
    work_pool_id: uuid.UUID
    name: str
    deleted: datetime


# ---------------------------------------------------------------------------------------------
# Commands


class WorkerHeartbeat(Command):
    """A worker says it is alive: created on its first heartbeat, ONLINE on each. An absent
    `heartbeat_interval_seconds` keeps the one given before."""

    work_pool_name: wp.PoolName
    name: WorkerName
    heartbeat_interval_seconds: NonNegativeInt32 | None = None


class DeleteWorker(Command):
    work_pool_name: wp.PoolName
    name: WorkerName


class MarkWorkerOffline(Command):
    """The foreman's: an ONLINE worker whose last heartbeat is older than three heartbeat
    intervals (30 s when it gave none) becomes OFFLINE; otherwise nothing."""

    work_pool_name: wp.PoolName
    name: WorkerName


# ---------------------------------------------------------------------------------------------
# Evolve and decide


def evolve(worker: Worker | None, event: Event) -> Worker | None:
    match event:
        case WorkerHeartbeatRecorded(worker=w) | WorkerHeartbeatRenewed(worker=w) | WorkerWentOffline(worker=w):
            return w
        case WorkerDeleted():
            return None
    return worker


def worker_not_found() -> Exception:
    return not_found("Worker not found.")


def _pool_event(pool: wp.WorkPool, *, online: tuple[str, ...] = (), offline: tuple[str, ...] = (),
                status: wp.Change | None = None) -> list[NewEvent]:
    """The pool's event, when its online workers or its status change."""
    came = [n for n in online if n not in pool.online_workers]
    went = [n for n in offline if n in pool.online_workers]
    if not came and not went and status is None:
        return []
    return [NewEvent(str(pool.id), wp.WorkPoolWorkersChanged(online=came, offline=went, status=status))]


def decide_heartbeat(cmd: WorkerHeartbeat, pool: wp.WorkPool | None, worker: Worker | None,
                     ctx: DecisionContext) -> Decision:
    """Upsert by (pool, name); a NOT_READY pool becomes READY (a PAUSED one stays PAUSED). A
    beat that changes nothing but the time is a `WorkerHeartbeatRenewed`, which may expire."""
    if pool is None:
        raise wp.pool_not_found(cmd.work_pool_name)
    wid = worker_id(pool.id, cmd.name)
    interval = cmd.heartbeat_interval_seconds
    if interval is None and worker is not None:
        interval = worker.heartbeat_interval_seconds
    after = Worker(id=wid, created=worker.created if worker else ctx.now, updated=ctx.now, name=cmd.name,
                   work_pool_id=pool.id, last_heartbeat_time=ctx.now, heartbeat_interval_seconds=interval,
                   status=WorkerStatus.ONLINE)
    status = wp.Change(old=wp.Status.NOT_READY, new=wp.Status.READY) if pool.status == wp.Status.NOT_READY else None
    routine = (worker is not None and worker.status is WorkerStatus.ONLINE
               and worker.heartbeat_interval_seconds == interval)
    beat = WorkerHeartbeatRenewed(worker=after) if routine else WorkerHeartbeatRecorded(worker=after)
    events = [NewEvent(str(wid), beat),
              *_pool_event(pool, online=(cmd.name,), status=status)]
    return Decision(events=events, result=after, created=worker is None, after={str(wid): after})


def decide_mark_offline(cmd: MarkWorkerOffline, pool: wp.WorkPool | None, worker: Worker | None,
                        ctx: DecisionContext) -> Decision:
    if pool is None:
        raise wp.pool_not_found(cmd.work_pool_name)
    if worker is None:
        raise worker_not_found()
    if worker.status != WorkerStatus.ONLINE or ctx.now - worker.last_heartbeat_time <= worker.offline_after():
        return Decision(events=[], result=worker)
    after = worker.model_copy(update={"status": WorkerStatus.OFFLINE, "updated": ctx.now})
    events = [NewEvent(str(worker.id), WorkerWentOffline(worker=after)), *_pool_event(pool, offline=(worker.name,))]
    return Decision(events=events, result=after, after={str(worker.id): after})


def decide_delete_worker(cmd: DeleteWorker, pool: wp.WorkPool | None, worker: Worker | None,
                         ctx: DecisionContext) -> Decision:
    if pool is None:
        raise wp.pool_not_found(cmd.work_pool_name)
    if worker is None:
        raise worker_not_found()
    deleted = WorkerDeleted(worker_id=worker.id, work_pool_id=pool.id, name=worker.name, deleted=ctx.now)
    return Decision(events=[NewEvent(str(worker.id), deleted), *_pool_event(pool, offline=(worker.name,))], result=None)
