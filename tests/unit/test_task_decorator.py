"""`@task` as a new user meets it, pure: a key the service would refuse, or one another function
already has, is refused when the task is defined, not at its first `.delay()`; a future names
its run; a result's nesting is counted as the service counts it."""

from __future__ import annotations

import importlib
import sys
import uuid

import pytest

from runledger.client.tasks import TASKS, TaskFuture, task
from runledger.commands.task_keys import MAX_ENCODED_TASK_KEY


@pytest.fixture(autouse=True)
def registry_left_as_found():
    before = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(before)


def nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def test_two_functions_with_one_key_are_refused_naming_both():
    @task(key="decorator.same")
    def first() -> int:
        return 1

    with pytest.raises(ValueError) as refused:
        @task(key="decorator.same")
        def second() -> int:
            return 2

    message = str(refused.value)
    assert "'decorator.same'" in message
    assert "test_two_functions_with_one_key_are_refused_naming_both.<locals>.first" in message
    assert "test_two_functions_with_one_key_are_refused_naming_both.<locals>.second" in message
    assert TASKS["decorator.same"] is first  # the first one still serves the key


def test_the_same_function_defined_again_replaces_itself(tmp_path, monkeypatch):
    """A module reloaded defines its tasks again: the same module and qualified name."""
    (tmp_path / "reloaded_tasks_mod.py").write_text(
        "from runledger.client.tasks import task\n\n@task\ndef add(a, b):\n    return a + b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("reloaded_tasks_mod")
        first = TASKS["reloaded_tasks_mod.add"]
        importlib.reload(module)
        assert TASKS["reloaded_tasks_mod.add"] is not first and TASKS["reloaded_tasks_mod.add"] is module.add
    finally:
        sys.modules.pop("reloaded_tasks_mod", None)


def test_a_key_the_service_would_refuse_is_refused_at_definition():
    def f() -> None:
        return None

    with pytest.raises(ValueError, match=r"task key '' cannot be submitted: it is empty"):
        task(key="")(f)
    too_long = "é" * (MAX_ENCODED_TASK_KEY // 6 + 1)
    with pytest.raises(ValueError, match="once encoded for its subject; at most 1024") as refused:
        task(key=too_long)(f)
    assert len(str(refused.value)) < 400  # the key is shortened in the message
    with pytest.raises(ValueError, match="it is 2001 characters, more than 2,000"):
        task(key="a" * 2001)(f)
    with pytest.raises(ValueError, match="NUL"):
        task(key="a\x00b")(f)
    assert not [k for k in TASKS if k in ("", too_long)]
    # The longest key that fits is taken.
    assert task(key="a" * MAX_ENCODED_TASK_KEY)(f).key == "a" * MAX_ENCODED_TASK_KEY


def test_a_future_names_its_run_as_id_too():
    run_id = uuid.uuid4()
    future = TaskFuture(run_id)
    assert future.id == future.task_run_id == run_id
    with pytest.raises(AttributeError):
        future.id = uuid.uuid4()  # type: ignore[misc]


def test_a_result_nests_at_most_as_deep_as_the_service_stores_it():
    """The service checks a state's data one level inside a document, and the result is one
    level inside the data (`{"type": "json", "value": ...}`): 62 levels of the result's own."""
    from runledger.commands.states import StateCreate
    from runledger.handlers.task_worker import MAX_RESULT_DEPTH, ResultTooLarge, result_data

    assert MAX_RESULT_DEPTH == 62
    fits = result_data(nested(MAX_RESULT_DEPTH))
    StateCreate(type="COMPLETED", data=fits)  # what the service accepts
    with pytest.raises(ValueError, match="nest deeper"):
        StateCreate(type="COMPLETED", data={"type": "json", "value": nested(MAX_RESULT_DEPTH + 1)})
    for levels in (MAX_RESULT_DEPTH + 1, MAX_RESULT_DEPTH + 2):
        with pytest.raises(ResultTooLarge, match=f"nests {levels} levels deep, more than the 62") as refused:
            result_data(nested(levels))
        assert refused.value.encoded is None  # not stored apart either: refused
