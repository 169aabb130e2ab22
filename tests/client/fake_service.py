"""A fake runledger service for client and CLI tests: it answers the broker contract with canned
envelopes on a real nats-server, and builds sample replies with the service's own reply
functions, so the tests follow the real shapes."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats

from runledger.commands.concurrency_limits import (
    CreateConcurrencyLimit,
    decide_create_concurrency_limit,
)
from runledger.commands.flows import CreateFlow, decide_create_flow
from runledger.commands.messages import DecisionContext
from runledger.commands.unique_keys import UniqueKeyClaim
from runledger.commands.variables import CreateVariable, decide_create_variable
from runledger.commands.work_pools import (
    CreateWorkPool,
    CreateWorkQueue,
    WorkPoolNameClaim,
    decide_create_work_pool,
    decide_create_work_queue,
    work_pool_reply,
    work_queue_reply,
)

SILENT = object()  # a canned reply that never answers: the request times out

Canned = dict[str, Any] | bytes | Callable[[dict[str, Any]], Any] | object


class FakeService:
    """Answers `<ns>.cmd.*` and `<ns>.qry.*` from `replies` (name -> envelope, raw bytes, or a
    function of the request body) and records every request as (name, body). It runs on its
    own thread and loop, so sync CLI tests and async client tests can both use it."""

    def __init__(self, url: str, namespace: str):
        self.url = url
        self.namespace = namespace
        self.replies: dict[str, Canned] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._nc: Any = None

    def start(self) -> FakeService:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._subscribe(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _subscribe(self) -> None:
        self._nc = await nats.connect(self.url)
        await self._nc.subscribe(f"{self.namespace}.cmd.*", cb=self._answer)
        await self._nc.subscribe(f"{self.namespace}.qry.*", cb=self._answer)
        await self._nc.flush()

    async def _answer(self, msg: Any) -> None:
        name = msg.subject.rsplit(".", 1)[1]
        body = json.loads(msg.data)
        self.requests.append((name, body))
        reply = self.replies.get(name)
        if reply is None:
            reply = {"ok": False, "error": {"code": "invalid", "message": f"the fake has no reply for {name}"}}
        if callable(reply):
            reply = reply(body)
        if reply is SILENT:
            return
        await msg.respond(reply if isinstance(reply, bytes) else json.dumps(reply).encode())

    # Helpers for canned envelopes

    def ok(self, name: str, result: Any, seq: int | None = None, created: bool | None = None) -> None:
        self.replies[name] = {"ok": True, "result": result, "seq": seq, "created": created}

    def error(self, name: str, code: str, message: str, **extra: Any) -> None:
        self.replies[name] = {"ok": False, "error": {"code": code, "message": message, **extra}}

    def bodies(self, name: str) -> list[dict[str, Any]]:
        return [body for n, body in self.requests if n == name]

    def sent(self, name: str) -> list[dict[str, Any]]:
        """The bodies without their idempotency key (see `keys`)."""
        return [{k: v for k, v in body.items() if k != "idempotency_key"} for body in self.bodies(name)]

    def keys(self, name: str) -> list[str | None]:
        return [body.get("idempotency_key") for body in self.bodies(name)]


NOW = datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def sample_pool_state(name: str = "etl", **fields: Any):
    ctx = DecisionContext.fixed(NOW)
    return decide_create_work_pool(CreateWorkPool(name=name, **fields), WorkPoolNameClaim(), ctx).result


def sample_pool(name: str = "etl", **fields: Any) -> dict[str, Any]:
    return work_pool_reply(sample_pool_state(name, **fields))


def sample_queue(name: str = "urgent", pool_name: str = "etl", **fields: Any) -> dict[str, Any]:
    pool = sample_pool_state(pool_name, type="process")
    if name == "default":
        return work_queue_reply(pool, pool.queues[pool.default_queue_id])
    ctx = DecisionContext.fixed(NOW, (uuid.UUID(int=1000 + i) for i in range(100)))
    after, queue = decide_create_work_queue(CreateWorkQueue(work_pool_name=pool_name, name=name, **fields),
                                            pool, ctx).result
    return work_queue_reply(after, queue)


def sample_flow(name: str = "etl", **fields: Any) -> dict[str, Any]:
    """A flow reply, made by the service's own decider (its id follows from its name)."""
    ctx = DecisionContext.fixed(NOW, iter([uuid.uuid5(uuid.NAMESPACE_URL, f"flow:{name}")]))
    return decide_create_flow(CreateFlow(name=name, **fields), UniqueKeyClaim(), None, ctx).result.reply()


def sample_variable(name: str = "db_url", value: Any = "postgres://db", **fields: Any) -> dict[str, Any]:
    """A variable reply, made by the service's own decider (its id follows from its name)."""
    ctx = DecisionContext.fixed(NOW, iter([uuid.uuid5(uuid.NAMESPACE_URL, f"variable:{name}")]))
    return decide_create_variable(CreateVariable(name=name, value=value, **fields), UniqueKeyClaim(), ctx).result.reply()


def sample_limit(name: str = "db", limit: int = 3, **fields: Any) -> dict[str, Any]:
    """A global concurrency limit reply, made by the service's own decider."""
    ctx = DecisionContext.fixed(NOW, iter([uuid.uuid5(uuid.NAMESPACE_URL, f"limit:{name}")]))
    cmd = CreateConcurrencyLimit(name=name, limit=limit, **fields)
    return decide_create_concurrency_limit(cmd, UniqueKeyClaim(), ctx).result.reply()


def sample_deployment(name: str = "nightly", flow_name: str = "etl", **fields: Any) -> dict[str, Any]:
    """A deployment reply, made by the service's own decider (its id follows from its flow and
    name; its flow's id is `sample_flow(flow_name)`'s). Placed on no queue: pass the queue's
    names and id as reply fields to show one."""
    from runledger.commands.deployments import CreateDeployment, Placement, decide_create_deployment

    placed = {k: fields.pop(k) for k in ("work_pool_name", "work_queue_name", "work_queue_id") if k in fields}
    flow_id = uuid.uuid5(uuid.NAMESPACE_URL, f"flow:{flow_name}")
    ids = (uuid.uuid5(uuid.NAMESPACE_URL, f"deployment:{flow_name}/{name}:{i}") for i in range(1000))
    ctx = DecisionContext.fixed(NOW, ids)
    decision = decide_create_deployment(CreateDeployment(name=name, flow_id=flow_id, **fields), UniqueKeyClaim(),
                                        None, True, Placement(), ctx)
    reply = decision.result.reply()
    return {**reply, **{k: str(v) if isinstance(v, uuid.UUID) else v for k, v in placed.items()}}


def sample_flow_run_model(name: str = "amber-badger", flow_name: str = "etl", **fields: Any):
    """A `FlowRun` made by the service's own decider, in its first state (Pending unless
    `state=` says otherwise)."""
    from runledger.commands.flow_runs import CreateFlowRun, decide_create_flow_run

    flow_id = uuid.uuid5(uuid.NAMESPACE_URL, f"flow:{flow_name}")
    ids = (uuid.uuid5(uuid.NAMESPACE_URL, f"run:{flow_name}/{name}:{i}") for i in range(1000))
    ctx = DecisionContext.fixed(NOW, ids)
    return decide_create_flow_run(CreateFlowRun(flow_id=flow_id, name=name, **fields), None, None, True, None,
                                  ctx).result


def sample_flow_run(name: str = "amber-badger", flow_name: str = "etl", *, read: bool = True,
                    **fields: Any) -> dict[str, Any]:
    """A flow run reply: a read's (with `work_pool_id` / `work_pool_name`) or, with
    `read=False`, a command's."""
    reply = sample_flow_run_model(name, flow_name, **fields).model_dump(mode="json")
    return {**reply, "work_pool_id": None, "work_pool_name": None} if read else reply


def set_state_reply(run, state: dict[str, Any], force: bool = False, seq: int = 7) -> dict[str, Any]:
    """The service's envelope for `SetFlowRunState` on `run` (a `FlowRun`): its own rules decide."""
    from runledger.commands.flow_runs import SetFlowRunState, decide_set_state

    ctx = DecisionContext.fixed(NOW, (uuid.UUID(int=5000 + i) for i in range(100)))
    decision = decide_set_state(SetFlowRunState(id=run.id, state=state, force=force), run, ctx)
    return {"ok": True, "result": decision.result.reply() if decision.result is not None else None, "seq": seq,
            "created": decision.created, "orchestration": decision.orchestration.as_reply()}


def sample_worker(name: str = "w1", pool_name: str = "etl", heartbeat_interval_seconds: int | None = 30,
                  **fields: Any) -> dict[str, Any]:
    """A worker reply, made by the service's own decider (its first heartbeat: ONLINE); `fields`
    replace reply fields (`status="OFFLINE"`)."""
    from runledger.commands.workers import WorkerHeartbeat, decide_heartbeat

    pool = sample_pool_state(pool_name, type="process")
    cmd = WorkerHeartbeat(work_pool_name=pool_name, name=name, heartbeat_interval_seconds=heartbeat_interval_seconds)
    return {**decide_heartbeat(cmd, pool, None, DecisionContext.fixed(NOW)).result.reply(), **fields}
