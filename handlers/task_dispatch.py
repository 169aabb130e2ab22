"""Putting task runs on their key's subject: right after their state is stored, and again by
a recovery sweep for any the service could not publish (it died between the two, or the
broker was away).

The submit path does not wait for a projection: the command that writes a run SCHEDULED and
deferred publishes it while its append is in flight, and replies once both are stored
(message id: run id and state id, so a repeat is dropped by the stream). Side by side, not
one after the other: a chain of tasks went 17.7 -> 16.5 ms per step (docs/benchmarks.md,
session 11). A worker that takes the run at once and asks to start it waits for the append:
in this service on the run's lock, in another one it hears `not_found` and gets the message
again a moment later (handlers/task_worker.py). A message for a run whose append then failed
is a copy of nothing: its worker drops it once it is older than that moment.

A key whose side is full gets the run back after a bounded wait: the run is then cancelled
with the reason, and the submitter gets the error. Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from runledger.commands import tag_concurrency_limits as tcl
from runledger.commands import task_runs as tr
from runledger.commands.decisions import Decision, QueuedTaskRun
from runledger.commands.states import TERMINAL, StateCreate, StateType
from runledger.commands.task_keys import encode_task_key
from runledger.infra.settings import Settings
from runledger.infra.task_queues import TaskKeyFull, TaskPublisher, task_stream_name
from runledger.projections import task_runs as read_model

from .command_bus import CommandBus
from .endpoint import extend_deadline

log = logging.getLogger("runledger.tasks")


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def task_message(run: tr.TaskRun) -> bytes:
    """What a task worker receives: the run as written (TQ-4), with its parameters. Without
    `waiting_reason` while it has none (a run just queued never has one): a task worker older
    than that field would drop the message as not a task run (it refuses unknown fields)."""
    return run.model_dump_json(exclude={"waiting_reason"} if run.waiting_reason is None else None).encode()


# The states a task run is announced in: the final ones, and CANCELLING (its waiters skip it:
# it is not final; a task worker older than the cancel notices hears there that it is cancelled).
ANNOUNCED = TERMINAL | {StateType.CANCELLING}


# The states whose notice the task workers of the run's key hear: the run is to be stopped.
CANCELLED_STATES = frozenset({StateType.CANCELLING, StateType.CANCELLED})


def cancel_notice_subject(settings: Settings, run: tr.TaskRun) -> str:
    """Where the task workers of a run's key hear that it is cancelled (core NATS, not kept):
    one subscription per key (`broker_auth.cancel_subject`), not one per run."""
    return f"{settings.namespace}.taskrun.cancel.{encode_task_key(run.task_key)}.{run.id}"


def finished_subject(settings: Settings, task_run_id: str) -> str:
    """Where the service announces a task run that reached a final state or CANCELLING (core
    NATS, not kept): a `.result()` waits there instead of polling."""
    return f"{settings.namespace}.taskrun.finished.{task_run_id}"


def tag_freed_subject(settings: Settings, tag: str) -> str:
    """Where the service announces that slots of a tag's limit were given back (core NATS, not
    kept): the task workers holding runs that wait for the tag propose them again at once,
    instead of after the WAIT's delay. The subject of `broker_auth.tag_freed_subject`."""
    return f"{settings.namespace}.taskrun.tagfreed.{encode_task_key(tag)}"


class TaskDispatch:
    """The command bus's `after_append`: queues the task runs a decision queued (`begin`, while
    the append is in flight), and announces the ones it finished or set CANCELLING, and the
    tag slots it gave back (once it is stored)."""

    def __init__(self, publisher: TaskPublisher, bus: CommandBus, nc: Any, settings: Settings):
        self.publisher = publisher
        self.bus = bus
        self.nc = nc
        self.settings = settings

    def begin(self, decision: Decision) -> asyncio.Future[list[tuple[tr.TaskRun, TaskKeyFull]]] | None:
        if not decision.queue:
            return None
        publishing = asyncio.ensure_future(self.publish(decision.queue))
        publishing.add_done_callback(_retrieve)  # an append that failed leaves it unawaited
        return publishing

    async def __call__(self, decision: Decision,
                       begun: asyncio.Future[list[tuple[tr.TaskRun, TaskKeyFull]]] | None = None) -> str | None:
        for new in decision.events:
            event = new.event
            if isinstance(event, tr.TaskRunStateSet | tr.TaskRunCreated) and event.run.state_type in ANNOUNCED:
                try:
                    notice = task_message(event.run)
                    await self.nc.publish(finished_subject(self.settings, str(event.run.id)), notice)
                    if event.run.state_type in CANCELLED_STATES:
                        await self.nc.publish(cancel_notice_subject(self.settings, event.run), notice)
                except Exception:
                    # The state is stored: the command succeeded and says so. A waiter that starts
                    # later reads the run finished; one already waiting waits to its timeout.
                    log.warning("the finish of task run %s was stored but not announced", event.run.id, exc_info=True)
        await self._announce_freed_tags(decision)
        if not decision.queue:
            return None
        full = await begun if begun is not None else await self.publish(decision.queue)
        problems = [await self._cancel(run, str(refused)) for run, refused in full]
        return " ".join(problems) if problems else None

    async def _announce_freed_tags(self, decision: Decision) -> None:
        """A notice per tag whose slots the decision gave back: a release is an event its
        waiters hear at once (handlers/task_worker.py proposes their runs again)."""
        for tag, freed in tcl.room_made(decision.events).items():
            try:
                await self.nc.publish(tag_freed_subject(self.settings, tag),
                                      json.dumps({"tag": tag, "freed": freed}).encode())
            except Exception:
                # The release is stored: its waiters come back after their WAIT's delay instead.
                log.warning("the release of %d slot(s) of tag %r was stored but not announced", freed, tag,
                            exc_info=True)

    async def publish(self, queued: list[QueuedTaskRun]) -> list[tuple[tr.TaskRun, TaskKeyFull]]:
        """Puts the runs on their keys' subjects; returns the scheduled ones refused for room
        (a retry refused waits in the log instead)."""
        full: list[tuple[tr.TaskRun, TaskKeyFull]] = []
        for q in queued:
            run: tr.TaskRun = q.run
            assert run.state is not None
            if q.wait_seconds:
                extend_deadline(q.wait_seconds)  # the submitter asked to wait that long for room
            try:
                await self.publisher.publish(q.task_key, q.side, str(run.id), str(run.state.id), task_message(run),
                                             wait_seconds=q.wait_seconds)
            except TaskKeyFull as refused:
                if q.side == "retry":
                    # Nobody submitted a retry to be told: it stays queued in the log, and the
                    # recovery sweep puts it on the retry side once there is room.
                    log.info("%s Task run %s waits in the log for room.", refused, run.id)
                    continue
                full.append((run, refused))
            except Exception:
                # Not published (its append may still be in flight): once stored, the recovery
                # sweep publishes it (TaskRecovery).
                log.warning("task run %s was not queued; the recovery sweep will queue it once it is stored", run.id,
                            exc_info=True)
        return full

    async def _cancel(self, run: tr.TaskRun, reason: str) -> str:
        """The run could not be queued: it is cancelled with the reason, so that it neither
        waits for ever unseen nor runs after its submitter was told it failed."""
        cancel = tr.SetTaskRunState(id=run.id, force=True, state=StateCreate(
            type=StateType.CANCELLED, message=f"{reason} The task run was not queued."))
        reply = await self.bus.execute_unlocked("SetTaskRunState", cancel)
        if not reply.get("ok"):
            log.warning("task run %s could not be queued nor cancelled: %s", run.id, reply)
        return f"{reason} Task run {run.id} was cancelled; submit it again later, or wait longer for room."


class TaskRecovery:
    """Every few seconds, puts back on its subject any run that is queued in the log (SCHEDULED,
    deferred, its queuing state the current one) and has waited a while, for keys whose subject
    holds fewer messages than such runs. A copy queued twice is harmless: the first worker to
    start the run holds it; the other copy is dropped when delivered."""

    def __init__(self, engine: Any, publisher: TaskPublisher, *, every: float = 5.0, older_than: float = 10.0):
        self.engine = engine
        self.publisher = publisher
        self.every = every
        self.older_than = older_than

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("the task recovery sweep failed; trying again", exc_info=True)
            await asyncio.sleep(max(0.0, self.every - (time.monotonic() - started)))

    async def sweep(self) -> int:
        """Publishes the runs found missing; returns how many it published."""
        runs = await read_model.queued_runs(self.engine, older_than_seconds=self.older_than)
        if not runs:
            return 0
        by_key: dict[tuple[str, str], list[tr.TaskRun]] = {}
        for run in runs:
            side = "retry" if run.state_name == "AwaitingRetry" else "scheduled"
            by_key.setdefault((run.task_key, side), []).append(run)
        # A running run's message stays on its subject until its worker reports the end.
        running = await read_model.running_from_messages(self.engine)
        published = 0
        for (key, side), waiting in by_key.items():
            held = await self.publisher.count(key, side)  # type: ignore[arg-type]
            stream = task_stream_name(self.publisher.settings, side)  # type: ignore[arg-type]
            if held >= len(waiting) + running.get((key, stream), 0):
                continue
            for run in waiting:
                assert run.state is not None
                try:
                    await self.publisher.publish(key, side, str(run.id), str(run.state.id),  # type: ignore[arg-type]
                                                 task_message(run))
                    published += 1
                except TaskKeyFull:
                    break
        if published:
            log.info("task recovery queued %d task runs again", published)
        return published
