"""What the Python client puts on the wire (client/envelope.py): text as UTF-8, which the
service reads exactly as it reads `\\u` escapes; a lone surrogate (no UTF-8 for it) escaped, so
that the service says which field holds it; a request over the max payload refused before
sending as the client's `Invalid`. Pure: no broker."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from runledger.client import Invalid
from runledger.client.envelope import encode_body, too_large_to_send
from runledger.commands import task_runs as tr
from runledger.handlers.command_bus import parse_payload

# Any code point, surrogates and controls included, with the troublesome ones often.
CHARS = st.characters(codec=None, exclude_categories=()) | st.sampled_from(
    "\x00\t\n\x1b\x7f\x85\u2028\u2029\ufeff\uffff\U0001f600\ud800\udfff é\"\\/")
TEXT = st.text(CHARS, max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=12,
)


def escaped(body: dict[str, Any]) -> bytes:
    """What the client sent before: ASCII, every other character a `\\u` escape."""
    return json.dumps(body, separators=(",", ":")).encode()


def test_text_goes_as_utf8():
    body = {"task_key": "k", "dynamic_key": "0", "parameters": {"text": "é" * 10, "emoji": "\U0001f600"}}
    raw = encode_body(body)
    assert "é".encode() * 10 in raw and "\U0001f600".encode() in raw and b"\\u" not in raw
    assert len(raw) < len(escaped(body))
    assert len(encode_body({"p": "é" * 450_000})) < 1_000_000 < len(escaped({"p": "é" * 450_000}))


@settings(max_examples=300, deadline=None)
@given(task_key=TEXT, dynamic_key=TEXT, labels=st.dictionaries(TEXT, JSON, max_size=3), parameters=JSON)
def test_the_service_reads_utf8_as_it_reads_escapes(task_key, dynamic_key, labels, parameters):
    body = {"task_key": task_key, "dynamic_key": dynamic_key, "labels": labels, "parameters": {"p": parameters}}
    raw = encode_body(body)
    as_utf8, as_escapes = parse_payload(tr.CreateTaskRun, raw), parse_payload(tr.CreateTaskRun, escaped(body))
    assert as_utf8 == as_escapes
    if not isinstance(as_utf8, dict):  # accepted: exactly what was given
        assert (as_utf8.task_key, as_utf8.dynamic_key, as_utf8.labels, as_utf8.parameters) == (
            task_key, dynamic_key, labels, {"p": parameters})


def test_a_lone_surrogate_goes_escaped_and_the_service_names_its_field():
    body = {"task_key": "ab\ud800", "dynamic_key": "0"}
    raw = encode_body(body)
    assert raw == escaped(body) and b"ab\\ud800" in raw
    reply = parse_payload(tr.CreateTaskRun, raw)
    assert reply == {"ok": False, "error": {"code": "invalid", "field": "task_key",
                                            "message": "task_key: must not contain a lone surrogate (U+D800)"}}
    reply = parse_payload(tr.CreateTaskRun, encode_body({"task_key": "k", "dynamic_key": "0",
                                                         "parameters": {"text": "é", "x": ["\udfff"]}}))
    assert isinstance(reply, dict) and reply["error"]["field"] == "parameters.x.0"


def test_a_request_too_large_to_send_is_invalid_naming_its_largest_field():
    error = too_large_to_send("CreateTaskRun", {"task_key": "k", "parameters": {"p": "x" * 50}, "tags": ["a"]},
                              1_100_123, 1_048_576)
    assert type(error) is Invalid and error.field == "parameters"
    assert error.message == ("CreateTaskRun is too large to send: its request would be 1,100,123 bytes; the server's "
                             "max payload is 1,048,576 bytes")
