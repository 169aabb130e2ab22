"""The event store on JetStream: append with optimistic concurrency and de-duplication,
atomic batches for multi-aggregate decisions, and reading an aggregate's events.

Subjects: `<ns>.evt.<aggregate type>.<aggregate id>.<EventName>`. The expected-sequence check
covers the whole aggregate (`…-Subject: <ns>.evt.<type>.<id>.*`) and sits on the first message
of each aggregate in an append (the server allows one check per subject per batch).

Measured (docs/benchmarks.md): a single-message append costs ~0.3 ms; an atomic batch on a
one-replica file stream is staged in a file store of its own and batches commit one at a
time. So a decision writes one message per aggregate, an append waiting for nobody goes
alone, and the appends that wait at the same moment share one batch (`BatchGroups`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NotFoundError

from runledger.commands.events import EncodedEvent, EventEnvelope

from .settings import Settings

EXPECTED_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
MSG_ID = "Nats-Msg-Id"
# A message the server removes after this many seconds (the stream allows per-message TTLs).
MESSAGE_TTL = "Nats-TTL"
WRONG_LAST_SEQUENCE = 10071
BATCH_DUPLICATE_MSG_ID = 10201


class WrongExpectedSequence(Exception):
    """Someone else appended to an aggregate we decided on: reload and decide again."""


class AppendUnavailable(Exception):
    """The broker did not acknowledge an append after retries; the outcome is unknown to us."""


class MessageTooLarge(Exception):
    """A message of an append would exceed the server's max payload (headers included), or
    come within its event's `headroom` of it: nothing was sent. The command is the client's to
    change, not a retry's. `whose`: what must leave the headroom ("a run", "a deployment")."""

    def __init__(self, what: str, size: int, limit: int, headroom: int = 0, whose: str = "a run"):
        if headroom:
            after = ("its later states, which carry the whole run again" if whose == "a run" else
                     "the runs it makes, which carry its parameters, labels and tags, and their later states")
            message = (f"{what} would be {size:,} bytes with its headers; {whose} must stay {headroom:,} bytes under "
                       f"the server's max payload of {limit:,} bytes, to leave room for {after}")
        else:
            message = f"{what} would be {size:,} bytes with its headers; the server's max payload is {limit:,} bytes"
        super().__init__(message)
        self.what = what
        self.size = size
        self.limit = limit
        self.headroom = headroom


class Pending:
    """Where an aggregate stands after an append that was submitted but not acknowledged yet:
    the `index`-th message of a waiting append. A decision taken against the state that append
    leaves *chains* onto it: its first message of that aggregate carries no sequence of its own
    to check, and is stored right after the append it follows, in the same atomic batch when
    both travel together, else with the sequence that append got. If that append fails, so does
    every decision chained onto it (decided against a state that never was)."""

    __slots__ = ("index", "waiting")

    def __init__(self, waiting: _Waiting, index: int):
        self.waiting = waiting
        self.index = index

    def landed_seq(self) -> int | None:
        """The stream sequence of the message, once its append landed (None: not yet, or never)."""
        result = self.waiting.result
        if not result.done() or result.cancelled() or result.exception() is not None:
            return None
        return result.result() - (len(self.waiting.messages) - 1 - self.index)

    async def settled(self) -> None:
        """Wait until the append is acknowledged or has failed, whichever."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self.waiting.result)


@dataclass(frozen=True)
class OutgoingMessage:
    subject: str
    data: bytes
    msg_id: str
    expect_seq: int | None = None
    expect_subject: str | None = None
    # Chained (see `Pending`): stored after that message, instead of checking a sequence.
    after: Pending | None = None
    # Seconds until the server removes it (a routine heartbeat); None: kept for ever.
    ttl: int | None = None
    # Bytes it must leave free under the max payload (`Event.append_headroom`): checked, not sent.
    headroom: int = 0

    def headers(self) -> dict[str, str]:
        h = {MSG_ID: self.msg_id}
        if self.expect_seq is not None:
            h[EXPECTED_SEQ] = str(self.expect_seq)
            if self.expect_subject:
                h[EXPECTED_SUBJECT] = self.expect_subject
        if self.ttl is not None:
            h[MESSAGE_TTL] = str(self.ttl)
        return h


_HEADER_FRAME = len(b"NATS/1.0\r\n") + len(b"\r\n")
# The most the atomic-batch headers can add to one message (`_publish_batch`): a uuid4 hex
# batch id, a sequence of up to 7 digits, the commit marker.
_BATCH_HEADERS = {"Nats-Batch-Id": "0" * 32, "Nats-Batch-Sequence": "9" * 7, "Nats-Batch-Commit": "1"}


def headers_size(headers: dict[str, str]) -> int:
    """The bytes nats-py sends for these headers (`NATS/1.0`, `Key: Value` lines, a blank
    line): the server counts them in the max payload, nats-py does not."""
    return _HEADER_FRAME + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


_BATCH_HEADERS_SIZE = headers_size(_BATCH_HEADERS) - _HEADER_FRAME


def message_size(m: OutgoingMessage, batched: bool) -> int:
    """What the server counts against its max payload: body plus headers."""
    return len(m.data) + headers_size(m.headers()) + (_BATCH_HEADERS_SIZE if batched else 0)


def _what(m: OutgoingMessage) -> str:
    kind = m.subject.split(".")
    if len(kind) >= 2 and kind[-2] == "idem":
        return "the idempotency record (the command's reply)"
    return f"the event {kind[-1]}"


def check_sizes(messages: Sequence[OutgoingMessage], limit: int) -> None:
    """Raise `MessageTooLarge` for the first message over `limit` (less its headroom), before
    any is sent: a batch whose later message the server refuses has already sent (and staged)
    its earlier ones."""
    batched = len(messages) > 1
    for m in messages:
        size = message_size(m, batched)
        if size + m.headroom > limit:
            tokens = m.subject.split(".")
            whose = "a deployment" if len(tokens) >= 3 and tokens[-3] == "deployment" else "a run"
            raise MessageTooLarge(_what(m), size, limit, m.headroom, whose)


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    subject: str
    envelope: EventEnvelope


def message_ttl(floor: float | None, retention: int) -> int | None:
    """How long the log keeps an event (`Event.expires_no_sooner_than`: `floor`): for ever
    (None) unless it is a routine one and `retention` is set; then the retention, and never
    less than the event's floor."""
    if floor is None or retention <= 0:
        return None
    return max(retention, math.ceil(floor))


def idempotency_subject(settings: Settings, key: str) -> str:
    return f"{settings.namespace}.idem.{hashlib.sha256(key.encode()).hexdigest()[:40]}"


class AckInbox:
    """Requests whose replies arrive on one wildcard subscription, keyed by a counter.

    nats-py's `request` draws OS randomness for every inbox token and wraps each wait in
    `asyncio.wait_for`; on the append path, once per command, that was ~5 % of the service's
    CPU. Here a reply is matched by its token and a timeout is one timer handle."""

    def __init__(self, nc: NATS):
        self.nc = nc
        self.prefix = ""
        self.pending: dict[str, asyncio.Future] = {}
        self.counter = 0
        self._starting: asyncio.Lock | None = None

    async def _start(self) -> None:
        self._starting = self._starting or asyncio.Lock()
        async with self._starting:
            if not self.prefix:
                prefix = self.nc.new_inbox()
                await self.nc.subscribe(prefix + ".*", cb=self._on_reply)
                self.prefix = prefix + "."

    async def _on_reply(self, msg) -> None:
        future = self.pending.get(msg.subject[len(self.prefix):])
        if future is not None and not future.done():
            future.set_result(msg)

    async def request(self, subject: str, data: bytes, headers: dict[str, str], timeout: float):
        if not self.prefix:
            await self._start()
        self.counter += 1
        token = str(self.counter)
        loop = asyncio.get_running_loop()
        future = self.pending[token] = loop.create_future()
        timer = loop.call_later(timeout, _expire, future)
        try:
            await self.nc.publish(subject, data, reply=self.prefix + token, headers=headers)
            msg = await future
        finally:
            timer.cancel()
            del self.pending[token]
        if msg.headers and msg.headers.get("Status") == "503":
            raise NoRespondersError
        return msg


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(NatsTimeoutError())


def _checked_subjects(messages: Sequence[OutgoingMessage]) -> set[str]:
    """The subjects whose last sequence the messages' expected-sequence headers check."""
    return {m.expect_subject or m.subject for m in messages if m.expect_seq is not None}


@dataclass(eq=False)
class _Waiting:
    messages: list[OutgoingMessage]
    result: asyncio.Future


class ChainBroken(WrongExpectedSequence):
    """A decision chained onto an append that did not land: decide again."""


def _resolve_chains(entry: _Waiting, group: list[_Waiting]) -> bool | None:
    """Make `entry` sendable with `group`: a chained message whose predecessor travels in the
    group stays chained (no check: the atomic batch keeps them in order); one whose predecessor
    landed checks the sequence it got. True: ready; None: a predecessor has not settled yet;
    False: a predecessor failed (the entry is settled with `ChainBroken`)."""
    in_group = {id(w) for w in group}
    resolved = []
    for m in entry.messages:
        dep = m.after
        if dep is None or id(dep.waiting) in in_group:
            resolved.append(m)
            continue
        if not dep.waiting.result.done():
            return None
        seq = dep.landed_seq()
        if seq is None:
            _settle(entry.result, error=ChainBroken("the decision it followed was not stored"))
            return False
        resolved.append(replace(m, expect_seq=seq, after=None))
    entry.messages = resolved
    return True


class BatchGroups:
    """Group commit for atomic batches.

    On a one-replica file stream, nats-server stages every atomic batch in a file store of its
    own and commits batches one at a time (~2 ms each, ~450 a second, whatever the
    concurrency). So the batches that arrive while one is in flight travel together as the
    next batch, when the aggregates they check do not overlap: one commit for many decisions,
    each still all-or-nothing. If a merged batch fails, nothing of it was stored (it is
    atomic) and each member is sent again alone, to get its own answer; if its acknowledgement
    was lost, each member, sent alone, finds out whether it landed."""

    MAX_MESSAGES = 500  # the server refuses batches over 1,000 messages by default

    def __init__(self, store: EventStore):
        self.store = store
        self.waiting: list[_Waiting] = []
        self.flusher: asyncio.Task | None = None

    def submit(self, messages: list[OutgoingMessage]) -> _Waiting:
        """Queue an append; its `result` is the stream sequence of its last message. Later
        decisions may chain onto it (`Pending`) before it is acknowledged."""
        entry = _Waiting(messages, asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush(), name="runledger-batch-groups")
        return entry

    def _next_group(self) -> list[_Waiting]:
        group: list[_Waiting] = []
        checked: set[str] = set()
        size = 0
        kept: list[_Waiting] = []
        for entry in self.waiting:
            if entry.result.done():
                continue
            ready = _resolve_chains(entry, group)
            if ready is False:
                continue
            subjects = _checked_subjects(entry.messages)
            # A decision over MAX_MESSAGES on its own still goes (alone), at its turn.
            fits = (not group or size + len(entry.messages) <= self.MAX_MESSAGES) and not subjects & checked
            if ready and fits:
                group.append(entry)
                checked |= subjects
                size += len(entry.messages)
            else:
                kept.append(entry)  # overlaps, too big, or follows one not settled: later, in order
        self.waiting = kept
        return group

    async def _flush(self) -> None:
        while self.waiting:
            group = self._next_group()
            if not group and not self.waiting:
                return  # every one left was settled meanwhile (its chain broke, or it was answered)
            if not group:
                # The first waits for an append outside the queue (a single message sent on its
                # own): let it settle. (Those behind it may wait for ones in the queue.)
                for m in self.waiting[0].messages:
                    if m.after is not None:
                        await m.after.settled()
                continue
            try:
                await self._commit(group)
            except BaseException as e:  # never leave a caller waiting
                for entry in group:
                    _settle(entry.result, error=e if isinstance(e, Exception) else AppendUnavailable("shutting down"))
                if not isinstance(e, Exception):
                    raise

    async def _commit(self, group: list[_Waiting]) -> None:
        if len(group) == 1:
            await self._alone(group[0])
            return
        merged = [m for entry in group for m in entry.messages]
        timed_out = False
        try:
            last = await self.store._publish_batch(merged)
        except (TimeoutError, NatsTimeoutError, NoRespondersError):
            timed_out = True
        except (WrongExpectedSequence, APIError):
            pass
        else:
            after = 0  # messages of later members: each member's last sequence follows
            for entry in reversed(group):
                _settle(entry.result, last - after)
                after += len(entry.messages)
            return
        for entry in group:  # nothing of the merged batch was stored, or we cannot tell
            await self._alone(entry, timed_out=timed_out)

    async def _alone(self, entry: _Waiting, timed_out: bool = False) -> None:
        # Sent alone (its merged batch failed): whatever it follows was sent alone before it.
        for m in entry.messages:
            if m.after is not None:
                await m.after.settled()
        if not _resolve_chains(entry, []):
            return
        try:
            _settle(entry.result, await self.store.append_alone(entry.messages, timed_out=timed_out))
        except Exception as e:
            _settle(entry.result, error=e)


def _settle(future: asyncio.Future, value: int | None = None, *, error: Exception | None = None) -> None:
    """Answer a waiting caller, unless it stopped waiting (cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class EventStore:
    def __init__(self, nc: NATS, settings: Settings, *, max_payload: int | None = None):
        """`max_payload`: the largest message (body plus headers) to send; by default the
        server's, as it announced on connecting (`nc.max_payload`)."""
        self._max_payload = max_payload
        self.nc = nc
        self.js = nc.jetstream(timeout=settings.request_timeout, prefix=settings.js_api_prefix)
        self.settings = settings
        self.stream = settings.stream_name
        self.prefix = settings.event_subject_prefix
        self.acks = AckInbox(nc)
        self.groups = BatchGroups(self)
        self._alone_tasks: set[asyncio.Task] = set()
        # Single messages through the group commit too (as before; for measuring the difference).
        self.group_single_messages = False

    @property
    def max_payload(self) -> int:
        return self._max_payload if self._max_payload is not None else self.nc.max_payload

    def check_sizes(self, messages: Sequence[OutgoingMessage]) -> None:
        """`MessageTooLarge` if any message would exceed the max payload; nothing is sent."""
        check_sizes(messages, self.max_payload)

    # -- subjects ------------------------------------------------------------------------

    def aggregate_filter(self, aggregate_type: str, aggregate_id: str) -> str:
        return f"{self.prefix}.{aggregate_type}.{aggregate_id}.*"

    def subject_of(self, envelope: EventEnvelope | EncodedEvent) -> str:
        return f"{self.prefix}.{envelope.aggregate_type}.{envelope.aggregate_id}.{envelope.type}"

    # -- appending -----------------------------------------------------------------------

    def build_messages(
        self,
        envelopes: Sequence[EventEnvelope | EncodedEvent],
        expected: dict[tuple[str, str], int | Pending],
        idempotency: tuple[str, bytes] | None = None,
    ) -> list[OutgoingMessage]:
        out: list[OutgoingMessage] = []
        if idempotency is not None:
            key, record = idempotency
            subject = idempotency_subject(self.settings, key)
            out.append(OutgoingMessage(subject, record, f"idem:{subject}:{uuid.uuid4()}", 0, None))
        checked: set[tuple[str, str]] = set()
        for env in envelopes:
            agg = (env.aggregate_type, env.aggregate_id)
            data = env.data if isinstance(env, EncodedEvent) else env.model_dump_json().encode()
            ttl = self.ttl_of(env)
            headroom = env.headroom if isinstance(env, EncodedEvent) else 0
            if agg in checked:
                out.append(OutgoingMessage(self.subject_of(env), data, str(env.id), ttl=ttl, headroom=headroom))
                continue
            checked.add(agg)
            at = expected.get(agg, 0)
            if isinstance(at, Pending):  # chained onto an append not acknowledged yet
                out.append(OutgoingMessage(self.subject_of(env), data, str(env.id), None,
                                           self.aggregate_filter(*agg), after=at, ttl=ttl, headroom=headroom))
            else:
                out.append(OutgoingMessage(self.subject_of(env), data, str(env.id), at, self.aggregate_filter(*agg),
                                           ttl=ttl, headroom=headroom))
        return out

    def ttl_of(self, env: EventEnvelope | EncodedEvent) -> int | None:
        floor = env.expires_no_sooner_than if isinstance(env, EncodedEvent) else None
        return message_ttl(floor, self.settings.routine_retention_seconds)

    def submit(self, messages: list[OutgoingMessage]) -> _Waiting:
        """`append` without waiting: the queued append (`result`: the last message's sequence),
        for a decision that lets the next one on the same aggregate chain onto it."""
        if not messages:
            raise ValueError("nothing to append")
        self.check_sizes(messages)  # all of them, before the first is sent
        fits_a_batch = message_size(messages[0], batched=True) <= self.max_payload
        if len(messages) > 1 or messages[0].after is not None or (self.group_single_messages and fits_a_batch):
            return self.groups.submit(messages)
        # One message needs no atomic batch: sent at once, side by side with the others (and
        # one too big to carry the batch headers could not go in one).
        entry = _Waiting(messages, asyncio.get_running_loop().create_future())

        async def alone() -> None:
            try:
                _settle(entry.result, await self.append_alone(messages))
            except Exception as e:
                _settle(entry.result, error=e)

        self._alone_tasks.add(task := asyncio.create_task(alone()))
        task.add_done_callback(self._alone_tasks.discard)
        return entry

    async def append(self, messages: list[OutgoingMessage]) -> int:
        """Store all messages or none; returns the stream sequence of the last one.

        A lost acknowledgement is retried with the same message ids. Because the server runs
        the sequence check before de-duplication, a retry of an append that did land fails
        its check: then the aggregate's last message tells whether it was ours.

        A decision of several messages goes through the group commit (`BatchGroups`): alone
        when nothing else waits, else merged with the ones that arrived meanwhile into one
        atomic batch (the server commits atomic batches one at a time, ~2 ms each on a
        one-replica file stream). A single message is sent at once, on its own: the server
        pipelines those (measured on this machine, 8 clients creating runs: grouped into
        batches p50 8.5 – 10 ms; alone, see docs/benchmarks.md)."""
        return await self.submit(messages).result

    async def append_alone(self, messages: list[OutgoingMessage], *, attempts: int = 3,
                           timed_out: bool = False) -> int:
        """`append` without the group commit. `timed_out`: an earlier try may have landed."""
        self.check_sizes(messages)
        for _ in range(attempts):
            try:
                if len(messages) == 1:
                    return await self._publish_one(messages[0])
                return await self._publish_batch(messages)
            except (TimeoutError, NatsTimeoutError, NoRespondersError):
                timed_out = True
                continue
            except WrongExpectedSequence:
                if timed_out:
                    landed = await self._landed_seq(messages[-1])
                    if landed is not None:
                        return landed
                raise
        landed = await self._landed_seq(messages[-1])
        if landed is not None:
            return landed
        raise AppendUnavailable("the event log did not acknowledge the append")

    async def _publish_one(self, m: OutgoingMessage) -> int:
        # No `Nats-Expected-Stream`: JetStream refuses streams with overlapping subjects, so
        # only our stream takes these subjects, and every stored header costs every reader.
        reply = await self.acks.request(m.subject, m.data, m.headers(), self.settings.request_timeout)
        return self._ack_seq(reply.data)

    @staticmethod
    def _ack_seq(data: bytes) -> int:
        body = json.loads(data)
        error = body.get("error")
        if error:
            if error.get("err_code") in (WRONG_LAST_SEQUENCE, BATCH_DUPLICATE_MSG_ID):
                raise WrongExpectedSequence(error.get("description", ""))
            raise APIError(code=error.get("code"), err_code=error.get("err_code"), description=error.get("description"))
        return int(body["seq"])

    async def _publish_batch(self, messages: list[OutgoingMessage]) -> int:
        batch_id = uuid.uuid4().hex
        last = len(messages)
        for i, m in enumerate(messages, start=1):
            headers = m.headers() | {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
            if i < last:
                await self.nc.publish(m.subject, m.data, headers=headers)
            else:
                headers["Nats-Batch-Commit"] = "1"
                reply = await self.acks.request(m.subject, m.data, headers, self.settings.request_timeout)
        return self._ack_seq(reply.data)

    async def _landed_seq(self, m: OutgoingMessage) -> int | None:
        try:
            last = await self.js.get_last_msg(self.stream, m.subject, direct=True)
        except NotFoundError:
            return None
        if last.headers and last.headers.get(MSG_ID) == m.msg_id:
            return last.seq
        return None

    # -- reading -------------------------------------------------------------------------

    async def read_subject(self, subject_filter: str, start_seq: int = 1, *, batch: int = 1000,
                           max_messages: int | None = None) -> list[tuple[int, str, bytes, dict]]:
        """The messages matching `subject_filter` from `start_seq` (all, or the first
        `max_messages`), via batched direct gets into a callback subscription (no consumer
        state on the server; no timer per message on the client)."""
        out: list[tuple[int, str, bytes, dict]] = []
        seq = max(1, start_seq)
        api = f"{self.settings.js_api_prefix}.DIRECT.GET.{self.stream}"
        inbox = self.nc.new_inbox()
        done = asyncio.Event()
        status: dict[str, str | int] = {}

        async def on_message(msg) -> None:
            headers = msg.headers or {}
            code = headers.get("Status")
            if code:
                status["code"] = code
                status["pending"] = int(headers.get("Nats-Num-Pending", "0") or 0)
                done.set()
                return
            out.append((int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data, headers))

        sub = await self.nc.subscribe(inbox, cb=on_message)
        try:
            while True:
                want = batch if max_messages is None else min(batch, max_messages - len(out))
                done.clear()
                status.clear()
                request = {"seq": seq, "next_by_subj": subject_filter, "batch": want}
                await self.nc.publish(api, json.dumps(request).encode(), reply=inbox)
                async with asyncio.timeout(self.settings.request_timeout):  # not wait_for: see runner
                    await done.wait()
                if status.get("code") not in ("204", "404"):
                    raise RuntimeError(f"direct get failed with status {status.get('code')}")
                if out:
                    seq = out[-1][0] + 1
                if status.get("code") == "404" or cast(int, status.get("pending", 0)) <= 0:
                    return out
                if max_messages is not None and len(out) >= max_messages:
                    return out
        finally:
            await sub.unsubscribe()

    async def read_aggregate(self, aggregate_type: str, aggregate_id: str, after_seq: int = 0) -> list[StoredEvent]:
        rows = await self.read_subject(self.aggregate_filter(aggregate_type, aggregate_id), after_seq + 1)
        return [StoredEvent(s, subj, EventEnvelope.model_validate_json(data)) for s, subj, data, _ in rows]

    async def last_event(self, aggregate_type: str, aggregate_id: str) -> StoredEvent | None:
        try:
            msg = await self.js.get_last_msg(self.stream, self.aggregate_filter(aggregate_type, aggregate_id), direct=True)
        except NotFoundError:
            return None
        # nats-py types these optional; a direct get sets them for every message it finds.
        assert msg.seq is not None and msg.subject is not None and msg.data is not None
        return StoredEvent(msg.seq, msg.subject, EventEnvelope.model_validate_json(msg.data))

    async def holds(self, seq: int, aggregate_type: str, aggregate_id: str) -> bool:
        """Whether the message at `seq` is an event of this aggregate (a snapshot's anchor:
        a snapshot of a log that was since deleted and started again must not be used)."""
        try:
            msg = await self.js.get_msg(self.stream, seq=seq, direct=True)
        except NotFoundError:
            return False
        assert msg.subject is not None  # set for every message a direct get finds
        return msg.subject.startswith(f"{self.prefix}.{aggregate_type}.{aggregate_id}.")

    async def replace_idempotency_record(self, key: str, record: bytes) -> int:
        """A record after the first under `key` (which is written with its command's events,
        checked to be the first): the one `read_idempotency_record` finds from then on. The
        caller holds what the command locked, so no other record can come in between."""
        subject = idempotency_subject(self.settings, key)
        return await self.submit([OutgoingMessage(subject, record, f"idem:{subject}:{uuid.uuid4()}")]).result

    async def read_idempotency_record(self, key: str) -> tuple[int, dict] | None:
        try:
            msg = await self.js.get_last_msg(self.stream, idempotency_subject(self.settings, key), direct=True)
        except NotFoundError:
            return None
        assert msg.seq is not None and msg.data is not None  # set for a record found (a JSON body)
        return msg.seq, json.loads(msg.data)

    async def last_sequence(self) -> int:
        info = await self.js.stream_info(self.stream)
        return info.state.last_seq

    async def log_status(self) -> tuple[int, dict[str, Any] | None]:
        """The log's last sequence, and how it is copied on a NATS cluster (None for a
        stream of one replica): its replicas, the node leading it, and each other copy
        (current, offline, how many operations behind). One stream info for both."""
        info = await self.js.stream_info(self.stream)
        if (info.config.num_replicas or 1) <= 1 or info.cluster is None:
            return info.state.last_seq, None
        return info.state.last_seq, {
            "replicas": info.config.num_replicas, "leader": info.cluster.leader,
            "peers": [{"name": peer.name, "current": bool(peer.current), "offline": bool(peer.offline),
                       "lag": peer.lag or 0} for peer in info.cluster.replicas or []]}
