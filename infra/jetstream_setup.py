"""The streams and buckets runledger owns, created and updated by our own code (never by
FastStream's declare, which silently rewrites stream settings): by the admin role
(`runledger broker-setup`, `runledger up`), or by the service itself on a broker without
users; a service with its own credentials only checks them (`ensure_broker`)."""

from __future__ import annotations

import dataclasses

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from .leases import ensure_lease_bucket
from .nats_connection import BrokerUnavailable
from .settings import Settings
from .snapshots import ensure_snapshot_bucket
from .task_queues import (
    SIDES,
    ensure_result_stream,
    ensure_task_streams,
    ensure_task_worker_bucket,
    result_stream_name,
    task_stream_name,
    task_worker_bucket,
)


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
        # Neither the message-delete nor the purge API may remove an event, whoever asks (the
        # admin included, who may update the stream: see drops_events).
        deny_delete=True,
        deny_purge=True,
        # Routine heartbeats and polls expire (`Settings.routine_retention_seconds`); nothing else does.
        allow_msg_ttl=True,
        duplicate_window=settings.event_duplicate_window_seconds,
        num_replicas=settings.stream_replicas,
    )


def drops_events(config: StreamConfig) -> list[tuple[str, str]]:
    """The settings of `config` under which nats-server removes stored events by itself, each
    with the `nats stream edit` flag that undoes it. Anyone with the admin's credentials (or a
    user of the account without permissions) can set them; refusing to run on them turns a
    silent erasure into a loud stop. Limits with discard new only refuse appends (an alarm an
    operator may set on purpose) and stay allowed. Checked in nats-server's filestore: max_age
    expires and max_msgs_per_subject trims a subject whatever the discard policy; interest
    retention drops what every consumer acked; a roll-up header purges a subject."""
    problems: list[tuple[str, str]] = []
    if config.discard == DiscardPolicy.OLD:
        limits = [f"{name}={value}" for name, value in (("max_msgs", config.max_msgs), ("max_bytes", config.max_bytes))
                  if (value or 0) > 0]
        if limits:
            problems.append((f"discard=old with {' and '.join(limits)}", "--discard new"))
    if (config.max_age or 0) > 0:
        seconds = f"{config.max_age:.3f}".rstrip("0").rstrip(".")
        problems.append((f"max_age={seconds}s", "--max-age 0"))
    if (config.max_msgs_per_subject or 0) > 0:
        problems.append((f"max_msgs_per_subject={config.max_msgs_per_subject}", "--max-msgs-per-subject -1"))
    if config.retention not in (None, RetentionPolicy.LIMITS):
        problems.append((f"retention={RetentionPolicy(config.retention).value}", "--retention limits"))
    if config.allow_rollup_hdrs:
        problems.append(("allow_rollup_hdrs=true", "--no-allow-rollup"))
    return problems


def _outdated(current: StreamConfig, wanted: StreamConfig) -> list[str]:
    """What an existing event stream lacks of what runledger needs (an older version made it)."""
    flags = ("allow_direct", "allow_atomic", "allow_msg_ttl", "deny_delete", "deny_purge")
    return ([*(["subjects"] if sorted(current.subjects or []) != sorted(wanted.subjects or []) else []),
             *(f for f in flags if not getattr(current, f, False)),
             *(["duplicate_window"] if current.duplicate_window != wanted.duplicate_window else [])])


def diverted(config: StreamConfig) -> list[str]:
    """The settings of `config` that carry messages into or out of the stream other than
    through runledger's own subjects and APIs, or freeze it: a source or mirror (another
    stream's messages, transformed into events or task runs), a republish (every stored message
    sent on to a subject others hear: the log read by whoever listens), a subject transform,
    `sealed` (no append ever again, and it cannot be undone). A stream update sets any of them,
    and NATS permissions cannot tell such an update from an upgrade; runledger sets none, so
    finding one means someone else did."""
    found = []
    if config.mirror is not None:
        found.append("mirror")
    if config.sources:
        found.append("sources")
    if config.republish is not None:
        found.append("republish")
    if config.subject_transform is not None:
        found.append("subject_transform")
    if config.sealed:
        found.append("sealed")
    return found


def _refuse_diverted(name: str, config: StreamConfig) -> None:
    if settings := diverted(config):
        raise BrokerUnavailable(
            f"stream {name} has {', '.join(settings)}, which runledger never sets: its messages can come from "
            "elsewhere or go on to others (or, sealed, it takes no more); runledger refuses to run on it. Remove "
            f"them (`nats stream info {name}` shows them; `nats stream edit {name}` changes them; a sealed stream "
            "must be restored from a backup), then start again.")


async def ensure_event_stream(js: JetStreamContext, settings: Settings, *, upgrade: bool = True,
                              change: bool = True) -> list[str]:
    """Creates the event stream, or checks it (`drops_events`) and upgrades an older one's
    settings; returns what it did. `change` False: changes nothing and returns what it would
    change (the service's start, whose role may not). `upgrade` False: an older stream is read
    as it is, unreported (the analyst's verbs, until the admin has upgraded it)."""
    wanted = event_stream_config(settings)
    assert wanted.name is not None  # event_stream_config names it
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        if not change:
            return [f"stream {wanted.name} missing"]
        info = await js.add_stream(wanted)
        done = [f"created stream {wanted.name}"]
    else:
        current = info.config
        # Before changing anything: an upgrade must not carry such settings along as if all were well.
        _refuse_diverted(wanted.name, current)
        if problems := drops_events(current):
            raise BrokerUnavailable(
                f"stream {wanted.name} drops stored events ({'; '.join(setting for setting, _ in problems)}): "
                "runledger refuses to run on a log that loses events, and leaves its settings to you; fix them "
                f"with `nats stream edit {wanted.name} {' '.join(flag for _, flag in problems)}`, then start again."
            )
        outdated = _outdated(current, wanted) if upgrade else []
        if outdated and not change:
            return [f"stream {wanted.name} outdated: {', '.join(outdated)}"]
        done = []
        if outdated:
            # Only what runledger needs changes: limits an operator set on the stream (a
            # `max_bytes` alarm, its replicas edited by hand) stay as they are.
            info = await js.update_stream(dataclasses.replace(
                current, subjects=wanted.subjects, allow_direct=True, allow_atomic=True, allow_msg_ttl=True,
                deny_delete=True, deny_purge=True, duplicate_window=wanted.duplicate_window))
            done = [f"upgraded stream {wanted.name}: {', '.join(outdated)}"]
    # A server that does not know atomic batches drops the flag silently: refuse it.
    if not getattr(info.config, "allow_atomic", False):
        raise BrokerUnavailable(
            f"stream {wanted.name} does not report allow_atomic=true: the NATS server ignores atomic "
            "batches; runledger needs NATS >= 2.12."
        )
    return done


async def ensure_broker(js: JetStreamContext, settings: Settings, *, change: bool) -> list[str]:
    """Every stream and bucket this runledger needs, made or upgraded (`change`: by the admin
    role, `runledger broker-setup`; or by a service on a broker without users) or only checked
    (a service with its own credentials, which may not create or update a stream): one line
    per stream or bucket made or upgraded, or missing or outdated. A log that drops events is
    refused either way (`drops_events`), and so is any of them that takes messages from
    elsewhere, sends them on, or is sealed (`diverted`)."""
    said = await ensure_event_stream(js, settings, change=change)
    for ensure in (ensure_task_streams, ensure_result_stream, ensure_snapshot_bucket, ensure_lease_bucket,
                   ensure_task_worker_bucket):
        said += await ensure(js, settings, change=change)
    for name in (*(task_stream_name(settings, side) for side in SIDES), result_stream_name(settings),
                 *(f"KV_{bucket}" for bucket in (settings.snapshot_bucket, settings.lease_bucket,
                                                 task_worker_bucket(settings)))):
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            continue  # missing: said above
        _refuse_diverted(name, info.config)
    return said
