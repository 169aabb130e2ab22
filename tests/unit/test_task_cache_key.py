"""`cache_policy="inputs"`: the key is made of the parameters as the worker receives them."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

import pytest

from runledger.client.errors import Invalid
from runledger.client.tasks import Task


def report(when: Any = None, day: Any = None, ref: Any = None, tags: Any = None) -> None:
    return None


def test_inputs_keys_take_the_values_the_client_converts_as_it_sends_them():
    """A `datetime`, `date` or `UUID` arrives as a string: its key is that string's, not an error."""
    t = Task(report, key="reports.build", cache_policy="inputs")
    now = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    ref = uuid.UUID(int=7)
    key = t.cache_key({"when": now, "day": date(2026, 12, 7), "ref": ref})
    assert key is not None and key.startswith("reports.build:")
    assert key == t.cache_key({"when": now.isoformat(), "day": "2026-12-07", "ref": str(ref)})
    assert key != t.cache_key({"when": datetime(2026, 12, 7, 9, 1, tzinfo=UTC), "day": date(2026, 12, 7), "ref": ref})
    assert t.cache_key({"tags": ("a", "b")}) == t.cache_key({"tags": ["a", "b"]})
    assert t.cache_key({"tags": {"b", "a"}}) == t.cache_key({"tags": ["a", "b"]})


def test_inputs_keys_refuse_what_cannot_be_sent_as_the_submission_would():
    with pytest.raises(Invalid):
        Task(report, key="reports.build", cache_policy="inputs").cache_key({"when": object()})
