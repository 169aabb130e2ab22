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

What hydration makes is checked as the request's own values were (`bounds`): a `json` or
`jinja` value can hold what the request could not (a NUL, a lone surrogate, NaN, an integer
past 64 bits), and what the read model cannot store would stop its projection for good.
Hydrated values together may not pass Prefect's size limit on parameters either.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from jinja2 import ChainableUndefined, TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from pydantic_core import to_json

from .bounds import MAX_PARAMETERS_BYTES, check_json_document, parameters_size_problem

KIND = "__prefect_kind"
MAX_TEMPLATE_RANGE = 100  # Prefect's bound on `range()` in a template
MAX_RENDERED_LENGTH = 100_000
MAX_TEMPLATE_LENGTH = 100_000
MAX_LOOP_COUNT = 10  # Prefect's bounds on `for` loops in a template (`validate_user_template`)
MAX_NESTED_LOOP_DEPTH = 2
# Loop iterations and calls one render may make: a render runs on the service's event loop, so
# it must end fast whatever the template (two nested loops over a 100,000-character string
# pass the loop rules and make 10^10 iterations; a macro calling itself twice per level makes
# 2^n calls). Prefect's loop rules allow at most ~50,000 iterations over ranges.
MAX_TEMPLATE_STEPS = 200_000
CALL_STEPS = 5  # a call (a macro's, a method's) costs about five loop steps' time
# A filter or call walks what it is given: a step for every few items or characters of its
# arguments (`s|unique` over 100,000 characters takes ~20 ms); joining and repeating text, a
# step for every few dozen characters made.
ITEMS_PER_STEP = 8
CHARACTERS_PER_STEP = 64
_STEPS: ContextVar[list[int]] = ContextVar("template_steps")


class HydrationError(Exception):
    """A value that cannot be hydrated; `str()` is Prefect's message."""


class _Drop:
    """A `json` or `workspace_variable` object without its key: removed from its parent."""


_DROP = _Drop()


def _step(n: int = 1) -> None:
    left = _STEPS.get()
    left[0] -= n
    if left[0] < 0:
        raise SecurityError(f"the template does too much work (more than {MAX_TEMPLATE_STEPS} loop steps and calls)")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict | set | frozenset) else 0


def _charged(function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that pays for what it walks (`ITEMS_PER_STEP`): filters are called directly,
    not through `Environment.call`. `wraps` keeps jinja's marks (`pass_context`...)."""

    @functools.wraps(function)
    def charged(*args: Any, **kwargs: Any) -> Any:
        _step(1 + sum(map(_size, args)) // ITEMS_PER_STEP)
        return function(*args, **kwargs)
    return charged


def _joined(*parts: Any) -> str:
    """`a ~ b ~ ...` (`render_template` rewrites every `~` to this), bounded and paid for."""
    text = "".join(map(str, parts))
    if len(text) > MAX_RENDERED_LENGTH:
        raise SecurityError("the joined value is too long for a template")
    _step(len(text) // CHARACTERS_PER_STEP)
    return text


def _counted(iterable: Any) -> Iterator[Any]:
    """A loop's iterable, each step counted (`render_template` wraps every `for` in it)."""
    for item in iterable:
        _step()
        yield item


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
        self.globals[_COUNTED] = _counted
        self.globals[_JOINED] = _joined
        self.filters = {name: _charged(f) for name, f in self.filters.items()}

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        # A method walks its object too (`s.replace(...)`); a recursive loop's `loop(items)`
        # walks its items.
        walked = _size(getattr(__obj, "__self__", None)) + sum(map(_size, args)) + sum(map(_size, kwargs.values()))
        _step(CALL_STEPS + walked // ITEMS_PER_STEP)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise SecurityError("the exponent is too large for a template")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int):
                    if len(seq) * count > MAX_RENDERED_LENGTH:
                        raise SecurityError("the repeated value is too long for a template")
                    _step(len(seq) * max(count, 0) // CHARACTERS_PER_STEP)
        return super().call_binop(context, operator, left, right)


_COUNTED = "__runledger_counted"
_JOINED = "__runledger_joined"
_ENVIRONMENT = _BoundedEnvironment()


def _count_work(parsed: nodes.Template) -> nodes.Template:
    """Every `for` iterates over `_counted(its iterable)`, so each step of every loop counts,
    and every `~` joins through `_joined`, so no text grows past the output's bound."""
    for loop in parsed.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.Name(_COUNTED, "load", lineno=loop.lineno), [loop.iter], [], None, None,
                               lineno=loop.lineno)
    for node in list(parsed.find_all(nodes.Concat)):
        joined = nodes.Call(nodes.Name(_JOINED, "load", lineno=node.lineno), node.nodes, [], None, None,
                            lineno=node.lineno)
        node.nodes = [joined]  # a Concat of one part: the part, as a string
    parsed.set_environment(_ENVIRONMENT)
    return parsed


def _nested_loop_depth(node: nodes.Node, depth: int = 0) -> int:
    depth += isinstance(node, nodes.For)
    return max((_nested_loop_depth(child, depth) for child in node.iter_child_nodes()), default=depth)


def _check_loops(parsed: nodes.Template) -> None:
    """Prefect's loop constraints: at most `MAX_LOOP_COUNT` loops, nested at most
    `MAX_NESTED_LOOP_DEPTH` deep (with ranges of 100 at most, four nested loops made 10^8
    iterations), with Prefect's messages."""
    loops = list(parsed.find_all(nodes.For))
    if len(loops) > MAX_LOOP_COUNT:
        raise SecurityError(f"Contains {len(loops)} for loops. Templates can contain no more than "
                            f"{MAX_LOOP_COUNT} for loops.")
    depth = max((_nested_loop_depth(loop) for loop in loops), default=0)
    if depth > MAX_NESTED_LOOP_DEPTH:
        raise SecurityError(f"Contains nested for loops at a depth of {depth}. Templates can nest for loops "
                            f"no more than {MAX_NESTED_LOOP_DEPTH} loops deep.")


def render_template(template: str) -> str:
    if len(template) > MAX_TEMPLATE_LENGTH:
        raise HydrationError(f"Invalid jinja: the template is longer than {MAX_TEMPLATE_LENGTH} characters")
    try:
        parsed = _ENVIRONMENT.parse(template)
        _check_loops(parsed)
        compiled = _ENVIRONMENT.from_string(_count_work(parsed))
        steps = _STEPS.set([MAX_TEMPLATE_STEPS])
        try:
            # Streamed, so that the output stops at its bound rather than after it was made.
            chunks, length = [], 0
            for chunk in compiled.generate():
                length += len(chunk)
                if length > MAX_RENDERED_LENGTH:
                    raise HydrationError(f"Invalid jinja: the result is longer than {MAX_RENDERED_LENGTH} characters")
                chunks.append(chunk)
        finally:
            _STEPS.reset(steps)
    except (TemplateError, SecurityError, OverflowError, RecursionError, MemoryError, TypeError, ValueError,
            ArithmeticError) as e:
        raise HydrationError(f"Invalid jinja: {e}") from None
    return "".join(chunks)


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
    """`parameters` with every `__prefect_kind` value resolved, checked as storable."""
    made = _Hydration(variables)
    result = made.hydrate(parameters)
    hydrated = {} if result is _DROP else result
    try:
        check_json_document(hydrated)
    except ValueError as e:
        raise HydrationError(f"Invalid hydrated value: {e}") from None
    if made.produced:  # plain parameters were sized with the request, as Prefect sizes them
        problem = parameters_size_problem(hydrated)
        if problem:
            raise HydrationError(f"Invalid hydrated value: {problem}")
    return hydrated


class _Hydration:
    """One hydration: the variables, and how many characters the resolved values have made
    so far. A few bytes of request can make much more (each template up to
    `MAX_RENDERED_LENGTH`, a large variable named many times), so hydration stops once they
    alone pass the size limit on parameters, before the rest is made."""

    def __init__(self, variables: Mapping[str, Any]) -> None:
        self.variables = variables
        self.produced = 0

    def _made(self, value: Any, size: int) -> Any:
        self.produced += size
        if self.produced > MAX_PARAMETERS_BYTES:
            raise HydrationError(f"Invalid hydrated value: the hydrated values are longer than the "
                                 f"{MAX_PARAMETERS_BYTES} bytes allowed for parameters")
        return value

    def hydrate(self, value: Any) -> Any:
        if isinstance(value, dict) and KIND in value:
            return self._resolve(value)
        if isinstance(value, dict):
            return {k: h for k, v in value.items() if (h := self.hydrate(v)) is not _DROP}
        if isinstance(value, list):
            return [h for v in value if (h := self.hydrate(v)) is not _DROP]
        return value

    def _inner(self, value: Any) -> Any:
        return self.hydrate(value) if isinstance(value, dict) else value

    def _resolve(self, obj: dict[str, Any]) -> Any:
        kind = obj[KIND]
        if kind == "none":
            if "value" not in obj:
                raise HydrationError("Missing 'value' key in __prefect object")
            return self.hydrate(obj["value"])
        if kind == "json":
            if "value" not in obj:
                return _DROP
            raw = self._inner(obj["value"])
            if not isinstance(raw, str):
                return raw
            try:  # ValueError: also an integer of more than 4,300 digits
                return self._made(json.loads(raw), len(raw))
            except (ValueError, RecursionError) as e:
                raise HydrationError(f"Invalid JSON: {e}") from None
        if kind == "jinja":
            if "template" not in obj:
                raise HydrationError("Missing 'template' key in __prefect object")
            template = self._inner(obj["template"])
            if not isinstance(template, str):
                raise HydrationError("Invalid jinja: the template is not a string")
            rendered = render_template(template)
            return self._made(rendered, len(rendered))
        if kind == "workspace_variable":
            if "variable_name" not in obj:
                return _DROP
            name = self._inner(obj["variable_name"])
            if not isinstance(name, str) or name not in self.variables:
                raise HydrationError(f"Variable '{name}' not found in workspace.")
            value = self.variables[name]
            return self._made(value, len(to_json(value)))
        return obj.get("value")
