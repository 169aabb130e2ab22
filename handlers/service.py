"""The service: wires the broker, the event store, the command and query buses and the
projection runner, and exposes them as FastStream subscribers on the broker contract.

Roles can run in separate processes to scale out: `commands`, `queries`, `projections`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from faststream.nats import NatsBroker
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncEngine

from runledger.infra.aggregates import AggregateRepository
from runledger.infra.database import create_engine, migrate
from runledger.infra.event_store import EventStore
from runledger.infra.jetstream_setup import ensure_event_stream
from runledger.infra.nats_connection import connect
from runledger.infra.settings import Settings
from runledger.projections import work_pools as work_pools_read_model
from runledger.projections.runner import ProjectionRunner
from runledger.projections.tables import MIGRATIONS

from .command_bus import CommandBus
from .query_bus import CheckpointWatch, QueryBus
from .work_pool_commands import AGGREGATE_KINDS, command_specs

log = logging.getLogger("runledger.service")

ALL_ROLES = frozenset({"commands", "queries", "projections"})
COMMAND_QUEUE_GROUP = "runledger-commands"
QUERY_QUEUE_GROUP = "runledger-queries"


def projectors():
    return [work_pools_read_model.WorkPoolsProjector()]


def query_specs():
    return dict(work_pools_read_model.QUERIES)


async def _raw_body(msg) -> bytes:
    return msg.body


def _broker_options(settings: Settings) -> dict:
    options: dict = {"servers": [settings.nats_url], "logger": None}
    if settings.nats_user:
        options["user"] = settings.nats_user
    if settings.nats_password:
        options["password"] = settings.nats_password.get_secret_value()
    if settings.nats_token:
        options["token"] = settings.nats_token.get_secret_value()
    if settings.nats_creds_file:
        options["user_credentials"] = str(settings.nats_creds_file)
    return options


@dataclass
class Service:
    settings: Settings
    roles: frozenset[str] = ALL_ROLES
    nc: NATS | None = None
    engine: AsyncEngine | None = None
    broker: NatsBroker | None = None
    store: EventStore | None = None
    commands: CommandBus | None = None
    queries: QueryBus | None = None
    runner: ProjectionRunner | None = None
    watch: CheckpointWatch | None = None
    _started: bool = field(default=False)

    async def start(self) -> None:
        s = self.settings
        self.nc = await connect(s, name="runledger-service")  # refuses NATS < 2.12
        await ensure_event_stream(self.nc.jetstream(), s)
        self.engine = create_engine(s)
        await migrate(self.engine, s.db_schema, MIGRATIONS)
        self.store = EventStore(self.nc, s)
        projections = projectors()
        self.watch = CheckpointWatch(self.engine, [p.name for p in projections], local="projections" in self.roles)
        if "projections" in self.roles:
            self.runner = ProjectionRunner(self.nc, s, self.engine, projections, on_applied=self.watch.applied,
                                           batch_size=s.projection_batch_size)
            await self.runner.start()
        repo = AggregateRepository(self.store, AGGREGATE_KINDS)
        self.commands = CommandBus(self.store, repo, command_specs(self._queue_pool_lookup), retries=s.command_retries)
        self.queries = QueryBus(self.engine, query_specs(), self.watch, wait_timeout=s.query_wait_timeout)
        self.broker = NatsBroker(**_broker_options(s))
        if "commands" in self.roles:
            self._subscribe(self.commands.specs, s.command_subject, COMMAND_QUEUE_GROUP, self.commands.execute, "command")
        if "queries" in self.roles:
            self._subscribe(self.queries.specs, s.query_subject, QUERY_QUEUE_GROUP, self.queries.execute, "query")
        await self.broker.start()
        self._started = True
        log.info("runledger service ready: roles %s, NATS %s, namespace %s", ",".join(sorted(self.roles)), s.safe_nats_url(), s.namespace)

    def _subscribe(self, names: Iterable[str], subject_of, group: str, execute, kind: str) -> None:
        assert self.broker is not None
        for name in names:
            self.broker.subscriber(subject_of(name), queue=group, decoder=_raw_body, title=name,
                                   description=f"runledger {kind} {name}")(self._handler(name, execute))

    @staticmethod
    def _handler(name: str, execute):
        async def handle(body: bytes) -> bytes:
            return json.dumps(await execute(name, body), default=str).encode()

        handle.__name__ = name
        return handle

    async def _queue_pool_lookup(self, queue_id: uuid.UUID) -> uuid.UUID | None:
        """Queue id -> pool id from the read model; on a miss, wait until the read model has
        caught up with the log (a queue created a moment ago) and look again."""
        assert self.engine is not None and self.store is not None and self.watch is not None
        async with self.engine.connect() as conn:
            found = await work_pools_read_model.pool_of_queue(conn, queue_id)
        if found is not None:
            return found
        if await self.watch.wait_for(await self.store.last_sequence(), self.settings.query_wait_timeout):
            async with self.engine.connect() as conn:
                return await work_pools_read_model.pool_of_queue(conn, queue_id)
        return None

    async def stop(self) -> None:
        """Stop taking requests, then stop projecting, then close connections; each step is
        bounded so that a signal always ends the process."""
        steps = [
            self.broker.stop() if self.broker is not None else None,
            self.runner.stop() if self.runner is not None else None,
            self.nc.close() if self.nc is not None and not self.nc.is_closed else None,
            self.engine.dispose() if self.engine is not None else None,
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
