"""The client's retries against a fake service: a command is sent again only with its
idempotency key (the same one), a query always may be, nobody listening is retried even
without a key, and what is raised in the end says whether the outcome is unknown."""

from __future__ import annotations

import pytest

from runledger.client import RunledgerClient, Unavailable
from runledger.infra.settings import Settings

from .fake_service import SILENT, sample_pool


@pytest.fixture
def fast(nats_url, namespace) -> Settings:
    return Settings(nats_url=nats_url, namespace=namespace, request_timeout=0.3, query_wait_timeout=0.3)


def _silent_first(fake, name: str, envelope: dict) -> None:
    calls = []

    def answer(body):
        calls.append(body)
        return SILENT if len(calls) == 1 else envelope

    fake.replies[name] = answer


async def test_off_by_default(fake, fast):
    fake.replies["UpdateWorkPool"] = SILENT
    async with RunledgerClient(fast) as rl:
        with pytest.raises(Unavailable) as caught:
            await rl.update_work_pool("etl", is_paused=True, idempotency_key="k")
    assert len(fake.bodies("UpdateWorkPool")) == 1
    assert caught.value.outcome_unknown and caught.value.attempts == 1


async def test_a_keyed_command_is_retried_with_its_key(fake, fast):
    _silent_first(fake, "CreateWorkPool", {"ok": True, "result": sample_pool("etl"), "seq": 3,
                                           "created": True, "repeat": True})
    async with RunledgerClient(fast, retries=2, retry_backoff=0.01) as rl:
        pool = await rl.create_work_pool("etl", idempotency_key="k-1")
        assert pool.name == "etl" and rl.last_seq == 3
    assert fake.keys("CreateWorkPool") == ["k-1", "k-1"]


async def test_a_command_without_a_key_that_may_have_arrived_is_not_sent_twice(fake, fast):
    fake.replies["DeleteWorkPool"] = SILENT
    async with RunledgerClient(fast, retries=2, retry_backoff=0.01) as rl:
        with pytest.raises(Unavailable) as caught:
            await rl.delete_work_pool("etl")
    assert len(fake.bodies("DeleteWorkPool")) == 1
    assert caught.value.outcome_unknown


async def test_idempotency_keys_gives_every_command_one_key_for_all_its_tries(fake, fast):
    fake.replies["DeleteWorkPool"] = SILENT
    async with RunledgerClient(fast, retries=2, retry_backoff=0.01, idempotency_keys=True) as rl:
        with pytest.raises(Unavailable) as caught:
            await rl.delete_work_pool("etl")
        fake.ok("UpdateWorkPool", sample_pool("etl"), seq=1)
        await rl.update_work_pool("etl", is_paused=True)
    keys = fake.keys("DeleteWorkPool")
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0]
    assert fake.keys("UpdateWorkPool")[0] not in (None, keys[0])
    assert caught.value.outcome_unknown and caught.value.attempts == 3
    assert str(caught.value).endswith("(tried 3 times)")


async def test_the_services_unavailable_to_a_command_is_an_unknown_outcome(fake, fast):
    fake.error("UpdateWorkPool", "unavailable", "the append's outcome is unknown")
    async with RunledgerClient(fast, retries=1, retry_backoff=0.01) as rl:
        with pytest.raises(Unavailable) as caught:
            await rl.update_work_pool("etl", is_paused=True, idempotency_key="k")
    assert caught.value.outcome_unknown and caught.value.attempts == 2


async def test_queries_are_retried_and_never_an_unknown_outcome(fake, fast):
    _silent_first(fake, "GetWorkPool", {"ok": True, "result": sample_pool("etl"), "seq": None})
    async with RunledgerClient(fast, retries=1, retry_backoff=0.01) as rl:
        assert (await rl.read_work_pool("etl")).name == "etl"
        fake.replies["GetWorkPool"] = SILENT
        with pytest.raises(Unavailable) as caught:
            await rl.read_work_pool("etl")
    assert len(fake.bodies("GetWorkPool")) == 4
    assert not caught.value.outcome_unknown


async def test_nobody_listening_is_retried_even_without_a_key_and_known_not_applied(nats_url, fast):
    async with RunledgerClient(fast, retries=2, retry_backoff=0.01) as rl:
        with pytest.raises(Unavailable, match="no runledger service answers") as caught:
            await rl.delete_work_pool("etl")
    assert caught.value.attempts == 3 and not caught.value.outcome_unknown
