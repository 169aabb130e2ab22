"""`Task.map`'s arguments: which are mapped element by element and which go to every run whole."""

from __future__ import annotations

import pytest

from runledger.client.tasks import _mapped_calls, unmapped


def test_iterables_are_mapped_and_the_rest_goes_whole():
    calls = _mapped_calls(([1, 2], "ab", {"k": 1}, unmapped([9])), {"t": (x for x in "xy"), "n": 5})
    assert calls == [([1, "ab", {"k": 1}, [9]], {"t": "x", "n": 5}),
                     ([2, "ab", {"k": 1}, [9]], {"t": "y", "n": 5})]


def test_lengths_must_agree_and_something_must_be_mapped():
    with pytest.raises(ValueError, match="differ in length: \\[2, 3\\]"):
        _mapped_calls(([1, 2], [1, 2, 3]), {})
    with pytest.raises(ValueError, match="at least one iterable"):
        _mapped_calls(("ab", unmapped([1])), {"n": 1})
    assert _mapped_calls(([],), {}) == []
