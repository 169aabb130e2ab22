"""Who may do what on the broker: the one definition of runledger's roles as NATS permissions,
and the nats-server configuration built from it (for `runledger up`, for `deploy/nats.conf`
and for `runledger broker-config`).

Roles (each a NATS user with a password):

- `service`: serves `<ns>.cmd.>` and `<ns>.qry.>` (and sends its background services'
  commands there), appends to the event stream, runs the
  projections' durable consumers, reads and writes the snapshot and lease buckets. It may
  not purge or delete the event stream nor delete messages in it, nor create or update any
  stream: a stream update cannot be narrowed to harmless settings, and one shrinking the
  log's limits would have nats-server erase it (docs/security.md). At start it only checks
  its streams and buckets (infra/jetstream_setup.py `ensure_broker`).
- `admin`: makes and upgrades runledger's streams and buckets (`runledger broker-setup`;
  `runledger up` runs it before the service starts): their info, create and update, and
  nothing else (no purge or delete, no event, no key, no consumer). In the service's account,
  under `$JS.API`. Its password belongs where upgrades are run, not on the service's machine.
- `client`: sends commands and queries; receives its replies on `_INBOX.client.>`.
- `analyst`: reads the log (stream info, direct gets, consumers it names itself in the
  create subject) for `runledger events`, `replay` and `verify`; publishes nothing to the
  log or the buckets and never touches the service's consumers. It is in an account of
  its own, importing that read API under ANALYST_JS_API: JetStream answers any reply
  subject a request names, and from there no answer can be steered into the log. It may
  also send the read-only queries in ANALYST_QUERIES (`ReadEvents`: the log over the
  broker contract), each imported as a service from the service's account under its own
  subject; no other query and no command.
- `task_worker`: takes task runs from the task-key streams (creates and reads their durable
  consumers, fetches from them, acknowledges), reports their states (`SetTaskRunState`),
  submits task runs (`CreateTaskRun`, a task may start others), reads one (`GetTaskRun`) and
  the service's health (`GetServiceHealth`: the position `.result()` catches up to), hears
  that a task run finished (`<ns>.taskrun.finished.>`) or is cancelled while it runs
  (`<ns>.taskrun.cancel.>`) and that slots of a tag's limit were given back
  (`<ns>.taskrun.tagfreed.*`), and puts its heartbeat in the
  task-workers bucket. Nothing of the event log, no other command or query. It too is in an
  account of its own (TASK_WORKER_ACCOUNT), importing exactly that (`task_worker_api`,
  TASK_WORKER_COMMANDS, TASK_WORKER_QUERIES, the task-workers bucket's subjects, the finished,
  cancel and tag-freed notices as streams) from the service's account, the JetStream API under TASK_WORKER_JS_API:
  the server's answers to its requests go back to its own account, never into the log, a
  bucket or a task stream.

Everything not allowed is denied: an unauthenticated connection is refused, since the
server has users and no `no_auth_user`. Each role's inbox prefix (`_INBOX.<role>`) is its
own, so one role cannot read another's replies.

Durability: `jetstream { sync_interval: always }` makes the server fsync every write before
it acknowledges it (nats-server `server/opts.go`: `sync`/`sync_interval`, the string
`always`), so an acknowledged event survives a power cut of a one-node server."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROLES = ("service", "client", "analyst", "task_worker", "admin")
# What a task worker may send: its reports, new task runs, and the reads a `.result()` makes
# (the run; the service's health, whose stream position `catch_up` waits for).
TASK_WORKER_COMMANDS = ("CreateTaskRun", "CreateTaskRuns", "SetTaskRunState", "SetTaskRunStates")
TASK_WORKER_QUERIES = ("GetTaskRun", "GetServiceHealth", "GetTaskRunResult")
# Headers plus body of one message (nats-server counts both); the server's default, stated.
MAX_PAYLOAD = 1024 * 1024


def inbox_prefix(role: str) -> str:
    return f"_INBOX.{role}"


def env_var(role: str) -> str:
    """The environment variable a compose deployment keeps the role's password in."""
    return f"RUNLEDGER_{role.upper()}_PASSWORD"


def new_password() -> str:
    """A fresh password: letters and digits only, starting with a letter, so it reads back
    as a string whether nats-server takes it quoted or from an environment variable."""
    return "rl" + secrets.token_hex(24)


def new_credentials() -> dict[str, dict[str, str]]:
    creds = {role: {"user": role, "password": new_password()} for role in ROLES}
    _set_js_api_prefixes(creds)
    return creds


def _set_js_api_prefixes(creds: dict[str, dict[str, str]]) -> bool:
    """Give the roles in accounts of their own the prefix their account imports the service
    account's JetStream API under (Settings.js_api_prefix); True if one changed."""
    changed = False
    for role, prefix in JS_API_PREFIXES.items():
        if creds[role].get("js_api_prefix") != prefix:
            creds[role]["js_api_prefix"] = prefix
            changed = True
    return changed


@dataclass(frozen=True)
class Names:
    """The broker names of one namespace (as `Settings` derives them)."""

    namespace: str

    @property
    def stream(self) -> str:
        return f"{self.namespace.upper()}_EVENTS"

    @property
    def task_streams(self) -> tuple[str, str]:
        """The task-key streams (infra/task_queues.py): scheduled and retry sides."""
        ns = self.namespace.upper()
        return (f"{ns}_TASKS", f"{ns}_TASK_RETRIES")

    @property
    def result_stream(self) -> str:
        """Large task results, in chunks (infra/task_queues.py)."""
        return f"{self.namespace.upper()}_TASK_RESULTS"

    @property
    def buckets(self) -> tuple[str, str, str]:
        ns = self.namespace.upper()
        return (f"{ns}_SNAPSHOTS", f"{ns}_LEASES", f"{ns}_TASK_WORKERS")


def service_consumer_names() -> list[str]:
    """The durable consumers the service owns on the event stream (one per projection)."""
    # Imported late: the projections sit above infra; only the config generator needs them.
    from runledger.handlers.registry import projectors
    from runledger.projections.runner import ProjectionRunner

    return sorted(ProjectionRunner.consumer_name(p) for p in projectors())


# The analyst's JetStream API prefix (nats-py `prefix`, Settings.js_api_prefix): its account's
# imports of the service account's read API.
ANALYST_JS_API = "$JS.READ.API"
# The task worker's: its account's imports of the task streams' consumer API.
TASK_WORKER_JS_API = "$JS.TASK.API"
JS_API_PREFIXES = {"analyst": ANALYST_JS_API, "task_worker": TASK_WORKER_JS_API}
SERVICE_ACCOUNT, ANALYST_ACCOUNT, TASK_WORKER_ACCOUNT = "RUNLEDGER", "ANALYST", "TASK_WORKERS"
# Queries the analyst may send (read-only, answered from the log): imported from the service's
# account. Their replies reach the service with a reply subject the server made for the import
# (`_R_.…`, see handlers/endpoint.py), routed back to the analyst's own inbox.
ANALYST_QUERIES = ("ReadEvents",)


def analyst_query_subjects(namespace: str) -> list[str]:
    return [f"{namespace}.qry.{name}" for name in ANALYST_QUERIES]


def analyst_api(stream: str) -> list[tuple[str, str]]:
    """(subject after `$JS.API.`, response type) of each read API the analyst imports."""
    return [
        (f"STREAM.INFO.{stream}", "singleton"),
        (f"STREAM.MSG.GET.{stream}", "singleton"),
        (f"DIRECT.GET.{stream}", "stream"),  # batched direct gets answer many messages
        (f"DIRECT.GET.{stream}.>", "stream"),
        (f"CONSUMER.CREATE.{stream}.*", "singleton"),
        (f"CONSUMER.CREATE.{stream}.*.>", "singleton"),
        (f"CONSUMER.MSG.NEXT.{stream}.*", "stream"),
        (f"CONSUMER.DELETE.{stream}.*", "singleton"),
        (f"CONSUMER.INFO.{stream}.*", "singleton"),
    ]


def task_worker_api(names: Names) -> list[tuple[str, str]]:
    """(subject after `$JS.API.`, response type) of each task-stream API the task worker
    imports: what nats-py's `add_consumer` (a name and a filter subject: `CONSUMER.CREATE.
    <stream>.<name>.<filter>`), `consumer_info` and a pull subscription's `fetch` send."""
    api = []
    for s in names.task_streams:
        api += [
            (f"CONSUMER.CREATE.{s}.*.>", "singleton"),
            (f"CONSUMER.INFO.{s}.*", "singleton"),
            (f"CONSUMER.MSG.NEXT.{s}.*", "stream"),  # a pull request answers with many messages
        ]
    return api


def task_worker_services(names: Names) -> list[tuple[str, str]]:
    """(subject, response type) of every other service the task worker's account imports
    under its own name: acknowledgements of task runs, its heartbeat (a JetStream publish,
    answered with one PubAck), its commands and queries (one reply each)."""
    ns = names.namespace
    return [
        # A delivered run's reply subject is `$JS.ACK.<stream>.<consumer>.…`; the server keeps it
        # as it is across the import, so the acknowledgement is sent there and imported as is.
        *((f"$JS.ACK.{s}.>", "singleton") for s in names.task_streams),
        (f"$KV.{names.buckets[2]}.>", "singleton"),
        (f"{ns}.result.>", "singleton"),  # a large result's chunks (a JetStream publish each)
        *((f"{ns}.cmd.{c}", "singleton") for c in TASK_WORKER_COMMANDS),
        *((f"{ns}.qry.{q}", "singleton") for q in TASK_WORKER_QUERIES),
    ]


def finished_subject(namespace: str) -> str:
    """Where the service announces finished task runs (core NATS; client/tasks.py)."""
    return f"{namespace}.taskrun.finished.>"


def cancel_subject(namespace: str, encoded_task_key: str = "*") -> str:
    """Where the service announces that a task run of a key is cancelled (core NATS; heard by
    the task workers of the key, handlers/task_worker.py): `<ns>.taskrun.cancel.<encoded
    task key>.<task run id>`. This pattern: every run of one key (`*`: of every key)."""
    return f"{namespace}.taskrun.cancel.{encoded_task_key}.*"


def tag_freed_subject(namespace: str) -> str:
    """Where the service announces that slots of a tag's concurrency limit were given back
    (core NATS; heard by every task worker, handlers/task_worker.py, which proposes the runs
    waiting for the tag again): `<ns>.taskrun.tagfreed.<encoded tag>`, every tag. Only the
    service publishes there: a forged notice could only make waiting runs ask again early."""
    return f"{namespace}.taskrun.tagfreed.*"


# Task workers bound to task keys (Settings.task_worker_keys): each name a user of its own in
# the task worker's account, `task_worker_<name>`, that may take, acknowledge and report on the
# runs of its keys only (the service checks its reports: see `bound_task_worker_name`).
BOUND_TASK_WORKER_PREFIX = "task_worker_"


def bound_task_worker_user(name: str) -> str:
    return f"{BOUND_TASK_WORKER_PREFIX}{name}"


def bound_task_worker_name(user: str | None) -> str | None:
    """The name a bound task worker's broker user stands for (None: not one)."""
    if user is None or not user.startswith(BOUND_TASK_WORKER_PREFIX):
        return None
    return user[len(BOUND_TASK_WORKER_PREFIX):]


def bound_task_worker_permissions(namespace: str, user: str, task_keys: Sequence[str]) -> dict:
    """The task worker's permissions narrowed to `task_keys`: the durable consumers of those
    keys only (create, info, pull, acknowledge), their cancel notices, the tag-freed notices
    (of every tag: a run of its keys may carry any), its heartbeats under
    its own name in the task-workers bucket, its own inbox; the same commands and queries (the
    service refuses its reports on other keys' runs)."""
    from runledger.commands.task_keys import encode_task_key

    from .task_queues import consumer_name  # the one definition of a key's consumer names

    n = Names(namespace)
    pub: list[str] = []
    for key in task_keys:
        for stream, side in zip(n.task_streams, ("scheduled", "retry"), strict=True):
            consumer = consumer_name(key, side)  # type: ignore[arg-type]
            pub += [f"{TASK_WORKER_JS_API}.CONSUMER.CREATE.{stream}.{consumer}.>",
                    f"{TASK_WORKER_JS_API}.CONSUMER.INFO.{stream}.{consumer}",
                    f"{TASK_WORKER_JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
                    f"$JS.ACK.{stream}.{consumer}.>"]
    pub += [f"$KV.{n.buckets[2]}.{user}.>", f"{namespace}.result.>",
            *(f"{namespace}.cmd.{c}" for c in TASK_WORKER_COMMANDS),
            *(f"{namespace}.qry.{q}" for q in TASK_WORKER_QUERIES)]
    return {"publish": {"allow": pub},
            "subscribe": {"allow": [f"{inbox_prefix(user)}.>", finished_subject(namespace),
                                    *(cancel_subject(namespace, encode_task_key(k)) for k in task_keys),
                                    tag_freed_subject(namespace)]}}


def role_permissions(namespace: str, service_consumers: Sequence[str]) -> dict[str, dict]:
    """NATS `permissions` per role. Subjects in allow lists are the only ones a role may use."""
    n = Names(namespace)
    ns, stream = namespace, n.stream
    api = "$JS.API"
    kv_streams = [f"KV_{b}" for b in n.buckets]
    own_streams = [stream, *kv_streams, *n.task_streams, n.result_stream]

    service_pub = [
        f"{ns}.evt.>", f"{ns}.idem.>",  # appends (single messages and atomic batches)
        f"{ns}.task.>",  # task runs onto their key's subjects
        f"{ns}.cmd.>",  # its background services' commands (scheduler, clock, foreman, poll records)
        finished_subject(ns),  # a task run reached a final state (heard by `.result()`)
        cancel_subject(ns),  # a task run is cancelled (heard by the task workers of its key)
        tag_freed_subject(ns),  # a tag's slots were given back (heard by the task workers)
        *(f"$KV.{b}.>" for b in n.buckets),  # snapshot and lease keys: put, create, update, delete
        "_INBOX.>",  # replies to requests (the service only answers under reply_subject_prefix)
        "_R_.>",  # replies to the queries and commands other accounts import (see nats_config)
        f"{api}.INFO",
    ]
    for s in own_streams:
        service_pub += [
            f"{api}.STREAM.INFO.{s}",
            f"{api}.STREAM.MSG.GET.{s}", f"{api}.DIRECT.GET.{s}", f"{api}.DIRECT.GET.{s}.>",
            f"{api}.CONSUMER.CREATE.{s}", f"{api}.CONSUMER.CREATE.{s}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{s}.>", f"{api}.CONSUMER.DELETE.{s}.>",
            f"{api}.CONSUMER.INFO.{s}.>", f"{api}.CONSUMER.MSG.NEXT.{s}.>",
            f"$JS.ACK.{s}.>", f"$JS.FC.{s}.>",
        ]
    for s in kv_streams:  # a bucket's own upkeep (purging deleted keys)
        service_pub += [f"{api}.STREAM.PURGE.{s}", f"{api}.STREAM.MSG.DELETE.{s}"]

    # The admin makes and upgrades the streams and buckets (`runledger broker-setup`): what
    # nats-py's `stream_info`, `add_stream`, `update_stream`, `key_value` and `create_key_value`
    # send (the last may ask for the account's info), and nothing else.
    admin_pub = [f"{api}.INFO"]
    for s in own_streams:
        admin_pub += [f"{api}.STREAM.INFO.{s}", f"{api}.STREAM.CREATE.{s}", f"{api}.STREAM.UPDATE.{s}"]

    # The analyst lives in an account of its own and reaches the event stream's read API only
    # through imports (`analyst_api`), under ANALYST_JS_API: the server then answers on a reply
    # subject of the analyst's account, never one it names in the service's. It may create
    # only consumers named in the subject (new-style create), so the service's durable
    # consumers can be denied by name: the legacy ephemeral subject (`CONSUMER.CREATE.<stream>`,
    # name in the body) would let it update one of them.
    read = ANALYST_JS_API
    analyst_pub = [f"{read}.{suffix}" for suffix, _ in analyst_api(stream)] + analyst_query_subjects(ns)
    analyst_deny = []
    for c in service_consumers:
        analyst_deny += [
            f"{read}.CONSUMER.CREATE.{stream}.{c}", f"{read}.CONSUMER.CREATE.{stream}.{c}.>",
            f"{read}.CONSUMER.MSG.NEXT.{stream}.{c}", f"{read}.CONSUMER.DELETE.{stream}.{c}",
        ]

    # The task worker too has an account of its own: its JetStream API (the task streams'
    # consumers) under TASK_WORKER_JS_API, everything else under the service's subjects; each
    # an import, so that what the server answers comes back to its account.
    task_worker_pub = [f"{TASK_WORKER_JS_API}.{suffix}" for suffix, _ in task_worker_api(n)]
    task_worker_pub += [subject for subject, _ in task_worker_services(n)]

    return {
        "service": {
            "publish": {"allow": service_pub, "deny": [
                f"{api}.STREAM.PURGE.{stream}", f"{api}.STREAM.DELETE.{stream}", f"{api}.STREAM.MSG.DELETE.{stream}",
            ]},
            "subscribe": {"allow": [f"{ns}.cmd.>", f"{ns}.qry.>", f"{inbox_prefix('service')}.>"]},
        },
        "client": {
            "publish": {"allow": [f"{ns}.cmd.>", f"{ns}.qry.>"]},
            "subscribe": {"allow": [f"{inbox_prefix('client')}.>", finished_subject(ns)]},
        },
        "task_worker": {
            "publish": {"allow": task_worker_pub},
            "subscribe": {"allow": [f"{inbox_prefix('task_worker')}.>", finished_subject(ns), cancel_subject(ns),
                                    tag_freed_subject(ns)]},
        },
        "analyst": {
            "publish": {"allow": analyst_pub, "deny": analyst_deny},
            "subscribe": {"allow": [f"{inbox_prefix('analyst')}.>"]},
        },
        "admin": {
            "publish": {"allow": admin_pub},
            "subscribe": {"allow": [f"{inbox_prefix('admin')}.>"]},
        },
    }


class EnvRef(str):
    """`$NAME`: an environment variable nats-server resolves when it reads the file."""


def _value(v) -> str:
    if isinstance(v, EnvRef):
        return v  # unquoted: a quoted `$NAME` would be taken literally
    return json.dumps(v)


# The user the nodes of a cluster log in to each other's route port as; its password is in
# the environment as ROUTE_PASSWORD_VAR, the same on every node.
ROUTE_USER = "route"
ROUTE_PASSWORD_VAR = "RUNLEDGER_ROUTE_PASSWORD"


@dataclass(frozen=True)
class ClusterNode:
    """One node's place in a NATS cluster: its own name, where it listens for the other
    nodes, and their route addresses (`host:port`). Routes are authenticated: a node that
    cannot log in is refused, so nobody who merely reaches the route port joins the cluster
    and sees its messages."""

    server_name: str
    routes: Sequence[str]
    route_password: str
    listen: str = "0.0.0.0:6222"
    cluster_name: str = "runledger"
    # The routes' TLS, each node proving itself to the others (cert, key, CA): the routes carry
    # every account's messages, so across machines they go encrypted.
    tls: RouteTLS | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", self.server_name):
            raise ValueError(f"not a server name (letters, digits, _ and -): {self.server_name!r}")
        for route in self.routes:
            if not re.fullmatch(r"(nats-route://|nats://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}", route):
                raise ValueError(f"not a route address (host:port): {route!r}")
        if not self.route_password:
            raise ValueError(f"no route password: set {ROUTE_PASSWORD_VAR}, the same on every node")

    def block(self, password: str | EnvRef) -> dict:
        """The `cluster` block. `password`: what the node checks (an `EnvRef` keeps it out of
        the file); the routes carry `route_password` itself (a URL cannot name a variable)."""
        secret = quote(self.route_password, safe="")
        urls = [f"nats://{ROUTE_USER}:{secret}@{route.split('://')[-1]}" for route in self.routes]
        block: dict[str, Any] = {"name": self.cluster_name, "listen": self.listen}
        if self.tls is not None:
            block["tls"] = {"cert_file": str(self.tls.cert_file), "key_file": str(self.tls.key_file),
                            "ca_file": str(self.tls.ca_file), "verify": True}
        return {**block, "authorization": {"user": ROUTE_USER, "password": password}, "routes": urls}


@dataclass(frozen=True)
class RouteTLS:
    """A cluster node's certificate and key for its routes, and the CA it trusts the other
    nodes' certificates from (each node verifies the other's)."""

    cert_file: str
    key_file: str
    ca_file: str


def _block(d: Mapping, indent: int) -> list[str]:
    pad = "  " * indent
    out = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out += [f"{pad}{k} {{", *_block(v, indent + 1), f"{pad}}}"]
        elif isinstance(v, list | tuple):
            out.append(f"{pad}{k}: [")
            out += [f"{pad}  {_value(x)}" for x in v]
            out.append(f"{pad}]")
        else:
            out.append(f"{pad}{k}: {_value(v)}")
    return out


def nats_config(namespace: str, passwords: Mapping[str, str], store_dir: str, *,
                listen: str | None = None, host: str | None = None, http_port: int | None = None,
                http: str | None = None, service_consumers: Sequence[str] | None = None, sync_always: bool = True,
                task_worker_keys: Mapping[str, Sequence[str]] | None = None,
                cluster: ClusterNode | None = None, cluster_password: str | EnvRef | None = None) -> str:
    """nats-server configuration text for one namespace. `passwords`: per role (and per bound
    task worker's user, `bound_task_worker_user`), a literal password or an `EnvRef`
    (`$ENV_VAR`, resolved by nats-server from its environment). `listen` (host:port) or
    `host`, `http_port`: the command line may set them instead; `http` (host:port): the
    monitoring endpoint on that interface alone (`http_port` alone listens on every one,
    unauthenticated: `/connz?auth=1` names the users). `task_worker_keys`: the task
    workers bound to keys (Settings.task_worker_keys). `cluster`: this node's place in a
    cluster (`cluster_password`: what it checks, by default the route password itself)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", namespace):  # as Settings.namespace
        raise ValueError(f"not a runledger namespace: {namespace!r}")
    bound = {bound_task_worker_user(name): list(keys) for name, keys in (task_worker_keys or {}).items()}
    missing = (set(ROLES) | set(bound)) - set(passwords)
    if missing:
        raise ValueError(f"no password for role(s) or user(s) {', '.join(sorted(missing))}")
    consumers = service_consumer_names() if service_consumers is None else list(service_consumers)
    perms = role_permissions(namespace, consumers)
    top: dict = {}
    if listen:
        top["listen"] = listen
    elif host:
        top["host"] = host
    if http:
        top["http"] = http
    elif http_port:
        top["http_port"] = http_port
    top["max_payload"] = MAX_PAYLOAD
    if cluster is not None:
        top["server_name"] = cluster.server_name
        top["cluster"] = cluster.block(cluster.route_password if cluster_password is None else cluster_password)
    head = [
        f"# nats-server configuration for runledger namespace {namespace!r}, generated by",
        "# runledger.infra.broker_auth (`runledger broker-config`). Roles and permissions are",
        "# defined there; regenerate rather than edit.",
    ]
    lines = head + _block(top, 0)
    # `sync_always=False` (nats-server's default: a sync every 2 minutes) exists only so that
    # the benchmarks can measure what syncing costs; nothing a user runs turns it off.
    sync = ["  sync_interval: always"] if sync_always else []
    lines += ["", "# Every write is synced to disk before it is acknowledged." if sync_always else
              "# NOT durable: writes are synced every 2 minutes (benchmarks only).", "jetstream {",
              f"  store_dir: {json.dumps(store_dir)}", *sync, "}", ""]

    def users(roles: Sequence[str]) -> list[str]:
        out = ["    users: ["]
        for role in roles:
            user = {"user": role, "password": passwords[role], "permissions":
                    perms[role] if role in perms else bound_task_worker_permissions(namespace, role, bound[role])}
            out += ["      {", *_block(user, 4), "      }"]
        return out + ["    ]"]

    n = Names(namespace)
    # What the service's account exports (subject: response type, accounts) and what each other
    # account imports (subject in the service's account, the subject it has in the importer's).
    exports: dict[str, tuple[str, list[str]]] = {}
    imports: dict[str, list[str]] = {ANALYST_ACCOUNT: [], TASK_WORKER_ACCOUNT: []}

    def service(account: str, subject: str, kind: str, to: str | None = None) -> None:
        exports.setdefault(subject, (kind, []))[1].append(account)
        rename = f", to: {json.dumps(to)}" if to and to != subject else ""
        # The task worker's commands carry who sent them (the `Nats-Request-Info` header, with
        # the user: the server sets it, replacing any the sender wrote), so that the service
        # holds a bound task worker to its keys.
        share = ", share: true" if account == TASK_WORKER_ACCOUNT and ".cmd." in subject else ""
        imports[account].append(f'      {{service: {{account: {json.dumps(SERVICE_ACCOUNT)}, '
                                f'subject: {json.dumps(subject)}}}{rename}{share}}}')

    for sub, kind in analyst_api(n.stream):
        service(ANALYST_ACCOUNT, "$JS.API." + sub, kind, f"{ANALYST_JS_API}.{sub}")
    for subject in analyst_query_subjects(namespace):  # one reply each, as every query
        service(ANALYST_ACCOUNT, subject, "singleton")
    for sub, kind in task_worker_api(n):
        service(TASK_WORKER_ACCOUNT, "$JS.API." + sub, kind, f"{TASK_WORKER_JS_API}.{sub}")
    for subject, kind in task_worker_services(n):
        service(TASK_WORKER_ACCOUNT, subject, kind)
    export_lines = [f'      {{service: {json.dumps(subject)}, response_type: {kind}, '
                    f'accounts: {json.dumps(accounts).replace(",", ", ")}}}'
                    for subject, (kind, accounts) in exports.items()]
    # The notices of finished and of cancelled task runs, and of freed tag slots: plain messages
    # the service publishes, heard there too.
    for notices in (finished_subject(namespace), cancel_subject(namespace), tag_freed_subject(namespace)):
        export_lines.append(f'      {{stream: {json.dumps(notices)}, accounts: [{json.dumps(TASK_WORKER_ACCOUNT)}]}}')
        imports[TASK_WORKER_ACCOUNT].append(f'      {{stream: {{account: {json.dumps(SERVICE_ACCOUNT)}, '
                                            f'subject: {json.dumps(notices)}}}}}')
    lines += [
        "# The service and its clients share an account, the one with JetStream. The analyst and",
        "# the task worker have accounts of their own and reach the service's only through",
        "# imports, so that the server's answers to their requests come back on their own subjects.",
        "accounts {",
        f"  {SERVICE_ACCOUNT} {{", "    jetstream: enabled", *users(["service", "client", "admin"]),
        "    exports: [", *export_lines, "    ]", "  }",
        f"  {ANALYST_ACCOUNT} {{", *users(["analyst"]), "    imports: [", *imports[ANALYST_ACCOUNT], "    ]", "  }",
        f"  {TASK_WORKER_ACCOUNT} {{", *users(["task_worker", *bound]),
        "    imports: [", *imports[TASK_WORKER_ACCOUNT], "    ]", "  }",
        "}", "",
    ]
    return "\n".join(lines)


def env_references(task_worker_keys: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    users = [*ROLES, *(bound_task_worker_user(name) for name in task_worker_keys or {})]
    return {user: EnvRef(f"${env_var(user)}") for user in users}


def dotenv(credentials: Mapping[str, Mapping[str, str]] | None = None,
           task_worker_keys: Mapping[str, Sequence[str]] | None = None) -> str:
    """Fresh passwords as a `.env` file for docker compose."""
    creds = dict(credentials or new_credentials())
    users = [*ROLES, *(bound_task_worker_user(name) for name in task_worker_keys or {})]
    for user in users:
        creds.setdefault(user, {"user": user, "password": new_password()})
    return ("".join(f"{env_var(user)}={creds[user]['password']}\n" for user in users)
            + f"{ROUTE_PASSWORD_VAR}={new_password()}\n")  # a cluster's nodes log in to each other with it


def write_private(path, text: str) -> None:
    """Write `text` to `path`, readable by the owner only from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT


def local_credentials(data_dir, task_worker_keys: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict[str, Any]]:
    """The role credentials of a `runledger up` data directory: made once, kept in
    `<data_dir>/credentials.json` (mode 0600); with those of the task workers bound to keys
    (`task_worker_keys`), each under its user's name (`bound_task_worker_user`), with its keys,
    inbox prefix and JetStream API prefix: what `load_settings(user=...)` needs."""
    path = Path(data_dir) / "credentials.json"
    try:
        creds = json.loads(path.read_text())
    except (OSError, ValueError):
        creds = {}
    if not isinstance(creds, dict) or not all(isinstance(creds.get(r), dict) for r in creds):
        creds = {}
    fresh = new_credentials()
    missing = [r for r in ROLES if not creds.get(r, {}).get("password")]
    # A role added since the directory was made gets its password; the others keep theirs
    # (and get the JetStream API prefix of a role moved to an account of its own since).
    kept_bound = {u: c for u, c in creds.items() if bound_task_worker_name(u) is not None and isinstance(c, dict)}
    creds = {**fresh, **{r: creds[r] for r in ROLES if r not in missing}}
    changed = bool(missing)
    for name, keys in (task_worker_keys or {}).items():
        user = bound_task_worker_user(name)
        entry = {"user": user, "password": kept_bound.get(user, {}).get("password") or new_password(),
                 "js_api_prefix": TASK_WORKER_JS_API, "inbox_prefix": inbox_prefix(user), "task_keys": list(keys)}
        changed = changed or kept_bound.get(user) != entry
        creds[user] = entry
    changed = changed or set(kept_bound) - set(creds) != set()  # a name no longer bound: forgotten
    if _set_js_api_prefixes(creds) or changed:
        write_private(path, json.dumps(creds, indent=2))
    return creds


def write_local_config(data_dir, namespace: str, creds: Mapping[str, Mapping[str, Any]], store_dir,
                       sync_always: bool = True, cluster: ClusterNode | None = None) -> Path:
    """`<data_dir>/nats.conf` (mode 0600) for `runledger up`; returns its path. The task workers
    bound to keys are those `creds` holds (`local_credentials`)."""
    path = Path(data_dir) / "nats.conf"
    bound = {name: creds[user]["task_keys"] for user in creds if (name := bound_task_worker_name(user)) is not None}
    passwords = {u: creds[u]["password"] for u in [*ROLES, *(bound_task_worker_user(n) for n in bound)]}
    # 127.0.0.1 here too, not only on up's command line: the file alone never opens the broker wider.
    write_private(path, nats_config(namespace, passwords, str(store_dir), host="127.0.0.1",
                                    sync_always=sync_always, task_worker_keys=bound, cluster=cluster))
    return path


def compose_config(namespace: str = "runledger", task_worker_keys: Mapping[str, Sequence[str]] | None = None,
                   cluster: ClusterNode | None = None) -> str:
    """The configuration of `deploy/nats.conf`: passwords from the server's environment,
    listening on all interfaces of its container, monitoring on 8222 of the container's own
    loopback (its health check; nothing outside it reaches it), the store on /data.
    With `cluster`, one node's: the password it checks on its route port from its
    environment too."""
    return nats_config(namespace, env_references(task_worker_keys), "/data", listen="0.0.0.0:4222", http="127.0.0.1:8222",
                       task_worker_keys=task_worker_keys, cluster=cluster,
                       cluster_password=EnvRef(f"${ROUTE_PASSWORD_VAR}"))
