"""`python burst_client.py NATS_URL SUBJECT N SIZE CONNECTIONS`: N requests of SIZE bytes
(CreateWorkPool bodies with a large job template), all sent at once over CONNECTIONS
connections from this separate process; prints one JSON line: how many replies of each code
(or the error of a request that got none), the seconds until the last one, and how often this
process's own connections were cut (a requester too slow to read its replies is cut by the
server as a slow consumer, and loses the replies on the way: not the service's doing)."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import nats


def body(i: int, size: int) -> bytes:
    template = {"job_configuration": {"command": f"{i}-" + "x" * max(0, size - 200)}, "variables": {"properties": {}}}
    return json.dumps({"name": f"burst-{i}", "type": "process", "base_job_template": template}).encode()


async def main(url: str, subject: str, n: int, size: int, k: int) -> None:
    cuts: list[str] = []

    async def on_error(e: Exception) -> None:
        cuts.append(f"{type(e).__name__}: {e}")

    async def on_disconnect() -> None:
        cuts.append("disconnected")

    conns = [await nats.connect(url, error_cb=on_error, disconnected_cb=on_disconnect) for _ in range(k)]
    bodies = [body(i, size) for i in range(n)]
    started = time.perf_counter()
    last = 0.0

    async def one(i: int) -> str:
        nonlocal last
        try:
            msg = await conns[i % k].request(subject, bodies[i], timeout=120)
            out = json.loads(msg.data)
            code = "ok" if out["ok"] else out["error"]["code"]
        except Exception as e:
            code = type(e).__name__
        last = max(last, time.perf_counter() - started)
        return code

    codes: dict[str, int] = {}
    for code in await asyncio.gather(*(one(i) for i in range(n))):
        codes[code] = codes.get(code, 0) + 1
    print(json.dumps({"codes": codes, "seconds": round(last, 2), "own_connections_cut": cuts}))
    for c in conns:
        await c.close()


if __name__ == "__main__":
    url, subject, n, size, k = sys.argv[1:6]
    asyncio.run(main(url, subject, int(n), int(size), int(k)))
