"""The task functions `bench/tasks.py` runs in its `runledger task-worker` processes. Each
records what it saw in `RL_BENCH_OUT` (one file per worker process, one line per call), so the
bench counts starts, latencies and runs made twice from outside the workers."""

from __future__ import annotations

import asyncio
import os
import time

from runledger.client.tasks import task

_out = None


def _record(*fields: object) -> None:
    global _out
    if _out is None:
        _out = open(os.path.join(os.environ["RL_BENCH_OUT"], f"{os.getpid()}.log"), "a", buffering=1)
    _out.write(" ".join(str(f) for f in fields) + "\n")


@task(key="bench.trivial")
async def trivial(label: str, sent: float) -> None:
    """Starts as soon as a worker takes it: records how long after it was submitted."""
    _record("start", label, time.time() - sent)


@task(key="bench.sleepy")
async def sleepy(label: str, seconds: float) -> str:
    _record("start", label, time.time())
    await asyncio.sleep(seconds)
    return label


@task(key="bench.chain")
async def chain(step: int, steps: int, work: float, label: str = "") -> str | None:
    """A step of a chain: works, then submits the next step; returns the next step's run id.
    Records when it started, when its work was done and when its submission was answered."""
    _record("cstart", label, step, time.time())
    await asyncio.sleep(work)
    _record("step", step, time.time())
    _record("cwork", label, step, time.time())
    if step + 1 >= steps:
        return None
    future = await chain.adelay(step + 1, steps, work, label)
    _record("csubmitted", label, step, time.time())
    return str(future.task_run_id)


@task(key="bench.tagged")
async def tagged(seconds: float) -> None:
    """Holds its tag's one slot for `seconds` (the tag-handoff figure)."""
    await asyncio.sleep(seconds)
