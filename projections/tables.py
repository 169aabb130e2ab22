"""The read-model tables and their versioned migrations.

No uniqueness constraints on names here: the write model guarantees them, and a projection
must be able to apply any valid history (a swap of two names inside one batch included).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Integer, MetaData, Table, Text
from sqlalchemy.dialects.postgresql import JSONB, UUID

from runledger.infra.database import Migration

metadata = MetaData()

projection_checkpoints = Table(
    "projection_checkpoints", metadata,
    Column("name", Text, primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)

skipped_events = Table(
    "skipped_events", metadata,
    Column("projection", Text, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("subject", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("recorded", DateTime(timezone=True), nullable=False),
)

# A projection that met an event it cannot apply stops there and says so here: one row per
# stalled projection, written in its own transaction, removed once it applies past `seq`.
projection_failures = Table(
    "projection_failures", metadata,
    Column("projection", Text, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("subject", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
)

work_pools = Table(
    "work_pools", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False),
    Column("description", Text),
    Column("type", Text, nullable=False),
    Column("base_job_template", JSONB, nullable=False),
    Column("is_paused", Boolean, nullable=False),
    Column("concurrency_limit", Integer),
    Column("storage_configuration", JSONB, nullable=False),
    Column("status", Text),
    Column("default_queue_id", UUID(as_uuid=True), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)

work_queues = Table(
    "work_queues", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("work_pool_id", UUID(as_uuid=True), nullable=False),
    Column("name", Text, nullable=False),
    Column("description", Text),
    Column("is_paused", Boolean, nullable=False),
    Column("concurrency_limit", Integer),
    Column("priority", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("last_polled", DateTime(timezone=True)),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)

flows = Table(
    "flows", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False),
    Column("tags", JSONB, nullable=False),
    Column("labels", JSONB, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)

# Tables that hold read models (compared by `runledger verify`); the others are bookkeeping.
READ_MODEL_TABLES = [work_pools, work_queues, flows]

MIGRATIONS = [
    Migration(1, "work pools and work queues", [
        """CREATE TABLE projection_checkpoints (name text PRIMARY KEY, last_seq bigint NOT NULL,
               updated timestamptz NOT NULL)""",
        """CREATE TABLE skipped_events (projection text NOT NULL, seq bigint NOT NULL, subject text NOT NULL,
               reason text NOT NULL, recorded timestamptz NOT NULL, PRIMARY KEY (projection, seq))""",
        """CREATE TABLE work_pools (id uuid PRIMARY KEY, name text NOT NULL, description text,
               type text NOT NULL, base_job_template jsonb NOT NULL, is_paused boolean NOT NULL,
               concurrency_limit integer, storage_configuration jsonb NOT NULL, status text,
               default_queue_id uuid NOT NULL, created timestamptz NOT NULL, updated timestamptz NOT NULL)""",
        "CREATE INDEX work_pools_name ON work_pools (name)",
        """CREATE TABLE work_queues (id uuid PRIMARY KEY, work_pool_id uuid NOT NULL, name text NOT NULL,
               description text, is_paused boolean NOT NULL, concurrency_limit integer,
               priority integer NOT NULL, status text NOT NULL, last_polled timestamptz,
               created timestamptz NOT NULL, updated timestamptz NOT NULL)""",
        "CREATE INDEX work_queues_pool_priority ON work_queues (work_pool_id, priority)",
        "CREATE INDEX work_queues_name ON work_queues (name)",
    ]),
    Migration(2, "projection failures", [
        """CREATE TABLE projection_failures (projection text PRIMARY KEY, seq bigint NOT NULL,
               subject text NOT NULL, event_type text NOT NULL, error text NOT NULL,
               attempts integer NOT NULL, first_seen timestamptz NOT NULL, last_seen timestamptz NOT NULL)""",
    ]),
    Migration(3, "flows", [
        """CREATE TABLE flows (id uuid PRIMARY KEY, name text NOT NULL, tags jsonb NOT NULL,
               labels jsonb NOT NULL, created timestamptz NOT NULL, updated timestamptz NOT NULL)""",
        "CREATE INDEX flows_name ON flows (name)",
        "CREATE INDEX flows_tags ON flows USING gin (tags)",
    ]),
]
