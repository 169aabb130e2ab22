"""JSON Schema validation, bounded: the schema and the value are both user input, and the check
runs on the service's event loop, so no pair of them may hold it. Each input below took
seconds to minutes with jsonschema's own keywords; the results are what jsonschema gives."""

from __future__ import annotations

import pytest

from runledger.commands import json_schemas
from runledger.commands.json_schemas import validation_problem
from runledger.commands.messages import ErrorCode, Rejection


def _problem(value, schema):
    return validation_problem(value, schema, ignore_required=False)


UNIQUE = {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}


@pytest.mark.timeout(20)
def test_unique_items_of_objects_are_checked_in_linear_time():
    """jsonschema compares objects pairwise: 5,000 of them held the service 36 s (8,000: 78 s;
    the test's timeout catches that, it asserts no time)."""
    items = [{"a": i, "b": [i, str(i)]} for i in range(8_000)]
    assert _problem({"x": items}, UNIQUE) is None
    problem = _problem({"x": [*items, {"b": [3, "3"], "a": 3.0}]}, UNIQUE)
    assert problem is not None and problem.endswith("has non-unique elements")


@pytest.mark.parametrize("items, unique", [
    ([1, 1.0], False),  # JSON Schema: the same number
    ([1, True], True),  # but a boolean is not a number
    ([0, False], True),
    ([[1], [True]], True),
    ([{"a": 1}, {"a": 1.0}], False),
    ([{"a": 1, "b": 2}, {"b": 2, "a": 1}], False),  # key order does not matter
    ([{"a": [1, 2]}, {"a": [2, 1]}], True),  # item order does
    (["1", 1], True),
    ([None, None], False),
    ([1.5, 1.5], False),
    ([2**53 + 1, float(2**53)], True),
    ([0.0, -0.0], False),
])
def test_unique_items_keeps_jsonschemas_equality(items, unique):
    assert (_problem({"x": items}, UNIQUE) is None) is unique


@pytest.mark.timeout(20)
def test_a_pattern_that_backtracks_is_answered_promptly():
    """`^(a+)+$` against 29 a's and a '!' took 41 s with Python's `re`."""
    schema = {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a+)+$"}}}
    assert "does not match" in _problem({"x": "a" * 29 + "!"}, schema)
    assert _problem({"x": "a" * 29}, schema) is None


@pytest.mark.parametrize("schema, value", [
    ({"properties": {"x": {"type": "string", "pattern": "^(a|aa)+$"}}}, {"x": "a" * 60 + "!"}),
    ({"patternProperties": {"^(a|aa)+$": {"type": "string"}}}, {"a" * 60 + "!": 1}),
    ({"patternProperties": {"^(a|aa)+$": {}}, "additionalProperties": False}, {"a" * 60 + "!": 1}),
    ({"patternProperties": {"^(a|aa)+$": {}}, "unevaluatedProperties": False}, {"a" * 60 + "!": 1}),
    ({"propertyNames": {"pattern": "^(a|aa)+$"}}, {"a" * 60 + "!": 1}),
])
def test_a_pattern_that_cannot_be_checked_in_time_is_refused_as_invalid(schema, value):
    """Every keyword that matches a pattern (values and keys) is bounded."""
    with pytest.raises(Rejection) as e:
        _problem(value, schema)
    assert e.value.code == ErrorCode.INVALID
    assert "^(a|aa)+$" in e.value.message and "could not be checked in time" in e.value.message


def test_a_schema_that_branches_exponentially_is_refused_as_invalid(monkeypatch):
    """Each level tries both branches: 2^40 paths to a failure at the bottom. (The limit is
    lowered so that the test is quick; the point is that the check stops.)"""
    monkeypatch.setattr(json_schemas, "VALIDATION_TIME_LIMIT", 0.2)
    depth = 40
    defs = {f"a{i}": {"anyOf": [{"$ref": f"#/$defs/a{i + 1}"}, {"$ref": f"#/$defs/a{i + 1}"}]}
            for i in range(depth)}
    defs[f"a{depth}"] = {"type": "string"}
    schema = {"$defs": defs, "properties": {"x": {"$ref": "#/$defs/a0"}}}
    with pytest.raises(Rejection) as e:
        _problem({"x": 1}, schema)
    assert e.value.code == ErrorCode.INVALID
    assert "could not be checked against the schema" in e.value.message


@pytest.mark.parametrize("schema, value", [
    ({"patternProperties": {"^k": {}}, "unevaluatedProperties": False}, {f"k{i}": i for i in range(15_000)}),
    ({"contains": {"type": "integer"}, "unevaluatedItems": False}, list(range(15_000))),
])
def test_unevaluated_keywords_are_linear(schema, value):
    """jsonschema looks each key (item) up in a list of the evaluated ones: 15,000 took 2 s."""
    assert validation_problem({"x": value}, {"properties": {"x": schema}}, ignore_required=False) is None
    bad = {**value, "z": 1} if isinstance(value, dict) else [*value, "z"]
    assert "Unevaluated" in validation_problem({"x": bad}, {"properties": {"x": schema}}, ignore_required=False)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("schema", [
    # A part declaring its dialect: jsonschema would check it with its stock validator.
    {"type": "object", "properties": {"x": {"$schema": "https://json-schema.org/draft/2020-12/schema",
                                            "type": "string", "pattern": "^(a|aa)+$"}}},
    # A root declaring one, reached again through `$ref: "#"`.
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
     "properties": {"y": {"$ref": "#"}, "x": {"type": "string", "pattern": "^(a|aa)+$"}}},
])
def test_a_part_that_declares_its_dialect_is_bounded_too(schema):
    with pytest.raises(Rejection) as refused:
        validation_problem({"y": {"x": "a" * 38 + "b"}, "x": "a" * 38 + "b"}, schema, ignore_required=False)
    assert refused.value.code is ErrorCode.INVALID and "could not be checked in time" in refused.value.message
    # A property named `$schema` is a property like any other.
    named = {"type": "object", "properties": {"$schema": {"type": "integer"}}}
    assert validation_problem({"$schema": "no"}, named, ignore_required=False) == (
        "Validation failed for field '$schema'. Failure reason: 'no' is not of type 'integer'")
