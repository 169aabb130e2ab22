"""No deaf process: when the service's NATS connection closes for good (nats-py does not
reconnect after a server `-ERR`, such as "maximum payload exceeded"), `runledger serve` exits
non-zero within seconds, so that a supervisor starts it again; a signal still stops it cleanly.

The service connects through a TCP proxy of the test's own; the proxy sends the real server a
PUB whose announced size is over the max payload, on the service's connection, and the real
server answers `-ERR 'Maximum Payload Violation'` and closes it, as it would for the service's
own mistake."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from urllib.parse import urlsplit

import pytest

from runledger.infra.nats_connection import connect

from .test_process_kills import ServeProcess

pytestmark = pytest.mark.timeout(120)


class Proxy:
    """Forwards TCP connections to the NATS server; `poison` sends the server an oversize PUB
    on every connection it carries."""

    def __init__(self, target: str):
        parts = urlsplit(target)
        self.host, self.port = parts.hostname, parts.port
        self.server: asyncio.AbstractServer | None = None
        self.upstreams: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.upstreams.append(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        for t in (asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))):
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    def poison(self) -> None:
        for w in self.upstreams:
            w.write(b"PUB poison 999999999\r\n")

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()


async def _answers(nc, settings) -> bool:
    try:
        msg = await nc.request(settings.query_subject("CountWorkPools"), b"{}", timeout=2)
        return json.loads(msg.data).get("ok") is True
    except Exception:
        return False


async def test_serve_exits_non_zero_when_its_connection_closes_for_good(settings, tmp_path):
    proxy = Proxy(settings.nats_url)
    via_proxy = settings.model_copy(update={"nats_url": await proxy.start()})
    serve = ServeProcess(via_proxy, "commands,queries,projections", tmp_path)
    nc = await connect(settings)
    try:
        serve.start()
        await serve.wait_ready(30)
        assert await _answers(nc, settings)

        proxy.poison()
        started = time.monotonic()
        while serve.proc.poll() is None:
            assert time.monotonic() - started < 30, f"serve still running (deaf) after 30 s:\n{serve.output()}"
            await asyncio.sleep(0.1)
        assert serve.proc.returncode == 6, serve.output()
        assert "closed for good" in serve.output(), serve.output()
        assert not await _answers(nc, settings)

        # A signal is a clean stop, not an error.
        serve.start()
        await serve.wait_ready(30)
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0, serve.output()
    finally:
        serve.kill()
        await proxy.stop()
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(settings.stream_name)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_key_value(settings.snapshot_bucket)
        await nc.close()
        from tests.conftest import cleanup_namespace

        await cleanup_namespace(settings)
