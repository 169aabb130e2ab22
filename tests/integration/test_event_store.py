"""The event store's contract against a real NATS >= 2.12: optimistic concurrency over a whole
aggregate, all-or-nothing batches, and lost acknowledgements. The first two would fail on a
server that ignores the checks (NATS 2.9 accepts both), so they also guard the version gate."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import nats.errors
import pytest

from runledger.commands import work_pools as wp
from runledger.commands.events import EventEnvelope
from runledger.infra.embedded import free_port
from runledger.infra.event_store import EventStore, WrongExpectedSequence, message_size
from runledger.infra.jetstream_setup import ensure_event_stream
from runledger.infra.nats_connection import BrokerUnavailable, connect
from runledger.infra.settings import Settings
from tests.conftest import cleanup_namespace


@pytest.fixture
async def store(settings):
    nc = await connect(settings)
    await ensure_event_stream(nc.jetstream(), settings)
    try:
        yield EventStore(nc, settings)
    finally:
        await nc.close()
        await cleanup_namespace(settings)


def claim(name: str, pool_id: uuid.UUID | None = None) -> EventEnvelope:
    event = wp.WorkPoolNameClaimed(name=name, work_pool_id=pool_id or uuid.uuid4())
    return EventEnvelope.wrap(wp.name_aggregate_id(name), event, occurred=datetime.now(UTC), event_id=uuid.uuid4())


def release(name: str, pool_id: uuid.UUID) -> EventEnvelope:
    event = wp.WorkPoolNameReleased(name=name, work_pool_id=pool_id)
    return EventEnvelope.wrap(wp.name_aggregate_id(name), event, occurred=datetime.now(UTC), event_id=uuid.uuid4())


async def count(store: EventStore) -> int:
    return (await store.js.stream_info(store.stream)).state.messages


async def test_stale_append_to_an_aggregate_is_rejected(store):
    key = (wp.WORK_POOL_NAME, wp.name_aggregate_id("a"))
    first = claim("a")
    seq = await store.append(store.build_messages([first], {key: 0}))
    # The same expectation again is stale: the aggregate now has an event.
    with pytest.raises(WrongExpectedSequence):
        await store.append(store.build_messages([claim("a")], {key: 0}))
    # The check spans the aggregate, not one subject: a different event type is stale too.
    with pytest.raises(WrongExpectedSequence):
        await store.append(store.build_messages([release("a", first.payload["work_pool_id"])], {key: 0}))
    assert await count(store) == 1
    # With the right expectation it goes through.
    seq2 = await store.append(store.build_messages([release("a", uuid.UUID(first.payload["work_pool_id"]))], {key: seq}))
    assert seq2 == seq + 1
    events = await store.read_aggregate(*key)
    assert [e.envelope.type for e in events] == ["WorkPoolNameClaimed", "WorkPoolNameReleased"]


async def test_a_batch_with_one_stale_check_stores_nothing(store):
    taken = (wp.WORK_POOL_NAME, wp.name_aggregate_id("taken"))
    await store.append(store.build_messages([claim("taken")], {taken: 0}))
    before = await count(store)
    fresh = (wp.WORK_POOL_NAME, wp.name_aggregate_id("fresh"))
    batch = store.build_messages([claim("fresh"), claim("taken")], {fresh: 0, taken: 0})
    assert len(batch) == 2
    with pytest.raises(WrongExpectedSequence):
        await store.append(batch)
    assert await count(store) == before
    assert await store.read_aggregate(*fresh) == []


async def test_a_batch_lands_whole_and_in_order(store):
    keys = [(wp.WORK_POOL_NAME, wp.name_aggregate_id(n)) for n in ("x", "y", "z")]
    envelopes = [claim(n) for n in ("x", "y", "z")]
    last = await store.append(store.build_messages(envelopes, dict.fromkeys(keys, 0)))
    seqs = [(await store.read_aggregate(*k))[0].seq for k in keys]
    assert seqs == [last - 2, last - 1, last]


@pytest.mark.parametrize("batched", [False, True])
async def test_a_retry_after_a_lost_ack_is_recognised_as_ours(store, monkeypatch, batched):
    """The ack of a stored append is lost; the retry fails its sequence check (the server
    checks before de-duplicating) and the store must recognise its own message."""
    names = ["lost1", "lost2"] if batched else ["lost1"]
    envelopes = [claim(n) for n in names]
    keys = {(wp.WORK_POOL_NAME, wp.name_aggregate_id(n)): 0 for n in names}
    messages = store.build_messages(envelopes, keys)
    method = "_publish_batch" if batched else "_publish_one"
    real = getattr(store, method)
    calls = 0

    async def ack_lost(*args):
        nonlocal calls
        calls += 1
        result = await real(*args)
        if calls == 1:
            raise nats.errors.TimeoutError  # stored, but the caller never hears it
        return result

    monkeypatch.setattr(store, method, ack_lost)
    seq = await store.append(messages)
    assert calls == 2
    assert await count(store) == len(names)
    stored = await store.read_aggregate(*next(reversed(keys)))
    assert stored[-1].seq == seq and stored[-1].envelope.id == envelopes[-1].id


def _pair(name: str) -> tuple[list[EventEnvelope], dict]:
    """A two-aggregate decision (two name claims): an atomic batch of two messages."""
    names = [name, f"{name}-b"]
    return [claim(n) for n in names], {(wp.WORK_POOL_NAME, wp.name_aggregate_id(n)): 0 for n in names}


@pytest.fixture
def batch_sizes(store, monkeypatch):
    """The sizes of the atomic batches sent to the server (a failed one included)."""
    sizes: list[int] = []
    real = store._publish_batch

    async def spy(messages):
        sizes.append(len(messages))
        return await real(messages)

    monkeypatch.setattr(store, "_publish_batch", spy)
    return sizes


async def test_concurrent_batches_commit_together_and_each_gets_its_own_sequence(store, batch_sizes):
    decisions = [_pair(f"g{i}") for i in range(40)]
    results = await asyncio.gather(*(store.append(store.build_messages(envs, keys)) for envs, keys in decisions))
    assert await count(store) == 80
    for (envs, keys), seq in zip(decisions, results, strict=True):
        last_key = list(keys)[-1]
        (stored,) = await store.read_aggregate(*last_key)
        assert (stored.seq, stored.envelope.id) == (seq, envs[-1].id)  # the member's own last message
        (first,) = await store.read_aggregate(*list(keys)[0])
        assert first.seq == seq - 1  # each member's messages stay together, in order
    assert max(batch_sizes) > 2 and len(batch_sizes) < 40  # merged: fewer commits than decisions


async def test_a_stale_member_fails_alone_and_the_rest_of_its_group_lands(store, batch_sizes):
    taken = (wp.WORK_POOL_NAME, wp.name_aggregate_id("taken"))
    await store.append(store.build_messages([claim("taken")], {taken: 0}))
    before = await count(store)
    decisions = [_pair(f"s{i}") for i in range(20)]
    stale_envs, stale_keys = decisions[7]
    decisions[7] = ([stale_envs[0], claim("taken")], {list(stale_keys)[0]: 0, taken: 0})  # "taken" is not new
    results = await asyncio.gather(*(store.append(store.build_messages(envs, keys)) for envs, keys in decisions),
                                   return_exceptions=True)
    assert [i for i, r in enumerate(results) if isinstance(r, Exception)] == [7]
    assert isinstance(results[7], WrongExpectedSequence)
    assert await count(store) == before + 2 * 19
    assert await store.read_aggregate(*list(stale_keys)[0]) == []  # nothing of the stale decision
    assert len(await store.read_aggregate(*taken)) == 1


async def test_concurrent_single_appends_go_side_by_side_and_a_stale_one_fails_alone(store, batch_sizes):
    """Single-message appends need no atomic batch: they are sent at once, side by side (the
    server pipelines them, where it commits atomic batches one at a time); one whose check
    fails gets its error and the others land."""
    names = [f"one{i}" for i in range(30)]
    await store.append(store.build_messages([claim("one7")], {(wp.WORK_POOL_NAME, wp.name_aggregate_id("one7")): 0}))
    envs = [claim(n) for n in names]
    results = await asyncio.gather(
        *(store.append(store.build_messages([e], {(wp.WORK_POOL_NAME, wp.name_aggregate_id(n)): 0}))
          for e, n in zip(envs, names, strict=True)), return_exceptions=True)
    assert [i for i, r in enumerate(results) if isinstance(r, Exception)] == [7]  # "one7" was not new
    assert isinstance(results[7], WrongExpectedSequence)
    assert await count(store) == 1 + 29
    for i, (e, n) in enumerate(zip(envs, names, strict=True)):
        stored = await store.read_aggregate(wp.WORK_POOL_NAME, wp.name_aggregate_id(n))
        if i != 7:
            assert [(x.seq, x.envelope.id) for x in stored] == [(results[i], e.id)]
    assert batch_sizes == []  # none was merged into an atomic batch


async def test_grouped_single_appends_share_batches_when_asked(store, batch_sizes):
    """`group_single_messages` (how single appends went before): merged into atomic batches."""
    store.group_single_messages = True
    names = [f"grouped{i}" for i in range(30)]
    results = await asyncio.gather(*(store.append(store.build_messages(
        [claim(n)], {(wp.WORK_POOL_NAME, wp.name_aggregate_id(n)): 0})) for n in names))
    assert len(set(results)) == 30 and max(batch_sizes) > 2


async def test_a_single_message_too_big_for_the_batch_headers_goes_alone(store, monkeypatch):
    """Right under the max payload on its own, over it with the batch headers: it is never
    merged into a batch (the server would close the connection) and still lands."""
    store.group_single_messages = True  # the others are merged; it is not
    batched_ids: list[str] = []
    real = store._publish_batch

    async def spy(messages):
        batched_ids.extend(m.msg_id for m in messages)
        return await real(messages)

    monkeypatch.setattr(store, "_publish_batch", spy)
    big_name = "big-one-" + "x" * 200  # the small ones fit with the batch headers
    (big,) = store.build_messages([claim(big_name)], {(wp.WORK_POOL_NAME, wp.name_aggregate_id(big_name)): 0})
    store._max_payload = message_size(big, batched=False)  # fits alone, not with batch headers
    small = [store.build_messages([claim(f"s{i}")], {(wp.WORK_POOL_NAME, wp.name_aggregate_id(f"s{i}")): 0})
             for i in range(20)]
    results = await asyncio.gather(*(store.append(m) for m in [*small[:10], [big], *small[10:]]))
    assert batched_ids and big.msg_id not in batched_ids  # the others were merged; it was not
    (stored,) = await store.read_aggregate(wp.WORK_POOL_NAME, wp.name_aggregate_id(big_name))
    assert stored.seq == results[10]
    assert await count(store) == 21


async def test_decisions_on_one_aggregate_are_never_merged_and_only_one_wins(store):
    same = (wp.WORK_POOL_NAME, wp.name_aggregate_id("same"))
    decisions = [_pair(f"o{i}") for i in range(10)]
    for i in (3, 6):  # two decisions both expecting "same" to be new
        envs, keys = decisions[i]
        decisions[i] = ([envs[0], claim("same")], {list(keys)[0]: 0, same: 0})
    results = await asyncio.gather(*(store.append(store.build_messages(envs, keys)) for envs, keys in decisions),
                                   return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
    assert len(failed) == 1 and failed[0] in (3, 6) and isinstance(results[failed[0]], WrongExpectedSequence)
    assert len(await store.read_aggregate(*same)) == 1
    assert await count(store) == 2 * 9


async def test_a_lost_ack_of_a_merged_batch_is_recognised_by_every_member(store, monkeypatch):
    real = store._publish_batch
    lost = []

    async def first_merged_ack_lost(messages):
        result = await real(messages)
        if len(messages) > 2 and not lost:
            lost.append(len(messages))
            raise nats.errors.TimeoutError  # stored, but nobody hears it
        return result

    monkeypatch.setattr(store, "_publish_batch", first_merged_ack_lost)
    decisions = [_pair(f"l{i}") for i in range(30)]
    results = await asyncio.gather(*(store.append(store.build_messages(envs, keys)) for envs, keys in decisions))
    assert lost, "no merged batch was sent"
    assert await count(store) == 60  # nothing twice
    for (envs, keys), seq in zip(decisions, results, strict=True):
        (stored,) = await store.read_aggregate(*list(keys)[-1])
        assert (stored.seq, stored.envelope.id) == (seq, envs[-1].id)


async def test_a_decision_larger_than_a_group_still_lands_beside_small_ones(store):
    big = [claim(f"big{i}") for i in range(store.groups.MAX_MESSAGES + 100)]
    big_keys = {(wp.WORK_POOL_NAME, wp.name_aggregate_id(f"big{i}")): 0 for i in range(len(big))}
    small = [_pair(f"sm{i}") for i in range(10)]
    results = await asyncio.gather(store.append(store.build_messages(big, big_keys)),
                                   *(store.append(store.build_messages(envs, keys)) for envs, keys in small))
    assert await count(store) == len(big) + 20
    (last_big,) = await store.read_aggregate(*list(big_keys)[-1])
    assert last_big.seq == results[0]


async def test_fifty_racing_claims_of_one_name_store_exactly_one(store):
    key = (wp.WORK_POOL_NAME, wp.name_aggregate_id("contested"))

    async def attempt(i: int):
        try:
            return await store.append(store.build_messages([claim("contested")], {key: 0}))
        except WrongExpectedSequence:
            return None

    results = await asyncio.gather(*(attempt(i) for i in range(50)))
    assert sum(r is not None for r in results) == 1
    assert len(await store.read_aggregate(*key)) == 1


def _old_nats_server(store_dir: Path) -> tuple[str, subprocess.Popen | None]:
    """Debian's NATS 2.9 (the machine's own), started on a free port; else the one at 4222."""
    binary = shutil.which("nats-server", path="/usr/sbin:/usr/bin")
    if binary and "2.9" in subprocess.run([binary, "--version"], capture_output=True, text=True).stdout:
        port = free_port()
        proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return f"nats://127.0.0.1:{port}", proc
    return "nats://127.0.0.1:4222", None


async def test_an_old_nats_server_is_refused_with_a_clear_error(tmp_path):
    url, proc = _old_nats_server(tmp_path / "old-nats")
    try:
        await asyncio.sleep(0.3)
        settings = Settings(nats_url=url, namespace=f"t{uuid.uuid4().hex[:10]}")
        with pytest.raises(BrokerUnavailable, match=r"is version 2\.\d+\.\d+; runledger needs NATS >= 2\.12"):
            await connect(settings)
        # Even past the version check, the stream setup notices the ignored allow_atomic flag.
        nc = await connect(settings, check_version=False)
        try:
            with pytest.raises(BrokerUnavailable, match="allow_atomic"):
                await ensure_event_stream(nc.jetstream(), settings)
        finally:
            await nc.jetstream().delete_stream(settings.stream_name)
            await nc.close()
    finally:
        if proc:
            proc.terminate()
            proc.wait()


async def test_a_decision_chained_onto_a_queued_append_lands_right_after_it_or_not_at_all(store):
    """Chaining (`Pending`): decisions on one hot aggregate, each taken against the state the
    queued one before it leaves, land in order, in one atomic batch when they travel together;
    one chained onto an append that fails fails too, and nothing of either is stored."""
    from runledger.infra.event_store import ChainBroken, Pending

    key = (wp.WORK_POOL_NAME, wp.name_aggregate_id("hot"))
    pool_id = uuid.uuid4()
    first = store.submit(store.build_messages([claim("hot", pool_id)], {key: 0}))
    second = store.submit(store.build_messages([release("hot", pool_id)], {key: Pending(first, 0)}))
    third = store.submit(store.build_messages([claim("hot", pool_id)], {key: Pending(second, 0)}))
    seqs = [await w.result for w in (first, second, third)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    stored = await store.read_aggregate(*key)
    assert [s.seq for s in stored] == seqs
    assert [s.envelope.type for s in stored] == ["WorkPoolNameClaimed", "WorkPoolNameReleased", "WorkPoolNameClaimed"]

    before = await count(store)
    stale = store.submit(store.build_messages([release("hot", pool_id)], {key: seqs[0]}))  # not the last one
    chained = store.submit(store.build_messages([claim("hot", pool_id)], {key: Pending(stale, 0)}))
    with pytest.raises(WrongExpectedSequence):
        await stale.result
    with pytest.raises(ChainBroken):
        await chained.result
    # The group commit's flusher, left with nothing but a broken chain, ends cleanly.
    await asyncio.wait_for(store.groups.flusher, 5)
    assert await count(store) == before
    # A decision chained onto one that already landed checks the sequence it got.
    after = store.submit(store.build_messages([release("hot", pool_id)], {key: Pending(third, 0)}))
    assert await after.result > seqs[2]


async def test_a_log_made_before_heartbeats_expired_is_given_message_ttls_keeping_its_events(settings):
    """A log created by an earlier runledger (no per-message TTLs) is updated in place when the
    service starts, and keeps what it holds."""
    import dataclasses

    from runledger.infra.jetstream_setup import event_stream_config

    nc = await connect(settings)
    try:
        js = nc.jetstream()
        await js.add_stream(dataclasses.replace(event_stream_config(settings), allow_msg_ttl=False,
                                                max_bytes=512 * 1024 * 1024))  # an operator's limit
        store = EventStore(nc, settings)
        await store.append(store.build_messages([claim("kept")], {(wp.WORK_POOL_NAME, wp.name_aggregate_id("kept")): 0}))
        await ensure_event_stream(js, settings)
        info = await js.stream_info(settings.stream_name)
        assert info.config.allow_msg_ttl and info.config.deny_delete and info.state.messages == 1
        assert info.config.max_bytes == 512 * 1024 * 1024  # the operator's limit is kept
    finally:
        await nc.close()
        await cleanup_namespace(settings)
