"""The task worker: takes task runs from its keys' subjects, runs their functions and reports
each state through commands.

Order (TQ-2, TQ-3): each time it has room for one more run, it takes the first run available
checking its keys in the order given, each key's retry side before its scheduled side. When
none is available it waits on all of them at once, so an idle worker starts a run as soon as
it is queued.

Exactly once in effect: a run is started with `SetTaskRunState(RUNNING)` naming this worker
and the delivery it came from, and only then run. A copy of a run another worker holds, or
one that has finished, is not run (the rules refuse it). While a run runs, the worker keeps
its message from being delivered to another worker (`in_progress` within the ack wait, sent
from a thread of its own, `_Pulse`, which an async task blocking the loop does not stop); its
message is acknowledged only once the outcome is recorded. A worker killed mid-run stops
doing so: the run is delivered again after the ack wait and the next worker takes it over.

Outcomes: a return value is recorded with COMPLETED (`data = {"type": "json", "value": ...}`,
or a reference to it in the result store when it is large, or would not fit beside the run in
one event); an exception with FAILED. An outcome the service refuses as invalid is replaced by
a short FAILED saying so; a run whose outcome is not recorded at all is never acknowledged as
if finished: its message goes back after a delay (`_unrecorded`). Sent again after a lost
reply, such a report is refused (the run is no longer this worker's), and the refusal's state
is what the first one wrote: a failure
turned into `AwaitingRetry` is still queued. A FAILED turned into
`AwaitingRetry` by the run's retries is queued again on the key's retry side (a deferred
`AwaitingRetry` state, which the rules take from this worker only while the run is still in
that `AwaitingRetry`: not after a cancel), after its delay, and the message is acknowledged
only once it is queued.

Cancels: the worker listens to its keys' cancel notices (the service's
`<ns>.taskrun.cancel.<encoded key>.<id>`, one subscription per key), and heeds those of the
runs it handles. When one becomes CANCELLING or CANCELLED it stops the call (an async function is cancelled; a plain function's thread cannot
be, and its outcome is dropped), reports CANCELLED for a CANCELLING run it holds, acknowledges
the message and frees the slot at once.

Tag limits: a run whose tags' concurrency limit is full is answered WAIT. The worker keeps its
message (alive, `in_progress`) without holding one of its `limit` slots, and proposes the run
again through the same start path as soon as the service announces that a slot of one of its
tags was given back, or that the limit was raised, reset or removed
(`<ns>.taskrun.tagfreed.<encoded tag>`, one subscription for every tag),
or once the WAIT's delay has passed, whichever comes first. A notice of n slots wakes at most
n of this worker's runs waiting for the tag, the oldest first, each after a small random
jitter; one that loses the slot to another run is answered WAIT again and waits again. A WAIT
of a run without tags is handed back with its delay.

SIGTERM (`stop`): stops taking runs, lets the running ones finish within a grace period (ended
at once by `hand_back_now`, a second SIGTERM), and hands back the rest (a negative
acknowledgement: delivered again at once to another worker), the runs waiting for a tag's
slot included.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import APIError, NotFoundError

from runledger.commands.bounds import MAX_JSON_DEPTH, RUN_STATE_HEADROOM_BYTES, check_json_document
from runledger.commands.tag_concurrency_limits import EVERY_WAITER
from runledger.commands.task_keys import decode_task_key, encode_task_key
from runledger.commands.task_runs import TaskRun
from runledger.infra.nats_connection import connect
from runledger.infra.settings import Settings
from runledger.infra.task_queues import (
    MAX_STORED_RESULT_BYTES,
    SIDES,
    TASK_WORKER_HEARTBEAT_SECONDS,
    Side,
    consumer_name,
    forget_task_worker,
    put_task_worker,
    store_result,
    task_consumer_config,
    task_stream_name,
)

from .task_reports import ReportBatcher

log = logging.getLogger("runledger.task_worker")

TaskFunction = Callable[..., Any]
# A result larger than this (as JSON) is stored apart (infra/task_queues.store_result) and its
# state carries a reference; one larger than MAX_STORED_RESULT_BYTES is refused (FAILED). So is
# a smaller one that would not fit in one event beside its run (`inline_limit`).
MAX_RESULT_BYTES = 256 * 1024
# A result this small travels in its state whatever the run's size: a reference takes about as
# much room, and the room every run keeps under the max payload (RUN_STATE_HEADROOM_BYTES) holds it.
SMALL_RESULT_BYTES = 1024
# How deep a result may nest: the service checks a state's data as one level inside a document
# (commands/states.py), and the result is one level inside the data (`{"type": "json", ...}`).
MAX_RESULT_DEPTH = MAX_JSON_DEPTH - 2
# An outcome the service refused, and the short FAILED that said so refused too: its message is
# handed back after this many seconds, doubled at each delivery, up to UNRECORDED_RETRY_MAX_SECONDS.
UNRECORDED_RETRY_SECONDS = 60.0
UNRECORDED_RETRY_MAX_SECONDS = 3600.0
# The longest message of that short FAILED: the service's reason, cut.
SHORT_FAILURE_MESSAGE = 500
# How long a report is tried again while the service or the broker is away, before the run is
# left for its message's redelivery to settle.
REPORT_PATIENCE_SECONDS = 300.0
# How long a cancelled async function may take to stop (its `except CancelledError` and
# `finally` blocks) before the worker reports the run CANCELLED and frees its slot anyway.
CANCEL_WAIT_SECONDS = 1.0
# The run's notices that stop its call.
CANCEL_STATES = ("CANCELLING", "CANCELLED")
# A run its service does not know, from a message younger than this, is asked for again a
# moment later: the message goes out while the run's create is being stored.
NOT_FOUND_GRACE_SECONDS = 5.0
# The most a tag-freed notice's jitter delays the proposals it wakes: the runs of several
# workers woken by one release do not all reach the service at the same instant.
TAG_WAKE_JITTER_SECONDS = 0.02
# How long a stopping worker waits for the broker to confirm it sent all it will to a pull inbox.
DRAIN_SECONDS = 5.0
# How often the worker's event loop shows its keep-alive thread it is alive (`_Pulse`).
LOOP_STAMP_SECONDS = 0.5


def _pending_after(msg: Msg) -> int | None:
    """How many messages its consumer still held when `msg` was delivered (JetStream's
    metadata, from its reply subject; parsed once per message, read again at its start), or
    None when it carries none."""
    try:
        return int(msg.metadata.num_pending)
    except Exception:  # not a JetStream delivery: unknown
        return None


def _age_seconds(meta: Any) -> float:
    """How long ago the message was stored (JetStream's timestamp; unknown: very long)."""
    stored = getattr(meta, "timestamp", None)
    if stored is None:
        return float("inf")
    return (datetime.now(UTC) - stored).total_seconds()


class ResultTooLarge(Exception):
    """A result that cannot travel in its state: unstorable, or (`encoded` set) too large."""

    def __init__(self, message: str, encoded: bytes | None = None):
        super().__init__(message)
        self.encoded = encoded


class TaskSourcesUnavailable(Exception):
    """The worker cannot bind to its keys' consumers: the service never ran in this namespace
    (no task streams), or the broker refused a consumer."""


def result_data(value: Any, inline_limit: int = MAX_RESULT_BYTES) -> dict[str, Any]:
    """A COMPLETED state's data for a return value: JSON the log and the read model can store
    (no NUL, finite numbers, 64-bit integers, at most `MAX_RESULT_DEPTH` levels, checked as the
    service checks a state's data), and at most `inline_limit` bytes. A larger one raises
    `ResultTooLarge` with its JSON (`.encoded`), for the result store."""
    try:
        text = json.dumps(value, allow_nan=False)  # tuples become lists, keys strings, as JSON has them
        data = {"type": "json", "value": json.loads(text)}
    except (TypeError, ValueError, RecursionError) as e:
        raise ResultTooLarge(f"the task's result cannot be recorded: {e}") from None
    try:
        check_json_document({"": data})  # as `StateCreate.data` is checked
    except ValueError as e:
        levels = _nesting(data["value"])
        why = f"it nests {levels} levels deep, more than the {MAX_RESULT_DEPTH} a result may" \
            if levels > MAX_RESULT_DEPTH else str(e)
        raise ResultTooLarge(f"the task's result cannot be recorded: {why}") from None
    encoded = text.encode()
    if len(encoded) > inline_limit:
        raise ResultTooLarge(f"the task's result is {len(encoded)} bytes as JSON", encoded)
    return data


def _nesting(value: Any) -> int:
    """How many levels of lists and objects `value` nests (a scalar: 0, `[]`: 1)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def inline_limit(max_payload: int, run_size: int) -> int:
    """The largest result (as JSON) that travels in its state beside a run of `run_size` bytes:
    its event carries the run and the state together, and must leave the room a run keeps
    under the broker's max payload (RUN_STATE_HEADROOM_BYTES, for the state's other fields and
    the event's envelope). A larger one is stored apart."""
    return min(MAX_RESULT_BYTES, max(SMALL_RESULT_BYTES, max_payload - RUN_STATE_HEADROOM_BYTES - run_size))


def _cut(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most - 1] + "…"


def _unrecorded_delay(delivered: int) -> float:
    """How long the message of a run whose outcome could not be recorded waits before its next
    delivery (`delivered`: deliveries so far)."""
    return min(UNRECORDED_RETRY_SECONDS * 2 ** min(max(delivered - 1, 0), 16), UNRECORDED_RETRY_MAX_SECONDS)


def storable_text(text: str) -> str:
    """Text the log and the read model can store: NUL and lone surrogates replaced."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def failure_data(e: BaseException) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return {"type": "exception", "exception_type": storable_text(type(e).__qualname__)[:500],
            "message": storable_text(str(e))[:2_000], "traceback": storable_text(tb)[-8_000:]}


@dataclass
class _Source:
    """One side of one key: a durable consumer shared by every worker of the key, pulled
    through an inbox of this worker's own. `held`: messages delivered here and not yet started;
    `pulling`: a pull request is outstanding (the server answers it with one message, or a
    status when it expires)."""

    task_key: str
    side: Side
    pull_subject: str
    inbox: str
    held: list[Msg] = field(default_factory=list)
    pulling: bool = False
    probing: bool = False  # the request out is a no-wait probe (answered at once)
    pull_until: float = 0.0
    sub: Any = None
    # Whether its last answer said more messages wait (a message's pending count), or nothing
    # is known: worth a no-wait probe. A source emptied by its last answer is pulled waiting.
    more: bool = True


class _CancelWatch:
    """The cancel notices of one task run, heeded from before its start until its call ends:
    `heard` is set to the run (as JSON) once it is CANCELLING or CANCELLED. Registered in
    `watches` (run id → watch), which the worker's subscriptions to its keys' cancel notices
    read."""

    def __init__(self, watches: dict[str, _CancelWatch], run_id: str) -> None:
        self.heard: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._watches = watches
        self._run_id = run_id
        watches[run_id] = self

    def on_notice(self, data: bytes) -> None:
        try:
            run = json.loads(data)
        except ValueError:
            return
        if isinstance(run, dict) and run.get("state_type") in CANCEL_STATES and not self.heard.done():
            self.heard.set_result(run)

    async def close(self) -> None:
        if self._watches.get(self._run_id) is self:
            del self._watches[self._run_id]


def _server_identity(nc: NATS) -> str | None:
    """The cluster a connection reached, or its server when it is alone: the keep-alive
    connection must reach the broker the worker's messages came from."""
    info = getattr(nc, "_server_info", None) or {}
    return info.get("cluster") or info.get("server_id")


class _Pulse:
    """Keeps the worker's messages alive from a thread of its own, with its own event loop and
    its own connection: an in-progress acknowledgement (`+WPI`, what `Msg.in_progress` sends)
    to the reply subject of each message held (`hold` … `release`, counted: a run's message is
    held by its call and by a report at once) every `every` seconds. On the worker's loop,
    those timers would stop while an async task blocks the loop, and after the ack wait its
    run would be delivered to another worker and run twice.

    The thread keeps messages alive only while the worker's loop shows life (`stamp`, every
    `LOOP_STAMP_SECONDS`): a loop stuck for longer than `stuck_after` seconds loses its runs to
    other workers, as a dead worker does. A killed process takes the thread with it.

    A message it kept alive that the worker hands back with a delay goes back through it
    (`nak`), after its keep-alives: JetStream takes a `+WPI` that reaches it after a delayed
    nak as a fresh start of the ack wait (nats-server `progressUpdate` resets the time the nak
    had set), so a keep-alive of this connection landing after a nak of the worker's (two
    connections: no order between them) would bring the message back after the ack wait
    instead of the delay, or cut a delay longer than the ack wait short."""

    def __init__(self, settings: Settings, name: str, every: float, stuck_after: float) -> None:
        self.settings = settings
        self.name = name
        self.every = every
        self.stuck_after = stuck_after
        self.beats = 0  # rounds of acknowledgements sent (tests)
        self.server: str | None = None  # the NATS server (or cluster) its connection reached
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        self._seen_at = time.monotonic()
        self._stuck = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._nc: NATS | None = None
        self._naks: set[asyncio.Task] = set()  # on their way out, on its loop

    async def start(self) -> None:
        """Starts the thread and waits for its connection (raises what the connect raised)."""
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.name, daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stops the thread (its connection closed) and waits for it to end."""
        self._stopping = True
        loop, wake, thread = self._loop, self._wake, self._thread
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop ended already
                loop.call_soon_threadsafe(wake.set)
        if thread is not None:
            await asyncio.to_thread(thread.join)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    def stamp(self) -> None:
        self._seen_at = time.monotonic()

    def hold(self, subject: str) -> None:
        with self._lock:
            self._held[subject] = self._held.get(subject, 0) + 1

    def release(self, subject: str) -> None:
        with self._lock:
            left = self._held.get(subject, 0) - 1
            if left > 0:
                self._held[subject] = left
            else:
                self._held.pop(subject, None)

    def nak(self, subject: str, delay: float) -> bool:
        """Hands a released message back with a delay (`-NAK {"delay": ns}`, what
        `Msg.nak(delay)` sends) on this thread's connection, behind every keep-alive it has sent
        for it; not waited for (a nak is never answered). False when the thread has stopped or
        is stopping: the caller sends it itself."""
        loop, nc = self._loop, self._nc
        if self._stopping or loop is None or nc is None:
            return False
        payload = b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode() if delay else b"-NAK"
        try:
            loop.call_soon_threadsafe(self._send_nak, nc, subject, payload)
        except RuntimeError:  # its loop has ended
            return False
        return True

    def _send_nak(self, nc: NATS, subject: str, payload: bytes) -> None:
        sending = asyncio.ensure_future(self._publish(nc, subject, payload))
        self._naks.add(sending)
        sending.add_done_callback(self._naks.discard)

    @staticmethod
    async def _publish(nc: NATS, subject: str, payload: bytes) -> None:
        with contextlib.suppress(Exception):  # lost, as a nak of a broken connection is
            await nc.publish(subject, payload)

    def _run(self, ready: Future[None]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(ready))
        finally:
            loop.close()

    async def _serve(self, ready: Future[None]) -> None:
        try:
            nc = await connect(self.settings, name=self.name, check_version=False)
        except BaseException as e:
            if not ready.cancelled():
                ready.set_exception(e)
            return
        self._loop, self._wake, self._nc = asyncio.get_running_loop(), asyncio.Event(), nc
        self.server = _server_identity(nc)
        try:
            if ready.cancelled():  # its start was given up while it connected
                return
            ready.set_result(None)
            while not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.every)
                if not self._stopping:
                    await self._beat(nc)
        finally:
            await asyncio.gather(*self._naks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await nc.close()

    async def _beat(self, nc: NATS) -> None:
        if time.monotonic() - self._seen_at > self.stuck_after:
            if not self._stuck:
                log.error("task worker %s: its event loop has shown no life for %.0f s; its runs are no longer "
                          "kept and will be delivered to other workers", self.name, self.stuck_after)
                self._stuck = True
            return
        self._stuck = False
        with self._lock:
            subjects = list(self._held)
        for subject in subjects:
            with self._lock:
                if subject not in self._held:
                    # Released during this round: its nak may be on its way (`nak`). Checked
                    # and sent in one step of this loop, which a nak handed over meanwhile
                    # follows.
                    continue
            with contextlib.suppress(Exception):
                await nc.publish(subject, b"+WPI")
        self.beats += 1


class _KeepAlive:
    """A message kept from being delivered to another worker, until `cancel()`: by the pulse
    thread when the worker has one (`_Pulse`), else by an in-progress acknowledgement every
    `every` seconds from the worker's loop. One due but not yet sent when it is cancelled is
    dropped: sent after a delayed nak, it would replace the nak's delay with the ack wait."""

    def __init__(self, msg: Msg, every: float, beats: set[asyncio.Task], pulse: _Pulse | None = None):
        self.msg = msg
        self.every = every
        self.beats = beats
        self.loop = asyncio.get_running_loop()
        self.pulse = pulse if pulse is not None and pulse.running and msg.reply else None
        self.timer: asyncio.TimerHandle | None = None
        self.cancelled = False
        if self.pulse is not None:
            self.pulse.hold(msg.reply)
        else:
            self.timer = self.loop.call_later(every, self._beat)

    def _beat(self) -> None:
        beat = asyncio.ensure_future(self._send())
        self.beats.add(beat)
        beat.add_done_callback(self.beats.discard)
        self.timer = self.loop.call_later(self.every, self._beat)

    async def _send(self) -> None:
        if self.cancelled:
            return
        with contextlib.suppress(Exception):
            await self.msg.in_progress()

    def cancel(self) -> None:
        self.cancelled = True
        if self.pulse is not None:
            self.pulse.release(self.msg.reply)
            self.pulse = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _SlotWait:
    """A run its tags' limits hold back (WAIT), whose message this worker keeps, alive, until a
    slot of one of its tags is given back or the WAIT's delay has passed (`timer`). It holds
    none of the worker's run slots meanwhile. `waking`: a notice chose it (its jitter runs);
    `woken`: it waits for a run slot of this worker, to be proposed again."""

    def __init__(self, source: _Source, msg: Msg, run: TaskRun, keep_alive: _KeepAlive, watch: _CancelWatch):
        self.source = source
        self.msg = msg
        self.run = run
        self.tags = list(dict.fromkeys(run.tags))
        self.keep_alive = keep_alive
        self.watch = watch
        self.timer: asyncio.TimerHandle | None = None
        self.waking = False
        self.woken = False


def _freed_count(data: bytes) -> int:
    """How many more runs a tag-freed notice says may start (at least 1, at most
    `EVERY_WAITER`: a limit removed)."""
    try:
        freed = json.loads(data).get("freed")
    except (ValueError, AttributeError):
        return 1
    return max(1, min(freed, EVERY_WAITER)) if isinstance(freed, int) and not isinstance(freed, bool) else 1


def _refresh(run: TaskRun) -> dict[str, bool]:
    """`refresh_cache`, as its submitter wrote it in the state that queued the run: carried to
    its start (no cached state taken) and to its retries."""
    details = run.state.state_details if run.state is not None else None
    return {"refresh_cache": True} if details is not None and details.refresh_cache else {}


def _retrieve(task: asyncio.Task) -> None:
    """A call's exception is read (and so not reported as never retrieved) once it ends."""
    if not task.cancelled():
        task.exception()


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
        self.js = nc.jetstream(timeout=settings.request_timeout, prefix=settings.js_api_prefix)
        self.sources: list[_Source] = []
        self._running: dict[asyncio.Task, Msg] = {}
        self._wake = asyncio.Event()
        # The runs this worker handles now, with the message (`<stream>:<sequence>`) each came from.
        self._active: dict[uuid.UUID, str] = {}
        self._taking = True
        # Set by `hand_back_now`: a stop's grace period ends at once.
        self._hurry = asyncio.Event()
        self.started = 0  # runs this worker started (for tests and benchmarks)
        self.finished = 0
        self.pulls = 0  # pull requests it sent
        self.cancelled = 0  # runs it stopped because they were cancelled while they ran
        self.tag_waits = 0  # times a run was told to WAIT for its tags and kept here until a slot is freed
        # Cancelled async calls that did not stop within CANCEL_WAIT_SECONDS (kept referenced).
        self._strays: set[asyncio.Task] = set()
        # The runs whose cancel notices it heeds now (run id → watch), and its subscriptions to
        # its keys' notices.
        self._watches: dict[str, _CancelWatch] = {}
        self._cancel_subs: list[Any] = []
        # The runs waiting for a slot of their tags (run id → wait), each tag's oldest first, the
        # ones woken and waiting for a run slot here, and the subscription to the tag-freed notices.
        self._slot_waits: dict[uuid.UUID, _SlotWait] = {}
        self._tag_waiters: dict[str, list[_SlotWait]] = {}
        self._woken: list[_SlotWait] = []
        self._tag_sub: Any = None
        # When each tag's last notice was heard (loop time): a notice heard while a run's start
        # was on its way, before its WAIT came back, wakes it as soon as it waits.
        self._freed_at: dict[str, float] = {}
        self._beats: set[asyncio.Task] = set()  # the in-progress acknowledgements being sent
        # The thread that keeps its messages alive while it works on them (from `start` to
        # `stop`), and the task by which its loop shows that thread it is alive.
        self._pulse: _Pulse | None = None
        self._stamping: asyncio.Task | None = None
        # Its starts and outcomes, sent together when several are made at once.
        self.reports = ReportBatcher(self._command)

    async def _command(self, name: str, body: bytes) -> dict[str, Any]:
        raw = await self.nc.request(self.settings.command_subject(name), body, timeout=self.settings.request_timeout)
        reply: dict[str, Any] = json.loads(raw.data)
        return reply

    async def start(self) -> None:
        """Binds to (creating if needed) the durable consumers of its keys, and says it is here
        (its first heartbeat), so that a worker that has started is listed at once."""
        for key in self.keys:
            for side in SIDES:
                stream = task_stream_name(self.settings, side)
                try:
                    await self.js.add_consumer(stream, task_consumer_config(key, side, self.settings))
                except NotFoundError:
                    raise TaskSourcesUnavailable(
                        f"the task stream {stream} does not exist: the runledger service creates it when it "
                        f"starts (namespace {self.settings.namespace!r}); is it running?") from None
                except APIError as e:
                    raise TaskSourcesUnavailable(
                        f"the consumer of task key {key!r} ({side} side) on {stream} cannot be created: "
                        f"{e.description or e}") from None
                source = _Source(key, side, pull_subject=f"{self.settings.js_api_prefix}.CONSUMER.MSG.NEXT."
                                                                   f"{stream}.{consumer_name(key, side)}",
                                 inbox=self.nc.new_inbox())
                source.sub = await self.nc.subscribe(source.inbox, cb=self._arrived(source))
                self.sources.append(source)
            # The subject of `broker_auth.cancel_subject` (not imported: it brings the broker's configuration).
            self._cancel_subs.append(await self.nc.subscribe(
                f"{self.settings.namespace}.taskrun.cancel.{encode_task_key(key)}.*", cb=self._on_cancel_notice))
        # The subject of `broker_auth.tag_freed_subject`. A broker whose configuration predates it
        # refuses the subscription (asynchronously): the runs then wait out their WAIT's delay.
        self._tag_sub = await self.nc.subscribe(f"{self.settings.namespace}.taskrun.tagfreed.*",
                                                cb=self._on_tag_freed)
        await self._start_pulse()
        try:
            await self._heartbeat()
        except BaseException:
            await self._stop_pulse()  # a start given up leaves no thread nor connection behind
            raise

    async def _start_pulse(self) -> None:
        """Its keep-alive thread, on a connection of its own with the same settings. Where that
        connection cannot be made (a FastStream app whose broker was given credentials the
        settings lack), its loop keeps its messages alive, as before, and says so."""
        pulse = _Pulse(self.settings, f"{self.worker_id}-keepalive", self._keep_alive_every(),
                       self.settings.task_worker_stuck_loop_seconds)
        try:
            await pulse.start()
            if pulse.server != _server_identity(self.nc):
                await pulse.stop()
                raise ConnectionError(f"its settings reach {pulse.server!r}, the worker's connection "
                                      f"{_server_identity(self.nc)!r}")
        except Exception as e:
            log.warning("task worker %s could not open its keep-alive connection (%s: %s): its event loop keeps "
                        "its runs alive, and an async task that blocks that loop longer than the ack wait "
                        "(%g s) may run twice", self.worker_id, type(e).__name__, e,
                        self.settings.task_ack_wait_seconds)
            return
        self._pulse = pulse
        self._stamping = asyncio.create_task(self._stamp_loop())

    async def _stamp_loop(self) -> None:
        pulse = self._pulse
        while pulse is not None:
            pulse.stamp()
            await asyncio.sleep(LOOP_STAMP_SECONDS)

    async def _stop_pulse(self) -> None:
        stamping, self._stamping = self._stamping, None
        if stamping is not None:
            stamping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stamping
        pulse, self._pulse = self._pulse, None
        if pulse is not None:
            await pulse.stop()

    async def _on_cancel_notice(self, msg: Msg) -> None:
        watch = self._watches.get(msg.subject.rsplit(".", 1)[-1])
        if watch is not None:
            watch.on_notice(msg.data)

    async def serve(self, stop: asyncio.Event) -> None:
        """Takes and runs task runs until `stop` is set, then stops as `stop()` says."""
        taking = asyncio.create_task(self._take_loop())
        beating = asyncio.create_task(self._heartbeats())
        try:
            try:
                await stop.wait()
            finally:
                self._taking = False
                for task in (taking, beating):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await self.stop()
            with contextlib.suppress(Exception):
                await forget_task_worker(self.js, self.settings, self.worker_id)
        finally:
            await self._stop_pulse()  # cancelled too: nothing it held is kept alive any more

    async def _heartbeats(self) -> None:
        """Says it is here, with its keys, so that task workers can be listed (`ListTaskWorkers`)."""
        while True:
            await asyncio.sleep(TASK_WORKER_HEARTBEAT_SECONDS)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        try:
            await put_task_worker(self.js, self.settings, self.worker_id, self.keys, datetime.now(UTC).isoformat())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.info("a task worker heartbeat failed (%s); the next one follows", type(e).__name__)

    @property
    def running(self) -> int:
        """How many runs it is running now (those a stop lets finish)."""
        return len(self._running)

    def hand_back_now(self) -> None:
        """Ends the grace period of a stop at once (or of the next one): the runs still running
        are cancelled and handed back, as when the grace period runs out. A second SIGTERM or
        Ctrl-C of `runledger task-worker`."""
        self._hurry.set()

    async def stop(self) -> None:
        """Lets running runs finish within the grace period (cut short by `hand_back_now`) and
        hands back the rest.

        The pull inboxes are drained before anything is handed back: a message handed back
        while a pull request of this worker is still open on the server may be delivered to
        it again, and once the inbox is gone that delivery is lost until the acknowledgement
        wait runs out (a minute by default). Drained, the server knows no one listens there
        and skips those requests; what it sent before is handed back as it arrives."""
        self._taking = False
        await self._drain_pulls()
        await self._hand_back_held()
        await self._hand_back_slot_waits()
        if self._running:
            loop = asyncio.get_running_loop()
            until = loop.time() + self.grace_seconds
            hurry = asyncio.create_task(self._hurry.wait())
            try:
                while self._running and not self._hurry.is_set() and loop.time() < until:
                    await asyncio.wait([*self._running, hurry], timeout=until - loop.time(),
                                       return_when=asyncio.FIRST_COMPLETED)
            finally:
                hurry.cancel()
            pending = list(self._running)
            for task in pending:
                running = self._running.get(task)
                task.cancel()
                if running is not None:
                    with contextlib.suppress(Exception):
                        await running.nak()
        for sub in [*self._cancel_subs, self._tag_sub]:
            if sub is None:
                continue
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._stop_pulse()

    async def _drain_pulls(self) -> None:
        """Unsubscribes the pull inboxes once the server has sent all it will send there (a
        round trip, all inboxes at once), each message of it handed back by `_arrived`; plainly,
        if the broker does not answer in time."""
        subs = [source.sub for source in self.sources if source.sub is not None]
        for source in self.sources:
            source.sub = None
        try:
            await asyncio.wait_for(asyncio.gather(*(sub.drain() for sub in subs), return_exceptions=True),
                                   DRAIN_SECONDS)
        except TimeoutError:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    # -----------------------------------------------------------------------------------------
    # Taking runs in order

    async def _take_loop(self) -> None:
        """Starts the first run available, in the sources' order, whenever there is room.

        Before each start it asks the sources ahead of the first one with a message here for
        one message each (no wait), and chooses once they have answered: the first run in
        order among those available. (With no message here, it asks only up to the last source
        whose last answer said more were waiting.) When none is, it asks all of them again,
        waiting, and takes whichever comes first. Each source has at most one request out, so
        at most one message per source waits here unstarted (kept alive meanwhile, or handed
        back when every slot is busy). An error (a broker away) is logged and the loop goes on, unless
        the connection closed for good."""
        while self._taking:
            try:
                await self._take_runs()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.nc.is_closed:
                    log.error("task worker %s lost its broker connection for good; it takes no more runs",
                              self.worker_id)
                    return
                log.warning("taking task runs failed (%s: %s); trying again", type(e).__name__, e)
                await asyncio.sleep(0.5)

    async def _take_runs(self) -> None:
        loop = asyncio.get_running_loop()
        keep_alive_at = loop.time()
        while self._taking:
            if self.limit - len(self._running) > 0 and self._woken:
                # A run woken from its wait for a tag's slot: it was taken before anything held now.
                self._resume(self._woken.pop(0))
                continue
            if self.limit - len(self._running) > 0:
                # Sources before the first with a message here may have one on the server: ask
                # them (no wait) and choose once they have answered. With none here, the sources
                # after the last that said more were waiting are not probed: they were empty a
                # moment ago, and a probe would mostly hear so (a round trip per run at a
                # worker that keeps up); they are pulled waiting below instead.
                first = self._first_held()
                if first == len(self.sources):
                    first = 1 + max((i for i, src in enumerate(self.sources) if src.more), default=-1)
                await self._ask(self.sources[:first], no_wait=True)
                await self._until(lambda: not any(src.pulling and src.probing for src in self.sources),
                                  timeout=self.settings.request_timeout)
                first = self._first_held()
                if first < len(self.sources):
                    self._start(self.sources[first], self.sources[first].held.pop(0))
                    continue
                await self._ask(self.sources, no_wait=False)  # nothing anywhere: wait on all
            self._wake.clear()
            now = loop.time()
            if now >= keep_alive_at:
                await self._keep_held_alive()
                keep_alive_at = now + self._keep_alive_every()
            if not (self.limit - len(self._running) > 0 and (self._first_held() < len(self.sources) or self._woken)):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            for src in self.sources:
                if src.pulling and loop.time() > src.pull_until + 1.0:
                    src.pulling = src.probing = False  # its answer was lost (a reconnect): ask again

    def _first_held(self) -> int:
        """The index of the first source with a message here (len(sources): none has one)."""
        return next((i for i, src in enumerate(self.sources) if src.held), len(self.sources))

    async def _ask(self, sources: list[_Source], no_wait: bool) -> None:
        """One pull request to each of `sources` that has none out and nothing held."""
        loop = asyncio.get_running_loop()
        for src in sources:
            if src.pulling or src.held:
                continue
            request: dict[str, Any] = {"batch": 1}
            if no_wait:
                request["no_wait"] = True
            else:
                request["expires"] = int(self.poll_seconds * 1e9)
            src.pulling, src.probing = True, no_wait
            self.pulls += 1
            src.pull_until = loop.time() + (0.0 if no_wait else self.poll_seconds)
            try:
                await self.nc.publish(src.pull_subject, json.dumps(request).encode(), reply=src.inbox)
            except Exception:
                src.pulling = False
                raise

    async def _until(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not ready():
            self._wake.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                for src in self.sources:
                    if src.probing:
                        src.pulling = src.probing = False
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def _arrived(self, source: _Source) -> Callable[[Msg], Any]:
        async def on_message(msg: Msg) -> None:
            source.pulling = source.probing = False
            status = msg.headers.get("Status") if msg.headers else None
            if status in ("404", "408"):
                source.more = False
            elif status is None:
                source.more = _pending_after(msg) != 0
            if status:  # 404 nothing there, 408 expired, 409 ...
                if status not in ("404", "408", "100"):
                    log.info("a pull on %s was answered %s %s", source.pull_subject, status,
                             (msg.headers or {}).get("Description", ""))
            elif self._taking:
                source.held.append(msg)
            else:
                with contextlib.suppress(Exception):
                    await msg.nak()  # stopping: back to another worker at once
            self._wake.set()
        return on_message

    def _start(self, source: _Source, msg: Msg) -> None:
        task = asyncio.create_task(self._handle(source, msg))
        self._running[task] = msg
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("handling a task run failed", exc_info=task.exception())

    async def _keep_held_alive(self) -> None:
        """Messages delivered here while every slot is busy go back at once to other workers
        (a negative acknowledgement); while there is room they wait their turn, kept alive."""
        busy = len(self._running) >= self.limit
        if busy:
            woken, self._woken = self._woken, []
            for wait in woken:
                await self._give_back_wait(wait)
        for src in self.sources:
            if busy:
                held, src.held = src.held, []
                for msg in held:
                    with contextlib.suppress(Exception):
                        await msg.nak()
                continue
            for msg in src.held:
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _hand_back_held(self) -> None:
        for src in self.sources:
            held, src.held = src.held, []
            for msg in held:
                with contextlib.suppress(Exception):
                    await msg.nak()

    # -----------------------------------------------------------------------------------------
    # Waiting for a tag's slot

    def _wait_for_slot(self, source: _Source, msg: Msg, run: TaskRun, delay: float, proposed_at: float) -> None:
        """Keeps the message of a run its tags' limits hold back, alive and outside the run
        slots, until a notice of one of its tags wakes it or `delay` has passed; it is then
        proposed again (`_resume`). The run stays in `_active` meanwhile: a copy of its message
        delivered here is handled as one of a run this worker is busy with."""
        wait = _SlotWait(source, msg, run, self._keep_alive(msg), self._watch(run))
        self.tag_waits += 1
        loop = asyncio.get_running_loop()
        wait.timer = loop.call_later(delay, self._wake_slot_wait, wait)
        # Cancelled while it waits: proposed again at once, to be ended CANCELLED, never run.
        wait.watch.heard.add_done_callback(lambda _: self._wake_slot_wait(wait))
        self._slot_waits[run.id] = wait
        for tag in wait.tags:
            self._tag_waiters.setdefault(tag, []).append(wait)
        if any(self._freed_at.get(tag, float("-inf")) >= proposed_at for tag in wait.tags):
            # A slot was freed while the start was on its way (the WAIT may predate it).
            wait.waking = True
            loop.call_later(random.uniform(0, TAG_WAKE_JITTER_SECONDS), self._wake_slot_wait, wait)

    async def _on_tag_freed(self, msg: Msg) -> None:
        """`freed` slots of a tag were given back: at most that many of the runs waiting here for
        the tag (the oldest first) are proposed again, each after a small random jitter."""
        try:
            tag = decode_task_key(msg.subject.rsplit(".", 1)[-1])
        except (ValueError, IndexError):
            return
        loop = asyncio.get_running_loop()
        if len(self._freed_at) > 1_000:  # only the last moments matter (see `_wait_for_slot`)
            self._freed_at = {t: at for t, at in self._freed_at.items() if at > loop.time() - 60}
        self._freed_at[tag] = loop.time()
        chosen = [w for w in self._tag_waiters.get(tag, []) if not w.waking][:_freed_count(msg.data)]
        for wait in chosen:
            wait.waking = True
            loop.call_later(random.uniform(0, TAG_WAKE_JITTER_SECONDS), self._wake_slot_wait, wait)

    def _forget_slot_wait(self, wait: _SlotWait) -> None:
        """No longer waiting for a tag (woken, or handed back)."""
        if wait.timer is not None:
            wait.timer.cancel()
            wait.timer = None
        for tag in wait.tags:
            waiters = self._tag_waiters.get(tag)
            if waiters is not None and wait in waiters:
                waiters.remove(wait)
                if not waiters:
                    del self._tag_waiters[tag]

    def _wake_slot_wait(self, wait: _SlotWait) -> None:
        """Its wait is over: it is proposed again once this worker has a run slot for it."""
        if wait.woken or self._slot_waits.get(wait.run.id) is not wait:
            return
        wait.woken = True
        self._forget_slot_wait(wait)
        self._woken.append(wait)
        self._wake.set()

    def _resume(self, wait: _SlotWait) -> None:
        """Proposes a woken run again, in one of the worker's run slots, through the path of a
        fresh delivery of its message (which may WAIT again)."""
        self._release_slot_wait(wait)
        self._start(wait.source, wait.msg)

    def _release_slot_wait(self, wait: _SlotWait) -> None:
        self._forget_slot_wait(wait)
        wait.keep_alive.cancel()
        if self._slot_waits.get(wait.run.id) is wait:
            del self._slot_waits[wait.run.id]
            self._active.pop(wait.run.id, None)
        if self._watches.get(str(wait.run.id)) is wait.watch:
            del self._watches[str(wait.run.id)]

    async def _give_back_wait(self, wait: _SlotWait) -> None:
        """Hands a waiting run's message back (delivered again at once, to any worker)."""
        self._release_slot_wait(wait)
        with contextlib.suppress(Exception):
            await wait.msg.nak()

    async def _hand_back_slot_waits(self) -> None:
        self._woken = []
        for wait in list(self._slot_waits.values()):
            await self._give_back_wait(wait)

    # -----------------------------------------------------------------------------------------
    # Running one

    async def _handle(self, source: _Source, msg: Msg) -> None:
        try:
            run = TaskRun.model_validate_json(msg.data)
        except ValueError:
            log.error("a message on %s is not a task run; dropped", msg.subject)
            await msg.term()
            return
        message = f"{msg.metadata.stream}:{msg.metadata.sequence.stream}" if msg.metadata else ""
        if run.id in self._active:
            if self._active[run.id] != message:
                # Another message of a run this worker is busy with (its retry, queued by this
                # worker a moment ago, or a copy): back in a moment, when the rules can tell.
                await msg.nak(delay=0.5)
            return  # the same message again, while it runs: its ack settles it
        self._active[run.id] = message
        try:
            await self._start_and_run(source, msg, run)
        finally:
            if run.id not in self._slot_waits:  # a run waiting for a tag's slot stays this worker's
                self._active.pop(run.id, None)

    def _watch(self, run: TaskRun) -> _CancelWatch:
        """Heeds the run's cancel notices, from before its start is sent, so that a cancel
        written after the start is heard (the key's subscription is older than both)."""
        return _CancelWatch(self._watches, str(run.id))

    async def _start_and_run(self, source: _Source, msg: Msg, run: TaskRun) -> None:
        due = run.state.state_details.scheduled_time if run.state is not None else None
        early = (due - datetime.now(UTC)).total_seconds() if due is not None else 0.0
        if early > 0.01:
            # Queued for later (a retry's delay): back when it is due. The service would only
            # say so in whole seconds.
            await msg.nak(delay=early)
            return
        watch = self._watch(run)
        try:
            await self._start_and_run_watched(source, msg, run, watch)
        finally:
            await watch.close()

    async def _start_and_run_watched(self, source: _Source, msg: Msg, run: TaskRun, watch: _CancelWatch) -> None:
        meta = msg.metadata
        attempt = meta.num_delivered if meta else 1
        queued_by = run.queued_state_id or (run.state.id if run.state is not None else None)
        start: dict[str, Any] = {"id": str(run.id), "state": {"type": "RUNNING"}, "task_worker_id": self.worker_id}
        if run.cache_key is not None:
            # A cached run is answered with a copy of its key's state (REJECT, `Cached`): not run,
            # unless its submitter asked for the cache to be refreshed.
            start["state"]["state_details"] = {"cache_key": run.cache_key, **_refresh(run)}
        if queued_by is not None:
            message = f"{meta.stream}:{meta.sequence.stream}" if meta else None
            start["delivery"] = {"state_id": str(queued_by), "attempt": attempt, "message": message}
        proposed_at = asyncio.get_running_loop().time()
        reply = await self._report(start, msg)
        if reply is None:
            return  # left for redelivery
        if not reply.get("ok"):
            code = reply["error"].get("code")
            if code == "not_found":
                if _age_seconds(meta) < NOT_FOUND_GRACE_SECONDS:
                    # Published while its create was being stored: another service instance may
                    # not see it yet (handlers/task_dispatch.py). Again in a moment.
                    await self._nak_after_report(msg, 0.2)
                else:
                    await msg.ack()  # deleted meanwhile, or its create never stored: nothing to run
            elif code == "invalid":
                # Refused as it is (a run too large for any state): asked again each time
                # sooner would only repeat the refusal, once a second, for ever.
                delay = _unrecorded_delay(attempt)
                log.error("task run %s cannot start: %s; its message is handed back, to be tried again in %g s",
                          run.id, _cut(str(reply["error"].get("message")), 2_000), delay)
                await self._nak_after_report(msg, delay)
            else:
                log.warning("task run %s could not start: %s", run.id, reply["error"])
                await self._nak_after_report(msg, 1)
            return
        status = reply["orchestration"]["status"]
        details = reply["orchestration"]["details"]
        current = reply.get("result") or {}
        if status == "WAIT":
            delay = details.get("delay_seconds") or 1
            if run.tags and self._taking:
                # Held back by its tags' limits (a run without tags waits for another reason): kept
                # here, out of the run slots, until a slot of one of its tags is given back.
                self._wait_for_slot(source, msg, run, delay, proposed_at)
            else:
                await self._nak_after_report(msg, delay)
            return
        if status == "ABORT":
            # It can never start (a tag limit of 0, a stopped flow run): ended, so that it
            # neither waits for ever nor comes back from the recovery sweep.
            await self._report({"id": str(run.id), "state": {
                "type": "FAILED", "state_details": {"retriable": False},
                "message": storable_text(f"The task run cannot start: {details.get('reason')}")[:10_000]}}, msg)
            await msg.ack()
            return
        if status != "ACCEPT":
            ours = (status == "REJECT" and current.get("type") == "RUNNING" and not details.get("copy")
                    and details.get("task_worker_id") == self.worker_id)
            if not ours:
                if details.get("copy") and current.get("type") == "CANCELLING":
                    # Set CANCELLING while it waited (or before this worker's start took): it ends
                    # CANCELLED, never run. (For a copy of a run another worker holds, that report
                    # is refused: its holder ends it.)
                    await self._end_cancelling(run, msg, current.get("message") or "Cancelled before it started.")
                if details.get("copy") or current.get("type") != "RUNNING":
                    await msg.ack()  # a copy, or finished, cached, or not allowed to run
                # else: the message another worker runs the run from, delivered here too: its
                # holder's acknowledgement settles it.
                return
            # Ours already: the reply to our start was lost and the start sent again.
        self.started += 1
        function = self.functions[source.task_key]
        keep_alive = self._keep_alive(msg)
        running_id = (reply.get("result") or {}).get("id")  # the RUNNING state this attempt runs in
        try:
            # The run's own size, as the service wrote it in its message: the outcome's event
            # carries the run again.
            room = inline_limit(self.nc.max_payload, len(msg.data))
            call = asyncio.create_task(self._call(function, run, str(running_id or run.id), room))
            call.add_done_callback(_retrieve)
            try:
                await asyncio.wait({call, watch.heard}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                call.cancel()  # the worker is stopping and the grace period ran out
                raise
            await watch.close()  # no need to hear the outcome this worker reports
            if watch.heard.done():  # cancelled before its outcome was reported: that outcome is dropped
                await self._stop_cancelled(run, msg, call, watch.heard.result())
                return
            outcome = call.result()
            if outcome["type"] == "COMPLETED" and run.cache_key is not None:
                # Recorded under its cache key, for the runs that ask for it later.
                outcome["state_details"] = {**outcome.get("state_details", {}), "cache_key": run.cache_key,
                                            "cache_expiration": run.cache_expiration.isoformat()
                                            if run.cache_expiration is not None else None}
            reply = await self._report({"id": str(run.id), "state": outcome, "task_worker_id": self.worker_id}, msg)
            refusals: list[str] = []
            if reply is not None and not reply.get("ok") and reply["error"].get("code") == "invalid":
                # The outcome itself cannot be recorded (a value the log cannot store): say so, in
                # as few bytes as can say it, no data, so that it fits where the outcome did not.
                why = storable_text(str(reply["error"].get("message")))
                refusals.append(why)
                problem = {"type": "FAILED", "state_details": {"retriable": False},
                           "message": _cut(f"The task's outcome could not be recorded: {why}", SHORT_FAILURE_MESSAGE)}
                reply = await self._report({"id": str(run.id), "state": problem, "task_worker_id": self.worker_id},
                                           msg)
            if reply is None:
                return
            if not reply.get("ok") and reply["error"].get("code") != "not_found":  # not_found: deleted, nothing runs
                # Its keep-alive let go first: one landing after the delayed nak would cut the delay
                # to the ack wait (`_Pulse.nak`).
                keep_alive.cancel()
                await self._unrecorded(run, msg, "; then ".join([*refusals, str(reply["error"].get("message"))]))
                return
            if reply.get("ok") and reply["orchestration"]["status"] == "REJECT":
                written = reply.get("result") or {}
                holder = reply["orchestration"]["details"].get("task_worker_id")
                if holder not in (None, self.worker_id):
                    # Taken over (this worker was presumed dead): the message is the new holder's
                    # now, and an acknowledgement would remove it under that holder.
                    return
                if written.get("name") == "AwaitingRetry" and not await self._queue_retry(run, written, msg):
                    # Not queued: the message is left for its redelivery, which starts the retry
                    # (an AwaitingRetry not queued is no recovery sweep's to requeue).
                    return
            self.finished += 1
            await msg.ack()
        finally:
            keep_alive.cancel()

    async def _unrecorded(self, run: TaskRun, msg: Msg, why: str) -> None:
        """Neither the run's outcome nor the short FAILED that says so was recorded: the run
        is still RUNNING, held by this worker, and an acknowledgement would leave it so for ever
        (nothing settles a RUNNING run whose message is gone). Its message goes back instead,
        after a delay that doubles at each delivery: the next delivery starts it again (as its
        holder, or taken over by another worker) and runs the function again, at least once
        as a takeover would. A cause that goes away (the broker's max payload raised, the
        service upgraded) lets a later attempt record the outcome; one that stays costs one
        attempt an hour, each logged, never a fast loop. A terminated message would stop the
        attempts, and leave the run RUNNING with nothing to end it."""
        meta = msg.metadata
        delay = _unrecorded_delay(meta.num_delivered if meta else 1)
        log.error("task run %s: its outcome could not be recorded (%s); it stays RUNNING and its message is "
                  "handed back, to be run again in %g s", run.id, _cut(why, 2_000), delay)
        await self._nak_after_report(msg, delay)

    async def _stop_cancelled(self, run: TaskRun, msg: Msg, call: asyncio.Task, notice: dict[str, Any]) -> None:
        """The run became CANCELLING or CANCELLED while its function ran: the call is cancelled
        (a plain function's thread runs on, its outcome dropped), a CANCELLING run this worker
        holds is reported CANCELLED, and its message is acknowledged, so that it is not run
        again."""
        # A plain function runs in a thread: cancelling its call stops the wait for it, not the
        # thread, which runs the function to its end.
        in_thread = not inspect.iscoroutinefunction(self.functions.get(run.task_key))
        stopped = call.done()
        if not stopped:
            call.cancel()
            await asyncio.wait({call}, timeout=CANCEL_WAIT_SECONDS)
            stopped = call.done() and not in_thread
            if not call.done():
                log.warning("task run %s was cancelled but its function did not stop within %g s; its outcome "
                            "will be dropped", run.id, CANCEL_WAIT_SECONDS)
                self._strays.add(call)
                call.add_done_callback(self._strays.discard)
        self.cancelled += 1
        if notice.get("state_type") == "CANCELLING":
            holder = notice.get("task_worker_id")
            if holder not in (None, self.worker_id):
                return  # taken over (this worker was presumed dead): the holder ends it, and owns the message
            message = (notice.get("state") or {}).get("message")
            if not await self._end_cancelling(run, msg, message):
                return  # left for redelivery
        await msg.ack()
        if stopped:
            log.info("task run %s was cancelled while it ran; its function stopped", run.id)
        elif in_thread:
            log.info("task run %s was cancelled while it ran; its slot is free, but a plain function cannot be "
                     "interrupted: its thread runs on to the function's end, and what it returns is dropped", run.id)
        else:
            log.info("task run %s was cancelled while it ran; its slot is free, and its function, still running, "
                     "will have its outcome dropped", run.id)

    async def _end_cancelling(self, run: TaskRun, msg: Msg, message: str | None) -> bool:
        """Reports CANCELLED for a CANCELLING run, as its holder (or for a run set CANCELLING while
        it waited, which nobody holds): Prefect's CANCELLING -> CANCELLED once the run stopped.
        False when the report never got through."""
        state = {"type": "CANCELLED",
                 "message": message or f"Stopped by task worker {self.worker_id!r} while it ran."}
        reply = await self._report({"id": str(run.id), "state": state, "task_worker_id": self.worker_id}, msg)
        return reply is not None

    async def _call(self, function: TaskFunction, run: TaskRun, attempt: str,
                    room: int = MAX_RESULT_BYTES) -> dict[str, Any]:
        """The state the call comes to: COMPLETED with its value (or, when larger than `room`, a
        reference to it in the result store), or FAILED with its exception."""
        try:
            if inspect.iscoroutinefunction(function):
                value = await function(**run.parameters)
            else:
                value = await asyncio.to_thread(function, **run.parameters)
            return {"type": "COMPLETED", "data": result_data(value, room)}
        except asyncio.CancelledError:
            raise
        except ResultTooLarge as e:
            if e.encoded is not None and len(e.encoded) <= MAX_STORED_RESULT_BYTES:
                reference = await store_result(self.js, self.settings, str(run.id), attempt, e.encoded)
                return {"type": "COMPLETED", "data": reference}
            if e.encoded is not None:
                e = ResultTooLarge(f"the task's result is {len(e.encoded)} bytes as JSON, more than the "
                                   f"{MAX_STORED_RESULT_BYTES} a task run may store: store it yourself and "
                                   "return a reference to it")
            return {"type": "FAILED", "message": str(e), "state_details": {"retriable": False}}
        except Exception as e:
            return {"type": "FAILED", "message": storable_text(f"{type(e).__name__}: {e}")[:10_000],
                    "data": failure_data(e)}

    async def _queue_retry(self, run: TaskRun, retry: dict[str, Any], msg: Msg) -> bool:
        """The run's retries turned its failure into `AwaitingRetry`: that state, deferred, puts
        it on the key's retry side, due after its delay. Sent as this worker's (`task_worker_id`),
        which the rules accept only from the `AwaitingRetry` not yet queued: a run cancelled
        meanwhile stays cancelled. Sent with an idempotency key, so that a resend after a lost
        reply queues it once. False when the report never got through or was answered an error."""
        details = retry.get("state_details") or {}
        state = {"type": "SCHEDULED", "name": "AwaitingRetry", "message": retry.get("message"),
                 "state_details": {"deferred": True, "scheduled_time": details.get("scheduled_time"), **_refresh(run)}}
        reply = await self._report({"id": str(run.id), "state": state, "task_worker_id": self.worker_id,
                                    "idempotency_key": f"retry:{run.id}:{retry.get('id')}"}, msg)
        return reply is not None and bool(reply.get("ok"))

    async def _nak_after_report(self, msg: Msg, delay: float) -> None:
        """Hands back with a delay a message just reported on, which the keep-alive thread held
        meanwhile: through that thread (`_Pulse.nak`), behind the keep-alives it sent, which a
        nak on this connection could overtake. Those this connection sent went out before the
        report's request, so the server had them before it answered. No round trip: the thread
        sends it when its loop next runs."""
        pulse = self._pulse
        if pulse is None or not msg.reply or not pulse.nak(msg.reply, delay):
            await msg.nak(delay=delay)

    def _keep_alive(self, msg: Msg) -> _KeepAlive:
        """Tells JetStream the run is still being worked on, every third of the ack wait, until
        cancelled: from the keep-alive thread (`_Pulse`), which an async task blocking the
        loop does not stop; without one, from a timer on the loop."""
        return _KeepAlive(msg, self._keep_alive_every(), self._beats, self._pulse)

    def _keep_alive_every(self) -> float:
        return max(0.2, self.settings.task_ack_wait_seconds / 3)

    async def _report(self, body: dict[str, Any], msg: Msg) -> dict[str, Any] | None:
        """A `SetTaskRunState`, tried again while the service or the broker is away, or the
        service lost its races for the run (the run's message is kept alive meanwhile); None
        when it never got through. Sent with the other
        reports made at the same moment (`task_reports.ReportBatcher`)."""
        keep_alive = self._keep_alive(msg)
        pause = 0.05
        loop = asyncio.get_running_loop()
        give_up = loop.time() + REPORT_PATIENCE_SECONDS
        try:
            while True:
                try:
                    reply = await self.reports.report(body)
                    # `conflict`: the service lost its races for the run too often in a row and
                    # appended nothing; the report is safe to send again, as after an outage
                    # (where running the function again would not be).
                    if reply.get("ok") or reply.get("error", {}).get("code") not in ("unavailable", "conflict"):
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
