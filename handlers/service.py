"""The service: wires the broker, the event store, the command and query buses and the
projection runner, and serves the broker contract (`<ns>.cmd.*`, `<ns>.qry.*`).

Roles can run in separate processes to scale out: `commands`, `queries`, `projections`.

The request/reply endpoints are plain nats-py queue subscriptions. They were FastStream
subscribers first; measured on the 2-core reference machine, FastStream's per-message path
(context, middlewares, a log context that re-parses the subject, its reply publisher) cost
~225 µs of CPU per request, a third of the service's budget, while giving nothing these
endpoints use (they take raw bytes and validate with our own models). See docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncEngine

from runledger.commands.task_run_rules import TAKEOVER_GRACE_SECONDS
from runledger.infra.aggregates import AggregateRepository
from runledger.infra.database import DatabaseUnavailable, check_database, create_engine, migrate
from runledger.infra.event_loop import running_loop_name
from runledger.infra.event_store import EventStore
from runledger.infra.jetstream_setup import ensure_broker
from runledger.infra.leases import Lease, holder_lookup
from runledger.infra.nats_connection import BrokerUnavailable, connect
from runledger.infra.settings import Settings
from runledger.infra.snapshots import SnapshotStore
from runledger.infra.task_queues import TaskPublisher
from runledger.projections.health import health_queries
from runledger.projections.runner import ProjectionRunner
from runledger.projections.tables import MIGRATIONS

from . import registry
from .background import Clock, CommandSender, Scheduler, run_leased
from .command_bus import CommandBus
from .endpoint import Endpoint
from .event_queries import event_queries
from .foreman import Foreman
from .query_bus import CheckpointWatch, QueryBus
from .task_dispatch import TaskDispatch, TaskRecovery
from .task_worker_queries import task_worker_queries
from .vacuum import Vacuum
from .worker_polls import PollRecorder, poll_queries

log = logging.getLogger("runledger.service")

ALL_ROLES = frozenset({"commands", "queries", "projections"})
# Single-active background services (handlers/background.py), each behind its lease: run by
# `up` and `serve`; tests start them only where they test them.
BACKGROUND_ROLES = frozenset({"scheduler", "clock", "foreman", "task_recovery", "vacuum"})
COMMAND_QUEUE_GROUP = "runledger-commands"
QUERY_QUEUE_GROUP = "runledger-queries"


def request_deadline(settings: Settings) -> float:
    """How long one command or query may run before it is answered `unavailable`: a little
    under the client's request timeout, so that the answer arrives before the client gives up."""
    return max(0.5, settings.request_timeout * 0.8)


projectors = registry.projectors  # what replay, verify and the tests run, too


@dataclass
class Service:
    settings: Settings
    roles: frozenset[str] = ALL_ROLES
    nc: NATS | None = None
    engine: AsyncEngine | None = None
    # Migrations and projection batches: statements that may rightly run longer than a request's.
    batch_engine: AsyncEngine | None = None
    endpoints: list[Endpoint] = field(default_factory=list)
    store: EventStore | None = None
    commands: CommandBus | None = None
    queries: QueryBus | None = None
    runner: ProjectionRunner | None = None
    watch: CheckpointWatch | None = None
    # Set when the NATS connection closed for good (not by `stop` or a failed start): nats-py does not reconnect
    # after a fatal protocol error ("maximum payload exceeded"), so the process must end and
    # let its supervisor start it again instead of living on deaf.
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    lost_reason: str = ""
    # Connections of their own for the request subscriptions (see Endpoint.serve).
    lanes: list[NATS] = field(default_factory=list)
    _stopping: bool = False
    background: list[asyncio.Task] = field(default_factory=list)
    # Records each worker poll as a command, in the background (handlers/worker_polls.py).
    polls: PollRecorder | None = None

    # When the service's main connection to the broker was last made: a broker restart
    # redelivers every task run at once, and a worker may take over another's run only once the
    # workers have had time to reconnect and report (commands/task_run_rules.py).
    connected_at: float = field(default_factory=time.monotonic)

    async def _on_reconnected(self) -> None:
        self.connected_at = time.monotonic()

    def _takeover_allowed(self) -> bool:
        return time.monotonic() - self.connected_at >= TAKEOVER_GRACE_SECONDS

    async def _on_closed(self) -> None:
        if self._stopping or self.nc is None:  # None: closed within `connect` (a server too old), not lost
            return
        err = getattr(self.nc, "last_error", None)
        self.lost_reason = f"{type(err).__name__}: {err}" if err is not None else "closed by the server"
        log.error("the NATS connection closed for good (%s); the service stops", self.lost_reason)
        self.lost.set()

    async def _on_error(self, e: Exception) -> None:
        # nats-py dropped a request past a subscription's pending limits: answer it busy.
        if isinstance(e, nats.errors.SlowConsumerError):
            for endpoint in self.endpoints:
                if e.sub in endpoint.subscriptions:
                    await endpoint.answer_dropped(e.reply, getattr(e.sub, "_conn", None))

    async def start(self) -> None:
        s = self.settings
        self.nc = await connect(s, name="runledger-service", lazy_headers=True, closed_cb=self._on_closed,
                                error_cb=self._on_error, reconnected_cb=self._on_reconnected)  # refuses NATS < 2.12
        self.connected_at = time.monotonic()
        for i in range(s.request_lanes if self.roles & {"commands", "queries"} else 0):
            self.lanes.append(await connect(s, name=f"runledger-service-requests-{i}", lazy_headers=True, closed_cb=self._on_closed,
                                            error_cb=self._on_error, check_version=False))

        async def refused() -> None:
            self._stopping = True  # closed by us: not a connection lost (`_on_closed`)
            for conn in (self.nc, *self.lanes):
                if conn is not None and not conn.is_closed:
                    await conn.close()
            if self.engine is not None:
                await self.engine.dispose()

        # Its streams and buckets are the admin role's to make and upgrade (its own role may not
        # create or update a stream, docs/security.md); on a broker without users it makes them.
        setting_up = not s.logs_in
        try:
            said = await ensure_broker(self.nc.jetstream(), s, change=setting_up)
        except BaseException:  # a log that drops events, the broker gone: nothing left open
            await refused()
            raise
        if said and setting_up:
            log.info("set up the broker: %s", "; ".join(said))
        elif said:
            await refused()
            raise BrokerUnavailable(
                f"the broker is not set up for this runledger ({'; '.join(said)}): run `runledger broker-setup` "
                "with the admin role's credentials (or others that may create and update streams), then start again.")
        self.engine = create_engine(s)
        try:
            await check_database(self.engine, s)
        except DatabaseUnavailable:
            await refused()
            raise
        self.batch_engine = create_engine(s, pool_size=2, statement_timeout=max(60.0, 10 * s.statement_timeout_seconds))
        await migrate(self.batch_engine, s.db_schema, MIGRATIONS)
        self.store = EventStore(self.nc, s)
        projections = projectors()
        self.watch = CheckpointWatch(self.engine, [p.name for p in projections], local="projections" in self.roles)
        if "projections" in self.roles:
            self.runner = ProjectionRunner(self.nc, s, self.batch_engine, projections, on_applied=self.watch.applied,
                                           on_released=self.watch.released,
                                           batch_size=s.projection_batch_size, lease_ttl=s.lease_ttl_seconds,
                                           stall_retry_seconds=s.projection_stall_retry_seconds,
                                           rebuild_missed=s.rebuild_missed_event_types)
            self.watch.on_wait = self.runner.want  # a query that waits wakes an idle projection
            await self.runner.start()
        snapshots = None
        if "commands" in self.roles:  # only the command side loads aggregates
            snapshots = SnapshotStore(self.nc.jetstream(timeout=s.request_timeout), s)
        repo = AggregateRepository(self.store, registry.AGGREGATE_KINDS, snapshots=snapshots, snapshot_every=s.snapshot_every)
        self.commands = CommandBus(self.store, repo, registry.command_specs(self.store, self._takeover_allowed, s.task_worker_keys,
                                                                  s.deployment_slot_lease_seconds, s.handed_slot_seconds),
                                   retries=s.command_retries)
        self.commands.after_append = TaskDispatch(TaskPublisher(self.nc.jetstream(timeout=s.request_timeout), s,
                                                              acks=self.store.acks),
                                                  self.commands, self.nc, s)
        deadline = request_deadline(s)
        self.polls = PollRecorder(CommandSender(self.nc, s, timeout=s.request_timeout))
        specs = {**registry.QUERIES, **health_queries([p.name for p in projections], self.store.log_status,
                                                   holder_lookup(self.nc.jetstream(timeout=s.request_timeout), s)),
                 **poll_queries(self.polls), **event_queries(self.store),
                 **task_worker_queries(self.nc.jetstream(timeout=s.request_timeout), s)}
        self.queries = QueryBus(self.engine, specs, self.watch, wait_timeout=s.query_wait_timeout,
                                last_sequence=self.store.last_sequence, concurrency=s.handler_concurrency,
                                timeout=deadline)
        if "commands" in self.roles:
            self.endpoints.append(await Endpoint.serve(
                self.nc, s.command_subject("*"), COMMAND_QUEUE_GROUP, self.commands.execute, settings=s,
                kind="command", concurrency=s.handler_concurrency, max_in_flight=16 * s.handler_concurrency,
                deadline=deadline, lanes=self.lanes))
        if "queries" in self.roles:
            # The query bus bounds its own database work, so a read-your-writes wait holds no slot.
            self.endpoints.append(await Endpoint.serve(
                self.nc, s.query_subject("*"), QUERY_QUEUE_GROUP, self.queries.execute, settings=s,
                kind="query", concurrency=None,
                max_in_flight=16 * s.handler_concurrency + self.queries.max_waiting,
                deadline=deadline, lanes=self.lanes))  # extended by a min_seq wait
        await self.nc.flush()
        for lane in self.lanes:
            await lane.flush()
        await self._start_background()
        log.info("runledger service ready: roles %s, NATS %s, namespace %s, event loop %s", ",".join(sorted(self.roles)),
                 s.safe_nats_url(), s.namespace, running_loop_name())

    async def _start_background(self) -> None:
        """The scheduler, the clock, the foreman and the task recovery sweep, each waiting for its
        lease (infra/leases.py)."""
        s = self.settings
        assert self.nc is not None and self.engine is not None
        send = CommandSender(self.nc, s, timeout=s.request_timeout)
        js = self.nc.jetstream(timeout=s.request_timeout)
        services: dict[str, Scheduler | Clock | Foreman | TaskRecovery | Vacuum] = {
            "scheduler": Scheduler(self.engine, send), "clock": Clock(self.engine, send),
            "foreman": Foreman(self.engine, send, deployment_lease_seconds=s.deployment_slot_lease_seconds,
                               handed_slot_seconds=s.handed_slot_seconds),
            "task_recovery": TaskRecovery(self.engine, TaskPublisher(js, s))}
        if s.flow_run_retention_seconds:  # off (no task, no lease) unless a retention is set
            services["vacuum"] = Vacuum(self.engine, send, retention_seconds=s.flow_run_retention_seconds)
        for role, service in services.items():
            if role not in self.roles:
                continue
            lease = await Lease.open(js, s, role, ttl=s.lease_ttl_seconds, label=role)
            self.background.append(asyncio.create_task(run_leased(lease, role, service.run), name=f"runledger-{role}"))

    async def stop(self) -> None:
        """Stop taking requests, then stop projecting, then close connections; each step is
        bounded so that a signal always ends the process."""
        self._stopping = True
        for task in self.background:
            task.cancel()
        if self.background:
            await asyncio.wait(self.background, timeout=10)
        if self.polls is not None:
            await self.polls.drain(timeout=2)
        steps = [
            *(e.stop() for e in self.endpoints),
            *(lane.close() for lane in self.lanes if not lane.is_closed),
            self.runner.stop() if self.runner is not None else None,
            self.nc.close() if self.nc is not None and not self.nc.is_closed else None,
            self.engine.dispose() if self.engine is not None else None,
            self.batch_engine.dispose() if self.batch_engine is not None else None,
        ]
        for step in steps:
            if step is None:
                continue
            try:
                await asyncio.wait_for(step, 10)
            except (TimeoutError, Exception):
                log.warning("a shutdown step did not finish cleanly", exc_info=True)

    async def run_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()
