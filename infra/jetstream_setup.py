"""The streams runledger owns, created and updated by our own code (never by FastStream's
declare, which silently rewrites stream settings)."""

from __future__ import annotations

import dataclasses

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from .nats_connection import BrokerUnavailable
from .settings import Settings


def event_stream_config(settings: Settings) -> StreamConfig:
    ns = settings.namespace
    return StreamConfig(
        name=settings.stream_name,
        description="runledger event log: the source of truth",
        subjects=[f"{ns}.evt.>", f"{ns}.idem.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        allow_direct=True,
        allow_atomic=True,
        deny_delete=True,
        # Routine heartbeats and polls expire (`Settings.routine_retention_seconds`); nothing else does.
        allow_msg_ttl=True,
        duplicate_window=settings.event_duplicate_window_seconds,
        num_replicas=settings.stream_replicas,
    )


async def ensure_event_stream(js: JetStreamContext, settings: Settings) -> None:
    wanted = event_stream_config(settings)
    assert wanted.name is not None  # event_stream_config names it
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        info = await js.add_stream(wanted)
    else:
        current = info.config
        if (
            sorted(current.subjects or []) != sorted(wanted.subjects or [])
            or not current.allow_direct
            or not current.allow_atomic
            or not current.allow_msg_ttl
            or current.duplicate_window != wanted.duplicate_window
        ):
            # Only what runledger needs changes: limits an operator set on the stream (a
            # `max_bytes` alarm, its replicas edited by hand) stay as they are.
            info = await js.update_stream(dataclasses.replace(
                current, subjects=wanted.subjects, allow_direct=True, allow_atomic=True, allow_msg_ttl=True,
                duplicate_window=wanted.duplicate_window))
    # A server that does not know atomic batches drops the flag silently: refuse it.
    if not getattr(info.config, "allow_atomic", False):
        raise BrokerUnavailable(
            f"stream {wanted.name} does not report allow_atomic=true: the NATS server ignores atomic "
            "batches; runledger needs NATS >= 2.12."
        )
