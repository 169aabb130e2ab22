"""Request/reply endpoints: plain nats-py queue subscriptions that run a bus and answer.

Three promises (docs/protocol.md, "Replies"):

- **Replies go only to inboxes.** A request's reply subject is the requester's choice, and the
  service is the publisher, so client permissions cannot stop a reply from landing in our own
  streams. A reply subject must start with `settings.reply_subject_prefix` (`_INBOX.`), be a
  plain subject (no wildcards, no empty tokens, no spaces or control characters) and lie
  outside every subject our streams and buckets capture. A reply subject the server made for a
  request that came through another account's service import (`_R_.`, nats-server's reserved
  prefix: the analyst's `ReadEvents`, infra/broker_auth.py) is an inbox too: the server routes
  the reply back to the requester's own. Other requests are dropped *without being executed* (a command must not run when nobody may hear its outcome), counted, and
  logged at most once per 10 s.
- **Every admitted request gets exactly one reply, in bounded time.** The bus runs under a
  deadline; an exception, a deadline or an unencodable result still answers (`unavailable`).
- **Back-pressure is a quick "busy", not a disconnect.** The message callback never waits:
  past `max_in_flight` requests or `max_bytes` of request bodies in flight, a request is
  answered `unavailable` (busy, retry) at once, so nats-py keeps draining the socket and the
  server never sees a slow consumer. A reply too large for the connection's max payload
  becomes a shorter page (lists) or an error, never silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from nats.aio.client import Client as NATS
from pydantic_core import to_json

from runledger.commands.messages import ErrorCode
from runledger.infra.settings import Settings

log = logging.getLogger("runledger.service")

Execute = Callable[[str, bytes], Awaitable[dict[str, Any]]]

MAX_REPLY_SUBJECT = 256
SMALL_REQUEST = 64 * 1024  # smaller requests skip the large-request gate
WARN_EVERY_SECONDS = 10.0


def _error(code: ErrorCode | str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": str(code), "message": message}}


def protected_prefixes(settings: Settings) -> tuple[str, ...]:
    """Subjects a reply must never be published to: our namespace's event, idempotency,
    command and query subjects, and every `$`-subject (JetStream API, KV and object buckets,
    the system account)."""
    ns = settings.namespace
    return (f"{ns}.evt.", f"{ns}.idem.", f"{ns}.cmd.", f"{ns}.qry.", "$")


# Tokens of printable ASCII without `.`, `*` and `>`; no empty token.
_TOKEN = r"[\x21-\x29\x2b-\x2d\x2f-\x3d\x3f-\x7e]+"
_PLAIN_SUBJECT = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")


# The reply subjects nats-server makes for requests that cross a service import.
SERVICE_IMPORT_REPLY_PREFIX = "_R_."


def reply_subject_allowed(reply: str | None, prefix: str, protected: tuple[str, ...]) -> bool:
    if not reply or len(reply) > MAX_REPLY_SUBJECT or not reply.startswith((prefix, SERVICE_IMPORT_REPLY_PREFIX)):
        return False
    if reply.startswith(protected):
        return False
    return _PLAIN_SUBJECT.fullmatch(reply) is not None


@dataclass
class DroppedRequests:
    """Requests dropped for their reply subject: counted, logged at most once per 10 s."""

    total: int = 0
    _since_log: int = 0
    _last_log: float = 0.0

    def note(self, subject: str, reply: str | None) -> None:
        self.total += 1
        self._since_log += 1
        now = time.monotonic()
        if now - self._last_log >= WARN_EVERY_SECONDS:
            log.warning("dropped %d request(s) without executing them: their reply subject is not an inbox "
                        "(last: %r on %s; %d dropped since start)", self._since_log, (reply or "")[:80], subject, self.total)
            self._since_log = 0
            self._last_log = now


def widen_reads(nc: NATS, size: int = 4 * 1024 * 1024) -> bool:
    """Let one event-loop turn read up to `size` bytes from the connection's socket.

    nats-py pauses its socket past 64 KiB buffered, and asyncio's own loop reads at most
    256 KiB per turn, so a process busy with large requests reads a few hundred KiB per turn
    while publishers write megabytes: the server's buffer for us passes its `max_pending`
    (64 MiB) and it disconnects us as a slow consumer. The reader's limit is widened on any
    connection; the read size only on asyncio's own plain TCP transport (uvloop reads until
    the socket is drained, up to 32 reads of 256 KiB a turn). Private attributes of asyncio
    and nats-py, checked: anything else is left as it is. Call again after a reconnect."""
    transport = getattr(nc, "_transport", None)
    reader = getattr(transport, "_io_reader", None)
    writer = getattr(transport, "_io_writer", None)
    socket_transport = getattr(writer, "transport", None)
    if reader is None or not isinstance(getattr(reader, "_limit", None), int) or socket_transport is None:
        return False
    reader._limit = max(reader._limit, size // 2)
    if isinstance(getattr(socket_transport, "max_size", None), int):  # asyncio's selector transport
        socket_transport.max_size = max(socket_transport.max_size, size)
    return True


class _Pending:
    __slots__ = ("due", "msg", "name", "answered", "started")

    def __init__(self, due: float, msg: Any, name: str):
        self.due, self.msg, self.name, self.answered, self.started = due, msg, name, False, False


_orphans: set[asyncio.Task] = set()
_extend_deadline: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar(
    "runledger_extend_deadline", default=None)


def extend_deadline(seconds: float) -> None:
    """Give the request this task is answering `seconds` more before its deadline (a
    read-your-writes wait, itself bounded; negative: take it back); nothing outside a request."""
    req = _extend_deadline.get()
    if req is not None:
        req.due += seconds


@dataclass(frozen=True)
class Caller:
    """Who sent the request being answered, as the broker says: the account and user of a
    request that crossed into the service's account through an import that shares them (the
    `Nats-Request-Info` header, which the server writes, replacing any the sender wrote). A
    request from the service's own account carries none: `account` and `user` None."""

    account: str | None = None
    user: str | None = None


REQUEST_INFO_HEADER = "Nats-Request-Info"
_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("runledger_caller", default=Caller())  # noqa: B039 - frozen


def current_caller() -> Caller:
    """The sender of the request this task is answering (`Caller()` outside a request)."""
    return _caller.get()


@contextlib.contextmanager
def as_the_service() -> Iterator[None]:
    """What the service decides on its own while answering a request (a correction such as
    cancelling a task run that could not be queued) is not held to the sender's limits."""
    token = _caller.set(Caller())
    try:
        yield
    finally:
        _caller.reset(token)


def _caller_of(msg: Any) -> Caller:
    raw = msg.headers.get(REQUEST_INFO_HEADER) if msg.headers else None
    if not raw:
        return Caller()
    try:
        info = json.loads(raw)
    except ValueError:
        return Caller()
    if not isinstance(info, dict):
        return Caller()
    account, user = info.get("acc"), info.get("user")
    return Caller(account if isinstance(account, str) else None, user if isinstance(user, str) else None)


def _spawn(coro: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(coro)
    _orphans.add(task)
    task.add_done_callback(_reap)


def _reap(task: asyncio.Task) -> None:
    _orphans.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a late failure of abandoned work is not news


async def run_bounded(coro: Awaitable[Any], seconds: float) -> Any:
    """`coro`'s result, or TimeoutError after `seconds` *without waiting for it to wind
    down*: cancelling work stuck on a stalled database runs its clean-up (a connection's
    rollback or close), which itself waits on that database; the reply must not."""
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        _orphans.add(task)
        task.add_done_callback(_reap)
        raise TimeoutError
    return task.result()


def encode(out: Any) -> bytes:
    return to_json(out, fallback=str)


def fit_reply(out: dict[str, Any], request: bytes, limit: int, kind: str) -> bytes:
    """A reply whose encoding exceeds `limit` bytes, made to fit.

    A list result becomes a shorter page: `"truncated": true` and `"next_offset"` (ask again
    with `offset` = `next_offset`). A command's successful reply keeps its envelope without the
    result (`"result": null, "truncated": true`): the command did take effect. Anything else is
    an `invalid` error saying how large it was."""
    result = out.get("result") if out.get("ok") else None
    if isinstance(result, list) and result:
        try:
            offset = int(json.loads(request or b"{}").get("offset", 0))
        except (ValueError, TypeError, AttributeError):
            offset = 0

        def page(n: int) -> bytes:
            return encode({**out, "result": result[:n], "truncated": True, "next_offset": offset + n})

        lo, hi = 0, len(result) - 1  # the largest n < len that fits (len did not)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(page(mid)) <= limit:
                lo = mid
            else:
                hi = mid - 1
        if lo > 0:
            return page(lo)
        message = (f"the item at offset {offset} alone makes a reply larger than the broker's max payload "
                   f"({limit} bytes); it cannot be sent")
        return encode(_error(ErrorCode.INVALID, message))
    size = len(encode(out))
    if out.get("ok") and kind == "command":
        body = encode({**out, "result": None, "truncated": True})
        if len(body) <= limit:
            return body
    return encode(_error(ErrorCode.INVALID, f"the reply ({size} bytes) is larger than the broker's max payload "
                                            f"({limit} bytes); it cannot be sent"))


@dataclass
class Endpoint:
    """Request/reply on one wildcard subject in a queue group; the last token names the
    command or query.

    `concurrency` requests run at once (None: the bus bounds its own work, as the query bus
    does so that a read-your-writes wait holds no slot); up to `max_in_flight` are admitted
    (running or waiting for a slot) holding at most `max_bytes` of request bodies; past that a
    request is answered busy at once. Each runs under `deadline` seconds."""

    nc: NATS
    subject: str
    kind: str  # "command" or "query"
    execute: Execute
    settings: Settings
    concurrency: int | None
    max_in_flight: int
    deadline: float
    max_bytes: int = 32 * 1024 * 1024
    exec_bytes: int = 2 * 1024 * 1024
    subscriptions: list[Any] = field(default_factory=list)
    tasks: set[asyncio.Task] = field(default_factory=set)
    dropped: DroppedRequests = field(default_factory=DroppedRequests)
    busy: int = 0
    _bytes: int = 0
    _slots: asyncio.Semaphore | None = None
    _executing: int = 0
    _exec_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _protected: tuple[str, ...] = ()
    _widened: dict[int, Any] = field(default_factory=dict)
    _pending: dict[asyncio.Task, _Pending] = field(default_factory=dict)
    _sweeper: asyncio.Task | None = None
    _loop: Any = None

    @classmethod
    async def serve(cls, nc: NATS, subject: str, group: str, execute: Execute, *, settings: Settings, kind: str,
                    concurrency: int | None, max_in_flight: int, deadline: float,
                    max_bytes: int = 32 * 1024 * 1024, lanes: Sequence[NATS] = ()) -> Endpoint:
        """Subscribe on `nc`, or on each of `lanes` when given: connections of their own, each
        with its own server-side buffer (`max_pending`, 64 MiB by default) and socket, so a
        burst larger than one buffer is spread over several instead of disconnecting us."""
        self = cls(nc, subject, kind, execute, settings, concurrency, max_in_flight, deadline, max_bytes)
        self._slots = asyncio.Semaphore(concurrency) if concurrency else None
        self._protected = protected_prefixes(settings)
        self._loop = asyncio.get_running_loop()
        self._sweeper = asyncio.create_task(self._sweep(min(0.25, deadline / 8)))
        # Bounded pending (nats-py drops past it and reports a slow consumer, which the
        # service answers busy); the callback below never waits, so it stays near empty.
        for conn in lanes or (nc,):
            self.subscriptions.append(await conn.subscribe(subject, queue=group, cb=self._on_message,
                                                           pending_msgs_limit=max(4 * max_in_flight, 1024),
                                                           pending_bytes_limit=max_bytes))
        return self

    @property
    def subscription(self):
        return self.subscriptions[0]

    def reply_allowed(self, reply: str | None) -> TypeGuard[str]:
        return reply_subject_allowed(reply, self.settings.reply_subject_prefix, self._protected)

    async def _on_message(self, msg) -> None:
        conn = msg._client
        if getattr(conn, "_transport", None) is not self._widened.get(id(conn)):  # new after a reconnect
            widen_reads(conn)
            self._widened[id(conn)] = getattr(conn, "_transport", None)
        reply = msg.reply
        if not self.reply_allowed(reply):
            self.dropped.note(msg.subject, reply)
            return
        size = len(msg.data) + (sum(len(k) + len(v) for k, v in msg.header.items()) if msg.header else 0)
        if len(self.tasks) >= self.max_in_flight or (self._bytes and self._bytes + size > self.max_bytes):
            self.busy += 1
            await self._publish(reply, BUSY_REPLY, conn)
            return
        self._bytes += size
        task = asyncio.create_task(self._answer(msg, size))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, name: str, data: bytes, size: int, req: _Pending) -> dict[str, Any]:
        # Large requests run a few at a time (`exec_bytes` of bodies at once, or one alone):
        # their parsing and encoding are long synchronous steps, and many at once would keep
        # the event loop from reading the socket, which is what makes a slow consumer.
        if size < SMALL_REQUEST:  # the common case: no gate
            if self._slots is None:
                req.started = True
                return await self.execute(name, data)
            async with self._slots:
                req.started = True
                return await self.execute(name, data)
        while self._executing and self._executing + size > self.exec_bytes:
            self._exec_changed.clear()
            await self._exec_changed.wait()
        self._executing += size
        try:
            if self._slots is None:
                req.started = True
                return await self.execute(name, data)
            async with self._slots:
                req.started = True
                return await self.execute(name, data)
        finally:
            self._executing -= size
            self._exec_changed.set()

    async def _answer(self, msg, size: int) -> None:
        name = msg.subject.rsplit(".", 1)[1]
        # The deadline: the sweeper answers a request past it and cancels its task, without
        # waiting for the work to wind down (cancelled work stuck on a stalled database runs
        # clean-up that waits on that database too). One sweeper, not a timer per request:
        # thousands of timers in the event loop's heap cost more than the rest of the endpoint.
        me = asyncio.current_task()
        assert me is not None  # a coroutine the subscription runs as a task
        req = _Pending(self._loop.time() + self.deadline, msg, name)
        self._pending[me] = req
        _extend_deadline.set(req)  # this task's own context
        _caller.set(_caller_of(msg))
        try:
            try:
                out = await self._run(name, msg.data, size, req)
            except asyncio.CancelledError:
                if req.answered:  # the deadline answered already
                    return
                # The endpoint is stopping: still answer, then let the cancel through.
                await self._publish(msg.reply, conn=msg._client, body=encode(_error(
                    ErrorCode.UNAVAILABLE, f"the service stopped while handling {name}; "
                    + ("its outcome is unknown: retry with the same idempotency key" if self.kind == "command" else "retry"))))
                raise
            except Exception:
                log.exception("%s %s failed", self.kind, name)
                out = _error(ErrorCode.UNAVAILABLE, f"{self.kind} {name} failed on the server; see the service log"
                             + ("; its outcome is unknown: retry with the same idempotency key" if self.kind == "command" else ""))
            try:
                body = encode(out)
            except Exception:
                log.exception("the reply of %s %s could not be encoded", self.kind, name)
                body = encode(_error(ErrorCode.UNAVAILABLE, f"the reply of {name} could not be encoded; see the service log"))
            if req.answered:  # the work swallowed the deadline's cancel: its reply went out already
                return
            req.answered = True
            limit = msg._client.max_payload
            if len(body) > limit:
                body = fit_reply(out, msg.data, limit, self.kind)
            await self._publish(msg.reply, body, msg._client)
        finally:
            del self._pending[me]
            self._bytes -= size

    async def _sweep(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            now = self._loop.time()
            for task, req in list(self._pending.items()):
                if not req.answered and now >= req.due:
                    req.answered = True
                    _spawn(self._publish(req.msg.reply, self._deadline_reply(req), req.msg._client))
                    task.cancel()

    def _deadline_reply(self, req: _Pending) -> bytes:
        if not req.started:  # it waited for a slot all along: nothing was done
            return BUSY_REPLY
        if self.kind == "command":
            return encode(_error(ErrorCode.UNAVAILABLE, f"{req.name} did not finish within {self.deadline:g} s; its "
                                                        "outcome is unknown: retry with the same idempotency key"))
        return encode(_error(ErrorCode.UNAVAILABLE, f"{req.name} did not finish within {self.deadline:g} s (the "
                                                    "database may be slow or unreachable); retry"))

    async def _publish(self, reply: str, body: bytes, conn: NATS | None = None) -> None:
        try:
            await (conn or self.nc).publish(reply, body)
        except Exception as e:  # closed or reconnecting: nothing more can be done for this one
            log.debug("reply to %s not sent: %s", reply, type(e).__name__)

    async def answer_dropped(self, reply: str | None, conn: NATS | None = None) -> None:
        """nats-py dropped a request past the pending limits (a slow consumer on our side):
        answer it busy, if its reply subject may be answered at all."""
        if self.reply_allowed(reply):
            self.busy += 1
            await self._publish(reply, BUSY_REPLY, conn)
        else:
            self.dropped.note(self.subject, reply)

    async def stop(self) -> None:
        """Take no new requests; let the ones in flight finish (bounded), then answer the rest."""
        for sub in self.subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        # The sweeper goes on answering late requests while the last ones finish.
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=10)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self._sweeper is not None:
            self._sweeper.cancel()


BUSY_REPLY = encode(_error(ErrorCode.UNAVAILABLE, "the service is busy and did not run this request; retry shortly"))
