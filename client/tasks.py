"""Background tasks as Prefect users know them: a decorator that gives a function `.delay()`,
a future whose `.result()` waits for the outcome, and `submit_task` for any key.

    from runledger.client.tasks import task

    @task
    def add(x: int, y: int) -> int:
        return x + y

    future = add.delay(1, 2)      # queued durably on the task key's subject
    future.result(timeout=10)     # 3, once a task worker has run it

In async code use `await add.adelay(1, 2)` and `await future.aresult()`; a function served by
a task worker may itself submit and await others that way. Task workers run the functions
(`runledger task-worker --module MOD --key KEY`); the key of a decorated function is
`<module>.<qualified name>` unless `key=` says otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import inspect
import json
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import Future as ThreadFuture
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from runledger.infra.settings import Settings, load_settings

from .envelope import _json_default as json_default
from .errors import Invalid, NotFound, RunledgerError, Unavailable, error_from_reply
from .models import TaskRun
from .runledger_client import RunledgerClient

R = TypeVar("R")

# Every decorated function, by task key: what `runledger task-worker --module` serves.
TASKS: dict[str, Task[Any]] = {}

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


class TaskFailed(RunledgerError):
    """The task run ended FAILED, CANCELLED or CRASHED: `run` says how (its state's message)."""

    def __init__(self, run: TaskRun):
        state = run.state
        message = state.message if state is not None and state.message else f"task run {run.id} ended {run.state_type}"
        super().__init__(message)
        self.run = run


class TaskCancelled(TaskFailed):
    """The task run ended CANCELLED (cancelled while it waited or while it ran, see
    `RunledgerClient.cancel_task_run`, or refused by a full key): its message says so, then
    why (its state's message); `run` is the run."""

    def __init__(self, run: TaskRun):
        state = run.state
        why = f": {state.message}" if state is not None and state.message else "."
        RunledgerError.__init__(self, f"Task run {run.id} was cancelled{why}")
        self.run = run


def finished_subject(settings: Settings, task_run_id: uuid.UUID | str) -> str:
    """Where the service announces a task run that reached a final state, or CANCELLING (for
    the task worker running it: a waiter skips it)."""
    return f"{settings.namespace}.taskrun.finished.{task_run_id}"


def task_result(run: TaskRun) -> Any:
    """The value a COMPLETED run returned; `TaskFailed` for a run that ended otherwise
    (`TaskCancelled`, a kind of it, for a CANCELLED one). A result stored apart (too large for
    its state) is returned as its reference: read it with `fetch_task_result`."""
    if run.state_type == "CANCELLED":
        raise TaskCancelled(run)
    if run.state_type != "COMPLETED":
        raise TaskFailed(run)
    data = run.state.data if run.state is not None else None
    if isinstance(data, dict) and data.get("type") == "json":
        return data.get("value")
    return data


async def fetch_task_result(client: RunledgerClient, run: TaskRun) -> Any:
    """The value a COMPLETED run returned, read from the result store when it was too large for
    its state (checked against its SHA-256); `TaskFailed` for a run that ended otherwise."""
    value = task_result(run)
    if not (isinstance(value, dict) and value.get("type") == "reference" and value.get("storage") == "task-results"):
        return value
    parts = []
    stored_by = value.get("task_run_id") or str(run.id)  # a cached copy names the run that stored it
    for chunk in range(int(value["chunks"])):
        reply = await client.query("GetTaskRunResult", {"id": stored_by, "attempt": value["attempt"],
                                                         "chunk": chunk}, min_seq=0)
        parts.append(base64.b64decode(reply.result["data"]))
    encoded = b"".join(parts)
    if hashlib.sha256(encoded).hexdigest() != value["sha256"]:
        raise RunledgerError(f"task run {run.id}: the stored result does not match its checksum")
    return json.loads(encoded)


async def submit_task(client: RunledgerClient, task_key: str, parameters: dict[str, Any] | None = None, *,
                      retries: int | None = None, retry_delay: float | list[float] | None = None,
                      retry_jitter_factor: float | None = None, tags: list[str] | None = None,
                      queue_wait_seconds: float = 0.0, task_run_id: uuid.UUID | None = None,
                      dynamic_key: str | None = None, cache_key: str | None = None,
                      cache_expiration: datetime | None = None, refresh_cache: bool = False,
                      scheduled_time: datetime | None = None) -> TaskRun:
    """Queues a new task run of `task_key` for a task worker (a SCHEDULED, deferred state) and
    returns it. A key whose queue is full raises `Unavailable` at once, or after waiting up to
    `queue_wait_seconds` for room; the run is then cancelled, never left behind unseen.

    `dynamic_key` (default: a fresh one) makes the submission idempotent: the same task key and
    dynamic key return the run made the first time, so a submitter that lost a reply sends it
    again safely; if that run was cancelled (its key was full, or someone cancelled it), it
    raises `Unavailable` again instead.

    `cache_key` (and `cache_expiration`, when the cached state stops counting): a run whose
    key has an unexpired COMPLETED state is given a copy of it when a worker takes it
    (`Cached`), without running; a run that completes records its state under the key.
    `refresh_cache`: the run does not take a cached state; it runs, and its COMPLETED state
    replaces the one under its key (Prefect's `refresh_cache`).

    `scheduled_time`: no worker starts the run before then (it waits on its key's subject,
    counted against the key's bound)."""
    body = _submission(task_key, parameters, retries=retries, retry_delay=retry_delay,
                       retry_jitter_factor=retry_jitter_factor, tags=tags, queue_wait_seconds=queue_wait_seconds,
                       task_run_id=task_run_id, dynamic_key=dynamic_key, cache_key=cache_key,
                       cache_expiration=cache_expiration, refresh_cache=refresh_cache, scheduled_time=scheduled_time)
    reply = await client.command("CreateTaskRun", body, extra_timeout=queue_wait_seconds)
    run = RunledgerClient._one(TaskRun, reply.result)
    if reply.created is False and run.state_type == "CANCELLED":
        # Sent again (same dynamic key) after the first was refused, or cancelled since: it
        # will not run, and the caller asked for a run that does.
        message = run.state.message if run.state is not None else None
        raise Unavailable(f"Task run {run.id} of this submission was cancelled and will not run: {message}")
    return run


def _submission(task_key: str, parameters: dict[str, Any] | None = None, *,
                retries: int | None = None, retry_delay: float | list[float] | None = None,
                retry_jitter_factor: float | None = None, tags: list[str] | None = None,
                queue_wait_seconds: float = 0.0, task_run_id: uuid.UUID | None = None,
                dynamic_key: str | None = None, cache_key: str | None = None,
                cache_expiration: datetime | None = None, refresh_cache: bool = False,
                scheduled_time: datetime | None = None) -> dict[str, Any]:
    """A `CreateTaskRun` body (see `submit_task`)."""
    policy: dict[str, Any] = {}
    if retries is not None:
        policy["retries"] = retries
    if retry_delay is not None:
        policy["retry_delay"] = retry_delay
    if retry_jitter_factor is not None:
        policy["retry_jitter_factor"] = retry_jitter_factor
    body: dict[str, Any] = {
        "task_key": task_key, "dynamic_key": dynamic_key if dynamic_key is not None else uuid.uuid4().hex, "parameters": parameters or {},
        "state": {"type": "SCHEDULED", "state_details": {
            "deferred": True, **({"scheduled_time": _aware(scheduled_time).isoformat()} if scheduled_time else {}),
            **({"refresh_cache": True} if refresh_cache else {})}},
        "empirical_policy": policy, "tags": tags or [], "queue_wait_seconds": queue_wait_seconds,
    }
    if task_run_id is not None:
        body["id"] = str(task_run_id)
    if cache_key is not None:
        body["cache_key"] = cache_key
        if cache_expiration is not None:
            body["cache_expiration"] = cache_expiration.isoformat()
    return body


# A bulk submission's requests: at most this many runs, and about this many bytes of body
# (the broker's max payload is 1 MiB by default, and the reply lists every run too).
MAX_RUNS_PER_REQUEST = 1_000
MAX_BODY_BYTES_PER_REQUEST = 256 * 1024


class SubmissionRefused(RunledgerError):
    """Some runs of a bulk submission (`submit_tasks`, `Task.map`) were not queued; the others
    were. `task_run_ids`: each submission's run id in order, None where refused; `errors`: the
    refusals, by position. The code and message are the first refusal's."""

    def __init__(self, task_run_ids: list[uuid.UUID | None], errors: dict[int, RunledgerError]):
        first = min(errors)
        super().__init__(f"{len(errors)} of {len(task_run_ids)} task runs were not queued; the first "
                         f"(#{first}): {errors[first].message}", code=errors[first].code)
        self.task_run_ids = task_run_ids
        self.errors = errors


async def submit_tasks(client: RunledgerClient, task_key: str, parameters: Sequence[dict[str, Any]], *,
                       queue_wait_seconds: float = 0.0, **options: Any) -> list[uuid.UUID]:
    """Queues one run of `task_key` per item of `parameters`, as `submit_task` would each (the
    same `options`, each run a fresh dynamic key), in as few requests as fit (`CreateTaskRuns`,
    up to 1,000 runs each): Prefect's `.map(..., deferred=True)`. Returns the runs' ids in
    order. A run refused (its key full) does not stop the others: `SubmissionRefused` is
    raised once all were sent, naming the ones queued."""
    bodies = [_submission(task_key, p, queue_wait_seconds=queue_wait_seconds, **options) for p in parameters]
    return await _submit_all(client, bodies, queue_wait_seconds)


async def _submit_all(client: RunledgerClient, bodies: list[dict[str, Any]], queue_wait_seconds: float = 0.0
                      ) -> list[uuid.UUID]:
    ids: list[uuid.UUID | None] = []
    errors: dict[int, RunledgerError] = {}
    for chunk in _chunks(bodies):
        reply = await client.command("CreateTaskRuns", {"task_runs": chunk}, extra_timeout=queue_wait_seconds)
        for item in reply.result:
            if item.get("ok") and not (item.get("created") is False and item["result"]["state_type"] == "CANCELLED"):
                ids.append(uuid.UUID(item["result"]["id"]))
                continue
            errors[len(ids)] = (error_from_reply(item["error"]) if not item.get("ok") else Unavailable(
                f"Task run {item['result']['id']} of this submission was cancelled and will not run"))
            ids.append(None)
    if errors:
        raise SubmissionRefused(ids, errors)
    return [i for i in ids if i is not None]


def _chunks(bodies: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for body in bodies:
        length = len(json.dumps(body, default=str))
        if chunks[-1] and (len(chunks[-1]) >= MAX_RUNS_PER_REQUEST or size + length > MAX_BODY_BYTES_PER_REQUEST):
            chunks.append([])
            size = 0
        chunks[-1].append(body)
        size += length
    return [c for c in chunks if c]


async def wait_for_task_run(client: RunledgerClient, task_run_id: uuid.UUID | str,
                            timeout: float | None = None) -> TaskRun:
    """The run once it has reached a final state: announced by the service (no polling), or
    read at once if it is already there. A run the read model does not hold yet (submitted a
    moment ago by someone else) is waited for all the same: bound the wait with `timeout`."""
    nc = client._nc
    if nc is None:
        raise RuntimeError("the client is not connected")
    arrived: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_finished(msg: Any) -> None:
        # The subject also carries the run's CANCELLING (for its task worker): not an end.
        with contextlib.suppress(ValueError):
            if not arrived.done() and TaskRun.model_validate_json(msg.data).state_type in FINAL_STATES:
                arrived.set_result(msg.data)

    sub = await nc.subscribe(finished_subject(client.settings, task_run_id), cb=on_finished)
    try:
        await nc.flush()
        # Subscribed first: a finish from now on is heard. One that came before is in the read
        # model once it holds the whole log as of now (`catch_up`), asked only when needed.
        for caught_up in (False, True):
            if caught_up:
                await client.catch_up()
            try:
                reply = await client.query("GetTaskRun", {"id": str(task_run_id)})
            except NotFound:
                continue
            run = RunledgerClient._one(TaskRun, reply.result)
            if run.state_type in FINAL_STATES:
                return run
        try:
            data = await asyncio.wait_for(arrived, timeout)
        except TimeoutError:
            raise TimeoutError(f"task run {task_run_id} did not finish within {timeout:g} s; it may still run: "
                               "wait again, or cancel it (`runledger task-run cancel "
                               f"{task_run_id}`)") from None
        return TaskRun.model_validate_json(data)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


class _Bridge:
    """An event loop on a thread of its own with a connected client: what the synchronous
    `.delay()` and `.result()` run on, so they work from plain (non-async) code."""

    _lock = threading.Lock()
    _instance: _Bridge | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="runledger-tasks", daemon=True)
        self.thread.start()
        self.client = self.run(RunledgerClient(_current_settings()).connect())

    @classmethod
    def get(cls) -> _Bridge:
        with cls._lock:
            if cls._instance is None:
                cls._instance = _Bridge()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, R], timeout: float | None = None) -> R:
        future: ThreadFuture[R] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)


class TaskFuture(Generic[R]):
    """A submitted task run: `result()` waits for it (synchronously), `aresult()` in async code.
    Either returns the function's return value or raises `TaskFailed`."""

    def __init__(self, task_run_id: uuid.UUID, client: RunledgerClient | None = None):
        self.task_run_id = task_run_id
        self._client = client

    @property
    def id(self) -> uuid.UUID:
        """The task run's id, as `TaskRun.id` names it (the same as `task_run_id`): what
        `cancel_task_run` and `runledger task-run inspect` take."""
        return self.task_run_id

    def result(self, timeout: float | None = None) -> R:
        bridge = _Bridge.get()
        run = bridge.run(wait_for_task_run(bridge.client, self.task_run_id, timeout))
        return bridge.run(fetch_task_result(bridge.client, run))

    async def aresult(self, timeout: float | None = None) -> R:
        if self._client is None:
            raise RuntimeError("this future was made by .delay(): wait for it with .result()")
        run = await wait_for_task_run(self._client, self.task_run_id, timeout)
        return await fetch_task_result(self._client, run)

    def __repr__(self) -> str:
        return f"TaskFuture({self.task_run_id})"


class Task(Generic[R]):
    """A function that task workers run (see the module docstring)."""

    def __init__(self, fn: Callable[..., R], *, key: str | None = None, retries: int | None = None,
                 retry_delay: float | list[float] | None = None, retry_jitter_factor: float | None = None,
                 tags: list[str] | None = None, cache_policy: str | None = None,
                 cache_key_fn: Callable[[dict[str, Any]], str | None] | None = None,
                 cache_expiration: timedelta | None = None, refresh_cache: bool = False):
        if cache_policy not in (None, "inputs"):
            raise ValueError(f"cache_policy {cache_policy!r}: the one policy is 'inputs'")
        if cache_policy is not None and cache_key_fn is not None:
            raise ValueError("give cache_policy or cache_key_fn, not both")
        self.fn = fn
        self.key = _submittable_key(key if key is not None else f"{fn.__module__}.{fn.__qualname__}")
        self.retries, self.retry_delay, self.retry_jitter_factor = retries, retry_delay, retry_jitter_factor
        self.tags = tags or []
        self.cache_policy, self.cache_key_fn, self.cache_expiration = cache_policy, cache_key_fn, cache_expiration
        self.refresh_cache = refresh_cache
        self._signature = inspect.signature(fn)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", self.key)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.fn(*args, **kwargs)

    def parameters(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The call's arguments by parameter name (defaults left to the worker's call), as the
        worker passes them back: by keyword. Extra keywords of a `**kwargs` function travel as
        keywords of their own; a `*args` function's extra positional arguments cannot travel."""
        bound = self._signature.bind(*args, **kwargs).arguments
        out: dict[str, Any] = {}
        for name, value in bound.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{self.key}: extra positional arguments (*{name}) cannot be sent to a task "
                                    "worker; pass keyword arguments")
            elif kind is inspect.Parameter.POSITIONAL_ONLY:
                raise TypeError(f"{self.key}: positional-only parameter {name!r} cannot be sent by keyword")
            else:
                out[name] = value
        return out

    def cache_key(self, parameters: dict[str, Any]) -> str | None:
        """The key a run with these parameters is cached under (None: not cached). `inputs`:
        the task key and a SHA-256 of the parameters as canonical JSON."""
        if self.cache_key_fn is not None:
            return self.cache_key_fn(parameters)
        if self.cache_policy == "inputs":
            return f"{self.key}:{hashlib.sha256(_canonical_json(parameters).encode()).hexdigest()}"
        return None

    def _options(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """`submit_task`'s options for a run of this task with these parameters."""
        cache_key = self.cache_key(parameters)
        expiration = (datetime.now(UTC) + self.cache_expiration
                      if cache_key is not None and self.cache_expiration is not None else None)
        return {"retries": self.retries, "retry_delay": self.retry_delay, "retry_jitter_factor": self.retry_jitter_factor,
                "tags": self.tags, "cache_key": cache_key, "cache_expiration": expiration,
                "refresh_cache": self.refresh_cache and cache_key is not None}

    async def _submit(self, client: RunledgerClient, parameters: dict[str, Any],
                      scheduled_time: datetime | None = None) -> TaskRun:
        return await submit_task(client, self.key, parameters, scheduled_time=scheduled_time, **self._options(parameters))

    def map(self, *args: Any, deferred: bool = True, **kwargs: Any) -> list[TaskFuture[R]]:
        """Queues one run per element of the iterable arguments, as Prefect's
        `.map(..., deferred=True)`: lists, tuples and other iterables are mapped element by
        element (all of one length); anything else, and strings, bytes and mappings, goes to
        every run as it is, as does an iterable wrapped in `unmapped(...)`. The runs go in
        as few requests as fit (`submit_tasks`); returns their futures in order."""
        bridge = _Bridge.get()
        return bridge.run(self._map(bridge.client, args, kwargs, deferred, own_client=False))

    async def amap(self, *args: Any, client: RunledgerClient | None = None, deferred: bool = True,
                   **kwargs: Any) -> list[TaskFuture[R]]:
        """`map` for async code."""
        return await self._map(client or await _shared_client(), args, kwargs, deferred, own_client=True)

    async def _map(self, client: RunledgerClient, args: tuple, kwargs: dict[str, Any], deferred: bool,
                   own_client: bool) -> list[TaskFuture[R]]:
        if not deferred:
            raise ValueError("runledger runs tasks in task workers only: map(..., deferred=True)")
        calls = [self.parameters(*a, **k) for a, k in _mapped_calls(args, kwargs)]
        bodies = [_submission(self.key, p, **self._options(p)) for p in calls]
        ids = await _submit_all(client, bodies)
        return [TaskFuture(i, client if own_client else None) for i in ids]

    def delay(self, *args: Any, **kwargs: Any) -> TaskFuture[R]:
        """Queues a run with these arguments for a task worker; returns at once with its future."""
        bridge = _Bridge.get()
        run = bridge.run(self._submit(bridge.client, self.parameters(*args, **kwargs)))
        return TaskFuture(run.id)

    async def adelay(self, *args: Any, client: RunledgerClient | None = None, **kwargs: Any) -> TaskFuture[R]:
        """`delay` for async code. `client`: the connection to use (default: one shared by the
        process's tasks, made on first use)."""
        client = client or await _shared_client()
        run = await self._submit(client, self.parameters(*args, **kwargs))
        return TaskFuture(run.id, client)

    def delay_until(self, when: datetime, *args: Any, **kwargs: Any) -> TaskFuture[R]:
        """`delay`, for a run that no worker starts before `when` (timezone-aware)."""
        bridge = _Bridge.get()
        run = bridge.run(self._submit(bridge.client, self.parameters(*args, **kwargs), _aware(when)))
        return TaskFuture(run.id)

    async def adelay_until(self, when: datetime, *args: Any, client: RunledgerClient | None = None,
                           **kwargs: Any) -> TaskFuture[R]:
        """`delay_until` for async code."""
        client = client or await _shared_client()
        run = await self._submit(client, self.parameters(*args, **kwargs), _aware(when))
        return TaskFuture(run.id, client)


class unmapped:  # noqa: N801 - Prefect's name
    """An iterable argument of `Task.map` given whole to every run, not mapped."""

    def __init__(self, value: Any):
        self.value = value


def _is_mapped(value: Any) -> bool:
    return (isinstance(value, Iterable) and not isinstance(value, str | bytes | bytearray | Mapping | unmapped))


def _mapped_calls(args: tuple, kwargs: dict[str, Any]) -> list[tuple[list[Any], dict[str, Any]]]:
    """The argument lists of `Task.map`'s runs: the mapped arguments element by element, the
    others whole (unwrapped from `unmapped`)."""
    def split(value: Any) -> tuple[bool, Any]:
        if _is_mapped(value):
            return True, list(value)
        return False, value.value if isinstance(value, unmapped) else value

    positional = [split(a) for a in args]
    named = {k: split(v) for k, v in kwargs.items()}
    lengths = {len(v) for mapped, v in (*positional, *named.values()) if mapped}
    if not lengths:
        raise ValueError("map needs at least one iterable argument (a list, a tuple, ...)")
    if len(lengths) > 1:
        raise ValueError(f"map's iterable arguments differ in length: {sorted(lengths)}")
    (n,) = lengths
    return [([v[i] if mapped else v for mapped, v in positional],
             {k: v[i] if mapped else v for k, (mapped, v) in named.items()}) for i in range(n)]


def _canonical_json(parameters: dict[str, Any]) -> str:
    """The parameters as canonical JSON, after the conversion the client sends them with (a
    `datetime`, `date` or `UUID` as a string, a tuple as a list, a pydantic model as a dict),
    so that the key is made of what the worker receives. A set's elements are sorted when
    they can be, so that its key does not depend on the order a process happens to hold them
    in. A value that cannot be sent is `Invalid`, as `.delay()` says of it."""
    def convert(value: Any) -> Any:
        if isinstance(value, set | frozenset):
            try:
                return sorted(value)
            except TypeError:
                pass
        return json_default(value)

    try:
        return json.dumps(parameters, default=convert, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise Invalid(f"parameters: {e}", field="parameters") from None


def _aware(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError("a start time must say its time zone (e.g. datetime.now(UTC) + timedelta(minutes=5))")
    return when


_clients: dict[int, RunledgerClient] = {}
_settings: Settings | None = None


def use_settings(settings: Settings | None) -> None:
    """The settings `.delay()` and `.adelay()` connect with (default: `load_settings()`, the
    client role); a task worker sets its own, so its tasks submit as it does."""
    global _settings
    _settings = settings


def _current_settings() -> Settings:
    return _settings if _settings is not None else load_settings()


async def _shared_client() -> RunledgerClient:
    """One client per event loop (a connection belongs to the loop that made it)."""
    loop_id = id(asyncio.get_running_loop())
    client = _clients.get(loop_id)
    if client is None:
        client = _clients[loop_id] = await RunledgerClient(_current_settings()).connect()
    return client


def _submittable_key(key: str) -> str:
    """A key the service accepts for a run (`CreateTaskRun.task_key`: 1 to 2,000 characters,
    at most 1,024 once encoded for its subject), checked when the task is defined: a key it
    refuses would make every `.delay()` fail, and a worker serve a key no run can reach."""
    from pydantic import TypeAdapter, ValidationError

    from runledger.commands.task_runs import TaskKey

    try:
        return TypeAdapter(TaskKey).validate_python(key)
    except ValidationError as e:
        error = e.errors()[0]
        why = {"too_short": "it is empty", "too_long": f"it is {len(key)} characters, more than 2,000"}.get(
            error["type"], error["msg"].removeprefix("Value error, "))
        shown = key if len(key) <= 60 else key[:57] + "..."
        raise ValueError(f"task key {shown!r} cannot be submitted: {why}; give @task a key= the service accepts "
                         "(1 to 2,000 characters, at most 1,024 once encoded for its subject)") from None


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """The same function defined again (its module reloaded, a test defining it twice): the
    same module and qualified name."""
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == (
        getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def _function_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def task(fn: Callable[..., R] | None = None, *, key: str | None = None, retries: int | None = None,
         retry_delay: float | list[float] | None = None, retry_jitter_factor: float | None = None,
         tags: list[str] | None = None, cache_policy: str | None = None,
         cache_key_fn: Callable[[dict[str, Any]], str | None] | None = None,
         cache_expiration: timedelta | None = None, refresh_cache: bool = False) -> Any:
    """`@task` or `@task(key=..., retries=..., retry_delay=...)`: registers the function for task
    workers and gives it `.delay()`. Caching, as Prefect's: `cache_policy="inputs"` (or a
    `cache_key_fn(parameters) -> str`) makes a run whose key has an unexpired COMPLETED state
    take a copy of it (`Cached`) instead of running; `cache_expiration` counts from the
    submission; `refresh_cache=True` runs it all the same and replaces the cached state with
    the new one."""

    def wrap(f: Callable[..., R]) -> Task[R]:
        t = Task(f, key=key, retries=retries, retry_delay=retry_delay, retry_jitter_factor=retry_jitter_factor,
                 tags=tags, cache_policy=cache_policy, cache_key_fn=cache_key_fn, cache_expiration=cache_expiration,
                 refresh_cache=refresh_cache)
        registered = TASKS.get(t.key)
        if registered is not None and not _same_function(registered.fn, f):
            # A worker serves one function per key: the second would silently replace the first.
            raise ValueError(f"task key {t.key!r} is already registered by {_function_name(registered.fn)}; "
                             f"{_function_name(f)} cannot take it too: give one of them another key=")
        TASKS[t.key] = t
        return t

    return wrap(fn) if fn is not None else wrap
