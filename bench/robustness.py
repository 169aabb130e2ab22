"""How long the service takes to answer, or recover from, what should not hurt it, against one
`runledger serve` process (reached through a TCP proxy of this script's, for the last part):

- poison requests: a command whose reply subject is not an inbox (dropped unexecuted: the time
  is that of the next ordinary request), a body just under the max payload, a name with NUL;
- a burst of 300 requests of 900 KB sent at once from another process (every one answered: ok
  or busy; the service must not be disconnected);
- a stalled Postgres (SIGSTOP of the postmaster and its backends): how long a query takes to
  answer `unavailable`, and after SIGCONT how long until queries answer ok again (embedded
  Postgres only: skipped when RUNLEDGER_DATABASE_URL names one);
- a lost connection (the real server closes it with `-ERR`, which nats-py does not reconnect
  after): how long until the process exits, and with which code.

    python bench/robustness.py [--burst 300] [--size 900000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from urllib.parse import urlsplit

from harness import bench_settings, report, role_env, servers, service_process

from runledger.infra.nats_connection import connect
from runledger.infra.settings import load_settings


class Proxy(threading.Thread):
    """A TCP proxy in a thread of its own (service_process blocks this one until ready);
    `poison()` sends the server an oversize PUB on every connection it carries."""

    def __init__(self, target: str):
        super().__init__(daemon=True)
        parts = urlsplit(target)
        self.host, self.port = parts.hostname, parts.port
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.url = ""
        self.upstreams: list[asyncio.StreamWriter] = []

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.upstreams.append(up_writer)

        async def pipe(src, dst) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(1 << 20):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        asyncio.ensure_future(pipe(reader, up_writer))
        asyncio.ensure_future(pipe(up_reader, writer))

    def poison(self) -> None:
        def send() -> None:
            for w in self.upstreams:
                w.write(b"PUB poison 999999999\r\n")
        self.loop.call_soon_threadsafe(send)


def _postgres_pids(backend_pid: int) -> list[int]:
    import psutil

    postmaster = psutil.Process(backend_pid).parent()
    return [postmaster.pid, *(c.pid for c in postmaster.children(recursive=True))]


async def _burst_client(n: int, size: int, k: int) -> None:
    """Run in a process of its own: n requests of `size` bytes at once over k connections."""
    settings = load_settings()
    conns = [await connect(settings) for _ in range(k)]
    subject = settings.command_subject("CreateWorkPool")

    def body(i: int) -> bytes:
        template = {"job_configuration": {"command": f"{i}-" + "x" * max(0, size - 200)}, "variables": {"properties": {}}}
        return json.dumps({"name": f"burst-{i}", "type": "process", "base_job_template": template}).encode()

    bodies = [body(i) for i in range(n)]
    started = time.perf_counter()
    last = 0.0

    async def one(i: int) -> str:
        nonlocal last
        try:
            out = json.loads((await conns[i % k].request(subject, bodies[i], timeout=120)).data)
            code = "ok" if out["ok"] else out["error"]["code"]
        except Exception as e:
            code = type(e).__name__
        last = max(last, time.perf_counter() - started)
        return code

    codes: dict[str, int] = {}
    for code in await asyncio.gather(*(one(i) for i in range(n))):
        codes[code] = codes.get(code, 0) + 1
    print(json.dumps({"codes": codes, "seconds": round(last, 2)}))


async def run(args) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    with servers() as urls:
        settings = bench_settings(urls)
        client_settings = bench_settings(urls, role="client")
        proxy = Proxy(settings.nats_url)
        proxy.start()
        proxy.ready.wait(10)
        with service_process(settings.model_copy(update={"nats_url": proxy.url})) as proc:
            nc = await connect(client_settings)

            async def timed(subject: str, body: bytes, timeout: float = 60) -> tuple[float, dict]:
                t = time.perf_counter()
                out = json.loads((await nc.request(subject, body, timeout=timeout)).data)
                return time.perf_counter() - t, out

            cmd, qry = settings.command_subject, settings.query_subject
            _, created = await timed(cmd("CreateWorkPool"), b'{"name": "steady", "type": "process"}')

            # -- poison requests
            await nc.publish(cmd("UpdateWorkPool"), b'{"name": "steady", "description": "evil"}',
                             reply=f"{settings.namespace}.evt.work_pool.x.WorkPoolUpdated")
            secs, out = await timed(qry("GetWorkPool"), json.dumps({"name": "steady", "min_seq": created["seq"]}).encode())
            dropped = out["ok"] and out["result"]["description"] != "evil"
            rows.append(("bad reply subject: dropped; next request answered in", f"{secs * 1000:.1f} ms"
                         + ("" if dropped else " (NOT dropped)"), "dropped, unexecuted"))
            big = json.dumps({"name": "big", "type": "process", "description": "x" * (nc.max_payload - 300)}).encode()
            secs, out = await timed(cmd("CreateWorkPool"), big)
            rows.append(("body just under max payload: answered in", f"{secs * 1000:.1f} ms ({out.get('error', {}).get('code', 'ok')})", "one reply"))
            secs, out = await timed(cmd("CreateWorkPool"), b'{"name": "nul\\u0000", "type": "process"}')
            rows.append(("name with NUL: answered in", f"{secs * 1000:.1f} ms ({out.get('error', {}).get('code', 'ok')})", "invalid"))

            # -- a burst
            env = dict(os.environ, RUNLEDGER_NATS_URL=settings.nats_url, RUNLEDGER_NAMESPACE=settings.namespace,
                       RUNLEDGER_DATABASE_URL=settings.database_url.get_secret_value(), **role_env(client_settings))
            burst = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--burst-client", str(args.burst), str(args.size), "6", env=env,
                stdout=asyncio.subprocess.PIPE)
            result = json.loads((await asyncio.wait_for(burst.communicate(), 300))[0])
            secs, out = await timed(qry("CountWorkPools"), b"{}")
            rows.append((f"burst of {args.burst} x {args.size // 1000} KB: last reply after",
                         f"{result['seconds']:.1f} s; {result['codes']}", "every request one reply"))
            rows.append(("after the burst, a query answered in", f"{secs * 1000:.1f} ms", "no disconnect"))

            # -- a stalled Postgres
            if os.environ.get("RUNLEDGER_DATABASE_URL"):
                rows.append(("stalled Postgres", "skipped (not embedded)", ""))
            else:
                import asyncpg

                url = settings.database_url.get_secret_value().replace("postgresql+asyncpg://", "postgresql://")
                conn = await asyncpg.connect(url)
                pids = _postgres_pids(await conn.fetchval("SELECT pg_backend_pid()"))
                await conn.close()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):  # our own backend, gone with its connection
                        os.kill(pid, signal.SIGSTOP)
                try:
                    secs, out = await timed(qry("ListWorkPools"), b"{}", timeout=30)
                    rows.append(("Postgres SIGSTOPped: a query answered in", f"{secs:.2f} s ({out.get('error', {}).get('code', 'ok')})", "unavailable, within the request timeout"))
                finally:
                    for pid in pids:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGCONT)
                t = time.perf_counter()
                while True:
                    _, out = await timed(qry("ListWorkPools"), b"{}", timeout=30)
                    if out["ok"] or time.perf_counter() - t > 60:
                        break
                    await asyncio.sleep(0.1)
                rows.append(("after SIGCONT, queries answer ok again after", f"{time.perf_counter() - t:.2f} s", "seconds"))

            # -- a lost connection
            t = time.perf_counter()
            proxy.poison()
            while proc.poll() is None and time.perf_counter() - t < 60:
                await asyncio.sleep(0.05)
            code = proc.poll()
            rows.append(("connection closed for good: the process exits after",
                         f"{time.perf_counter() - t:.2f} s (exit code {code})", "seconds, non-zero"))
            await nc.close()
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--burst-client":
        asyncio.run(_burst_client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--size", type=int, default=900_000)
    args = parser.parse_args()
    report("Robustness: poison requests, a burst, a stalled database, a lost connection", asyncio.run(run(args)))


if __name__ == "__main__":
    main()
