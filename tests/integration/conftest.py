import pytest

from runledger.infra.nats_connection import connect

from .broker import Broker

pytestmark = pytest.mark.integration


@pytest.fixture
async def broker(service, settings):
    nc = await connect(settings)
    try:
        yield Broker(nc, settings)
    finally:
        await nc.close()
