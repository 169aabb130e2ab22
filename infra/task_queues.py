"""Task-key subjects: the durable queues task workers take task runs from.

Each task key has two sides, `<ns>.task.<encoded key>.scheduled` and `<ns>.task.<encoded
key>.retry`, each in a stream of its own with work-queue retention (a message is gone once a
worker acknowledges it) and a per-subject bound that refuses the next message when full
(scheduled 1,000, retry 100 by default). Each side of each key has one durable pull consumer
that every worker serving the key shares, so each run goes to one worker, and one that does
not acknowledge it in time (it died) has it taken from it and delivered again.

Task keys may hold what subjects may not (dots, spaces, `*`, `>`, unicode):
`commands/task_keys.encode_task_key` is the one reversible encoding, used everywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
import weakref
from typing import Literal

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from runledger.commands.task_keys import encode_task_key

from .event_store import AckInbox
from .settings import Settings

log = logging.getLogger("runledger.tasks")

Side = Literal["scheduled", "retry"]
SIDES: tuple[Side, Side] = ("retry", "scheduled")  # the order a worker takes them in (retries first)
# The per-subject bound was reached (JetStream's "maximum messages per subject exceeded").
_FULL = 10077

def task_subject(settings: Settings, task_key: str, side: Side) -> str:
    return f"{settings.namespace}.task.{encode_task_key(task_key)}.{side}"


def task_stream_name(settings: Settings, side: Side) -> str:
    return f"{settings.namespace.upper()}_TASKS" if side == "scheduled" else f"{settings.namespace.upper()}_TASK_RETRIES"


def consumer_name(task_key: str, side: Side) -> str:
    """The durable consumer every worker of a key shares, for one side: a readable part of the
    key and a hash of all of it (consumer names allow fewer characters than keys, so the
    readable part alone could make two keys share a consumer)."""
    readable = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_-") else "_" for ch in task_key)[:48]
    return f"task_{side}_{readable}_{hashlib.sha256(task_key.encode()).hexdigest()[:24]}"


def queue_bound(settings: Settings, task_key: str, side: Side) -> int:
    """How many runs may wait on one side of a key: its own bound, else the side's default."""
    if side == "scheduled":
        return settings.task_queue_sizes.get(task_key, settings.task_queue_size)
    return settings.task_retry_queue_sizes.get(task_key, settings.task_retry_queue_size)


def stream_bound(settings: Settings, side: Side) -> int:
    """The stream's per-subject bound: the largest of the side's bounds. A key whose own bound
    is lower is held to it by the publisher, which counts before it publishes."""
    sizes = settings.task_queue_sizes if side == "scheduled" else settings.task_retry_queue_sizes
    default = settings.task_queue_size if side == "scheduled" else settings.task_retry_queue_size
    return max([default, *sizes.values()])


def task_stream_config(settings: Settings, side: Side) -> StreamConfig:
    return StreamConfig(
        name=task_stream_name(settings, side),
        description=f"runledger task runs waiting for a task worker ({side} side of each task key)",
        subjects=[f"{settings.namespace}.task.*.{side}"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        max_msgs_per_subject=stream_bound(settings, side),
        duplicate_window=settings.event_duplicate_window_seconds,
        allow_direct=True,
        num_replicas=settings.stream_replicas,
    )


async def ensure_task_streams(js: JetStreamContext, settings: Settings, *, change: bool = True) -> list[str]:
    """Creates the task streams, or raises their bounds; returns what it did (`change` False:
    what it would do, changing nothing). A lower bound is not applied: JetStream would delete
    the oldest runs of every key over it."""
    said = []
    for side in SIDES:
        wanted = task_stream_config(settings, side)
        assert wanted.name is not None
        try:
            info = await js.stream_info(wanted.name)
        except NotFoundError:
            if change:
                await js.add_stream(wanted)
            said.append(f"created stream {wanted.name}" if change else f"stream {wanted.name} missing")
            continue
        current = info.config
        bound, wanted_bound = current.max_msgs_per_subject or 0, wanted.max_msgs_per_subject or 0
        if 0 < wanted_bound < bound:
            log.warning("stream %s keeps its bound of %d runs per task key: lowering it to %d would delete "
                        "queued runs (drain the keys first, then delete the stream to recreate it)",
                        wanted.name, bound, wanted_bound)
            wanted = wanted.evolve(max_msgs_per_subject=bound)
        outdated = [field for field in ("max_msgs_per_subject", "duplicate_window")
                    if getattr(current, field) != getattr(wanted, field)]
        if outdated:
            if change:
                await js.update_stream(wanted)
            said.append(f"upgraded stream {wanted.name}: {', '.join(outdated)}" if change
                        else f"stream {wanted.name} outdated: {', '.join(outdated)}")
    return said


def task_consumer_config(task_key: str, side: Side, settings: Settings) -> ConsumerConfig:
    """Explicit acks within `task_ack_wait_seconds` (a worker extends it while it runs a task,
    so only a worker that stopped, or lost the broker, loses the run to another)."""
    return ConsumerConfig(
        name=consumer_name(task_key, side),
        durable_name=consumer_name(task_key, side),
        filter_subject=task_subject(settings, task_key, side),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.task_ack_wait_seconds,
        max_ack_pending=-1,
        inactive_threshold=None,
    )


class TaskKeyFull(Exception):
    """A task key's side holds as many runs as it may."""

    def __init__(self, task_key: str, side: Side, bound: int):
        super().__init__(f"Task key {task_key!r} is full: {bound} runs already wait on its {side} side.")
        self.task_key, self.side, self.bound = task_key, side, bound


class TaskPublisher:
    """Puts task runs on their key's subject, once each (message id: the run's id and the id of
    the state that queued it), waiting for room up to a bound when the key is full."""

    def __init__(self, js: JetStreamContext, settings: Settings, acks: AckInbox | None = None):
        self.js = js
        self.settings = settings
        # Where the stream's acknowledgements come back (the event store's, on the service):
        # nats-py's `js.publish` (a fresh inbox token and a timed wait each) was 6.6 % of the
        # service's CPU at task-run rates by the profile.
        self.acks = acks
        # Each stream's per-subject bound as the server has it (a lowered setting is not
        # applied to an existing stream: see `ensure_task_streams`), read once.
        self._stream_bounds: dict[Side, int] = {}

    async def _stream_bound(self, side: Side) -> int:
        if side not in self._stream_bounds:
            info = await self.js.stream_info(task_stream_name(self.settings, side))
            self._stream_bounds[side] = info.config.max_msgs_per_subject or stream_bound(self.settings, side)
        return self._stream_bounds[side]

    async def publish(self, task_key: str, side: Side, run_id: str, state_id: str, body: bytes,
                      wait_seconds: float = 0.0) -> None:
        """The stream refuses a message over its per-subject bound (the largest bound of the
        side); a key with a lower bound of its own is counted first (one more request; two
        publishers at once may pass it by one each)."""
        subject = task_subject(self.settings, task_key, side)
        headers = {"Nats-Msg-Id": f"{run_id}:{state_id}"}
        bound = queue_bound(self.settings, task_key, side)
        counted = bound < await self._stream_bound(side)
        deadline = time.monotonic() + wait_seconds
        pause = 0.01
        while True:
            full = counted and await self.count(task_key, side) >= bound
            if not full:
                try:
                    await self._put(subject, body, headers)
                    return
                except (ServiceUnavailableError, APIError) as e:
                    if getattr(e, "err_code", None) != _FULL:
                        raise
            if time.monotonic() + pause > deadline:
                raise TaskKeyFull(task_key, side, bound)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)

    async def _put(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        if self.acks is None:
            await self.js.publish(subject, body, headers=headers)
            return
        reply = await self.acks.request(subject, body, headers, self.settings.request_timeout)
        error = json.loads(reply.data).get("error")
        if error:
            raise APIError(code=error.get("code"), err_code=error.get("err_code"), description=error.get("description"))

    async def count(self, task_key: str, side: Side) -> int:
        """How many runs wait on one side of a key (acknowledged ones are gone from the stream)."""
        subject = task_subject(self.settings, task_key, side)
        info = await self.js.stream_info(task_stream_name(self.settings, side), subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))


# ---------------------------------------------------------------------------------------------
# Task workers present: each puts its entry in a KV bucket every few seconds; an entry not put
# again within three intervals expires with the bucket's TTL, so the bucket lists the workers
# alive now, without an event in the log for every heartbeat.

TASK_WORKER_HEARTBEAT_SECONDS = 5.0


def task_worker_bucket(settings: Settings) -> str:
    return f"{settings.namespace.upper()}_TASK_WORKERS"


# One token per connection's JetStream context: several task workers may share an identifier
# (one worker's processes, as Prefect's `client_id`), and each must keep its own entry.
_connections: weakref.WeakKeyDictionary[JetStreamContext, str] = weakref.WeakKeyDictionary()


def task_worker_key(settings: Settings, identifier: str, connection: str) -> str:
    """An entry's key in the bucket: its broker user, a hash of its identifier (KV keys allow
    few characters), then its connection's token, so that connections sharing an identifier do
    not overwrite each other (the listing merges them). Under its user, so that a task worker
    bound to keys may write its own entries and no other worker's (infra/broker_auth.py)."""
    owner = settings.nats_user or "task_worker"
    return f"{owner}.{hashlib.sha256(identifier.encode()).hexdigest()[:40]}.{connection}"


def _connection_token(js: JetStreamContext) -> str:
    token = _connections.get(js)
    if token is None:
        token = _connections[js] = uuid.uuid4().hex[:16]
    return token


async def ensure_task_worker_bucket(js: JetStreamContext, settings: Settings, *, change: bool = True) -> list[str]:
    """Creates the task workers' bucket if missing; returns what it did (`change` False: what it
    would do)."""
    from nats.js.api import KeyValueConfig
    from nats.js.errors import BucketNotFoundError

    bucket = task_worker_bucket(settings)
    try:
        await js.key_value(bucket)
        return []
    except BucketNotFoundError:
        if not change:
            return [f"bucket {bucket} missing"]
    await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, ttl=3 * TASK_WORKER_HEARTBEAT_SECONDS,
                                             storage=StorageType.FILE, replicas=settings.stream_replicas))
    return [f"created bucket {bucket}"]


async def put_task_worker(js: JetStreamContext, settings: Settings, identifier: str, task_keys: list[str],
                          timestamp: str) -> None:
    """A worker's heartbeat: a plain publish into the bucket's subject (no bucket lookup, so the
    task worker's role needs nothing of the bucket's stream API)."""
    import json

    body = json.dumps({"identifier": identifier, "task_keys": task_keys, "timestamp": timestamp}).encode()
    key = task_worker_key(settings, identifier, _connection_token(js))
    await js.publish(f"$KV.{task_worker_bucket(settings)}.{key}", body)


async def forget_task_worker(js: JetStreamContext, settings: Settings, identifier: str) -> None:
    """A worker that stops says so, instead of lingering until its entry expires (its other
    connections under the same identifier keep theirs)."""
    key = task_worker_key(settings, identifier, _connection_token(js))
    await js.publish(f"$KV.{task_worker_bucket(settings)}.{key}", b"", headers={"KV-Operation": "DEL"})


# ---------------------------------------------------------------------------------------------
# Large results: a task whose return value is too large to travel in its state stores it here,
# in chunks, and its COMPLETED state names them (`{"type": "reference", ...}`). One stream,
# limits retention (kept like the log), one subject per chunk, read back by direct gets.

RESULT_CHUNK_BYTES = 512 * 1024  # well inside the broker's 1 MiB message, headers included
MAX_STORED_RESULT_BYTES = 64 * 1024 * 1024


def result_stream_name(settings: Settings) -> str:
    return f"{settings.namespace.upper()}_TASK_RESULTS"


def result_subject(settings: Settings, task_run_id: str, attempt: str, index: int) -> str:
    """`attempt`: the id of the RUNNING state the result came from."""
    return f"{settings.namespace}.result.{task_run_id}.{attempt}.{index}"


async def ensure_result_stream(js: JetStreamContext, settings: Settings, *, change: bool = True) -> list[str]:
    """Creates the result stream if missing; returns what it did (`change` False: what it
    would do)."""
    config = StreamConfig(
        name=result_stream_name(settings),
        description="runledger task results too large for their task run's state",
        subjects=[f"{settings.namespace}.result.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        allow_direct=True,
        max_msg_size=RESULT_CHUNK_BYTES + 64 * 1024,
        num_replicas=settings.stream_replicas,
    )
    try:
        await js.stream_info(result_stream_name(settings))
        return []
    except NotFoundError:
        if not change:
            return [f"stream {config.name} missing"]
    await js.add_stream(config)
    return [f"created stream {config.name}"]


async def store_result(js: JetStreamContext, settings: Settings, task_run_id: str, attempt: str,
                       encoded: bytes) -> dict[str, object]:
    """Stores a large result in chunks; returns the reference a COMPLETED state carries."""
    chunks = [encoded[i:i + RESULT_CHUNK_BYTES] for i in range(0, len(encoded), RESULT_CHUNK_BYTES)] or [b""]
    for index, chunk in enumerate(chunks):
        await js.publish(result_subject(settings, task_run_id, attempt, index), chunk)
    return {"type": "reference", "storage": "task-results", "task_run_id": task_run_id, "attempt": attempt,
            "chunks": len(chunks), "size": len(encoded), "sha256": hashlib.sha256(encoded).hexdigest()}


async def read_result_chunk(js: JetStreamContext, settings: Settings, task_run_id: str, attempt: str,
                            index: int) -> bytes:
    msg = await js.get_last_msg(result_stream_name(settings), result_subject(settings, task_run_id, attempt, index),
                                direct=True)
    return msg.data or b""
