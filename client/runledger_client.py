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

from .envelope import UNSET, Reply, Unset, encode_body, given, parse_reply
from .errors import ProtocolError, Unavailable
from .models import Flow, WorkPool, WorkQueue

M = TypeVar("M", bound=BaseModel)


def new_idempotency_key() -> str:
    """A fresh, unguessable idempotency key."""
    return str(uuid.uuid4())


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

    async def command(self, name: str, body: Mapping[str, Any]) -> Reply:
        """Send command `name` and return its reply; an error reply raises its typed error.
        `unavailable` is retried as the class says (with the same idempotency key)."""
        if self.idempotency_keys and body.get("idempotency_key") is None:
            body = {**body, "idempotency_key": new_idempotency_key()}
        keyed = body.get("idempotency_key") is not None
        subject = self.settings.command_subject(name)
        unknown = False
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = await self._request(subject, body, self.settings.request_timeout, command=True)
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
        if min_seq is not None:
            body = {**body, "min_seq": min_seq}
            timeout += self.settings.query_wait_timeout  # the service may wait that long first
        subject = self.settings.query_subject(name)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._request(subject, body, timeout)
            except Unavailable as e:
                if attempt > self.retries:
                    raise self._gave_up(e, attempt, False) from None
            await self._pause(attempt)

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
        try:
            msg = await self._nc.request(subject, payload, timeout=timeout)
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
        idempotency_key: str | None = None,
    ) -> WorkQueue:
        """A queue in `default-agent-pool`, which is created when missing."""
        body = given(name=name, description=description, is_paused=is_paused,
                     concurrency_limit=concurrency_limit, priority=priority)
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
        idempotency_key: str | None = None,
    ) -> WorkQueue:
        """Like `update_work_queue`, but a priority is stored as given: no other queue moves (as in Prefect)."""
        body = given(id=str(id), name=name, description=description, is_paused=is_paused,
                     concurrency_limit=concurrency_limit, priority=priority, last_polled=last_polled)
        reply = await self.command("UpdateWorkQueueById", body | self._key(idempotency_key))
        return self._one(WorkQueue, reply.result)

    async def delete_work_queue_by_id(self, id: uuid.UUID | str, *, idempotency_key: str | None = None) -> None:
        await self.command("DeleteWorkQueueById", {"id": str(id)} | self._key(idempotency_key))

    async def read_work_queue_by_id(self, id: uuid.UUID | str, *, min_seq: int | None = None) -> WorkQueue:
        reply = await self.query("GetWorkQueueById", {"id": str(id)}, min_seq=min_seq)
        return self._one(WorkQueue, reply.result)

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
