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


@pytest.mark.parametrize("value, message", [
    ({"__prefect_kind": "json", "value": '"a\\u0000b"'}, "NUL"),
    ({"__prefect_kind": "json", "value": '{"a\\u0000": 1}'}, "NUL"),
    ({"__prefect_kind": "json", "value": '"\\ud800"'}, "lone surrogate"),
    ({"__prefect_kind": "json", "value": "NaN"}, "finite"),
    ({"__prefect_kind": "json", "value": "1e999"}, "finite"),
    ({"__prefect_kind": "json", "value": "9" * 30}, "between -2^63 and 2^64-1"),
    ({"__prefect_kind": "json", "value": "[" * 100 + "]" * 100}, "nest deeper"),
    ({"__prefect_kind": "json", "value": "1" * 5000}, "Invalid JSON: "),
    ({"__prefect_kind": "jinja", "template": "a{{ '\\x00' }}b"}, "NUL"),
    ({"__prefect_kind": "jinja", "template": "{{ '\\ud800' }}"}, "lone surrogate"),
])
def test_what_hydration_makes_is_checked_as_storable(value, message):
    """A `json` or `jinja` value can make what the request itself could not hold; the read
    model could not store it, and its projection would stop at the event for good."""
    with pytest.raises(HydrationError) as e:
        hydrate({"p": value}, {})
    assert message in str(e.value)


def test_hydrated_values_together_are_bounded_in_size():
    """Many small templates each rendering the most a template may: refused as soon as they
    pass the size limit on parameters, before the rest is rendered."""
    big = {"__prefect_kind": "jinja", "template": "{{ 'a' * 100000 }}"}
    with pytest.raises(HydrationError) as e:
        hydrate({f"p{i}": big for i in range(1000)}, {})
    assert "bytes allowed for parameters" in str(e.value)
    variable = {"__prefect_kind": "workspace_variable", "variable_name": "v"}
    with pytest.raises(HydrationError):
        hydrate({"p": [variable] * 1000}, {"v": "x" * 10_000})
    assert hydrate({"p": [variable] * 10}, {"v": "x" * 10_000}) == {"p": ["x" * 10_000] * 10}


def _refused(template: str) -> str:
    """The error hydrating a `jinja` value of `template` raises."""
    with pytest.raises(HydrationError) as e:
        hydrate({"t": {"__prefect_kind": "jinja", "template": template}}, {})
    return str(e.value)


@pytest.mark.parametrize("template, message", [
    ("{% for a in range(100) %}" * 3 + "{% endfor %}" * 3,
     "Contains nested for loops at a depth of 3. Templates can nest for loops no more than 2 loops deep."),
    ("{% for a in range(1) %}{% endfor %}" * 11,
     "Contains 11 for loops. Templates can contain no more than 10 for loops."),
])
def test_loops_are_bounded_as_prefect_bounds_them(template, message):
    """Four nested loops over `range(100)` rendered 10^8 times (7.6 s)."""
    assert _refused(template) == f"Invalid jinja: {message}"
    nested = "{% for a in range(3) %}{% for b in range(2) %}x{% endfor %}{% endfor %}"
    assert hydrate({"t": {"__prefect_kind": "jinja", "template": nested}}, {}) == {"t": "x" * 6}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("template", [
    # Within the loop rules, but 10^10 iterations.
    "{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}{% endfor %}{% endfor %}",
    # No loop at all: a macro calling itself twice per level makes 2^40 calls.
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
])
def test_a_template_s_work_is_bounded_so_a_render_ends_fast(template):
    """A render runs on the service's event loop: whatever the template, it ends after a
    bounded number of loop steps and calls, with a clear error (before, these ran for hours)."""
    assert _refused(template) == ("Invalid jinja: the template does too much work "
                                  "(more than 200000 loop steps and calls)")
    # What Prefect's rules allow still renders: two nested loops of 100.
    full = "{% for i in range(100) %}{% for j in range(100) %}.{% endfor %}{% endfor %}"
    assert hydrate({"t": {"__prefect_kind": "jinja", "template": full}}, {}) == {"t": "." * 10_000}


_S = '{% set s = "x" * 100000 %}'


@pytest.mark.timeout(20)
@pytest.mark.parametrize("template, message", [
    # Filters walk what they are given, and are called directly (no call to count).
    (_S + '{% for i in range(100) %}{% for j in range(10) %}{{ (s|unique|list|length) and "" }}{% endfor %}'
     '{% endfor %}', "the template does too much work (more than 200000 loop steps and calls)"),
    # A recursive loop's `loop(items)` walks its items.
    (_S + '{% for c in [' + ",".join(["s"] * 2000) + '] recursive %}{% if c is string and c|length == 1 %}'
     '{% else %}{{ loop(c) }}{% endif %}{% endfor %}',
     "the template does too much work (more than 200000 loop steps and calls)"),
    # Text joined again and again grows without bound.
    (_S + '{% set ns = namespace(x="") %}{% for i in range(100) %}{% for j in range(100) %}'
     '{% set ns.x = ns.x ~ s %}{% endfor %}{% endfor %}', "the joined value is too long for a template"),
    # Output stops at its bound, not after it was made.
    (_S + '{% for i in range(100) %}{% for j in range(100) %}{{ s }}{% endfor %}{% endfor %}',
     "the result is longer than 100000 characters"),
])
def test_filters_calls_joins_and_output_are_paid_for(template, message):
    """(Before: 22 s, 57 s, hours and 1 GB.)"""
    assert _refused(template) == f"Invalid jinja: {message}"
    ordinary = '{{ "a" ~ "b" ~ 1 }}{% for x in [1, 2] %}{{ x|string|upper }}{% endfor %}{{ "%s!"|format("w") }}'
    assert hydrate({"t": {"__prefect_kind": "jinja", "template": ordinary}}, {}) == {"t": "ab112w!"}
