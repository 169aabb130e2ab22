"""The event loop of runledger's own processes: uvloop by default where it installs, asyncio's
own when the setting asks for it or uvloop is missing (infra/event_loop.py)."""

import importlib.util

import pytest

from runledger.infra import event_loop
from runledger.infra.settings import Settings


async def _loop_name() -> str:
    return event_loop.running_loop_name()


def test_the_default_setting_runs_on_uvloop_where_it_is_installed():
    assert Settings().event_loop == "uvloop"
    assert event_loop.uvloop_available()  # a dependency on this platform (pyproject.toml)
    assert event_loop.run(_loop_name(), Settings().event_loop) == "uvloop"


def test_asyncio_when_asked_for():
    assert event_loop.run(_loop_name(), Settings(event_loop="asyncio").event_loop) == "asyncio"


def test_asyncio_where_uvloop_is_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    assert event_loop.chosen_loop("uvloop") == "asyncio"
    assert event_loop.run(_loop_name(), "uvloop") == "asyncio"


def test_an_unknown_loop_is_refused_by_the_settings(monkeypatch):
    monkeypatch.setenv("RUNLEDGER_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="event_loop"):
        Settings()
