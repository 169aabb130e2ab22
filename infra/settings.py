"""Settings from the environment (prefix `RUNLEDGER_`), then the endpoint file that
`runledger up` writes, then defaults. Secrets are `SecretStr` so they never print."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, FilePath, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .broker_auth import ANALYST_JS_API, TASK_WORKER_JS_API, bound_task_worker_name
from .broker_auth import inbox_prefix as broker_inbox_prefix
from .event_loop import EventLoop

MIN_NATS_VERSION = (2, 12, 0)


def config_dir() -> Path:
    """Where `runledger up` records how to reach it (XDG config dir by default)."""
    override = os.environ.get("RUNLEDGER_CONFIG_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "runledger"


def endpoint_file() -> Path:
    return config_dir() / "endpoint.json"


class Settings(BaseSettings):
    # `populate_by_name`: a field with an alias (its old name's too) is still set by its own name.
    model_config = SettingsConfigDict(env_prefix="RUNLEDGER_", extra="ignore", populate_by_name=True)

    # One server's URL, or a cluster's, comma-separated (a client moves to another when one goes).
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    # Files must exist when the settings are read: a typo is one clear line at start-up, not
    # an error at the first TLS handshake or credentials challenge.
    nats_creds_file: FilePath | None = None
    nats_tls_ca_file: FilePath | None = None
    nats_tls_cert_file: FilePath | None = None
    nats_tls_key_file: FilePath | None = None

    database_url: SecretStr = SecretStr("postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    database_pool_size: int = 5

    # One namespace names the subjects (`<ns>.cmd.…`), the streams (`<NS>_EVENTS`) and the
    # Postgres schema, so several deployments (or test runs) share servers without meeting.
    namespace: str = Field(default="runledger", pattern=r"^[a-z][a-z0-9_]{0,40}$")

    request_timeout: float = 5.0
    query_wait_timeout: float = 5.0
    command_retries: int = 10
    # Requests handled at once per command or query subject.
    handler_concurrency: int = 64
    projection_batch_size: int = 4000
    event_duplicate_window_seconds: float = 120.0
    # How many copies of each stream and bucket runledger creates: 1 on one server (as `up`
    # runs it), 3 on a NATS cluster of three or more nodes (docs/operations.md, "A NATS
    # cluster"). A replicated stream also stages atomic batches in memory, where a
    # one-replica file stream makes a file store for each.
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # A snapshot of an aggregate's state after this many events since its last one (0: never).
    snapshot_every: int = Field(default=1000, ge=0)
    # How long the log keeps a routine record: a heartbeat of a worker already online, a poll
    # of queues already READY (only a time moved; kept at least until a newer word is sure to
    # exist). 0 keeps every one for ever. What changes a status is always kept. Its first
    # name, RUNLEDGER_HEARTBEAT_RETENTION_SECONDS, is still read.
    routine_retention_seconds: int = Field(
        default=86_400, ge=0, le=10 * 365 * 86_400,
        validation_alias=AliasChoices("RUNLEDGER_ROUTINE_RETENTION_SECONDS", "RUNLEDGER_HEARTBEAT_RETENTION_SECONDS"))

    # Inboxes: this process's own (nats-py's `inbox_prefix`; each role gets its own prefix
    # under `_INBOX.` so one role cannot read another's replies), and the prefix every reply
    # subject the service answers must start with (it never publishes a reply anywhere else).
    inbox_prefix: str = Field(default="_INBOX", pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
    reply_subject_prefix: str = Field(default="_INBOX.", pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\.$")
    # The JetStream API's subject prefix (nats-py's `prefix`): `$JS.API`, or where the analyst
    # role's account imports the service account's read API (infra/broker_auth.py).
    js_api_prefix: str = Field(default="$JS.API", pattern=r"^\$JS(\.[A-Za-z0-9_\-]+)*\.API$")
    # Every Postgres statement is cut off after this long (the request then answers
    # `unavailable`), so a stalled database never leaves a request without a reply.
    statement_timeout_seconds: float = Field(default=5.0, gt=0)
    # Connections of its own that each service process reads requests on (0: the main one).
    # The server buffers at most `max_pending` (64 MiB by default) for one connection and
    # disconnects it past that: several spread a burst of large requests over several buffers.
    request_lanes: int = Field(default=4, ge=0, le=64)
    # A single-active role (each projection; later the scheduler and clock) holds a lease with
    # this TTL (infra/leases.py): a standby takes over about this long after a holder dies.
    lease_ttl_seconds: int = Field(default=5, ge=1, le=300)
    # Task-key subjects (infra/task_queues.py): how many runs may wait on each key's scheduled
    # and retry sides; how long a worker may go without acknowledging (or extending) a run
    # before it is delivered to another worker.
    task_queue_size: int = Field(default=1000, ge=1, le=10_000_000)
    task_retry_queue_size: int = Field(default=100, ge=1, le=10_000_000)
    # Per task key, where a key needs another bound (JSON: {"key": n}).
    task_queue_sizes: dict[str, Annotated[int, Field(ge=1, le=10_000_000)]] = {}
    task_retry_queue_sizes: dict[str, Annotated[int, Field(ge=1, le=10_000_000)]] = {}
    task_ack_wait_seconds: float = Field(default=3.0, ge=0.5, le=3600)
    # A task worker keeps its runs' messages alive from a thread of its own, so an async task
    # that blocks the worker's event loop does not lose its run to another worker; it stops
    # doing so once the loop has shown no life for this long (stuck for good: its runs go to
    # other workers).
    task_worker_stuck_loop_seconds: float = Field(default=300.0, ge=1, le=86_400)
    # Task workers bound to task keys (JSON: {"name": ["key", ...]}): each name is a broker user
    # of its own, `task_worker_<name>`, that may take and report on the runs of those keys only
    # (infra/broker_auth.py). The broker configuration and the service must be given the same.
    task_worker_keys: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,30}$")],
                           Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(min_length=1)]] = {}
    # How long a deployment concurrency slot's lease lasts while its run is PENDING, for a
    # deployment whose `concurrency_options` name no `grace_period_seconds` (Prefect's
    # `initial_deployment_lease_duration`); the foreman then gives the slot back.
    deployment_slot_lease_seconds: float = Field(default=300.0, gt=0, le=86_400)
    # How long a waiting run keeps the slots a release handed it before a worker claims it;
    # the foreman then gives them back, to the next waiter if there is one.
    handed_slot_seconds: float = Field(default=30.0, gt=0, le=3_600)
    # How long a finished flow run stays in the read models after its end before the vacuum
    # (handlers/vacuum.py) deletes it, with `DeleteFlowRun`, as Prefect's `db_vacuum`; finished
    # background task runs likewise. 0 (the default, as in Prefect): never. Else at least an
    # hour, Prefect's minimum too: a run's last task reports and the foreman's clean-up of its
    # left-over task runs come well before, and a value meant in hours cannot empty the history.
    flow_run_retention_seconds: int = Field(default=0, ge=0, le=100 * 365 * 86_400)
    # A projection stopped at an event it cannot apply tries that event again this often.
    projection_stall_retry_seconds: float = Field(default=30.0, gt=0)
    # A projection that finds events of a type it now handles below its checkpoint (a rolling
    # upgrade done in the wrong order) rebuilds its read model beside the live one and swaps
    # it in (projections/rebuild.py), as `runledger rebuild` does. Off: it only says so.
    rebuild_missed_event_types: bool = True
    # The event loop of `serve`, `up` and `task-worker`: uvloop (where installed) or asyncio's
    # own (infra/event_loop.py).
    event_loop: EventLoop = "uvloop"

    @field_validator("nats_url")
    @classmethod
    def _some_server(cls, v: str) -> str:
        if not any(url.strip() for url in v.split(",")):
            raise ValueError("names no NATS server (one URL, or several comma-separated)")
        return v

    @field_validator("flow_run_retention_seconds")
    @classmethod
    def _off_or_an_hour(cls, v: int) -> int:
        if 0 < v < 3600:
            raise ValueError("must be 0 (keep finished runs for ever) or at least 3600 (an hour)")
        return v

    @field_validator("database_url", mode="before")
    @classmethod
    def _asyncpg_scheme(cls, v: Any) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if isinstance(raw, str):
            raw = re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+asyncpg://", raw)
        return raw

    @property
    def stream_name(self) -> str:
        return f"{self.namespace.upper()}_EVENTS"

    @property
    def snapshot_bucket(self) -> str:
        return f"{self.namespace.upper()}_SNAPSHOTS"

    @property
    def lease_bucket(self) -> str:
        """Leases of the single-active roles (a projection, later the scheduler and clock)."""
        return f"{self.namespace.upper()}_LEASES"

    @property
    def event_subject_prefix(self) -> str:
        return f"{self.namespace}.evt"

    def command_subject(self, name: str) -> str:
        return f"{self.namespace}.cmd.{name}"

    def query_subject(self, name: str) -> str:
        return f"{self.namespace}.qry.{name}"

    @property
    def db_schema(self) -> str:
        return self.namespace

    @property
    def nats_servers(self) -> list[str]:
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    @property
    def logs_in(self) -> bool:
        """Whether the connection to the broker logs in as someone (a user, a token, a creds
        file, or a user in a server's URL): such a user has a role's permissions, which may not
        include making or changing streams; without any, the broker has no users (a
        development broker) and the service sets its streams up itself."""
        return bool(self.nats_user or self.nats_token or self.nats_creds_file
                    or any(urlsplit(url).username for url in self.nats_servers))

    def safe_nats_url(self) -> str:
        return ",".join(redact_url(url) for url in self.nats_servers)

    def safe_database_url(self) -> str:
        return redact_url(self.database_url.get_secret_value())


def redact_url(url: str) -> str:
    """The URL without a password or token, for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        user = parts.username if parts.password else "***"
        netloc = f"{user}:***@{host}" if parts.password else f"{user}@{host}"
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


class SettingsError(ValueError):
    """Settings that cannot be used. The message names each variable and the reason, never
    the value (it may be a secret)."""


BROKER_ROLES = ("client", "analyst", "service", "task_worker")
_CREDENTIAL_VARS = ("RUNLEDGER_NATS_URL", "RUNLEDGER_NATS_USER", "RUNLEDGER_NATS_PASSWORD", "RUNLEDGER_NATS_TOKEN",
                    "RUNLEDGER_NATS_CREDS_FILE")


def role_js_api_prefix(nats_user: str | None) -> str | None:
    """The JetStream API prefix of runledger's role users in accounts of their own: the
    analyst's, the task worker's and the bound task workers' (`task_worker_<name>`); None for
    any other user, which reaches JetStream under `$JS.API`."""
    if nats_user == "analyst":
        return ANALYST_JS_API
    if nats_user == "task_worker" or bound_task_worker_name(nats_user):
        return TASK_WORKER_JS_API
    return None


def recorded_endpoint() -> dict[str, Any]:
    """What a running `runledger up` recorded in its endpoint file (empty: none, or unreadable)."""
    try:
        recorded = json.loads(endpoint_file().read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def load_settings(role: str = "client", user: str | None = None, **overrides: Any) -> Settings:
    """Environment first; where it is silent, the endpoint file of a running `runledger up`.

    `role` (client, analyst, service, task_worker; see infra/broker_auth.py) picks the broker user taken
    from the endpoint file, and the inbox prefix `_INBOX.<role>`, which that role's
    permissions allow it to receive on; `user` another user recorded there (a task worker
    bound to keys, `task_worker_<name>`), with its own inbox prefix. The environment's own
    credentials or URL win."""
    if role not in BROKER_ROLES:
        raise ValueError(f"unknown broker role {role!r}")
    recorded = recorded_endpoint()
    values: dict[str, Any] = {}
    for key in ("nats_url", "database_url", "namespace"):
        if f"RUNLEDGER_{key.upper()}" not in os.environ and key in recorded:
            values[key] = recorded[key]
    # The recorded users belong to the recorded server: not with another URL or other credentials.
    entry = (recorded.get("nats_users") or {}).get(user or role)
    from_endpoint = isinstance(entry, dict) and not any(v in os.environ for v in _CREDENTIAL_VARS)
    if isinstance(entry, dict) and from_endpoint:
        values["nats_user"], values["nats_password"] = entry.get("user"), entry.get("password")
        if entry.get("js_api_prefix") and "RUNLEDGER_JS_API_PREFIX" not in os.environ:
            values["js_api_prefix"] = entry["js_api_prefix"]
    # A role user's own JetStream prefix and inbox follow from its name when nothing says
    # otherwise, for credentials from the environment. An endpoint file's entry without a
    # prefix comes from an `up` older than the accounts of their own, where `$JS.API` is right.
    nats_user = overrides.get("nats_user") or values.get("nats_user") or os.environ.get("RUNLEDGER_NATS_USER")
    if "js_api_prefix" not in values and "RUNLEDGER_JS_API_PREFIX" not in os.environ and not from_endpoint:
        if (prefix := role_js_api_prefix(nats_user)) is not None:
            values["js_api_prefix"] = prefix
    if "RUNLEDGER_INBOX_PREFIX" not in os.environ:
        recorded_inbox = entry.get("inbox_prefix") if user and isinstance(entry, dict) else None
        connecting_as = nats_user or user
        # A bound task worker's inbox is its own, `_INBOX.task_worker_<name>`.
        own = connecting_as if connecting_as is not None and bound_task_worker_name(connecting_as) else role
        values["inbox_prefix"] = recorded_inbox or broker_inbox_prefix(own)
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as e:
        problems = [
            f"RUNLEDGER_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in e.errors(include_input=False, include_url=False)
        ]
        raise SettingsError("; ".join(problems)) from None
