"""The task worker: takes task runs from its keys' subjects, runs their functions and reports
each state through commands.

Order (TQ-2, TQ-3): each time it has room for one more run, it takes the first run available
checking its keys in the order given, each key's retry side before its scheduled side. When
none is available it waits on all of them at once, so an idle worker starts a run as soon as
it is queued.

Exactly once in effect: a run is started with `SetTaskRunState(RUNNING)` naming this worker
and the delivery it came from, and only then run. A copy of a run another worker holds, or
one that has finished, is not run (the rules refuse it). While a run runs, the worker keeps
its message from being delivered to another worker (`in_progress` within the ack wait); its
message is acknowledged only once the outcome is recorded. A worker killed mid-run stops
doing so: the run is delivered again after the ack wait and the next worker takes it over.

Outcomes: a return value is recorded with COMPLETED (`data = {"type": "json", "value": ...}`);
an exception with FAILED; a FAILED turned into `AwaitingRetry` by the run's retries is queued
again on the key's retry side (a deferred `AwaitingRetry` state), after its delay.

SIGTERM (`stop`): stops taking runs, lets the running ones finish within a grace period, and
hands back the rest (a negative acknowledgement: delivered again at once to another worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from runledger.commands.task_runs import TaskRun
from runledger.infra.settings import Settings
from runledger.infra.task_queues import (
    SIDES,
    TASK_WORKER_HEARTBEAT_SECONDS,
    Side,
    consumer_name,
    forget_task_worker,
    put_task_worker,
    task_consumer_config,
    task_stream_name,
)

log = logging.getLogger("runledger.task_worker")

TaskFunction = Callable[..., Any]
# A result larger than this is refused (FAILED, saying so) rather than written into the log.
MAX_RESULT_BYTES = 256 * 1024
# How long a report is tried again while the service or the broker is away, before the run is
# left for its message's redelivery to settle.
REPORT_PATIENCE_SECONDS = 300.0


class ResultTooLarge(Exception):
    pass


def result_data(value: Any) -> dict[str, Any]:
    """A COMPLETED state's data for a return value: JSON, and bounded."""
    try:
        size = len(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ResultTooLarge(f"the task's result is not JSON-serialisable ({e})") from None
    if size > MAX_RESULT_BYTES:
        raise ResultTooLarge(f"the task's result is {size} bytes as JSON, more than {MAX_RESULT_BYTES} "
                             "can be recorded: store it yourself and return a reference to it") from None
    return {"type": "json", "value": value}


def failure_data(e: BaseException) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return {"type": "exception", "exception_type": type(e).__qualname__, "message": str(e)[:2_000],
            "traceback": tb[-8_000:]}


@dataclass
class _Source:
    """One side of one key: a durable consumer shared by every worker of the key."""

    task_key: str
    side: Side
    sub: JetStreamContext.PullSubscription


class TaskWorker:
    """`functions`: task key → function (async or sync; called with the run's parameters as
    keyword arguments). The keys are served in the order of `keys` (default: `functions`')."""

    def __init__(self, nc: NATS, settings: Settings, functions: Mapping[str, TaskFunction], *,
                 keys: Sequence[str] | None = None, limit: int = 10, worker_id: str | None = None,
                 grace_seconds: float = 30.0, poll_seconds: float = 1.0):
        self.nc = nc
        self.settings = settings
        self.functions = dict(functions)
        self.keys = list(keys) if keys is not None else list(self.functions)
        missing = [k for k in self.keys if k not in self.functions]
        if missing:
            raise ValueError(f"no function registered for task key(s): {', '.join(missing)}")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.worker_id = worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.grace_seconds = grace_seconds
        self.poll_seconds = poll_seconds
        self.js = nc.jetstream(timeout=settings.request_timeout)
        self.sources: list[_Source] = []
        self._room = asyncio.Semaphore(limit)
        self._running: dict[asyncio.Task, Msg] = {}
        self._held: list[tuple[int, Msg]] = []  # taken while waiting on all sources, not yet started
        # The runs this worker runs now, with the stream sequence of the message each came from.
        self._active: dict[uuid.UUID, int] = {}
        self._taking = True
        self.started = 0  # runs this worker started (for tests and benchmarks)
        self.finished = 0

    async def start(self) -> None:
        """Binds to (creating if needed) the durable consumers of its keys."""
        for key in self.keys:
            for side in SIDES:
                stream = task_stream_name(self.settings, side)
                await self.js.add_consumer(stream, task_consumer_config(key, side, self.settings))
                sub = await self.js.pull_subscribe_bind(durable=consumer_name(key, side), stream=stream)
                self.sources.append(_Source(key, side, sub))

    async def serve(self, stop: asyncio.Event) -> None:
        """Takes and runs task runs until `stop` is set, then stops as `stop()` says."""
        taking = asyncio.create_task(self._take_loop())
        beating = asyncio.create_task(self._heartbeats())
        await stop.wait()
        self._taking = False
        for task in (taking, beating):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.stop()
        with contextlib.suppress(Exception):
            await forget_task_worker(self.js, self.settings, self.worker_id)

    async def _heartbeats(self) -> None:
        """Says it is here, with its keys, so that task workers can be listed (`ListTaskWorkers`)."""
        while True:
            try:
                await put_task_worker(self.js, self.settings, self.worker_id, self.keys,
                                      datetime.now(UTC).isoformat())
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("a task worker heartbeat failed (%s); the next one follows", type(e).__name__)
            await asyncio.sleep(TASK_WORKER_HEARTBEAT_SECONDS)

    async def stop(self) -> None:
        """Lets running runs finish within the grace period and hands back the rest."""
        self._taking = False
        for _, held in self._held:
            with contextlib.suppress(Exception):
                await held.nak()
        self._held.clear()
        if self._running:
            _, pending = await asyncio.wait(list(self._running), timeout=self.grace_seconds)
            for task in pending:
                running = self._running.get(task)
                task.cancel()
                if running is not None:
                    with contextlib.suppress(Exception):
                        await running.nak()
        for source in self.sources:
            with contextlib.suppress(Exception):
                await source.sub.unsubscribe()

    # -----------------------------------------------------------------------------------------
    # Taking runs in order

    async def _take_loop(self) -> None:
        while self._taking:
            await self._room.acquire()
            try:
                index, msg = await self._next()
            except asyncio.CancelledError:
                self._room.release()
                raise
            except Exception:
                self._room.release()
                log.warning("taking a task run failed; trying again", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            source = self.sources[index]
            task = asyncio.create_task(self._handle(source, msg))
            self._running[task] = msg
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)
        self._room.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("handling a task run failed", exc_info=task.exception())

    async def _next(self) -> tuple[int, Msg]:
        """The first run available in the sources' order, waiting on all of them when none is."""
        while True:
            if self._held:
                self._held.sort(key=lambda item: item[0])
                return self._held.pop(0)
            for i, source in enumerate(self.sources):
                got = await self._fetch(source, timeout=0.005)
                if got is not None:
                    return i, got
            waits = {asyncio.create_task(self._fetch(source, timeout=self.poll_seconds)): i
                     for i, source in enumerate(self.sources)}
            try:
                done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                for task in waits:
                    task.cancel()
                raise
            for task in pending:
                task.cancel()
            # A fetch cancelled late may still have taken a message: keep every one taken.
            for task in waits:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    taken = await task
                    if taken is not None:
                        self._held.append((waits[task], taken))

    @staticmethod
    async def _fetch(source: _Source, timeout: float) -> Msg | None:
        try:
            msgs = await source.sub.fetch(1, timeout=timeout)
        except TimeoutError:
            return None
        return msgs[0] if msgs else None

    # -----------------------------------------------------------------------------------------
    # Running one

    async def _handle(self, source: _Source, msg: Msg) -> None:
        try:
            run = TaskRun.model_validate_json(msg.data)
        except ValueError:
            log.error("a message on %s is not a task run; dropped", msg.subject)
            await msg.term()
            return
        seq = msg.metadata.sequence.stream if msg.metadata else 0
        if run.id in self._active:
            if self._active[run.id] != seq:
                await msg.ack()  # a second copy of a run this worker is running
            return  # the same message again, while it runs: its ack settles it
        self._active[run.id] = seq
        try:
            await self._start_and_run(source, msg, run)
        finally:
            self._active.pop(run.id, None)

    async def _start_and_run(self, source: _Source, msg: Msg, run: TaskRun) -> None:
        attempt = msg.metadata.num_delivered if msg.metadata else 1
        queued_by = run.queued_state_id or (run.state.id if run.state is not None else None)
        start: dict[str, Any] = {"id": str(run.id), "state": {"type": "RUNNING"}, "task_worker_id": self.worker_id}
        if queued_by is not None:
            start["delivery"] = {"state_id": str(queued_by), "attempt": attempt}
        reply = await self._report(start, msg)
        if reply is None:
            return  # left for redelivery
        if not reply.get("ok"):
            code = reply["error"].get("code")
            if code == "not_found":
                await msg.ack()  # deleted meanwhile: nothing to run
            else:
                log.warning("task run %s could not start: %s", run.id, reply["error"])
                await msg.nak(delay=1)
            return
        status = reply["orchestration"]["status"]
        current = reply.get("result") or {}
        if status == "WAIT":
            await msg.nak(delay=reply["orchestration"]["details"].get("delay_seconds") or 1)
            return
        if status != "ACCEPT":
            holder = reply["orchestration"]["details"].get("task_worker_id")
            if current.get("type") == "RUNNING" and status == "REJECT" and holder != self.worker_id:
                return  # another worker runs it: its own delivery settles the message
            if holder != self.worker_id or current.get("type") != "RUNNING":
                await msg.ack()  # finished, cached, or not allowed to run: nothing to do
                return
            # Ours already: the reply to our start was lost and the start sent again.
        self.started += 1
        function = self.functions[source.task_key]
        keep_alive = asyncio.create_task(self._keep_alive(msg))
        try:
            try:
                if inspect.iscoroutinefunction(function):
                    value = await function(**run.parameters)
                else:
                    value = await asyncio.to_thread(function, **run.parameters)
                outcome: dict[str, Any] = {"type": "COMPLETED", "data": result_data(value)}
            except asyncio.CancelledError:
                raise
            except ResultTooLarge as e:
                outcome = {"type": "FAILED", "message": str(e), "state_details": {"retriable": False}}
            except Exception as e:
                outcome = {"type": "FAILED", "message": f"{type(e).__name__}: {e}"[:10_000], "data": failure_data(e)}
            reply = await self._report({"id": str(run.id), "state": outcome, "task_worker_id": self.worker_id}, msg)
            if reply is None:
                return
            if reply.get("ok") and reply["orchestration"]["status"] == "REJECT":
                written = reply.get("result") or {}
                if written.get("name") == "AwaitingRetry":
                    await self._queue_retry(run, written, msg)
            self.finished += 1
            await msg.ack()
        finally:
            keep_alive.cancel()

    async def _queue_retry(self, run: TaskRun, retry: dict[str, Any], msg: Msg) -> None:
        """The run's retries turned its failure into `AwaitingRetry`: that state, deferred, puts
        it on the key's retry side, due after its delay."""
        details = retry.get("state_details") or {}
        state = {"type": "SCHEDULED", "name": "AwaitingRetry", "message": retry.get("message"),
                 "state_details": {"deferred": True, "scheduled_time": details.get("scheduled_time")}}
        await self._report({"id": str(run.id), "state": state, "queue_wait_seconds": 30.0}, msg)

    async def _keep_alive(self, msg: Msg) -> None:
        """Tells JetStream the run is still being worked on, well within the ack wait."""
        every = max(0.2, self.settings.task_ack_wait_seconds / 3)
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _report(self, body: dict[str, Any], msg: Msg) -> dict[str, Any] | None:
        """A command, tried again while the service or the broker is away (the run's message is
        kept alive meanwhile); None when it never got through."""
        keep_alive = asyncio.create_task(self._keep_alive(msg))
        pause = 0.05
        loop = asyncio.get_running_loop()
        give_up = loop.time() + REPORT_PATIENCE_SECONDS
        try:
            while True:
                try:
                    raw = await self.nc.request(self.settings.command_subject("SetTaskRunState"),
                                                json.dumps(body).encode(), timeout=self.settings.request_timeout)
                    reply: dict[str, Any] = json.loads(raw.data)
                    if reply.get("ok") or reply.get("error", {}).get("code") != "unavailable":
                        return reply
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.info("reporting task run %s failed (%s); trying again", body["id"], type(e).__name__)
                if loop.time() > give_up:
                    log.error("gave up reporting task run %s; its message will be delivered again", body["id"])
                    return None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
        finally:
            keep_alive.cancel()
