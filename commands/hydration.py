"""Parameter hydration (Prefect's `__prefect_kind` values), pure.

A parameter value `{"__prefect_kind": K, ...}` is resolved before a run is made: `none` gives
its `value` (hydrated in turn), `json` parses its `value`, `jinja` renders its `template`,
`workspace_variable` gives the value of the variable `variable_name`. A `json` or
`workspace_variable` object without its key is dropped from its parent, as in Prefect; an
unknown kind gives its `value`. Any failure (bad JSON, bad template, a missing variable or key)
raises `HydrationError` with Prefect's message.

The variables come in as a mapping (`variable_names` says which ones a value refers to, so the
caller loads only those). Templates render in a sandbox whose work is bounded: a template is
user input, and no input may hold the service (ranges, repetition and output size capped).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from jinja2 import ChainableUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

KIND = "__prefect_kind"
MAX_TEMPLATE_RANGE = 100  # Prefect's bound on `range()` in a template
MAX_RENDERED_LENGTH = 100_000
MAX_TEMPLATE_LENGTH = 100_000


class HydrationError(Exception):
    """A value that cannot be hydrated; `str()` is Prefect's message."""


class _Drop:
    """A `json` or `workspace_variable` object without its key: removed from its parent."""


_DROP = _Drop()


def _bounded_range(*args: int) -> range:
    found = range(*args)
    if len(found) > MAX_TEMPLATE_RANGE:
        raise SecurityError(f"Range too big. The sandbox blocks ranges larger than MAX_TEMPLATE_RANGE={MAX_TEMPLATE_RANGE}.")
    return found


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Prefect's template sandbox, with repetition and powers bounded too (`'a' * 10**9`
    would otherwise hold the service)."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        super().__init__(undefined=ChainableUndefined)
        self.globals["range"] = _bounded_range

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise SecurityError("the exponent is too large for a template")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int):
                    if len(seq) * count > MAX_RENDERED_LENGTH:
                        raise SecurityError("the repeated value is too long for a template")
        return super().call_binop(context, operator, left, right)


_ENVIRONMENT = _BoundedEnvironment()


def render_template(template: str) -> str:
    if len(template) > MAX_TEMPLATE_LENGTH:
        raise HydrationError(f"Invalid jinja: the template is longer than {MAX_TEMPLATE_LENGTH} characters")
    try:
        rendered = _ENVIRONMENT.from_string(template).render()
    except (TemplateError, SecurityError, OverflowError, RecursionError, MemoryError, TypeError, ValueError,
            ArithmeticError) as e:
        raise HydrationError(f"Invalid jinja: {e}") from None
    if len(rendered) > MAX_RENDERED_LENGTH:
        raise HydrationError(f"Invalid jinja: the result is longer than {MAX_RENDERED_LENGTH} characters")
    return rendered


def variable_names(value: Any) -> Iterator[str]:
    """The names of the workspace variables `value` refers to (literal names only)."""
    if isinstance(value, dict):
        if value.get(KIND) == "workspace_variable" and isinstance(value.get("variable_name"), str):
            yield value["variable_name"]
        for item in value.values():
            yield from variable_names(item)
    elif isinstance(value, list):
        for item in value:
            yield from variable_names(item)


def hydrate(parameters: dict[str, Any], variables: Mapping[str, Any]) -> dict[str, Any]:
    """`parameters` with every `__prefect_kind` value resolved."""
    result = _hydrate(parameters, variables)
    return {} if result is _DROP else result


def _hydrate(value: Any, variables: Mapping[str, Any]) -> Any:
    if isinstance(value, dict) and KIND in value:
        return _resolve(value, variables)
    if isinstance(value, dict):
        return {k: h for k, v in value.items() if (h := _hydrate(v, variables)) is not _DROP}
    if isinstance(value, list):
        return [h for v in value if (h := _hydrate(v, variables)) is not _DROP]
    return value


def _inner(value: Any, variables: Mapping[str, Any]) -> Any:
    return _hydrate(value, variables) if isinstance(value, dict) else value


def _resolve(obj: dict[str, Any], variables: Mapping[str, Any]) -> Any:
    kind = obj[KIND]
    if kind == "none":
        if "value" not in obj:
            raise HydrationError("Missing 'value' key in __prefect object")
        return _hydrate(obj["value"], variables)
    if kind == "json":
        if "value" not in obj:
            return _DROP
        raw = _inner(obj["value"], variables)
        if not isinstance(raw, str):
            return raw
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as e:
            raise HydrationError(f"Invalid JSON: {e}") from None
    if kind == "jinja":
        if "template" not in obj:
            raise HydrationError("Missing 'template' key in __prefect object")
        template = _inner(obj["template"], variables)
        if not isinstance(template, str):
            raise HydrationError("Invalid jinja: the template is not a string")
        return render_template(template)
    if kind == "workspace_variable":
        if "variable_name" not in obj:
            return _DROP
        name = _inner(obj["variable_name"], variables)
        if not isinstance(name, str) or name not in variables:
            raise HydrationError(f"Variable '{name}' not found in workspace.")
        return variables[name]
    return obj.get("value")
