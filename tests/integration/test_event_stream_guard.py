"""The event stream's settings guard the log: the service refuses to run on a stream whose
limits drop stored events (the admin role, which upgrades the streams, can set them, and so can
a user of the account without permissions), and the purge API is denied on the stream, even to
the service."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy
from nats.js.errors import APIError

from runledger.commands import work_pools as wp
from runledger.commands.events import EventEnvelope
from runledger.handlers.service import Service
from runledger.infra.event_store import EventStore
from runledger.infra.jetstream_setup import ensure_event_stream, event_stream_config
from runledger.infra.nats_connection import BrokerUnavailable, connect
from tests.conftest import cleanup_namespace

DAY = 24 * 3600.0


def claim(name: str) -> EventEnvelope:
    event = wp.WorkPoolNameClaimed(name=name, work_pool_id=uuid.uuid4())
    return EventEnvelope.wrap(wp.name_aggregate_id(name), event, occurred=datetime.now(UTC), event_id=uuid.uuid4())


async def append_claims(nc, settings, *names: str) -> None:
    store = EventStore(nc, settings)
    for name in names:
        await store.append(store.build_messages([claim(name)], {(wp.WORK_POOL_NAME, wp.name_aggregate_id(name)): 0}))


async def start_refused(settings) -> str:
    """Start a service and return the one line it refuses with."""
    svc = Service(settings)
    try:
        with pytest.raises(BrokerUnavailable) as refused:
            await svc.start()
    finally:
        await svc.stop()  # closes the connections the refused start opened
    return str(refused.value)


@pytest.fixture
async def nc(settings):
    """A connection to the test's broker; the namespace's streams and schema go afterwards."""
    conn = await connect(settings)
    try:
        yield conn
    finally:
        await conn.close()
        await cleanup_namespace(settings)


async def test_a_log_whose_limits_were_shrunk_stops_the_service_naming_the_setting_and_the_fix(settings, nc):
    """The audit's attack: with the service's rights, `max_msgs=1, discard=old` erases all but
    the last event. The erasure cannot be undone, but the service no longer starts on it as
    if nothing happened (and then accepts a duplicate pool name): it stops, saying why."""
    js = nc.jetstream()
    await ensure_event_stream(js, settings)
    await append_claims(nc, settings, "etl", "nightly")
    current = (await js.stream_info(settings.stream_name)).config
    await js.update_stream(dataclasses.replace(current, max_msgs=1, discard=DiscardPolicy.OLD))
    assert (await js.stream_info(settings.stream_name)).state.messages == 1  # erased, as the audit found

    line = await start_refused(settings)
    assert "\n" not in line
    assert settings.stream_name in line and "discard=old" in line and "max_msgs=1" in line
    assert f"nats stream edit {settings.stream_name} --discard new" in line
    # The service leaves the operator's settings alone.
    after = (await js.stream_info(settings.stream_name)).config
    assert after.max_msgs == 1 and after.discard == DiscardPolicy.OLD


@pytest.mark.parametrize(("changes", "named", "fix"), [
    ({"discard": DiscardPolicy.OLD, "max_bytes": 1 << 30}, "max_bytes=1073741824", "--discard new"),
    # These two drop old messages whatever the discard policy (nats-server's filestore expires
    # by age, and keeps a subject's limit, with discard new too).
    ({"max_age": 30 * DAY}, "max_age=2592000s", "--max-age 0"),
    ({"max_msgs_per_subject": 1}, "max_msgs_per_subject=1", "--max-msgs-per-subject -1"),
    ({"retention": RetentionPolicy.INTEREST}, "retention=interest", "--retention limits"),
    ({"allow_rollup_hdrs": True, "deny_purge": False}, "allow_rollup_hdrs", "--no-allow-rollup"),
], ids=["discard-old-max-bytes", "max-age", "max-msgs-per-subject", "interest", "rollup"])
async def test_every_setting_that_drops_stored_events_is_refused(settings, nc, changes, named, fix):
    js = nc.jetstream()
    await js.add_stream(dataclasses.replace(event_stream_config(settings), **changes))
    with pytest.raises(BrokerUnavailable) as refused:
        await ensure_event_stream(js, settings)
    assert named in str(refused.value) and f"nats stream edit {settings.stream_name} {fix}" in str(refused.value)


async def test_an_operators_size_alarm_with_discard_new_lets_the_service_start(settings, nc):
    """`max_bytes` with discard new refuses appends when full instead of dropping old events:
    an alarm an operator may set on purpose, kept as it is."""
    js = nc.jetstream()
    await js.add_stream(dataclasses.replace(event_stream_config(settings), max_bytes=512 * 1024 * 1024,
                                            max_msgs=10_000_000, discard=DiscardPolicy.NEW))
    svc = Service(settings)
    await svc.start()
    await svc.stop()
    config = (await js.stream_info(settings.stream_name)).config
    assert config.max_bytes == 512 * 1024 * 1024 and config.max_msgs == 10_000_000


async def test_a_fresh_log_cannot_be_purged(settings, nc):
    js = nc.jetstream()
    await ensure_event_stream(js, settings)
    await append_claims(nc, settings, "kept")
    assert (await js.stream_info(settings.stream_name)).config.deny_purge
    with pytest.raises(APIError):
        await js.purge_stream(settings.stream_name)
    assert (await js.stream_info(settings.stream_name)).state.messages == 1


async def test_a_log_made_before_purges_were_denied_is_given_deny_purge_at_start_keeping_its_events(settings, nc):
    js = nc.jetstream()
    await js.add_stream(dataclasses.replace(event_stream_config(settings), deny_purge=False))
    await append_claims(nc, settings, "a", "b")
    svc = Service(settings)
    await svc.start()
    await svc.stop()
    info = await js.stream_info(settings.stream_name)
    assert info.config.deny_purge and info.config.deny_delete and info.state.messages == 2
    with pytest.raises(APIError):
        await js.purge_stream(settings.stream_name)


async def test_the_analysts_verbs_read_an_older_log_as_it_is(settings, nc):
    """`replay`, `verify` and `rebuild` run as the analyst, who may not update the stream: on a
    log an earlier runledger made they only check it (an update would be refused, and the verb
    would time out), until this version's service upgrades it."""
    js = nc.jetstream()
    await js.add_stream(dataclasses.replace(event_stream_config(settings), deny_purge=False))
    await ensure_event_stream(js, settings, upgrade=False)
    assert not (await js.stream_info(settings.stream_name)).config.deny_purge  # left as it was
    await js.update_stream(dataclasses.replace((await js.stream_info(settings.stream_name)).config,
                                               max_age=3600.0))
    with pytest.raises(BrokerUnavailable, match="max_age=3600s"):  # still checked
        await ensure_event_stream(js, settings, upgrade=False)
