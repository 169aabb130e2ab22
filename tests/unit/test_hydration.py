"""Parameter hydration, pure: each `__prefect_kind`, Prefect's messages, and bounded templates."""

from __future__ import annotations

import pytest

from runledger.commands.hydration import HydrationError, hydrate, variable_names


def test_each_kind_resolves_as_prefect_does():
    params = {
        "plain": 1,
        "none": {"__prefect_kind": "none", "value": {"__prefect_kind": "json", "value": "[1, 2]"}},
        "json": {"__prefect_kind": "json", "value": "\"x\""},
        "jinja": {"__prefect_kind": "jinja", "template": "{{ 1 + 2 }}"},
        "var": {"__prefect_kind": "workspace_variable", "variable_name": "v"},
        "nested": [{"a": {"__prefect_kind": "json", "value": "{\"b\": null}"}}],
        "unknown": {"__prefect_kind": "something", "value": 5},
    }
    assert hydrate(params, {"v": {"deep": True}}) == {
        "plain": 1, "none": [1, 2], "json": "x", "jinja": "3", "var": {"deep": True},
        "nested": [{"a": {"b": None}}], "unknown": 5,
    }


def test_objects_without_their_key_are_dropped_from_their_parent():
    assert hydrate({"a": {"__prefect_kind": "json"}, "b": [{"__prefect_kind": "workspace_variable"}], "c": 1},
                   {}) == {"b": [], "c": 1}


@pytest.mark.parametrize("value, message", [
    ({"__prefect_kind": "json", "value": "{bad"}, "Invalid JSON: "),
    ({"__prefect_kind": "workspace_variable", "variable_name": "missing"}, "Variable 'missing' not found in workspace."),
    ({"__prefect_kind": "none"}, "Missing 'value' key in __prefect object"),
    ({"__prefect_kind": "jinja"}, "Missing 'template' key in __prefect object"),
    ({"__prefect_kind": "jinja", "template": "{{ "}, "Invalid jinja: "),
])
def test_failures_carry_prefects_message(value, message):
    with pytest.raises(HydrationError) as e:
        hydrate({"p": value}, {})
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("template", [
    "{{ 'a' * 1000000000 }}",
    "{{ [1] * 1000000000 }}",
    "{{ 10 ** 100000000 }}",
    "{% for i in range(1000000) %}x{% endfor %}",
    "{{ ''.__class__.__mro__ }}{{ cycler.__init__.__globals__ }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
])
def test_a_template_cannot_hold_the_service_or_reach_python(template):
    try:
        rendered = hydrate({"t": {"__prefect_kind": "jinja", "template": template}}, {})["t"]
    except HydrationError:
        return
    assert "globals" not in rendered and len(rendered) <= 100_000


def test_the_variables_named_are_found_for_loading():
    params = {"a": {"__prefect_kind": "workspace_variable", "variable_name": "x"},
              "b": [{"c": {"__prefect_kind": "workspace_variable", "variable_name": "y"}}]}
    assert sorted(variable_names(params)) == ["x", "y"]
