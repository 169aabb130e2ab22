"""The read-model tables and their versioned migrations.

No uniqueness constraints on names here: the write model guarantees them, and a projection
must be able to apply any valid history (a swap of two names inside one batch included).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    Interval,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.schema import CreateIndex, CreateTable

from runledger.infra.database import Migration

metadata = MetaData()

projection_checkpoints = Table(
    "projection_checkpoints", metadata,
    Column("name", Text, primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
    # The event types the projection handled when it was last bound (null: bound by a version
    # before this column): one that handles more now rebuilds if the log holds those below its
    # checkpoint (projections/runner.py, `_bind`).
    Column("handles", ARRAY(Text)),
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
    Column("filter", JSONB),  # Prefect's deprecated tag-based queue filter (JSON null: none)
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

# One row per deployment: `Deployment` (commands/deployments.py) column for column; its
# schedules are part of it. Queue and pool names are read from `work_queues` at query time.
deployments = Table(
    "deployments", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
    Column("name", Text, nullable=False),
    Column("flow_id", UUID(as_uuid=True), nullable=False),
    Column("version", Text),
    Column("description", Text),
    Column("paused", Boolean, nullable=False),
    Column("schedules", JSONB, nullable=False),
    Column("concurrency_limit", Integer),
    Column("concurrency_options", JSONB),
    Column("job_variables", JSONB, nullable=False),
    Column("parameters", JSONB, nullable=False),
    Column("parameter_openapi_schema", JSONB),
    Column("enforce_parameter_schema", Boolean, nullable=False),
    Column("pull_steps", JSONB),
    Column("tags", JSONB, nullable=False),
    Column("labels", JSONB, nullable=False),
    Column("work_queue_name", Text),
    Column("work_queue_id", UUID(as_uuid=True)),
    Column("work_pool_name", Text),
    Column("path", Text),
    Column("entrypoint", Text),
    Column("storage_document_id", UUID(as_uuid=True)),
    Column("infrastructure_document_id", UUID(as_uuid=True)),
    Column("last_polled", DateTime(timezone=True)),
    Column("status", Text, nullable=False),
    Column("created_by", JSONB),
    Column("updated_by", JSONB),
    Index("deployments_flow_name", "flow_id", "name"),
    Index("deployments_name", "name"),
    Index("deployments_work_queue", "work_queue_id"),
    # Whether a poll readies a deployment (`any_not_ready_on`, at every poll): the few not READY
    # of its queues, not every deployment on them.
    Index("deployments_not_ready_by_queue", "work_queue_id", postgresql_where=text("status <> 'READY'")),
    Index("deployments_tags", "tags", postgresql_using="gin"),
)

# One row per deleted deployment, written by the deployments projector with its deletion: the
# foreman's sweep of the runs a deleted deployment left (handlers/foreman.py) asks for those
# deployments alone. "Not in `deployments`" also matched every deployment a run names that
# never existed (a plain create may name any id), and those runs, kept for ever, came back
# first at every pass. Ids are never reused, so a tombstone is never taken back.
deleted_deployments = Table(
    "deleted_deployments", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("deleted", DateTime(timezone=True), nullable=False),
)

variables = Table(
    "variables", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False),
    Column("value", JSONB),  # any JSON, null included
    Column("tags", JSONB, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)

concurrency_limits = Table(
    "concurrency_limits", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False),
    Column("limit", Integer, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("active_slots", Integer, nullable=False),
    Column("denied_slots", Integer, nullable=False),
    Column("slot_decay_per_second", Float, nullable=False),
    Column("avg_slot_occupancy_seconds", Float, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)

# One row per task tag concurrency limit: `TagConcurrencyLimit`
# (commands/tag_concurrency_limits.py), the runs holding its slots as a JSON list of ids.
tag_concurrency_limits = Table(
    "tag_concurrency_limits", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
    Column("tag", Text, nullable=False),
    Column("concurrency_limit", Integer, nullable=False),
    Column("active_slots", JSONB, nullable=False),
    Index("tag_concurrency_limits_tag", "tag"),
)

# One row per flow run: `FlowRun` (commands/flow_runs.py) column for column, its current
# state included. Queue and pool names are read from `work_queues` at query time.
flow_runs = Table(
    "flow_runs", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
    Column("name", Text, nullable=False),
    Column("flow_id", UUID(as_uuid=True), nullable=False),
    Column("state_id", UUID(as_uuid=True)),
    Column("deployment_id", UUID(as_uuid=True)),
    Column("deployment_version", Text),
    Column("work_queue_name", Text),
    Column("work_queue_id", UUID(as_uuid=True)),
    Column("flow_version", Text),
    Column("parameters", JSONB, nullable=False),
    Column("idempotency_key", Text),
    Column("context", JSONB, nullable=False),
    Column("empirical_policy", JSONB, nullable=False),
    Column("tags", JSONB, nullable=False),
    Column("labels", JSONB, nullable=False),
    Column("parent_task_run_id", UUID(as_uuid=True)),
    Column("state_type", Text),
    Column("state_name", Text),
    Column("run_count", Integer, nullable=False),
    Column("expected_start_time", DateTime(timezone=True)),
    Column("next_scheduled_start_time", DateTime(timezone=True)),
    Column("start_time", DateTime(timezone=True)),
    Column("end_time", DateTime(timezone=True)),
    Column("total_run_time", Interval, nullable=False),
    Column("auto_scheduled", Boolean, nullable=False),
    Column("infrastructure_document_id", UUID(as_uuid=True)),
    Column("infrastructure_pid", Text),
    Column("created_by", JSONB),
    Column("job_variables", JSONB, nullable=False),
    Column("state", JSONB),
    Column("priority", Integer, nullable=False),
    Column("waiting_reason", Text),
    Column("worker_name", Text),
    Column("deployment_lease_expired", Boolean, nullable=False, server_default=text("false")),
    Column("pool_slot_reserved", Boolean, nullable=False, server_default=text("false")),
    Column("deployment_lease_expiration", DateTime(timezone=True)),
    Index("flow_runs_flow", "flow_id"),
    Index("flow_runs_deployment", "deployment_id", "state_type"),
    Index("flow_runs_queue", "work_queue_id", "state_type", "next_scheduled_start_time"),
    Index("flow_runs_state_type", "state_type"),
    Index("flow_runs_expected_start", "expected_start_time"),
    Index("flow_runs_tags", "tags", postgresql_using="gin"),
    # The poll offers first the few runs a release handed a slot to (`pool_slot_reserved`).
    Index("flow_runs_slot_reserved", "work_queue_id", postgresql_where=text("pool_slot_reserved")),
    # A queue's health counts its Late runs (`GetWorkQueueStatus`): few, however long the history.
    Index("flow_runs_late_by_queue", "work_queue_id", postgresql_where=text("state_name = 'Late'")),
    # The vacuum's candidates, oldest end first (`handlers/vacuum.py`): ended runs only.
    Index("flow_runs_ended", "end_time", "id", postgresql_where=text("end_time IS NOT NULL")),
    # The foreman's look for renewed leases that ran out: the few runs whose process renews one.
    Index("flow_runs_renewed_leases", "deployment_lease_expiration",
          postgresql_where=text("deployment_lease_expiration IS NOT NULL")),
    # The foreman's other question: which runs of deleted deployments are left to delete? The
    # runs a deployment's delete may still delete: few, however long the history.
    Index("flow_runs_deletable_by_deployment", "deployment_id", postgresql_where=text(
        "state_type = 'SCHEDULED' AND run_count = 0 AND state_name <> 'AwaitingConcurrencySlot' "
        "AND deployment_id IS NOT NULL")),
    # The foreman's question: which runs does a worker that went away still hold?
    Index("flow_runs_claimed_by_worker", "work_queue_id", "worker_name", postgresql_where=text("worker_name IS NOT NULL")),
)

# Every written state of every flow run: its history (`ListFlowRunStates`).
flow_run_states = Table(
    "flow_run_states", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("flow_run_id", UUID(as_uuid=True), nullable=False),
    Column("type", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("message", Text),
    Column("data", JSONB),
    Column("state_details", JSONB, nullable=False),
    Index("flow_run_states_run", "flow_run_id", "timestamp"),
)

# One row per worker: `Worker` (commands/workers.py) column for column.
workers = Table(
    "workers", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
    Column("name", Text, nullable=False),
    Column("work_pool_id", UUID(as_uuid=True), nullable=False),
    Column("last_heartbeat_time", DateTime(timezone=True), nullable=False),
    Column("heartbeat_interval_seconds", Integer),
    Column("status", Text, nullable=False),
    Index("workers_pool_heartbeat", "work_pool_id", "last_heartbeat_time"),
    Index("workers_online", "status", "last_heartbeat_time"),
)

# One row per task run: `TaskRun` (commands/task_runs.py) column for column, its current
# state included.
task_runs = Table(
    "task_runs", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
    Column("name", Text, nullable=False),
    Column("flow_run_id", UUID(as_uuid=True)),
    Column("task_key", Text, nullable=False),
    Column("dynamic_key", Text, nullable=False),
    Column("cache_key", Text),
    Column("cache_expiration", DateTime(timezone=True)),
    Column("task_version", Text),
    Column("empirical_policy", JSONB, nullable=False),
    Column("tags", JSONB, nullable=False),
    Column("labels", JSONB, nullable=False),
    Column("task_inputs", JSONB, nullable=False),
    Column("state_id", UUID(as_uuid=True)),
    Column("state_type", Text),
    Column("state_name", Text),
    Column("run_count", Integer, nullable=False),
    Column("flow_run_run_count", Integer, nullable=False),
    Column("expected_start_time", DateTime(timezone=True)),
    Column("next_scheduled_start_time", DateTime(timezone=True)),
    Column("start_time", DateTime(timezone=True)),
    Column("end_time", DateTime(timezone=True)),
    Column("total_run_time", Interval, nullable=False),
    Column("state", JSONB),
    Column("parameters", JSONB, nullable=False),
    Column("queued_state_id", UUID(as_uuid=True)),
    Column("task_worker_id", Text),
    Column("task_message", Text),
    Column("waiting_reason", Text),
    Index("task_runs_flow_run", "flow_run_id"),
    Index("task_runs_task_key", "task_key", "state_type"),
    Index("task_runs_state_type", "state_type"),
    Index("task_runs_expected_start", "expected_start_time"),
    Index("task_runs_start", "start_time"),
    Index("task_runs_end", "end_time"),
    Index("task_runs_tags", "tags", postgresql_using="gin"),
)

# Every written state of every task run: its history (`ListTaskRunStates`).
task_run_states = Table(
    "task_run_states", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("task_run_id", UUID(as_uuid=True), nullable=False),
    Column("type", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("message", Text),
    Column("data", JSONB),
    Column("state_details", JSONB, nullable=False),
    Index("task_run_states_run", "task_run_id", "timestamp"),
)

# Tables that hold read models (compared by `runledger verify`); the others are bookkeeping.
READ_MODEL_TABLES = [work_pools, work_queues, flows, deployments, deleted_deployments, variables, concurrency_limits,
                     flow_runs, flow_run_states, workers, task_runs, task_run_states, tag_concurrency_limits]

def ddl(table: Table) -> list[str]:
    """The statements that create `table` and its indexes, from its definition: a new table is
    written once, here, not a second time as SQL. A later change to such a table is a new
    migration of its own (ALTER ...), never an edit of the definition alone."""
    dialect = postgresql.dialect()
    return [str(CreateTable(table).compile(dialect=dialect)),
            *(str(CreateIndex(index).compile(dialect=dialect)) for index in sorted(table.indexes, key=lambda i: str(i.name)))]


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
    Migration(4, "deployments", ddl(deployments)),
    Migration(5, "variables and global concurrency limits", [
        """CREATE TABLE variables (id uuid PRIMARY KEY, name text NOT NULL, value jsonb, tags jsonb NOT NULL,
               created timestamptz NOT NULL, updated timestamptz NOT NULL)""",
        "CREATE INDEX variables_name ON variables (name)",
        "CREATE INDEX variables_tags ON variables USING gin (tags)",
        """CREATE TABLE concurrency_limits (id uuid PRIMARY KEY, name text NOT NULL, "limit" integer NOT NULL,
               active boolean NOT NULL, active_slots integer NOT NULL, denied_slots integer NOT NULL,
               slot_decay_per_second double precision NOT NULL, avg_slot_occupancy_seconds double precision NOT NULL,
               created timestamptz NOT NULL, updated timestamptz NOT NULL)""",
        "CREATE INDEX concurrency_limits_name ON concurrency_limits (name)",
    ]),
    Migration(6, "flow runs and their states", [*ddl(flow_runs), *ddl(flow_run_states)]),
    # The pool poll reads a queue's SCHEDULED runs in its order (run priority, next start,
    # id): a partial index holds only those, however long the history of finished runs.
    Migration(7, "workers, and the scheduled runs of each queue in poll order", [
        *ddl(workers),
        """CREATE INDEX flow_runs_scheduled_by_queue ON flow_runs
               (work_queue_id, priority, next_scheduled_start_time, id) WHERE state_type = 'SCHEDULED'""",
    ]),
    # Migration 6 creates flow_runs from its current definition, which has these already.
    Migration(8, "the worker that holds a flow run's claim", [
        "ALTER TABLE flow_runs ADD COLUMN IF NOT EXISTS worker_name text",
        """CREATE INDEX IF NOT EXISTS flow_runs_claimed_by_worker ON flow_runs (work_queue_id, worker_name)
               WHERE worker_name IS NOT NULL""",
    ]),
    # The task recovery sweep reads the runs still queued for a task worker: a partial index
    # holds only those, however many finished runs there are.
    Migration(9, "task runs and their states", [
        *ddl(task_runs), *ddl(task_run_states),
        """CREATE INDEX task_runs_queued ON task_runs (updated)
               WHERE state_type = 'SCHEDULED' AND queued_state_id = state_id""",
    ]),
    Migration(10, "task tag concurrency limits", ddl(tag_concurrency_limits)),
    Migration(11, "the deprecated tag-based filter of a legacy work queue", [
        "ALTER TABLE work_queues ADD COLUMN IF NOT EXISTS filter jsonb",
    ]),
    # Migration 6 creates flow_runs from its current definition, which has it already.
    Migration(12, "a flow run whose deployment slot's lease expired while it was PENDING", [
        "ALTER TABLE flow_runs ADD COLUMN IF NOT EXISTS deployment_lease_expired boolean NOT NULL DEFAULT false",
    ]),
    # Migration 6 creates flow_runs from its current definition, which has these already.
    Migration(13, "a waiting flow run handed its queue's and pool's slot by a release", [
        "ALTER TABLE flow_runs ADD COLUMN IF NOT EXISTS pool_slot_reserved boolean NOT NULL DEFAULT false",
        "CREATE INDEX IF NOT EXISTS flow_runs_slot_reserved ON flow_runs (work_queue_id) WHERE pool_slot_reserved",
    ]),
    # A batch written as one statement with its checkpoint (projections/runner.py,
    # `apply_in_one_statement`) calls it when the checkpoint is no longer below the batch:
    # the error undoes the whole statement.
    Migration(14, "a projection's batch in one statement refuses a checkpoint another runner moved", [
        """CREATE OR REPLACE FUNCTION projection_checkpoint_moved(projection text) RETURNS bigint
           LANGUAGE plpgsql AS $$
           BEGIN
             RAISE EXCEPTION 'projection %: its checkpoint moved past this batch (another runner applied it)',
               projection USING ERRCODE = 'serialization_failure';
           END $$""",
    ]),
    # Migration 6 creates flow_runs from its current definition, which has it already.
    Migration(15, "a queue's Late runs, for its health", [
        "CREATE INDEX IF NOT EXISTS flow_runs_late_by_queue ON flow_runs (work_queue_id) WHERE state_name = 'Late'",
    ]),
    # Migration 6 creates flow_runs from its current definition, which has it already.
    Migration(16, "the runs a deployment's delete may still delete, by deployment", [
        """CREATE INDEX IF NOT EXISTS flow_runs_deletable_by_deployment ON flow_runs (deployment_id)
               WHERE state_type = 'SCHEDULED' AND run_count = 0 AND state_name <> 'AwaitingConcurrencySlot'
               AND deployment_id IS NOT NULL""",
    ]),
    # The release before this one did not give these two projections the deletions of pools and
    # queues (which clear `work_queue_id` on runs and deployments), and a projection bound again
    # starts after its checkpoint: the deletions below it would never be read. So both rebuild
    # from the log, once: without a checkpoint row the runner binds at the log's start
    # (projections/runner.py, `_bind`), and saved positions are written only by a running
    # service, after the migrations. The rebuild also fills `deleted_deployments` from every
    # deletion in the log. TRUNCATE, not DELETE: as fast for a million runs as for none. On a
    # fresh database the tables are empty and there is nothing to remove.
    Migration(17, "the flow runs' and deployments' read models rebuilt from the log, with deleted deployments", [
        *ddl(deleted_deployments),
        "TRUNCATE flow_runs, flow_run_states, deployments",
        "DELETE FROM projection_checkpoints WHERE name IN ('flow_runs', 'deployments')",
        "DELETE FROM projection_failures WHERE projection IN ('flow_runs', 'deployments')",
        "DELETE FROM skipped_events WHERE projection IN ('flow_runs', 'deployments')",
    ]),
    # Migration 9 creates task_runs from its current definition, which has it already. Rows
    # written before are of runs that never recorded a wait: null is what they mean.
    Migration(18, "why a task run waits for its tags' concurrency limits", [
        "ALTER TABLE task_runs ADD COLUMN IF NOT EXISTS waiting_reason text",
    ]),
    # Migration 6 creates flow_runs from its current definition, which has these already. Rows
    # written before are of runs whose lease was never renewed: null is what they mean.
    Migration(19, "when a renewed deployment slot lease runs out", [
        "ALTER TABLE flow_runs ADD COLUMN IF NOT EXISTS deployment_lease_expiration timestamptz",
        """CREATE INDEX IF NOT EXISTS flow_runs_renewed_leases ON flow_runs (deployment_lease_expiration)
               WHERE deployment_lease_expiration IS NOT NULL""",
    ]),
    Migration(20, "the deployments not READY, by queue, for every poll", [
        "CREATE INDEX IF NOT EXISTS deployments_not_ready_by_queue ON deployments (work_queue_id) WHERE status <> 'READY'",
    ]),
    Migration(21, "the ended flow runs by their end, for the vacuum", [
        "CREATE INDEX IF NOT EXISTS flow_runs_ended ON flow_runs (end_time, id) WHERE end_time IS NOT NULL",
    ]),
    Migration(22, "the event types each projection handled when it was last bound", [
        "ALTER TABLE projection_checkpoints ADD COLUMN IF NOT EXISTS handles text[]",
    ]),
    # The column joined the table's definition after migration 9 had been written from it, so
    # a schema made in between lacks it (a fresh one has it from migration 9).
    Migration(23, "the task message a task run was queued with, for schemas made before it", [
        "ALTER TABLE task_runs ADD COLUMN IF NOT EXISTS task_message text",
    ]),
]
