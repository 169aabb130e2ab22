"""Settings a user gives: a cluster's URLs and the streams' replicas."""

from __future__ import annotations

import pydantic
import pytest

from runledger.infra.jetstream_setup import event_stream_config
from runledger.infra.leases import lease_bucket_config
from runledger.infra.settings import Settings
from runledger.infra.snapshots import snapshot_bucket_config
from runledger.infra.task_queues import task_stream_config


def test_a_cluster_is_named_by_its_urls_comma_separated_and_each_is_redacted():
    settings = Settings(nats_url="nats://svc:secret@n1:4222, nats://n2:4222,,nats://svc:secret@n3:4222")
    assert settings.nats_servers == ["nats://svc:secret@n1:4222", "nats://n2:4222", "nats://svc:secret@n3:4222"]
    assert settings.safe_nats_url() == "nats://svc:***@n1:4222,nats://n2:4222,nats://svc:***@n3:4222"
    assert "secret" not in settings.safe_nats_url()


def test_one_url_stays_one_server():
    assert Settings(nats_url="nats://127.0.0.1:4222").nats_servers == ["nats://127.0.0.1:4222"]


def test_every_stream_and_bucket_gets_the_replicas_asked_for():
    settings = Settings(stream_replicas=3)
    assert event_stream_config(settings).num_replicas == 3
    assert task_stream_config(settings, "scheduled").num_replicas == 3
    assert task_stream_config(settings, "retry").num_replicas == 3
    assert lease_bucket_config(settings).replicas == 3
    assert snapshot_bucket_config(settings).replicas == 3
    assert event_stream_config(Settings()).num_replicas == 1


@pytest.mark.parametrize("replicas", [0, 6, -1])
def test_replicas_outside_one_to_five_are_refused(replicas):
    with pytest.raises(pydantic.ValidationError, match="stream_replicas"):
        Settings(stream_replicas=replicas)


@pytest.mark.parametrize("url", ["", " , ,"])
def test_a_nats_url_naming_no_server_is_refused(url):
    with pytest.raises(pydantic.ValidationError, match="names no NATS server"):
        Settings(nats_url=url)


def test_the_routine_retention_is_read_by_its_name_and_its_first_name_only(monkeypatch):
    """`RUNLEDGER_ROUTINE_RETENTION_SECONDS`, or its first name `..._HEARTBEAT_...`; never a
    variable without the prefix, which belongs to somebody else."""
    for name in ("RUNLEDGER_ROUTINE_RETENTION_SECONDS", "RUNLEDGER_HEARTBEAT_RETENTION_SECONDS",
                 "ROUTINE_RETENTION_SECONDS", "routine_retention_seconds"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROUTINE_RETENTION_SECONDS", "5")
    assert Settings().routine_retention_seconds == 86_400
    monkeypatch.setenv("RUNLEDGER_HEARTBEAT_RETENTION_SECONDS", "6")
    assert Settings().routine_retention_seconds == 6
    monkeypatch.setenv("RUNLEDGER_ROUTINE_RETENTION_SECONDS", "7")
    assert Settings().routine_retention_seconds == 7
    assert Settings(routine_retention_seconds=3).routine_retention_seconds == 3
