"""`RunledgerClient`: typed async methods over the broker contract (commands on `<ns>.cmd.<Name>`,
queries on `<ns>.qry.<Name>`, NATS request/reply).

Read-your-writes by default: the client remembers the highest stream sequence its commands
returned and sends it as `min_seq` with every later query, so a read after a write sees it
(`consistent_reads=False` turns that off; an explicit `min_seq=` always wins).

Arguments are sent as given (absent ones are left out), never validated here: the service is
the one judge of what is valid, and its `invalid` reply names the field and the reason.

Retries (`retries=N`, off by default): a request that meets `unavailable` is sent again, up to
N more times with a growing pause. A query always may be. A command is sent again with the
same `idempotency_key`, so the service applies it at most once and a retry of one that was in
fact applied returns its first reply; a command without a key is sent again only when it
certainly did not arrive (nobody listening). `idempotency_keys=True` gives every command
without a key a fresh one, so all of them can be retried. When the outcome stays unknown, the
`Unavailable` raised has `outcome_unknown=True`: send the command again with the same key to
learn it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from pydantic import BaseModel, ValidationError

from runledger.commands.queries import DEFAULT_LIMIT
from runledger.infra.nats_connection import BrokerUnavailable, connect
from runledger.infra.settings import Settings, load_settings

from .envelope import UNSET, Reply, Unset, encode_body, given, parse_reply, too_large_to_send
from .errors import Invalid, ProtocolError, Unavailable
from .leases import DeploymentSlotLease
from .models import (
    ConcurrencyLimit,
    Deployment,
    DeploymentPage,
    DeploymentSchedule,
    Flow,
    FlowRun,
    FlowRunCreateResult,
    HistoryInterval,
    LeaseRenewal,
    OrchestrationResult,
    State,
    TagConcurrencyLimit,
    TaskRun,
    TaskWorker,
    Variable,
    WorkerFlowRun,
    WorkPool,
    WorkPoolConcurrencyStatus,
    WorkQueue,
    WorkQueueConcurrencyStatus,
    WorkQueueStatusDetail,
)
from .models import Worker as WorkerModel

log = logging.getLogger("runledger.client")

M = TypeVar("M", bound=BaseModel)


def new_idempotency_key() -> str:
    """A fresh, unguessable idempotency key."""
    return str(uuid.uuid4())


# Commands whose bus idempotency key is not `idempotency_key`: there, as in Prefect,
# `idempotency_key` means "the existing run of this flow with this key" (a domain key), and the
# bus's own key is `request_idempotency_key` (the command's `BUS_KEY_FIELD` on the service).
BUS_KEY_FIELDS: dict[str, str | None] = {
    "CreateFlowRun": "request_idempotency_key",
    "CreateFlowRunFromDeployment": "request_idempotency_key",
    "CreateTaskRuns": None,  # each run's own keys make it safe to send again
    "SetTaskRunStates": None,  # each item carries its own
}


def bus_key_field(command: str) -> str | None:
    """The body field that carries command `command`'s bus idempotency key (None: it takes
    none, and is safe to send again as it is)."""
    return BUS_KEY_FIELDS.get(command, "idempotency_key")


def _filter(names: Sequence[str] | None, ids: Sequence[uuid.UUID | str] | None,
            types: Sequence[str] | None = None) -> dict[str, Any] | None:
    """A `WorkPoolFilter` / `WorkQueueFilter` body (`{"name": {"any_": [...]}}`), or None."""
    body: dict[str, Any] = {}
    if ids is not None:
        body["id"] = {"any_": [str(i) for i in ids]}
    if names is not None:
        body["name"] = {"any_": list(names)}
    if types is not None:
        body["type"] = {"any_": list(types)}
    return body or None


def _flow_filter(names: Sequence[str] | None, ids: Sequence[uuid.UUID | str] | None,
                 tags: Sequence[str] | None) -> dict[str, Any] | None:
    """A `FlowFilter` body: ids and names match any value given, `tags` every tag given."""
    body = _filter(names, ids) or {}
    if tags is not None:
        body["tags"] = {"all_": list(tags)}
    return body or None


class RunledgerClient:
    """One connection to the broker and the typed calls over it.

    `async with RunledgerClient() as rl:` connects with `load_settings()` (environment, then the
    endpoint file of `runledger up`) and closes on exit; `RunledgerClient.from_nats(nc, settings)`
    reuses a connection the caller owns (and leaves it open)."""

    def __init__(self, settings: Settings | None = None, *, consistent_reads: bool = True,
                 retries: int = 0, retry_backoff: float = 0.25, idempotency_keys: bool = False):
        self.settings = settings if settings is not None else load_settings()
        self.consistent_reads = consistent_reads
        self.retries = max(0, retries)
        self.retry_backoff = retry_backoff
        self.idempotency_keys = idempotency_keys
        # The highest stream sequence a command reply carried: the `min_seq` of the next query.
        self.last_seq: int | None = None
        self._nc: NATS | None = None
        self._owns_connection = False
        # Flow run id -> the `hold_deployment_slot` blocks of this client waiting for its lease.
        self._slot_holders: dict[str, set[DeploymentSlotLease]] = {}
        # The stalls already warned of (`_warn_stalled`): (projection, seq).
        self._stalls_warned: set[tuple[Any, Any]] = set()

    @classmethod
    def from_nats(cls, nc: NATS, settings: Settings | None = None, *, consistent_reads: bool = True,
                  retries: int = 0, retry_backoff: float = 0.25,
                  idempotency_keys: bool = False) -> RunledgerClient:
        client = cls(settings, consistent_reads=consistent_reads, retries=retries,
                     retry_backoff=retry_backoff, idempotency_keys=idempotency_keys)
        client._nc = nc
        return client

    async def connect(self) -> RunledgerClient:
        if self._nc is None:
            # Bounded: the connection options retry forever, which would hang a CLI run.
            timeout = self.settings.request_timeout
            try:
                self._nc = await asyncio.wait_for(
                    connect(self.settings, name="runledger-client", check_version=False, wait_for_server=False), timeout)
            except BrokerUnavailable as e:
                raise Unavailable(str(e)) from None
            except TimeoutError:
                raise Unavailable(f"cannot connect to NATS at {self.settings.safe_nats_url()} "
                                  f"within {timeout:g} s") from None
            self._owns_connection = True
        return self

    async def close(self) -> None:
        if self._nc is not None and self._owns_connection:
            await self._nc.close()
            self._nc = None
            self._owns_connection = False

    async def __aenter__(self) -> RunledgerClient:
        return await self.connect()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -----------------------------------------------------------------------------------------
    # The contract, untyped: for commands and queries without a typed method yet.

    async def command(self, name: str, body: Mapping[str, Any], *, extra_timeout: float = 0.0) -> Reply:
        """Send command `name` and return its reply; an error reply raises its typed error.
        `unavailable` is retried as the class says (with the same idempotency key).
        `extra_timeout`: seconds the service was asked to wait inside the command (a submit
        waiting for room on a full task key), added to the request timeout."""
        key_field = bus_key_field(name)
        if key_field is not None and self.idempotency_keys and body.get(key_field) is None:
            body = {**body, key_field: new_idempotency_key()}
        keyed = key_field is None or body.get(key_field) is not None
        subject = self.settings.command_subject(name)
        unknown = False
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = await self._request(subject, body, self.settings.request_timeout + extra_timeout, command=True)
                break
            except Unavailable as e:
                unknown = unknown or e.outcome_unknown
                # Without a key, a command that may have arrived is not sent twice.
                if attempt > self.retries or (e.outcome_unknown and not keyed):
                    raise self._gave_up(e, attempt, unknown) from None
            await self._pause(attempt)
        if reply.seq is not None and (self.last_seq is None or reply.seq > self.last_seq):
            self.last_seq = reply.seq
        return reply

    async def _whole_page(self, name: str, body: Mapping[str, Any], reply: Reply) -> Reply:
        """A list page the service cut to fit the broker's max payload (`next_offset` set),
        completed by asking for the rest: the page asked for, whole."""
        items = list(reply.result or [])
        limit = body.get("limit", DEFAULT_LIMIT)
        while reply.next_offset is not None and len(items) < limit:
            reply = await self.query(name, {**body, "offset": reply.next_offset, "limit": limit - len(items)},
                                     min_seq=body.get("min_seq"))
            items += reply.result or []
        return Reply(result=items, seq=reply.seq, created=reply.created)

    async def query(self, name: str, body: Mapping[str, Any], *, min_seq: int | None = None) -> Reply:
        """Ask query `name`. Without `min_seq`, the last command's sequence is sent when
        `consistent_reads` is on, so the read model has caught up with this client's writes."""
        if min_seq is None and self.consistent_reads:
            min_seq = self.last_seq
        timeout = self.settings.request_timeout
        if min_seq:  # 0: no wait asked
            body = {**body, "min_seq": min_seq}
            timeout += self.settings.query_wait_timeout  # the service may wait that long first
        subject = self.settings.query_subject(name)
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = await self._request(subject, body, timeout)
            except Unavailable as e:
                if attempt > self.retries:
                    raise self._gave_up(e, attempt, False) from None
                await self._pause(attempt)
                continue
            for stall in reply.stalled or ():
                self._warn_stalled(stall)
            return reply

    def _warn_stalled(self, stall: Mapping[str, Any]) -> None:
        """Once per stall: the answers that read a stalled read model may lack later events."""
        key = (stall.get("projection"), stall.get("seq"))
        if key in self._stalls_warned:
            return
        self._stalls_warned.add(key)
        log.warning("read model %s is stalled at stream sequence %s (%s): answers that read it lack what came "
                    "after; see `runledger status`", stall.get("projection"), stall.get("seq"), stall.get("event_type"))

    async def catch_up(self) -> int | None:
        """Make this client's next queries wait until the read models hold every write the
        service had acknowledged when this is called, anyone's (not only this client's): for a
        process that reads what another one just wrote (each CLI run is a new client). Returns
        the stream sequence waited for (None: the service did not say)."""
        reply = await self.query("GetServiceHealth", {}, min_seq=0)  # 0: no wait for this one
        last = reply.result.get("stream_last_seq") if isinstance(reply.result, dict) else None
        if isinstance(last, int) and not isinstance(last, bool) and last > 0:
            if self.last_seq is None or last > self.last_seq:
                self.last_seq = last
            return last
        return None

    async def _pause(self, attempt: int) -> None:
        """Before try `attempt + 1`: backoff * 2^(attempt-1), give or take a quarter."""
        await asyncio.sleep(self.retry_backoff * 2 ** (attempt - 1) * random.uniform(0.75, 1.25))

    @staticmethod
    def _gave_up(error: Unavailable, attempts: int, outcome_unknown: bool) -> Unavailable:
        message = error.message if attempts == 1 else f"{error.message} (tried {attempts} times)"
        return Unavailable(message, code=error.code, field=error.field, details=error.details,
                           outcome_unknown=outcome_unknown, attempts=attempts)

    async def _request(self, subject: str, body: Mapping[str, Any], timeout: float, *,
                       command: bool = False) -> Reply:
        """One request. For a command, `Unavailable.outcome_unknown` says whether it may have
        been applied: nobody listening means it was not; no reply in time means it may have."""
        if self._nc is None:
            raise RuntimeError("RunledgerClient is not connected; use `async with RunledgerClient() as rl:`")
        payload = encode_body(body)
        where = f"on {subject} at {self.settings.safe_nats_url()}"
        if len(payload) > self._nc.max_payload:  # nats-py would refuse it, sending nothing
            raise too_large_to_send(subject.rsplit(".", 1)[-1], body, len(payload), self._nc.max_payload)
        try:
            msg = await self._nc.request(subject, payload, timeout=timeout)
        except nats.errors.MaxPayloadError:  # the limit changed meanwhile (a reconnect): nothing was sent
            raise too_large_to_send(subject.rsplit(".", 1)[-1], body, len(payload), self._nc.max_payload) from None
        except nats.errors.NoRespondersError:
            raise Unavailable(f"no runledger service answers {where} (namespace "
                              f"{self.settings.namespace!r}); is `runledger up` or `runledger serve` running?") from None
        except nats.errors.TimeoutError:
            raise Unavailable(f"no reply {where} within {timeout:g} s", outcome_unknown=command) from None
        except nats.errors.Error as e:
            raise Unavailable(f"request {where} failed: {type(e).__name__}: {e}", outcome_unknown=command) from None
        try:
            return parse_reply(msg.data, subject)
        except Unavailable as e:
            # The service's own `unavailable` to a command: its append's outcome is unknown.
            e.outcome_unknown = command
            raise

    @staticmethod
    def _one(model: type[M], result: Any) -> M:
        try:
            return model.model_validate(result)
        except ValidationError as e:
            raise ProtocolError(f"the service replied with something that is not a {model.__name__}: {e}") from None

    @classmethod
    def _many(cls, model: type[M], result: Any) -> list[M]:
        if not isinstance(result, list):
            raise ProtocolError(f"the service replied with {type(result).__name__}, not a list of {model.__name__}")
        return [cls._one(model, item) for item in result]

    @staticmethod
    def _count(result: Any) -> int:
        if not isinstance(result, int) or isinstance(result, bool):
            raise ProtocolError(f"the service replied with {result!r}, not a count")
        return result

    @staticmethod
    def _key(idempotency_key: str | None) -> dict[str, Any]:
        return {} if idempotency_key is None else {"idempotency_key": idempotency_key}

    # -----------------------------------------------------------------------------------------
    # Work pools

    async def create_work_pool(
        self,
        name: str,
        *,
        type: str | Unset = UNSET,
        description: str | None | Unset = UNSET,
        base_job_template: Mapping[str, Any] | Unset = UNSET,
        is_paused: bool | Unset = UNSET,
        concurrency_limit: int | None | Unset = UNSET,
        storage_configuration: Mapping[str, Any] | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> WorkPool:
        """Create a pool and its `default` queue. Defaults (server side): type
        `prefect-agent`, no description, `{}` template, not paused, no limit."""
        body = given(name=name, type=type, description=description, base_job_template=base_job_template,
                     is_paused=is_paused, concurrency_limit=concurrency_limit,
                     storage_configuration=storage_configuration)
        reply = await self.command("CreateWorkPool", body | self._key(idempotency_key))
        return self._one(WorkPool, reply.result)

    async def update_work_pool(
        self,
        name: str,
        *,
        description: str | None | Unset = UNSET,
        is_paused: bool | Unset = UNSET,
        base_job_template: Mapping[str, Any] | Unset = UNSET,
        concurrency_limit: int | None | Unset = UNSET,
        storage_configuration: Mapping[str, Any] | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> WorkPool:
        """Change only the fields given; `concurrency_limit=None` removes the limit."""
        body = given(name=name, description=description, is_paused=is_paused,
                     base_job_template=base_job_template, concurrency_limit=concurrency_limit,
                     storage_configuration=storage_configuration)
        reply = await self.command("UpdateWorkPool", body | self._key(idempotency_key))
        return self._one(WorkPool, reply.result)

    async def delete_work_pool(self, name: str, *, idempotency_key: str | None = None) -> None:
        """Delete a pool with all its queues."""
        await self.command("DeleteWorkPool", {"name": name} | self._key(idempotency_key))

    async def read_work_pool(self, name: str, *, min_seq: int | None = None) -> WorkPool:
        reply = await self.query("GetWorkPool", {"name": name}, min_seq=min_seq)
        return self._one(WorkPool, reply.result)

    async def list_work_pools(
        self,
        *,
        names: Sequence[str] | None = None,
        ids: Sequence[uuid.UUID | str] | None = None,
        types: Sequence[str] | None = None,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[WorkPool]:
        """One page of pools, ordered by name; the server's limit is 200 at most."""
        body = given(limit=limit, offset=offset)
        if (flt := _filter(names, ids, types)) is not None:
            body["work_pools"] = flt
        reply = await self._whole_page("ListWorkPools", body, await self.query("ListWorkPools", body, min_seq=min_seq))
        return self._many(WorkPool, reply.result)

    async def count_work_pools(
        self,
        *,
        names: Sequence[str] | None = None,
        ids: Sequence[uuid.UUID | str] | None = None,
        types: Sequence[str] | None = None,
        min_seq: int | None = None,
    ) -> int:
        body: dict[str, Any] = {}
        if (flt := _filter(names, ids, types)) is not None:
            body["work_pools"] = flt
        reply = await self.query("CountWorkPools", body, min_seq=min_seq)
        return self._count(reply.result)

    # -----------------------------------------------------------------------------------------
    # Work queues in a pool

    async def create_work_queue(
        self,
        work_pool_name: str,
        name: str,
        *,
        description: str | None | Unset = UNSET,
        is_paused: bool | Unset = UNSET,
        concurrency_limit: int | None | Unset = UNSET,
        priority: int | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> WorkQueue:
        """Create a queue in a pool; without a priority it takes the first free one,
        with one the queues in its way move down."""
        body = given(work_pool_name=work_pool_name, name=name, description=description,
                     is_paused=is_paused, concurrency_limit=concurrency_limit, priority=priority)
        reply = await self.command("CreateWorkQueue", body | self._key(idempotency_key))
        return self._one(WorkQueue, reply.result)

    async def update_work_queue(
        self,
        work_pool_name: str,
        work_queue_name: str,
        *,
        name: str | Unset = UNSET,
        description: str | None | Unset = UNSET,
        is_paused: bool | Unset = UNSET,
        concurrency_limit: int | None | Unset = UNSET,
        priority: int | Unset = UNSET,
        last_polled: datetime | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> WorkQueue:
        """Change only the fields given; `name=` renames; a new priority moves the queues in its way down."""
        body = given(work_pool_name=work_pool_name, work_queue_name=work_queue_name, name=name,
                     description=description, is_paused=is_paused, concurrency_limit=concurrency_limit,
                     priority=priority, last_polled=last_polled)
        reply = await self.command("UpdateWorkQueue", body | self._key(idempotency_key))
        return self._one(WorkQueue, reply.result)

    async def delete_work_queue(self, work_pool_name: str, work_queue_name: str, *,
                                idempotency_key: str | None = None) -> None:
        """Delete a queue (not the pool's default one); the others keep their priorities."""
        body = {"work_pool_name": work_pool_name, "work_queue_name": work_queue_name}
        await self.command("DeleteWorkQueue", body | self._key(idempotency_key))

    async def set_work_queue_priorities(self, work_pool_name: str, priorities: Mapping[str, int], *,
                                        idempotency_key: str | None = None) -> list[WorkQueue]:
        """Several priorities at once (queue name -> priority), queues in the way moving down; returns the pool's queues in priority order."""
        body = {"work_pool_name": work_pool_name, "priorities": dict(priorities)}
        reply = await self.command("SetWorkQueuePriorities", body | self._key(idempotency_key))
        return self._many(WorkQueue, reply.result)

    async def read_work_queue(self, work_pool_name: str, work_queue_name: str, *,
                              min_seq: int | None = None) -> WorkQueue:
        body = {"work_pool_name": work_pool_name, "work_queue_name": work_queue_name}
        reply = await self.query("GetWorkQueue", body, min_seq=min_seq)
        return self._one(WorkQueue, reply.result)

    async def list_work_queues(
        self,
        work_pool_name: str,
        *,
        names: Sequence[str] | None = None,
        ids: Sequence[uuid.UUID | str] | None = None,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[WorkQueue]:
        """One page of a pool's queues, ordered by priority."""
        body = given(work_pool_name=work_pool_name, limit=limit, offset=offset)
        if (flt := _filter(names, ids)) is not None:
            body["work_queues"] = flt
        reply = await self._whole_page("ListWorkQueues", body, await self.query("ListWorkQueues", body, min_seq=min_seq))
        return self._many(WorkQueue, reply.result)

    async def count_work_queues(
        self,
        work_pool_name: str,
        *,
        names: Sequence[str] | None = None,
        ids: Sequence[uuid.UUID | str] | None = None,
        min_seq: int | None = None,
    ) -> int:
        body: dict[str, Any] = {"work_pool_name": work_pool_name}
        if (flt := _filter(names, ids)) is not None:
            body["work_queues"] = flt
        reply = await self.query("CountWorkQueues", body, min_seq=min_seq)
        return self._count(reply.result)

    # -----------------------------------------------------------------------------------------
    # Legacy, pool-less work queues (Prefect's /work_queues/ API)

    async def create_legacy_work_queue(
        self,
        name: str,
        *,
        description: str | None | Unset = UNSET,
        is_paused: bool | Unset = UNSET,
        concurrency_limit: int | None | Unset = UNSET,
        priority: int | Unset = UNSET,
        filter: dict[str, Any] | None | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> WorkQueue:
        """A queue in `default-agent-pool`, which is created when missing. `filter`
        (`{"tags": [...], "deployment_ids": [...]}`): Prefect's deprecated tag-based queue, whose
        legacy poll serves the scheduled runs of deployments with all those tags."""
        body = given(name=name, description=description, is_paused=is_paused,
                     concurrency_limit=concurrency_limit, priority=priority, filter=filter)
        reply = await self.command("CreateLegacyWorkQueue", body | self._key(idempotency_key))
        return self._one(WorkQueue, reply.result)

    async def update_work_queue_by_id(
        self,
        id: uuid.UUID | str,
        *,
        name: str | Unset = UNSET,
        description: str | None | Unset = UNSET,
        is_paused: bool | Unset = UNSET,
        concurrency_limit: int | None | Unset = UNSET,
        priority: int | Unset = UNSET,
        last_polled: datetime | Unset = UNSET,
        filter: dict[str, Any] | None | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> WorkQueue:
        """Like `update_work_queue`, but a priority is stored as given: no other queue moves (as in
        Prefect); `filter` sets or (None) removes Prefect's deprecated tag-based filter."""
        body = given(id=str(id), name=name, description=description, is_paused=is_paused,
                     concurrency_limit=concurrency_limit, priority=priority, last_polled=last_polled, filter=filter)
        reply = await self.command("UpdateWorkQueueById", body | self._key(idempotency_key))
        return self._one(WorkQueue, reply.result)

    async def delete_work_queue_by_id(self, id: uuid.UUID | str, *, idempotency_key: str | None = None) -> None:
        await self.command("DeleteWorkQueueById", {"id": str(id)} | self._key(idempotency_key))

    async def read_work_queue_by_id(self, id: uuid.UUID | str, *, min_seq: int | None = None) -> WorkQueue:
        reply = await self.query("GetWorkQueueById", {"id": str(id)}, min_seq=min_seq)
        return self._one(WorkQueue, reply.result)

    async def read_work_pool_concurrency_status(self, name: str, *, page: int = 1, limit: int = 200,
                                                flow_run_limit: int = 10,
                                                min_seq: int | None = None) -> WorkPoolConcurrencyStatus:
        """Who holds the pool's slots: its count, and a page of its queues (priority order),
        each with its count and its first `flow_run_limit` holders."""
        body = {"work_pool_name": name, "page": page, "limit": limit, "flow_run_limit": flow_run_limit}
        reply = await self.query("GetWorkPoolConcurrencyStatus", body, min_seq=min_seq)
        return self._one(WorkPoolConcurrencyStatus, reply.result)

    async def read_work_queue_concurrency_status(self, id: uuid.UUID | str, *, page: int = 1, limit: int = 200,
                                                 min_seq: int | None = None) -> WorkQueueConcurrencyStatus:
        """Who holds the queue's slots, counted as the legacy queue API does (CANCELLING too)."""
        reply = await self.query("GetWorkQueueConcurrencyStatus", {"id": str(id), "page": page, "limit": limit},
                                 min_seq=min_seq)
        return self._one(WorkQueueConcurrencyStatus, reply.result)

    async def read_work_queue_status(self, id: uuid.UUID | str, *, min_seq: int | None = None) -> WorkQueueStatusDetail:
        """The queue's health: healthy while none of its runs is Late and a worker polled it
        within the last 60 s."""
        reply = await self.query("GetWorkQueueStatus", {"id": str(id)}, min_seq=min_seq)
        return self._one(WorkQueueStatusDetail, reply.result)

    async def read_legacy_work_queue(self, name: str, *, min_seq: int | None = None) -> WorkQueue:
        """By name, inside `default-agent-pool` only."""
        reply = await self.query("GetLegacyWorkQueue", {"name": name}, min_seq=min_seq)
        return self._one(WorkQueue, reply.result)

    async def list_all_work_queues(
        self,
        *,
        names: Sequence[str] | None = None,
        ids: Sequence[uuid.UUID | str] | None = None,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[WorkQueue]:
        """One page of every pool's queues, ordered by name."""
        body = given(limit=limit, offset=offset)
        if (flt := _filter(names, ids)) is not None:
            body["work_queues"] = flt
        reply = await self._whole_page("ListAllWorkQueues", body,
                                       await self.query("ListAllWorkQueues", body, min_seq=min_seq))
        return self._many(WorkQueue, reply.result)

    # -----------------------------------------------------------------------------------------
    # Workers and the pool poll

    async def worker_heartbeat(self, work_pool_name: str, name: str, *,
                               heartbeat_interval_seconds: int | None = None,
                               idempotency_key: str | None = None) -> WorkerModel:
        """Record a heartbeat: the worker is created on its first, ONLINE on each; a NOT_READY
        pool becomes READY. An absent interval keeps the one given before."""
        body: dict[str, Any] = {"work_pool_name": work_pool_name, "name": name}
        if heartbeat_interval_seconds is not None:
            body["heartbeat_interval_seconds"] = heartbeat_interval_seconds
        reply = await self.command("WorkerHeartbeat", body | self._key(idempotency_key))
        return self._one(WorkerModel, reply.result)

    async def read_workers(
        self,
        work_pool_name: str,
        *,
        statuses: Sequence[str] | None = None,
        heartbeat_before: datetime | None = None,
        heartbeat_after: datetime | None = None,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[WorkerModel]:
        """One page of a pool's workers, the latest heartbeat first."""
        body = given(work_pool_name=work_pool_name, limit=limit, offset=offset)
        workers: dict[str, Any] = {}
        if statuses is not None:
            workers["status"] = {"any_": list(statuses)}
        times = {k: v.isoformat() for k, v in (("before_", heartbeat_before), ("after_", heartbeat_after))
                 if v is not None}
        if times:
            workers["last_heartbeat_time"] = times
        if workers:
            body["workers"] = workers
        reply = await self._whole_page("ListWorkers", body, await self.query("ListWorkers", body, min_seq=min_seq))
        return self._many(WorkerModel, reply.result)

    async def read_task_workers(self, task_keys: Sequence[str] | None = None) -> list[TaskWorker]:
        """The task workers serving now, with their keys; those serving any of `task_keys`
        when given (Prefect's `POST /task_workers/filter`)."""
        body = {"task_keys": list(task_keys)} if task_keys is not None else {}
        reply = await self.query("ListTaskWorkers", body, min_seq=0)
        return self._many(TaskWorker, reply.result)

    async def delete_worker(self, work_pool_name: str, name: str, *, idempotency_key: str | None = None) -> None:
        await self.command("DeleteWorker", {"work_pool_name": work_pool_name, "name": name} | self._key(idempotency_key))

    async def get_scheduled_flow_runs(
        self,
        work_pool_name: str,
        *,
        work_queue_names: Sequence[str] | None = None,
        scheduled_before: datetime | None = None,
        scheduled_after: datetime | None = None,
        limit: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[WorkerFlowRun]:
        """The pool poll: the runs a worker of the pool should start, within the limits; the
        service records the poll (the queues and their deployments become READY)."""
        body = given(work_pool_name=work_pool_name, limit=limit)
        if work_queue_names is not None:
            body["work_queue_names"] = list(work_queue_names)
        if scheduled_before is not None:
            body["scheduled_before"] = scheduled_before.isoformat()
        if scheduled_after is not None:
            body["scheduled_after"] = scheduled_after.isoformat()
        reply = await self.query("GetScheduledFlowRuns", body, min_seq=min_seq)
        return self._many(WorkerFlowRun, reply.result)

    async def get_scheduled_flow_runs_for_deployments(
        self,
        deployment_ids: Sequence[uuid.UUID | str],
        *,
        scheduled_before: datetime | None = None,
        limit: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[FlowRun]:
        """The runner poll (Prefect's `POST /deployments/get_scheduled_flow_runs`): the
        SCHEDULED runs of these deployments, the earliest first; the service records the poll
        (the deployments become READY)."""
        body = given(deployment_ids=[str(i) for i in deployment_ids], limit=limit)
        if scheduled_before is not None:
            body["scheduled_before"] = scheduled_before.isoformat()
        reply = await self.query("GetScheduledFlowRunsForDeployments", body, min_seq=min_seq)
        return self._many(FlowRun, reply.result)

    # -----------------------------------------------------------------------------------------
    # Flows

    async def create_flow(
        self,
        name: str,
        *,
        tags: Sequence[str] | Unset = UNSET,
        labels: Mapping[str, Any] | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> Flow:
        """Create a flow by name; a name already taken returns that flow unchanged (the tags
        and labels given are not applied: `ensure_flow` says which happened)."""
        flow, _ = await self._create_flow(name, tags, labels, idempotency_key)
        return flow

    async def ensure_flow(
        self,
        name: str,
        *,
        tags: Sequence[str] | Unset = UNSET,
        labels: Mapping[str, Any] | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> tuple[Flow, bool]:
        """`create_flow`, and whether this call made the flow (False: the name was taken, and
        the flow returned is the existing one, unchanged)."""
        flow, created = await self._create_flow(name, tags, labels, idempotency_key)
        if created is None:
            raise ProtocolError("the service's reply to CreateFlow does not say whether it created the flow")
        return flow, created

    async def _create_flow(self, name: str, tags: Sequence[str] | Unset, labels: Mapping[str, Any] | Unset,
                           idempotency_key: str | None) -> tuple[Flow, bool | None]:
        body = given(name=name, tags=tags, labels=labels)
        reply = await self.command("CreateFlow", body | self._key(idempotency_key))
        return self._one(Flow, reply.result), reply.created

    async def delete_flow(self, id: uuid.UUID | str, *, idempotency_key: str | None = None) -> None:
        """Delete a flow; its name is free again at once."""
        await self.command("DeleteFlow", {"id": str(id)} | self._key(idempotency_key))

    async def read_flow(self, id: uuid.UUID | str, *, min_seq: int | None = None) -> Flow:
        reply = await self.query("GetFlow", {"id": str(id)}, min_seq=min_seq)
        return self._one(Flow, reply.result)

    async def read_flow_by_name(self, name: str, *, min_seq: int | None = None) -> Flow:
        reply = await self.query("GetFlowByName", {"name": name}, min_seq=min_seq)
        return self._one(Flow, reply.result)

    async def list_flows(
        self,
        *,
        names: Sequence[str] | None = None,
        ids: Sequence[uuid.UUID | str] | None = None,
        tags: Sequence[str] | None = None,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[Flow]:
        """One page of flows, ordered by name; `tags`: only flows with every tag given. The
        server's limit is 200 at most."""
        body = given(limit=limit, offset=offset)
        if (flt := _flow_filter(names, ids, tags)) is not None:
            body["flows"] = flt
        reply = await self._whole_page("ListFlows", body, await self.query("ListFlows", body, min_seq=min_seq))
        return self._many(Flow, reply.result)

    async def count_flows(
        self,
        *,
        names: Sequence[str] | None = None,
        ids: Sequence[uuid.UUID | str] | None = None,
        tags: Sequence[str] | None = None,
        min_seq: int | None = None,
    ) -> int:
        body: dict[str, Any] = {}
        if (flt := _flow_filter(names, ids, tags)) is not None:
            body["flows"] = flt
        reply = await self.query("CountFlows", body, min_seq=min_seq)
        return self._count(reply.result)

    # -----------------------------------------------------------------------------------------
    # Variables

    async def create_variable(
        self,
        name: str,
        value: Any,
        *,
        tags: Sequence[str] | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> Variable:
        """Create a variable: any JSON `value` (at most 5000 characters as JSON). A name that
        is taken raises `Conflict`. Names: lowercase letters, digits, `-` and `_`."""
        body = given(name=name, value=value, tags=tags)
        reply = await self.command("CreateVariable", body | self._key(idempotency_key))
        return self._one(Variable, reply.result)

    async def update_variable(
        self,
        name: str,
        *,
        value: Any | Unset = UNSET,
        tags: Sequence[str] | Unset = UNSET,
        new_name: str | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> Variable:
        """Change what is given (`value=None` stores null); `new_name` renames. Returns the
        variable after the update."""
        body = given(name=name, value=value, tags=tags, new_name=new_name)
        reply = await self.command("UpdateVariable", body | self._key(idempotency_key))
        return self._one(Variable, reply.result)

    async def delete_variable(self, name: str, *, idempotency_key: str | None = None) -> None:
        """Delete a variable by name; the name is free again at once."""
        await self.command("DeleteVariable", {"name": name} | self._key(idempotency_key))

    async def read_variable(self, id: uuid.UUID | str, *, min_seq: int | None = None) -> Variable:
        reply = await self.query("GetVariable", {"id": str(id)}, min_seq=min_seq)
        return self._one(Variable, reply.result)

    async def read_variable_by_name(self, name: str, *, min_seq: int | None = None) -> Variable:
        reply = await self.query("GetVariableByName", {"name": name}, min_seq=min_seq)
        return self._one(Variable, reply.result)

    @staticmethod
    def _variable_filter(names: Sequence[str] | None, ids: Sequence[uuid.UUID | str] | None,
                         like: str | None, tags: Sequence[str] | None) -> dict[str, Any] | None:
        """A `VariableFilter` body: ids and names match any value given, `like` is a part of
        the name (any case), `tags` every tag given."""
        body = _flow_filter(names, ids, tags) or {}
        if like is not None:
            body["name"] = {**body.get("name", {}), "like_": like}
        return body or None

    async def list_variables(
        self,
        *,
        names: Sequence[str] | None = None,
        ids: Sequence[uuid.UUID | str] | None = None,
        like: str | None = None,
        tags: Sequence[str] | None = None,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[Variable]:
        """One page of variables, ordered by name. The server's limit is 200 at most."""
        body = given(limit=limit, offset=offset)
        if (flt := self._variable_filter(names, ids, like, tags)) is not None:
            body["variables"] = flt
        reply = await self._whole_page("ListVariables", body,
                                       await self.query("ListVariables", body, min_seq=min_seq))
        return self._many(Variable, reply.result)

    async def count_variables(
        self,
        *,
        names: Sequence[str] | None = None,
        ids: Sequence[uuid.UUID | str] | None = None,
        like: str | None = None,
        tags: Sequence[str] | None = None,
        min_seq: int | None = None,
    ) -> int:
        body: dict[str, Any] = {}
        if (flt := self._variable_filter(names, ids, like, tags)) is not None:
            body["variables"] = flt
        reply = await self.query("CountVariables", body, min_seq=min_seq)
        return self._count(reply.result)

    # -----------------------------------------------------------------------------------------
    # Global concurrency limits

    @staticmethod
    def _id_or_name(id_or_name: uuid.UUID | str) -> dict[str, str]:
        """`{"id": ...}` for a UUID (or text that is one), else `{"name": ...}`, as Prefect's
        `/v2/concurrency_limits/{id_or_name}` reads its path."""
        if isinstance(id_or_name, uuid.UUID):
            return {"id": str(id_or_name)}
        try:
            return {"id": str(uuid.UUID(id_or_name))}
        except ValueError:
            return {"name": id_or_name}

    async def create_concurrency_limit(
        self,
        name: str,
        limit: int,
        *,
        active: bool | Unset = UNSET,
        active_slots: int | Unset = UNSET,
        denied_slots: int | Unset = UNSET,
        slot_decay_per_second: float | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> ConcurrencyLimit:
        """Create a global concurrency limit of `limit` slots (>= 0); a taken name raises
        `Conflict`."""
        body = given(name=name, limit=limit, active=active, active_slots=active_slots, denied_slots=denied_slots,
                     slot_decay_per_second=slot_decay_per_second)
        reply = await self.command("CreateConcurrencyLimit", body | self._key(idempotency_key))
        return self._one(ConcurrencyLimit, reply.result)

    async def update_concurrency_limit(
        self,
        id_or_name: uuid.UUID | str,
        *,
        limit: int | Unset = UNSET,
        active: bool | Unset = UNSET,
        new_name: str | Unset = UNSET,
        active_slots: int | Unset = UNSET,
        denied_slots: int | Unset = UNSET,
        slot_decay_per_second: float | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> ConcurrencyLimit:
        """Change what is given, on the limit with this id (a UUID) or name. Returns the limit
        after the update."""
        body = self._id_or_name(id_or_name) | given(
            limit=limit, active=active, new_name=new_name, active_slots=active_slots, denied_slots=denied_slots,
            slot_decay_per_second=slot_decay_per_second)
        reply = await self.command("UpdateConcurrencyLimit", body | self._key(idempotency_key))
        return self._one(ConcurrencyLimit, reply.result)

    async def delete_concurrency_limit(self, id_or_name: uuid.UUID | str, *,
                                       idempotency_key: str | None = None) -> None:
        """Delete the limit with this id (a UUID) or name; the name is free again at once."""
        await self.command("DeleteConcurrencyLimit", self._id_or_name(id_or_name) | self._key(idempotency_key))

    async def read_concurrency_limit(self, id: uuid.UUID | str, *, min_seq: int | None = None) -> ConcurrencyLimit:
        reply = await self.query("GetConcurrencyLimit", {"id": str(id)}, min_seq=min_seq)
        return self._one(ConcurrencyLimit, reply.result)

    async def read_concurrency_limit_by_name(self, name: str, *, min_seq: int | None = None) -> ConcurrencyLimit:
        reply = await self.query("GetConcurrencyLimitByName", {"name": name}, min_seq=min_seq)
        return self._one(ConcurrencyLimit, reply.result)

    async def list_concurrency_limits(
        self,
        *,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[ConcurrencyLimit]:
        """One page of global concurrency limits, ordered by name (at most 200)."""
        body = given(limit=limit, offset=offset)
        reply = await self._whole_page("ListConcurrencyLimits", body,
                                       await self.query("ListConcurrencyLimits", body, min_seq=min_seq))
        return self._many(ConcurrencyLimit, reply.result)

    async def count_concurrency_limits(self, *, min_seq: int | None = None) -> int:
        reply = await self.query("CountConcurrencyLimits", {}, min_seq=min_seq)
        return self._count(reply.result)

    # -----------------------------------------------------------------------------------------
    # Task tag concurrency limits (Prefect's classic `/concurrency_limits/`)

    async def create_tag_concurrency_limit(self, tag: str, concurrency_limit: int, *,
                                           idempotency_key: str | None = None) -> tuple[TagConcurrencyLimit, bool]:
        """Let at most `concurrency_limit` (>= 0) task runs carrying `tag` run at once. Returns
        the limit and whether this call created it: a tag that has a limit gets the new number
        and keeps the runs holding its slots. A task run held back by a full tag is told to
        wait (`WAIT`, 10 s); a limit of 0 stops it (`ABORT`)."""
        body = {"tag": tag, "concurrency_limit": concurrency_limit}
        reply = await self.command("CreateTagConcurrencyLimit", body | self._key(idempotency_key))
        if reply.created is None:
            raise ProtocolError("the service's reply to CreateTagConcurrencyLimit does not say whether it created "
                                "the limit")
        return self._one(TagConcurrencyLimit, reply.result), reply.created

    async def delete_tag_concurrency_limit(self, tag: str, *, idempotency_key: str | None = None) -> None:
        """Remove the tag's limit (`NotFound` when it has none)."""
        await self.command("DeleteTagConcurrencyLimit", {"tag": tag} | self._key(idempotency_key))

    async def reset_tag_concurrency_limit(self, tag: str, slot_override: Sequence[uuid.UUID | str] | None = None, *,
                                          idempotency_key: str | None = None) -> TagConcurrencyLimit:
        """Replace the task runs holding the tag's slots by `slot_override` (none when not
        given). Returns the limit after it."""
        body: dict[str, Any] = {"tag": tag}
        if slot_override is not None:
            body["slot_override"] = [str(run_id) for run_id in slot_override]
        reply = await self.command("ResetTagConcurrencyLimit", body | self._key(idempotency_key))
        return self._one(TagConcurrencyLimit, reply.result)

    async def read_tag_concurrency_limit(self, tag: str, *, min_seq: int | None = None) -> TagConcurrencyLimit:
        """The tag's limit, with the task runs holding its slots (`NotFound` when it has none)."""
        reply = await self.query("GetTagConcurrencyLimit", {"tag": tag}, min_seq=min_seq)
        return self._one(TagConcurrencyLimit, reply.result)

    async def list_tag_concurrency_limits(
        self,
        *,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[TagConcurrencyLimit]:
        """One page of task tag concurrency limits, ordered by tag (at most 200)."""
        body = given(limit=limit, offset=offset)
        reply = await self._whole_page("ListTagConcurrencyLimits", body,
                                       await self.query("ListTagConcurrencyLimits", body, min_seq=min_seq))
        return self._many(TagConcurrencyLimit, reply.result)

    # -----------------------------------------------------------------------------------------
    # Deployments

    @staticmethod
    def _deployment_query(ids: Sequence[uuid.UUID | str] | None, names: Sequence[str] | None,
                          flow_ids: Sequence[uuid.UUID | str] | None, work_queue_ids: Sequence[uuid.UUID | str] | None,
                          tags: Sequence[str] | None, paused: bool | None, flow_names: Sequence[str] | None,
                          work_pool_names: Sequence[str] | None,
                          work_queue_names: Sequence[str] | None) -> dict[str, Any]:
        """The filter fields of `ListDeployments` / `CountDeployments` / `PaginateDeployments`:
        lists match any value given, `tags` every tag given; pool and queue names are the
        queue's names as they are now."""
        flt = _flow_filter(names, ids, tags) or {}
        if flow_ids is not None:
            flt["flow_id"] = {"any_": [str(i) for i in flow_ids]}
        if work_queue_ids is not None:
            flt["work_queue_id"] = {"any_": [str(i) for i in work_queue_ids]}
        if paused is not None:
            flt["paused"] = paused
        body: dict[str, Any] = {"deployments": flt} if flt else {}
        for key, values in (("flow_name", flow_names), ("work_pool_name", work_pool_names),
                            ("work_queue_name", work_queue_names)):
            if values is not None:
                body[key] = {"any_": list(values)}
        return body

    async def create_deployment(
        self,
        flow_id: uuid.UUID | str,
        name: str,
        *,
        version: str | None | Unset = UNSET,
        description: str | None | Unset = UNSET,
        paused: bool | Unset = UNSET,
        schedules: Sequence[Mapping[str, Any]] | Unset = UNSET,
        concurrency_limit: int | None | Unset = UNSET,
        concurrency_options: Mapping[str, Any] | None | Unset = UNSET,
        job_variables: Mapping[str, Any] | Unset = UNSET,
        parameters: Mapping[str, Any] | Unset = UNSET,
        parameter_openapi_schema: Mapping[str, Any] | None | Unset = UNSET,
        enforce_parameter_schema: bool | Unset = UNSET,
        pull_steps: Sequence[Any] | None | Unset = UNSET,
        tags: Sequence[str] | Unset = UNSET,
        labels: Mapping[str, Any] | Unset = UNSET,
        work_pool_name: str | None | Unset = UNSET,
        work_queue_name: str | None | Unset = UNSET,
        path: str | None | Unset = UNSET,
        entrypoint: str | None | Unset = UNSET,
        storage_document_id: uuid.UUID | str | None | Unset = UNSET,
        infrastructure_document_id: uuid.UUID | str | None | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> tuple[Deployment, bool]:
        """Create the deployment `name` of a flow, or update in place the one that exists
        (its id kept, the fields given changed, its schedules replaced by those given); returns
        it and whether this call created it. A schedule is `{"schedule": {"cron": ...} |
        {"interval": seconds} | {"rrule": ...}, "active", "max_scheduled_runs", "parameters",
        "slug"}`. A pool means its default queue; a queue named in it is created when
        missing."""
        body = given(name=name, flow_id=str(flow_id), version=version, description=description, paused=paused,
                     schedules=schedules, concurrency_limit=concurrency_limit,
                     concurrency_options=concurrency_options, job_variables=job_variables, parameters=parameters,
                     parameter_openapi_schema=parameter_openapi_schema,
                     enforce_parameter_schema=enforce_parameter_schema, pull_steps=pull_steps, tags=tags,
                     labels=labels, work_pool_name=work_pool_name, work_queue_name=work_queue_name, path=path,
                     entrypoint=entrypoint, storage_document_id=storage_document_id,
                     infrastructure_document_id=infrastructure_document_id)
        reply = await self.command("CreateDeployment", body | self._key(idempotency_key))
        if reply.created is None:
            raise ProtocolError("the service's reply to CreateDeployment does not say whether it created the deployment")
        return self._one(Deployment, reply.result), reply.created

    async def update_deployment(
        self,
        id: uuid.UUID | str,
        *,
        version: str | None | Unset = UNSET,
        description: str | None | Unset = UNSET,
        paused: bool | Unset = UNSET,
        schedules: Sequence[Mapping[str, Any]] | None | Unset = UNSET,
        concurrency_limit: int | None | Unset = UNSET,
        concurrency_options: Mapping[str, Any] | None | Unset = UNSET,
        job_variables: Mapping[str, Any] | Unset = UNSET,
        parameters: Mapping[str, Any] | Unset = UNSET,
        parameter_openapi_schema: Mapping[str, Any] | None | Unset = UNSET,
        enforce_parameter_schema: bool | Unset = UNSET,
        pull_steps: Sequence[Any] | None | Unset = UNSET,
        tags: Sequence[str] | Unset = UNSET,
        labels: Mapping[str, Any] | Unset = UNSET,
        work_pool_name: str | None | Unset = UNSET,
        work_queue_name: str | None | Unset = UNSET,
        path: str | None | Unset = UNSET,
        entrypoint: str | None | Unset = UNSET,
        storage_document_id: uuid.UUID | str | None | Unset = UNSET,
        infrastructure_document_id: uuid.UUID | str | None | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> Deployment:
        """Change the fields given. `schedules`: when every schedule (given and existing) has
        a `slug`, each is patched by slug (`replaces` renames one); otherwise the list replaces
        the deployment's. `work_pool_name=None` takes the deployment off its queue. Returns the
        deployment after the update."""
        body = given(id=str(id), version=version, description=description, paused=paused, schedules=schedules,
                     concurrency_limit=concurrency_limit, concurrency_options=concurrency_options,
                     job_variables=job_variables, parameters=parameters,
                     parameter_openapi_schema=parameter_openapi_schema,
                     enforce_parameter_schema=enforce_parameter_schema, pull_steps=pull_steps, tags=tags,
                     labels=labels, work_pool_name=work_pool_name, work_queue_name=work_queue_name, path=path,
                     entrypoint=entrypoint, storage_document_id=storage_document_id,
                     infrastructure_document_id=infrastructure_document_id)
        reply = await self.command("UpdateDeployment", body | self._key(idempotency_key))
        return self._one(Deployment, reply.result)

    async def delete_deployment(self, id: uuid.UUID | str, *, idempotency_key: str | None = None) -> None:
        """Delete a deployment; its (flow, name) is free again at once."""
        await self.command("DeleteDeployment", {"id": str(id)} | self._key(idempotency_key))

    async def pause_deployment(self, id: uuid.UUID | str, *, idempotency_key: str | None = None) -> None:
        """Pause a deployment (no new scheduled runs); its schedules keep their `active` flags."""
        await self.command("PauseDeployment", {"id": str(id)} | self._key(idempotency_key))

    async def resume_deployment(self, id: uuid.UUID | str, *, idempotency_key: str | None = None) -> None:
        await self.command("ResumeDeployment", {"id": str(id)} | self._key(idempotency_key))

    async def read_deployment(self, id: uuid.UUID | str, *, min_seq: int | None = None) -> Deployment:
        reply = await self.query("GetDeployment", {"id": str(id)}, min_seq=min_seq)
        return self._one(Deployment, reply.result)

    async def read_deployment_by_name(self, name: str, *, min_seq: int | None = None) -> Deployment:
        """By `"<flow name>/<deployment name>"`, as Prefect's client takes it (the first `/`
        separates them: a flow name holds none)."""
        flow_name, sep, deployment_name = name.partition("/")
        if not sep:
            raise Invalid(f"{name!r} is not <flow name>/<deployment name>", field="name")
        body = {"flow_name": flow_name, "deployment_name": deployment_name}
        reply = await self.query("GetDeploymentByName", body, min_seq=min_seq)
        return self._one(Deployment, reply.result)

    async def list_deployments(
        self,
        *,
        ids: Sequence[uuid.UUID | str] | None = None,
        names: Sequence[str] | None = None,
        flow_ids: Sequence[uuid.UUID | str] | None = None,
        flow_names: Sequence[str] | None = None,
        work_pool_names: Sequence[str] | None = None,
        work_queue_names: Sequence[str] | None = None,
        work_queue_ids: Sequence[uuid.UUID | str] | None = None,
        tags: Sequence[str] | None = None,
        paused: bool | None = None,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[Deployment]:
        """One page of deployments, ordered by name (then id); lists match any value given,
        `tags` every tag given. The server's limit is 200 at most."""
        body = given(limit=limit, offset=offset) | self._deployment_query(
            ids, names, flow_ids, work_queue_ids, tags, paused, flow_names, work_pool_names, work_queue_names)
        reply = await self._whole_page("ListDeployments", body,
                                       await self.query("ListDeployments", body, min_seq=min_seq))
        return self._many(Deployment, reply.result)

    read_deployments = list_deployments  # Prefect's name

    async def count_deployments(
        self,
        *,
        ids: Sequence[uuid.UUID | str] | None = None,
        names: Sequence[str] | None = None,
        flow_ids: Sequence[uuid.UUID | str] | None = None,
        flow_names: Sequence[str] | None = None,
        work_pool_names: Sequence[str] | None = None,
        work_queue_names: Sequence[str] | None = None,
        work_queue_ids: Sequence[uuid.UUID | str] | None = None,
        tags: Sequence[str] | None = None,
        paused: bool | None = None,
        min_seq: int | None = None,
    ) -> int:
        body = self._deployment_query(ids, names, flow_ids, work_queue_ids, tags, paused, flow_names,
                                      work_pool_names, work_queue_names)
        reply = await self.query("CountDeployments", body, min_seq=min_seq)
        return self._count(reply.result)

    async def paginate_deployments(
        self,
        *,
        page: int | Unset = UNSET,
        limit: int | Unset = UNSET,
        ids: Sequence[uuid.UUID | str] | None = None,
        names: Sequence[str] | None = None,
        flow_ids: Sequence[uuid.UUID | str] | None = None,
        flow_names: Sequence[str] | None = None,
        work_pool_names: Sequence[str] | None = None,
        work_queue_names: Sequence[str] | None = None,
        work_queue_ids: Sequence[uuid.UUID | str] | None = None,
        tags: Sequence[str] | None = None,
        paused: bool | None = None,
        min_seq: int | None = None,
    ) -> DeploymentPage:
        """Page `page` (from 1) of `limit` deployments, with the total count and the number of
        pages; a page past the end is empty."""
        body = given(page=page, limit=limit) | self._deployment_query(
            ids, names, flow_ids, work_queue_ids, tags, paused, flow_names, work_pool_names, work_queue_names)
        reply = await self.query("PaginateDeployments", body, min_seq=min_seq)
        return self._one(DeploymentPage, reply.result)

    async def create_deployment_schedules(
        self,
        deployment_id: uuid.UUID | str,
        schedules: Sequence[Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
    ) -> list[DeploymentSchedule]:
        """Add schedules beside the deployment's (`{"schedule": {...}, "active",
        "max_scheduled_runs", "parameters", "slug"}` each); returns the ones added."""
        body = {"deployment_id": str(deployment_id), "schedules": list(schedules)}
        reply = await self.command("CreateDeploymentSchedules", body | self._key(idempotency_key))
        return self._many(DeploymentSchedule, reply.result)

    async def update_deployment_schedule(
        self,
        deployment_id: uuid.UUID | str,
        schedule_id: uuid.UUID | str,
        *,
        schedule: Mapping[str, Any] | Unset = UNSET,
        active: bool | Unset = UNSET,
        max_scheduled_runs: int | None | Unset = UNSET,
        parameters: Mapping[str, Any] | None | Unset = UNSET,
        slug: str | None | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> None:
        """Change what is given of one schedule."""
        body = given(deployment_id=str(deployment_id), schedule_id=str(schedule_id), schedule=schedule,
                     active=active, max_scheduled_runs=max_scheduled_runs, parameters=parameters, slug=slug)
        await self.command("UpdateDeploymentSchedule", body | self._key(idempotency_key))

    async def delete_deployment_schedule(self, deployment_id: uuid.UUID | str, schedule_id: uuid.UUID | str, *,
                                         idempotency_key: str | None = None) -> None:
        body = {"deployment_id": str(deployment_id), "schedule_id": str(schedule_id)}
        await self.command("DeleteDeploymentSchedule", body | self._key(idempotency_key))

    async def read_deployment_schedules(self, deployment_id: uuid.UUID | str, *,
                                        min_seq: int | None = None) -> list[DeploymentSchedule]:
        reply = await self.query("ListDeploymentSchedules", {"deployment_id": str(deployment_id)}, min_seq=min_seq)
        return self._many(DeploymentSchedule, reply.result)

    async def schedule_deployment_runs(
        self,
        deployment_id: uuid.UUID | str,
        *,
        start_time: datetime | Unset = UNSET,
        end_time: datetime | Unset = UNSET,
        min_time: float | Unset = UNSET,
        min_runs: int | Unset = UNSET,
        max_runs: int | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> list[uuid.UUID]:
        """Make the `Scheduled` runs the deployment's active schedules give from `start_time`
        (default now) to `end_time` (default 100 days later): at most `max_runs` per schedule
        (default 100), stopping once there are `min_runs` (default 3) and `min_time` seconds
        (default an hour) are covered. A date whose run exists is skipped, so scheduling twice
        makes each run once; a start in the past backfills. Returns the ids of the runs made
        (none for an unknown deployment, as in Prefect)."""
        body = given(deployment_id=str(deployment_id), start_time=start_time, end_time=end_time, min_time=min_time,
                     min_runs=min_runs, max_runs=max_runs)
        reply = await self.command("ScheduleDeploymentRuns", body | self._key(idempotency_key))
        ids = reply.result.get("flow_run_ids") if isinstance(reply.result, dict) else None
        if not isinstance(ids, list):
            raise ProtocolError(f"the service replied with {reply.result!r}, not {{'flow_run_ids': [...]}}")
        try:
            return [uuid.UUID(i) for i in ids]
        except (TypeError, ValueError, AttributeError):
            raise ProtocolError(f"the service replied with flow run ids that are not UUIDs: {ids!r}") from None

    @staticmethod
    def _run_fields(**fields: Any) -> dict[str, Any]:
        """A proposed first state may be given as a `State`-like mapping or a type name."""
        state = fields.get("state", UNSET)
        if isinstance(state, str):
            fields["state"] = {"type": state}
        return given(**fields)

    async def create_flow_run_from_deployment(
        self,
        deployment_id: uuid.UUID | str,
        *,
        parameters: Mapping[str, Any] | Unset = UNSET,
        state: Mapping[str, Any] | str | None | Unset = UNSET,
        name: str | None | Unset = UNSET,
        tags: Sequence[str] | Unset = UNSET,
        labels: Mapping[str, Any] | Unset = UNSET,
        context: Mapping[str, Any] | Unset = UNSET,
        work_queue_name: str | None | Unset = UNSET,
        job_variables: Mapping[str, Any] | Unset = UNSET,
        enforce_parameter_schema: bool | None | Unset = UNSET,
        empirical_policy: Mapping[str, Any] | Unset = UNSET,
        parent_task_run_id: uuid.UUID | str | None | Unset = UNSET,
        infrastructure_document_id: uuid.UUID | str | None | Unset = UNSET,
        priority: int | Unset = UNSET,
        idempotency_key: str | None | Unset = UNSET,
        request_idempotency_key: str | None = None,
    ) -> FlowRun:
        """A run of the deployment (`Scheduled` now unless `state` says otherwise): its
        parameters over the deployment's, checked against its schema; `work_queue_name` picks
        (or makes) a queue of the deployment's pool. `idempotency_key` is Prefect's: the run of
        this flow that has it comes back unchanged. `request_idempotency_key` is the bus's (see
        the class): a repeat returns the first reply."""
        body = self._run_fields(
            deployment_id=str(deployment_id), parameters=parameters, state=state, name=name, tags=tags,
            labels=labels, context=context, work_queue_name=work_queue_name, job_variables=job_variables,
            enforce_parameter_schema=enforce_parameter_schema, empirical_policy=empirical_policy,
            parent_task_run_id=parent_task_run_id, infrastructure_document_id=infrastructure_document_id,
            priority=priority, idempotency_key=idempotency_key)
        if request_idempotency_key is not None:
            body["request_idempotency_key"] = request_idempotency_key
        reply = await self.command("CreateFlowRunFromDeployment", body)
        return self._one(FlowRun, reply.result)

    async def create_flow_runs_from_deployment(
        self,
        deployment_id: uuid.UUID | str,
        runs: Sequence[Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
    ) -> list[FlowRunCreateResult]:
        """Up to 100 runs at once, each a mapping of `create_flow_run_from_deployment`'s
        fields (`idempotency_key` there is Prefect's); each succeeds or fails on its own."""
        body = {"deployment_id": str(deployment_id), "runs": [dict(r) for r in runs]}
        reply = await self.command("CreateFlowRunsFromDeployment", body | self._key(idempotency_key))
        return self._many(FlowRunCreateResult, reply.result)

    # -----------------------------------------------------------------------------------------
    # Flow runs

    async def create_flow_run(
        self,
        flow_id: uuid.UUID | str,
        *,
        name: str | None | Unset = UNSET,
        state: Mapping[str, Any] | str | None | Unset = UNSET,
        parameters: Mapping[str, Any] | Unset = UNSET,
        context: Mapping[str, Any] | Unset = UNSET,
        tags: Sequence[str] | Unset = UNSET,
        labels: Mapping[str, Any] | Unset = UNSET,
        deployment_id: uuid.UUID | str | None | Unset = UNSET,
        deployment_version: str | None | Unset = UNSET,
        flow_version: str | None | Unset = UNSET,
        empirical_policy: Mapping[str, Any] | Unset = UNSET,
        parent_task_run_id: uuid.UUID | str | None | Unset = UNSET,
        work_pool_name: str | None | Unset = UNSET,
        work_queue_name: str | None | Unset = UNSET,
        infrastructure_document_id: uuid.UUID | str | None | Unset = UNSET,
        job_variables: Mapping[str, Any] | Unset = UNSET,
        priority: int | Unset = UNSET,
        idempotency_key: str | None | Unset = UNSET,
        request_idempotency_key: str | None = None,
    ) -> FlowRun:
        """A run of a flow, `Pending` unless `state` (a mapping or a type name) says
        otherwise. A pool means its default queue, or the named queue of it (which must
        exist). `idempotency_key` is Prefect's: the run of this flow that has it comes back
        unchanged, its state not applied. `request_idempotency_key` is the bus's."""
        body = self._run_fields(
            flow_id=str(flow_id), name=name, state=state, parameters=parameters, context=context, tags=tags,
            labels=labels, deployment_id=deployment_id, deployment_version=deployment_version,
            flow_version=flow_version, empirical_policy=empirical_policy, parent_task_run_id=parent_task_run_id,
            work_pool_name=work_pool_name, work_queue_name=work_queue_name,
            infrastructure_document_id=infrastructure_document_id, job_variables=job_variables, priority=priority,
            idempotency_key=idempotency_key)
        if request_idempotency_key is not None:
            body["request_idempotency_key"] = request_idempotency_key
        reply = await self.command("CreateFlowRun", body)
        return self._one(FlowRun, reply.result)

    async def set_flow_run_state(
        self,
        flow_run_id: uuid.UUID | str,
        state: Mapping[str, Any] | str,
        force: bool = False,
        *,
        worker_name: str | None = None,
        idempotency_key: str | None = None,
    ) -> OrchestrationResult:
        """Propose a state (`{"type", "name", "message", "data", "state_details"}`, or just its
        type); the orchestration rules decide what is written, and `force=True` writes it
        anyway. A refusal is not an error: read `status` (ACCEPT, REJECT, WAIT, ABORT),
        `details.reason`, and `state`, the run's state after the decision. A worker that
        claims a run names itself (`worker_name`): it must be ONLINE in the run's pool, and
        if it stops sending heartbeats the run is crashed and its slots given back."""
        proposed = {"type": state} if isinstance(state, str) else dict(state)
        body: dict[str, Any] = {"id": str(flow_run_id), "state": proposed}
        if force:
            body["force"] = True
        if worker_name is not None:
            body["worker_name"] = worker_name
        reply = await self.command("SetFlowRunState", body | self._key(idempotency_key))
        if reply.orchestration is None:
            raise ProtocolError("the service's reply to SetFlowRunState has no orchestration outcome")
        for holder in self._slot_holders.get(str(flow_run_id), ()):
            holder.nudge()  # the run may hold its deployment slot's lease now
        return self._one(OrchestrationResult, {**reply.orchestration, "state": reply.result})

    async def renew_deployment_slot_lease(self, flow_run_id: uuid.UUID | str, *, lease_id: uuid.UUID | str | None = None,
                                          lease_seconds: float = 300.0,
                                          idempotency_key: str | None = None) -> LeaseRenewal:
        """Renew the run's deployment concurrency slot lease (`lease_id`, else whichever it
        holds): it then runs out `lease_seconds` from now, and once a lease has been renewed
        the slot is given back when it runs out. `NotFound` when the run holds no lease (or
        not that one): it ran out, or the run gave the slot back. `hold_deployment_slot`
        does this for the length of a block."""
        body = {"id": str(flow_run_id), "lease_seconds": lease_seconds}
        if lease_id is not None:
            body["lease_id"] = str(lease_id)
        reply = await self.command("RenewDeploymentSlotLease", body | self._key(idempotency_key))
        return self._one(LeaseRenewal, reply.result)

    def hold_deployment_slot(self, flow_run_id: uuid.UUID | str, *, lease_seconds: float = 300.0,
                             strict: bool = True) -> DeploymentSlotLease:
        """`async with rl.hold_deployment_slot(run_id):` keeps the run's deployment slot for the
        length of the block, as Prefect's engine does while a flow runs: the lease is renewed at
        once and every three quarters of `lease_seconds`. If this process dies, the slot goes
        back within `lease_seconds` (and a pass of the service's foreman). If a renewal finds
        the lease gone, the block is cancelled and raises `DeploymentSlotLost` (`strict=False`:
        it runs on, and the holder's `lost` is set)."""
        return DeploymentSlotLease(self, flow_run_id, lease_seconds=lease_seconds, strict=strict)

    async def update_flow_run(
        self,
        flow_run_id: uuid.UUID | str,
        *,
        name: str | Unset = UNSET,
        flow_version: str | None | Unset = UNSET,
        parameters: Mapping[str, Any] | None | Unset = UNSET,
        empirical_policy: Mapping[str, Any] | None | Unset = UNSET,
        tags: Sequence[str] | None | Unset = UNSET,
        infrastructure_pid: str | None | Unset = UNSET,
        job_variables: Mapping[str, Any] | None | Unset = UNSET,
        priority: int | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> None:
        """Change the fields given. Job variables change only while the run is scheduled (and
        has a deployment); `priority` only while it is scheduled."""
        body = given(id=str(flow_run_id), name=name, flow_version=flow_version, parameters=parameters,
                     empirical_policy=empirical_policy, tags=tags, infrastructure_pid=infrastructure_pid,
                     job_variables=job_variables, priority=priority)
        await self.command("UpdateFlowRun", body | self._key(idempotency_key))

    async def delete_flow_run(self, flow_run_id: uuid.UUID | str, *, idempotency_key: str | None = None) -> None:
        """Delete a run; its idempotency key is free again at once."""
        await self.command("DeleteFlowRun", {"id": str(flow_run_id)} | self._key(idempotency_key))

    async def read_flow_run(self, flow_run_id: uuid.UUID | str, *, min_seq: int | None = None) -> FlowRun:
        reply = await self.query("GetFlowRun", {"id": str(flow_run_id)}, min_seq=min_seq)
        return self._one(FlowRun, reply.result)

    @staticmethod
    def _flow_run_query(ids: Sequence[uuid.UUID | str] | None, names: Sequence[str] | None,
                        flow_ids: Sequence[uuid.UUID | str] | None, deployment_ids: Sequence[uuid.UUID | str] | None,
                        work_queue_ids: Sequence[uuid.UUID | str] | None, work_queue_names: Sequence[str] | None,
                        state_types: Sequence[str] | None, state_names: Sequence[str] | None,
                        tags: Sequence[str] | None, idempotency_keys: Sequence[str] | None,
                        parent_task_run_ids: Sequence[uuid.UUID | str] | None,
                        expected_start_time_after: datetime | None, expected_start_time_before: datetime | None,
                        work_pool_names: Sequence[str] | None,
                        flow_run_filter: Mapping[str, Any] | None) -> dict[str, Any]:
        """The filter fields of `ListFlowRuns` / `CountFlowRuns`: lists match any value given,
        `tags` every tag given; `flow_run_filter` is a raw `FlowRunFilter` the keywords add to."""
        flt: dict[str, Any] = dict(flow_run_filter or {})
        for key, values in (("id", ids), ("name", names), ("flow_id", flow_ids), ("deployment_id", deployment_ids),
                            ("work_queue_id", work_queue_ids), ("work_queue_name", work_queue_names),
                            ("state_type", state_types), ("state_name", state_names),
                            ("idempotency_key", idempotency_keys), ("parent_task_run_id", parent_task_run_ids)):
            if values is not None:
                flt[key] = {"any_": [str(v) for v in values]}
        if tags is not None:
            flt["tags"] = {"all_": list(tags)}
        if expected_start_time_after is not None or expected_start_time_before is not None:
            flt["expected_start_time"] = given(
                after_=UNSET if expected_start_time_after is None else expected_start_time_after,
                before_=UNSET if expected_start_time_before is None else expected_start_time_before)
        body: dict[str, Any] = {"flow_runs": flt} if flt else {}
        if work_pool_names is not None:
            body["work_pool_name"] = {"any_": list(work_pool_names)}
        return body

    async def list_flow_runs(
        self,
        *,
        ids: Sequence[uuid.UUID | str] | None = None,
        names: Sequence[str] | None = None,
        flow_ids: Sequence[uuid.UUID | str] | None = None,
        deployment_ids: Sequence[uuid.UUID | str] | None = None,
        work_pool_names: Sequence[str] | None = None,
        work_queue_ids: Sequence[uuid.UUID | str] | None = None,
        work_queue_names: Sequence[str] | None = None,
        state_types: Sequence[str] | None = None,
        state_names: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        idempotency_keys: Sequence[str] | None = None,
        parent_task_run_ids: Sequence[uuid.UUID | str] | None = None,
        expected_start_time_after: datetime | None = None,
        expected_start_time_before: datetime | None = None,
        flow_run_filter: Mapping[str, Any] | None = None,
        sort: str | Unset = UNSET,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[FlowRun]:
        """One page of flow runs, ordered by `sort` (ID_DESC, the default: newest first;
        NAME_ASC / _DESC, EXPECTED_START_TIME_ASC / _DESC, NEXT_SCHEDULED_START_TIME_ASC,
        START_TIME_ASC / _DESC: by when the run started or, not started yet, is expected to;
        END_TIME_DESC). The server's limit is 200 at most."""
        body = given(sort=sort, limit=limit, offset=offset) | self._flow_run_query(
            ids, names, flow_ids, deployment_ids, work_queue_ids, work_queue_names, state_types, state_names, tags,
            idempotency_keys, parent_task_run_ids, expected_start_time_after, expected_start_time_before,
            work_pool_names, flow_run_filter)
        reply = await self._whole_page("ListFlowRuns", body, await self.query("ListFlowRuns", body, min_seq=min_seq))
        return self._many(FlowRun, reply.result)

    read_flow_runs = list_flow_runs  # Prefect's name

    async def count_flow_runs(
        self,
        *,
        ids: Sequence[uuid.UUID | str] | None = None,
        names: Sequence[str] | None = None,
        flow_ids: Sequence[uuid.UUID | str] | None = None,
        deployment_ids: Sequence[uuid.UUID | str] | None = None,
        work_pool_names: Sequence[str] | None = None,
        work_queue_ids: Sequence[uuid.UUID | str] | None = None,
        work_queue_names: Sequence[str] | None = None,
        state_types: Sequence[str] | None = None,
        state_names: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        idempotency_keys: Sequence[str] | None = None,
        parent_task_run_ids: Sequence[uuid.UUID | str] | None = None,
        expected_start_time_after: datetime | None = None,
        expected_start_time_before: datetime | None = None,
        flow_run_filter: Mapping[str, Any] | None = None,
        min_seq: int | None = None,
    ) -> int:
        body = self._flow_run_query(
            ids, names, flow_ids, deployment_ids, work_queue_ids, work_queue_names, state_types, state_names, tags,
            idempotency_keys, parent_task_run_ids, expected_start_time_after, expected_start_time_before,
            work_pool_names, flow_run_filter)
        reply = await self.query("CountFlowRuns", body, min_seq=min_seq)
        return self._count(reply.result)

    async def read_flow_run_states(self, flow_run_id: uuid.UUID | str, *, min_seq: int | None = None) -> list[State]:
        """A run's state history, oldest first."""
        reply = await self.query("ListFlowRunStates", {"flow_run_id": str(flow_run_id)}, min_seq=min_seq)
        return self._many(State, reply.result)

    async def read_flow_run_state(self, state_id: uuid.UUID | str, *, min_seq: int | None = None) -> State:
        """One written state of a flow run, by the state's id."""
        reply = await self.query("GetFlowRunState", {"id": str(state_id)}, min_seq=min_seq)
        return self._one(State, reply.result)

    @staticmethod
    def _history(history_start: datetime, history_end: datetime, history_interval_seconds: float) -> dict[str, Any]:
        return {"history_start": history_start, "history_end": history_end,
                "history_interval_seconds": history_interval_seconds}

    async def flow_run_history(
        self,
        history_start: datetime,
        history_end: datetime,
        history_interval_seconds: float,
        *,
        flow_ids: Sequence[uuid.UUID | str] | None = None,
        deployment_ids: Sequence[uuid.UUID | str] | None = None,
        work_pool_names: Sequence[str] | None = None,
        work_queue_names: Sequence[str] | None = None,
        state_types: Sequence[str] | None = None,
        state_names: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        flow_run_filter: Mapping[str, Any] | None = None,
        min_seq: int | None = None,
    ) -> list[HistoryInterval]:
        """Flow runs counted per interval of their expected start time (at least 1 s each, at
        most 500 intervals), by state, with their estimated run time and lateness."""
        body = self._history(history_start, history_end, history_interval_seconds) | self._flow_run_query(
            None, None, flow_ids, deployment_ids, None, work_queue_names, state_types, state_names, tags, None, None,
            None, None, work_pool_names, flow_run_filter)
        reply = await self.query("GetFlowRunHistory", body, min_seq=min_seq)
        return self._many(HistoryInterval, reply.result)

    # -----------------------------------------------------------------------------------------
    # Task runs (task queues and task workers: docs/tasks.md)

    async def submit_task(self, task_key: str, parameters: dict[str, Any] | None = None, **options: Any) -> TaskRun:
        """Queues a run of `task_key` for a task worker and returns it (SCHEDULED, deferred):
        `runledger.client.tasks.submit_task` with this client, its options (retries, tags,
        queue_wait_seconds, dynamic_key, scheduled_time, ...) the same. Await its end with
        `runledger.client.tasks.wait_for_task_run`."""
        from .tasks import submit_task  # client/tasks.py builds on this client

        return await submit_task(self, task_key, parameters, **options)

    async def create_task_run(
        self,
        task_key: str,
        dynamic_key: str,
        *,
        flow_run_id: uuid.UUID | str | None = None,
        state: Mapping[str, Any] | str | None | Unset = UNSET,
        id: uuid.UUID | str | Unset = UNSET,
        name: str | None | Unset = UNSET,
        cache_key: str | None | Unset = UNSET,
        cache_expiration: datetime | None | Unset = UNSET,
        task_version: str | None | Unset = UNSET,
        empirical_policy: Mapping[str, Any] | Unset = UNSET,
        tags: Sequence[str] | Unset = UNSET,
        labels: Mapping[str, Any] | Unset = UNSET,
        task_inputs: Mapping[str, Any] | Unset = UNSET,
        parameters: Mapping[str, Any] | Unset = UNSET,
        queue_wait_seconds: float | Unset = UNSET,
        idempotency_key: str | None = None,
    ) -> tuple[TaskRun, bool]:
        """A task run, `Pending` unless `state` (a mapping or a type name) says otherwise; no
        `flow_run_id` makes a background task. Returns it and whether this call created it:
        a run with the same (flow run, task key, dynamic key) comes back unchanged, its state
        not applied. An `id` that another run with other keys has → `Conflict`. A SCHEDULED
        state with `state_details.deferred` queues the run for a task worker;
        `queue_wait_seconds`: how long to wait for room when its key's queue is full."""
        body = self._run_fields(
            task_key=task_key, dynamic_key=dynamic_key, state=state, id=id, name=name, cache_key=cache_key,
            cache_expiration=cache_expiration, task_version=task_version, empirical_policy=empirical_policy,
            tags=tags, labels=labels, task_inputs=task_inputs, parameters=parameters,
            queue_wait_seconds=queue_wait_seconds)
        if flow_run_id is not None:
            body["flow_run_id"] = str(flow_run_id)
        wait = queue_wait_seconds if isinstance(queue_wait_seconds, int | float) else 0.0
        reply = await self.command("CreateTaskRun", body | self._key(idempotency_key), extra_timeout=wait)
        if reply.created is None:
            raise ProtocolError("the service's reply to CreateTaskRun does not say whether it created the task run")
        return self._one(TaskRun, reply.result), reply.created

    async def set_task_run_state(
        self,
        task_run_id: uuid.UUID | str,
        state: Mapping[str, Any] | str,
        force: bool = False,
        *,
        task_worker_id: str | None = None,
        delivery: Mapping[str, Any] | None = None,
        queue_wait_seconds: float | None = None,
        idempotency_key: str | None = None,
    ) -> OrchestrationResult:
        """Propose a state; the task orchestration rules decide what is written (read
        `status`, `details` and `state` as for `set_flow_run_state`). A task worker names
        itself (`task_worker_id`) and, when it starts a run, the delivery it took it from
        (`delivery`: `{"state_id", "message", "attempt"}`)."""
        proposed = {"type": state} if isinstance(state, str) else dict(state)
        body: dict[str, Any] = {"id": str(task_run_id), "state": proposed}
        if force:
            body["force"] = True
        if task_worker_id is not None:
            body["task_worker_id"] = task_worker_id
        if delivery is not None:
            body["delivery"] = dict(delivery)
        if queue_wait_seconds is not None:
            body["queue_wait_seconds"] = queue_wait_seconds
        reply = await self.command("SetTaskRunState", body | self._key(idempotency_key),
                                   extra_timeout=queue_wait_seconds or 0.0)
        if reply.orchestration is None:
            raise ProtocolError("the service's reply to SetTaskRunState has no orchestration outcome")
        return self._one(OrchestrationResult, {**reply.orchestration, "state": reply.result})

    async def cancel_task_run(self, task_run_id: uuid.UUID | str, *,
                              idempotency_key: str | None = None) -> OrchestrationResult:
        """Cancel a task run. A running one is set CANCELLING: the task worker running it stops
        it (an async function is cancelled; a plain function's thread cannot be, and its
        outcome is dropped) and reports CANCELLED. One not started yet is set CANCELLED at
        once: it never runs. A finished one is left as it is (`status` ABORT). Read `status`
        and `state` as for `set_task_run_state`; wait for the end with
        `tasks.wait_for_task_run`. The run is read first, as of every write acknowledged now."""
        run = await self.read_task_run(task_run_id, min_seq=await self.catch_up())
        # Waiting: CANCELLED (nothing runs it to stop). Else CANCELLING: for a running run its
        # worker's cue, for a finished one refused with the reason.
        proposed = "CANCELLED" if run.state_type in (None, "SCHEDULED", "PENDING", "PAUSED") else "CANCELLING"
        return await self.set_task_run_state(task_run_id, proposed, idempotency_key=idempotency_key)

    async def update_task_run(self, task_run_id: uuid.UUID | str, *, name: str | Unset = UNSET,
                              idempotency_key: str | None = None) -> None:
        """Rename a task run (the one field Prefect's task-run update changes)."""
        await self.command("UpdateTaskRun", given(id=str(task_run_id), name=name) | self._key(idempotency_key))

    async def delete_task_run(self, task_run_id: uuid.UUID | str, *, idempotency_key: str | None = None) -> None:
        """Delete a task run; its keys are free again at once."""
        await self.command("DeleteTaskRun", {"id": str(task_run_id)} | self._key(idempotency_key))

    async def read_task_run(self, task_run_id: uuid.UUID | str, *, min_seq: int | None = None) -> TaskRun:
        reply = await self.query("GetTaskRun", {"id": str(task_run_id)}, min_seq=min_seq)
        return self._one(TaskRun, reply.result)

    @staticmethod
    def _time_range(after: datetime | None, before: datetime | None) -> dict[str, Any] | None:
        if after is None and before is None:
            return None
        return given(after_=UNSET if after is None else after, before_=UNSET if before is None else before)

    @classmethod
    def _task_run_query(cls, ids: Sequence[uuid.UUID | str] | None, names: Sequence[str] | None,
                        flow_run_ids: Sequence[uuid.UUID | str] | None, flow_run_id_is_null: bool | None,
                        task_keys: Sequence[str] | None, state_types: Sequence[str] | None,
                        state_names: Sequence[str] | None, tags: Sequence[str] | None,
                        expected_start_time: tuple[datetime | None, datetime | None],
                        start_time: tuple[datetime | None, datetime | None],
                        end_time: tuple[datetime | None, datetime | None],
                        task_run_filter: Mapping[str, Any] | None) -> dict[str, Any]:
        """The `task_runs` filter of the task-run queries: lists match any value given, `tags`
        every tag given, time ranges are (after, before), both inclusive; `task_run_filter` is
        a raw `TaskRunFilter` the keywords add to."""
        flt: dict[str, Any] = dict(task_run_filter or {})
        for key, values in (("id", ids), ("name", names), ("flow_run_id", flow_run_ids), ("task_key", task_keys),
                            ("state_type", state_types), ("state_name", state_names)):
            if values is not None:
                flt[key] = {"any_": [str(v) for v in values]}
        if flow_run_id_is_null is not None:
            flt["flow_run_id"] = {**flt.get("flow_run_id", {}), "is_null_": flow_run_id_is_null}
        if tags is not None:
            flt["tags"] = {"all_": list(tags)}
        for key, (after, before) in (("expected_start_time", expected_start_time), ("start_time", start_time),
                                     ("end_time", end_time)):
            if (r := cls._time_range(after, before)) is not None:
                flt[key] = r
        return {"task_runs": flt} if flt else {}

    async def list_task_runs(
        self,
        *,
        ids: Sequence[uuid.UUID | str] | None = None,
        names: Sequence[str] | None = None,
        flow_run_ids: Sequence[uuid.UUID | str] | None = None,
        flow_run_id_is_null: bool | None = None,
        task_keys: Sequence[str] | None = None,
        state_types: Sequence[str] | None = None,
        state_names: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        expected_start_time_after: datetime | None = None,
        expected_start_time_before: datetime | None = None,
        start_time_after: datetime | None = None,
        start_time_before: datetime | None = None,
        end_time_after: datetime | None = None,
        end_time_before: datetime | None = None,
        task_run_filter: Mapping[str, Any] | None = None,
        sort: str | Unset = UNSET,
        limit: int | Unset = UNSET,
        offset: int | Unset = UNSET,
        min_seq: int | None = None,
    ) -> list[TaskRun]:
        """One page of task runs, ordered by `sort` (ID_DESC, the default: newest first;
        NAME_ASC / _DESC, EXPECTED_START_TIME_ASC / _DESC, NEXT_SCHEDULED_START_TIME_ASC,
        START_TIME_DESC, END_TIME_DESC). `flow_run_id_is_null=True`: background tasks only
        (no flow run); False: tasks of flow runs only. The server's limit is 200 at most."""
        body = given(sort=sort, limit=limit, offset=offset) | self._task_run_query(
            ids, names, flow_run_ids, flow_run_id_is_null, task_keys, state_types, state_names, tags,
            (expected_start_time_after, expected_start_time_before), (start_time_after, start_time_before),
            (end_time_after, end_time_before), task_run_filter)
        reply = await self._whole_page("ListTaskRuns", body, await self.query("ListTaskRuns", body, min_seq=min_seq))
        return self._many(TaskRun, reply.result)

    read_task_runs = list_task_runs  # Prefect's name

    async def count_task_runs(
        self,
        *,
        ids: Sequence[uuid.UUID | str] | None = None,
        names: Sequence[str] | None = None,
        flow_run_ids: Sequence[uuid.UUID | str] | None = None,
        flow_run_id_is_null: bool | None = None,
        task_keys: Sequence[str] | None = None,
        state_types: Sequence[str] | None = None,
        state_names: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        expected_start_time_after: datetime | None = None,
        expected_start_time_before: datetime | None = None,
        start_time_after: datetime | None = None,
        start_time_before: datetime | None = None,
        end_time_after: datetime | None = None,
        end_time_before: datetime | None = None,
        task_run_filter: Mapping[str, Any] | None = None,
        min_seq: int | None = None,
    ) -> int:
        body = self._task_run_query(
            ids, names, flow_run_ids, flow_run_id_is_null, task_keys, state_types, state_names, tags,
            (expected_start_time_after, expected_start_time_before), (start_time_after, start_time_before),
            (end_time_after, end_time_before), task_run_filter)
        reply = await self.query("CountTaskRuns", body, min_seq=min_seq)
        return self._count(reply.result)

    async def read_task_run_states(self, task_run_id: uuid.UUID | str, *,
                                   min_seq: int | None = None) -> list[State]:
        """A task run's state history, oldest first."""
        reply = await self.query("ListTaskRunStates", {"task_run_id": str(task_run_id)}, min_seq=min_seq)
        return self._many(State, reply.result)

    async def read_task_run_state(self, state_id: uuid.UUID | str, *, min_seq: int | None = None) -> State:
        """One written state of a task run, by the state's id."""
        reply = await self.query("GetTaskRunState", {"id": str(state_id)}, min_seq=min_seq)
        return self._one(State, reply.result)

    async def task_run_history(
        self,
        history_start: datetime,
        history_end: datetime,
        history_interval_seconds: float,
        *,
        flow_run_ids: Sequence[uuid.UUID | str] | None = None,
        flow_run_id_is_null: bool | None = None,
        task_keys: Sequence[str] | None = None,
        state_types: Sequence[str] | None = None,
        state_names: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        task_run_filter: Mapping[str, Any] | None = None,
        min_seq: int | None = None,
    ) -> list[HistoryInterval]:
        """Task runs counted per interval of their expected start time (at least 1 s each, at
        most 500 intervals), by state, with their estimated run time and lateness."""
        body = self._history(history_start, history_end, history_interval_seconds) | self._task_run_query(
            None, None, flow_run_ids, flow_run_id_is_null, task_keys, state_types, state_names, tags,
            (None, None), (None, None), (None, None), task_run_filter)
        reply = await self.query("GetTaskRunHistory", body, min_seq=min_seq)
        return self._many(HistoryInterval, reply.result)

    # -----------------------------------------------------------------------------------------
    # The event log

    async def read_events(
        self,
        *,
        aggregate_type: str | None = None,
        aggregate_id: uuid.UUID | str | None = None,
        resource_id: str | None = None,
        event_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_seq: int = 0,
        limit: int | None = None,
        vocabulary: str = "runledger",
        prefect_event_prefix: str | None = None,
        all_pages: bool = False,
        min_seq: int | None = None,
    ) -> EventPage:
        """Events of the log after `after_seq`, in stream order (`ReadEvents`): the stored
        envelopes, each with its `seq`, or (`vocabulary="prefect"`) Prefect's events, each with
        the `seq` of the runledger event it comes from. A page may be short and still have a
        `next_after_seq`; `all_pages=True` follows the cursor until the end of the log (`limit`
        is then the size of each page) and returns every event with `next_after_seq` None.

        The log is read directly, so no read-your-writes wait is needed: none is asked unless
        `min_seq` is given, or `resource_id` names a work queue (its pool is looked up in the
        read model)."""
        if min_seq is None and not (resource_id and resource_id.startswith("prefect.work-queue.")):
            min_seq = 0
        body: dict[str, Any] = {"after_seq": after_seq, "vocabulary": vocabulary}
        for key, value in (("aggregate_type", aggregate_type), ("resource_id", resource_id),
                           ("event_type", event_type), ("since", since), ("until", until), ("limit", limit),
                           ("prefect_event_prefix", prefect_event_prefix)):
            if value is not None:
                body[key] = value
        if aggregate_id is not None:
            body["aggregate_id"] = str(aggregate_id)
        events: list[dict[str, Any]] = []
        while True:
            page = self._one(EventPage, (await self.query("ReadEvents", body, min_seq=min_seq)).result)
            if not all_pages:
                return page
            events += page.events
            if page.next_after_seq is None:
                return EventPage(events=events, next_after_seq=None)
            if page.next_after_seq <= body["after_seq"]:  # a cursor must move on
                raise ProtocolError(f"ReadEvents answered the cursor {page.next_after_seq} for a page after "
                                    f"{body['after_seq']}")
            body["after_seq"] = page.next_after_seq


class EventPage(BaseModel):
    """A page of `ReadEvents`: the events, and the cursor for the next page (None: the end of
    the log, as it was when the query was answered)."""

    events: list[dict[str, Any]]
    next_after_seq: int | None = None
