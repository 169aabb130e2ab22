import pytest

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
