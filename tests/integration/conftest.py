import contextlib

import pytest
from sqlalchemy import text

from runledger.client import RunledgerClient
from runledger.handlers.service import Service
from runledger.infra.nats_connection import connect

from .broker import Broker


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
async def broker(service, settings):
    nc = await connect(settings)
    try:
        yield Broker(nc, settings)
    finally:
        await nc.close()


@pytest.fixture
async def client(service, settings):
    """A client of the running service (the tests of task runs and their workers)."""
    async with RunledgerClient(settings) as rl:
        yield rl


@pytest.fixture
def service_with(settings):
    """`async with service_with(**changes) as (changed, client)`: a service of its own whose
    settings differ (a task key's bound), and a client of it; the namespace is cleaned after."""
    from tests.conftest import cleanup_namespace

    @contextlib.asynccontextmanager
    async def start(**changes):
        changed = settings.model_copy(update=changes)
        svc = Service(changed)
        await svc.start()
        try:
            async with RunledgerClient(changed) as rl:
                yield changed, rl
        finally:
            await svc.stop()
            await cleanup_namespace(settings)

    return start


@pytest.fixture
async def second_instance(service, settings):
    """A second service taking commands beside `service`, with its own cache and locks: what
    two instances decide apart, only the log keeps consistent."""
    other = Service(settings, roles=frozenset({"commands"}))
    await other.start()
    try:
        yield other
    finally:
        await other.stop()


@pytest.fixture
async def writer(settings):
    """A service that takes commands but projects nothing (the test runs its own projection
    runners), an `applied_counts` table for counting projectors, and a broker to talk to it."""
    svc = Service(settings, roles=frozenset({"commands"}))
    await svc.start()
    async with svc.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE applied_counts (key text PRIMARY KEY, n int NOT NULL)"))
    nc = await connect(settings)
    try:
        yield svc, Broker(nc, settings)
    finally:
        await nc.close()
        await svc.stop()
        from tests.conftest import cleanup_namespace

        await cleanup_namespace(settings)
