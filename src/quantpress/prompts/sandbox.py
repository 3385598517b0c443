"""A Jinja sandbox whose renders have a budget of CPU time and of what they may build.

jinja2's ImmutableSandboxedEnvironment keeps a chat template (untrusted code from a model
repository) away from Python's internals, but not from running for ever or filling memory:
nested `range` loops, a macro that calls itself twice per level, `10**10**7` (folded at compile
time, so it costs seconds before the first render), `'x' * 10**10`, `'a'|center(10**10)`.
BoundedSandbox gives every render two budgets, like minijinja's fuel; running out of either
raises RenderLimitExceeded, a TemplateError:

- CPU time: `cpu_seconds` of the rendering thread's CPU time (CPU, not wall time, so a busy
  server does not fail renders that merely waited), checked at every step template code takes:
  each loop iteration, call, attribute or item access, operator, filter and test.
- Size: `max_built` characters or items in all, charged for every value an operation returns
  (a container by everything it holds, a shared value once per reference, so printing it cannot
  amplify), for every macro or `{% set %}` block, and for the output. The operations whose result
  can outgrow their inputs in one call (repetition, power, padding and format widths, join,
  replace, ...) are charged their result's size *before* they run, so a huge result is refused
  before it is allocated. Integers are kept under MAX_INT_BITS bits.

Constant folding cannot get around these: intercepted operators and wrapped filters are never
folded at compile time. `lipsum`, whose output size is a number, is not offered (no chat
template uses it). Python's recursion limit bounds recursion; the caller turns the
RecursionError (like any other exception a template raises) into a TemplateError.
"""

from __future__ import annotations

import math
import re
import string
import threading
import time
from collections.abc import Callable, Iterable, Iterator, ItemsView, KeysView, ValuesView
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

from quantpress.errors import TemplateError

# A chat template counts messages and characters; multiplying or printing a huge integer is a
# single uninterruptible step, so integers stay small.
MAX_INT_BITS = 1 << 16
_CONTAINERS = (list, tuple, dict, set, frozenset, KeysView, ValuesView, ItemsView)
_SCALAR_WEIGHT = 24  # a float, None, a bool... as printed (a float's repr has at most 24 characters)


class RenderLimitExceeded(TemplateError):
    """A render used more CPU time, or built more, than its budget."""


@dataclass(frozen=True)
class RenderLimits:
    cpu_seconds: float = 1.0  # real chat templates render a long conversation in milliseconds
    max_built: int = 1 << 24  # characters or items: many times the longest prompt a model takes


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles every for-loop to iterate through `environment.metered(...)`, and every `~`
    concatenation through `environment.sized(...)`: no loop runs, and no string grows, unchecked."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("metered"), [node.iter], [], None, None,
                               lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment whose renders, inside `bounded()`, keep to `limits`."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, limits: RenderLimits = RenderLimits(), **options: Any) -> None:
        super().__init__(**options)
        self.limits = limits
        self._render = threading.local()  # this thread's budgets: renders may run in parallel threads
        self.globals.pop("lipsum", None)
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: self._stepping(test) for name, test in self.tests.items()}

    def add_filter(self, name: str, function: Callable) -> None:
        """Register a filter under the same budgets as the built-in ones."""
        self.filters[name] = self._bounded_filter(name, function)

    @contextmanager
    def bounded(self) -> Iterator[None]:
        """Renders in this block (on this thread) share one fresh pair of budgets."""
        self._render.deadline = time.thread_time() + self.limits.cpu_seconds
        self._render.built = 0
        self._render.steps = 0
        try:
            yield
        finally:
            self._render.deadline = None

    # -- the budgets ------------------------------------------------------------------------
    def step(self) -> None:
        """One step of template code. A no-op outside `bounded()`: constant folding calls the
        hooks at compile time, where the size checks still apply but no clock runs."""
        render = self._render
        if getattr(render, "deadline", None) is None:
            return
        render.steps += 1
        # reading the thread's CPU clock is a system call: every 32 steps is ample
        if render.steps % 32 == 0 and time.thread_time() > render.deadline:
            raise RenderLimitExceeded(f"the chat template ran for more than {self.limits.cpu_seconds:g} s of "
                                      "CPU time (a loop without end?)")

    def reserve(self, size: float) -> None:
        """Refuse an operation whose result would take `size` beyond the size budget."""
        built = getattr(self._render, "built", 0)
        if built + size > self.limits.max_built:
            raise RenderLimitExceeded(f"the chat template builds more than {self.limits.max_built} characters "
                                      "or items while rendering")

    def charge(self, size: int) -> None:
        """Count `size` against the render's budget (outside a render, only check it fits at all)."""
        self.reserve(size)
        if getattr(self._render, "deadline", None) is not None:
            self._render.built += size

    def sized(self, value: Any) -> Any:
        """`value`, charged to the size budget (integers: checked against MAX_INT_BITS)."""
        if isinstance(value, str):  # the common case, first
            self.charge(len(value))
        elif isinstance(value, int):
            self._check_bits(value.bit_length())
        else:
            self.charge(self._weight(value))
        return value

    def metered(self, iterable: Iterable) -> Iterator:
        """A for-loop's iterable: each iteration is a step."""
        for item in iterable:
            self.step()
            yield item

    def _weight(self, value: Any) -> int:
        """Characters or items `value` holds as printed, counting a shared value once per
        reference (a list of 1000 references to one string prints it 1000 times); stops counting
        once past the budget."""
        limit = self.limits.max_built + 1
        memo: dict[int, int] = {}

        def weigh(v: Any) -> int:
            if isinstance(v, (str, bytes)):
                return len(v)
            if isinstance(v, int):
                return v.bit_length() // 3 + 2  # at least its decimal digits and a sign
            if not isinstance(v, _CONTAINERS):
                return _SCALAR_WEIGHT
            if id(v) in memo:
                return memo[id(v)]
            total = len(v)
            # (key, value) pairs are weighed apart: the pair tuples are temporaries, and a freed
            # temporary's id may come back for the next one, which would corrupt the memo
            pairs = v.items() if isinstance(v, dict) else v if isinstance(v, ItemsView) else None
            for item in pairs if pairs is not None else v:
                total += weigh(item[0]) + weigh(item[1]) if pairs is not None else weigh(item)
                if total >= limit:
                    break
            memo[id(v)] = total
            return total

        return weigh(value)

    def _check_bits(self, bits: float) -> None:
        if bits > MAX_INT_BITS:
            raise RenderLimitExceeded(f"the chat template computes a number of more than {MAX_INT_BITS} bits")

    # -- the sandbox's hooks -----------------------------------------------------------------
    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805  jinja's signature
        __self.step()
        subject = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", None)
        if isinstance(subject, (str, bytes)) and name == "join" and args:
            args = (__self._charged_items(args[0], len(subject)), *args[1:])
        growth = _METHOD_GROWTH.get(name)
        if growth is not None and isinstance(subject, (str, bytes, int)) and not isinstance(subject, bool):
            __self.reserve(growth(subject, args, kwargs, __self._weight))
        return __self.sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.step()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        self.step()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            self._check_bits(right * left.bit_length())
        elif operator == "*" and isinstance(left, int) and isinstance(right, int):
            self._check_bits(left.bit_length() + right.bit_length())
        elif operator == "*":
            sequence, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(times, int) and isinstance(sequence, (str, bytes, list, tuple)):
                self.reserve(self._weight(sequence) * max(times, 0))
        elif operator == "%" and isinstance(left, str):
            values = right if isinstance(right, tuple) else (right,)
            self.reserve(_printf_size(left, values, self._weight))
        return self.sized(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """str.format and str.format_map, charged their result's size before formatting."""
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        template = value.__self__

        @wraps(formatter)
        def checked_format(*args: Any, **kwargs: Any) -> str:
            mapping = args[0] if value.__name__ == "format_map" and args and isinstance(args[0], dict) else {}
            self.reserve(_format_size(template, [*args, *kwargs.values(), *mapping.values()], self._weight))
            return formatter(*args, **kwargs)

        return checked_format

    def concat(self, chunks: Iterable[str]) -> str:  # type: ignore[override]  # Environment.concat is "".join
        """Joins the output of a render, macro or block, charging it as it grows."""
        pieces = []
        for chunk in chunks:
            self.charge(len(chunk))
            pieces.append(chunk)
        return "".join(pieces)

    def _charged_items(self, items: Iterable, separator: int) -> Iterator:
        """A join's items, each charged (with a separator) as the join collects them: str.join
        gathers every item before it allocates the result, so an oversized join fails first."""
        for item in items:
            self.charge(self._weight(item) + separator)
            yield item

    def _bounded_filter(self, name: str, f: Callable) -> Callable:
        growth = _FILTER_GROWTH.get(name)
        # a filter may take the context, eval context or environment first (jinja's pass_* decorators)
        at = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0

        @wraps(f)  # keeps jinja_pass_arg, so jinja passes the same arguments
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self.step()
            if name == "join" and len(args) > at:
                separator = _arg(args[at + 1:], kwargs, 0, "d", "")
                args = (*args[:at], self._charged_items(args[at], self._weight(separator)), *args[at + 1:])
            if growth is not None and len(args) > at:
                self.reserve(growth(args[at], args[at + 1:], kwargs, self._weight))
            return self.sized(f(*args, **kwargs))

        return bounded

    def _stepping(self, test: Callable) -> Callable:
        @wraps(test)
        def stepping(*args: Any, **kwargs: Any) -> Any:
            self.step()
            return test(*args, **kwargs)

        return stepping


# -- result sizes known before an operation runs ------------------------------------------------
# Upper bounds on the size of an operation's result, from its subject (the string a method is
# called on, or a filter's input), its arguments and `weight` (BoundedSandbox._weight). Only
# operations whose result can outgrow their inputs by more than a constant factor need one; the
# rest are charged by their result.
Growth = Callable[[Any, tuple, dict, Callable[[Any], int]], float]


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _width(value: Any, weight: Callable[[Any], int]) -> int:
    """A width argument: a number, or a string used as the padding itself (jinja's indent)."""
    return value if isinstance(value, int) else weight(value)


def _padded(subject: Any, args: tuple, kwargs: dict, weight: Callable) -> float:  # center, ljust, ...
    return max(weight(subject), _width(_arg(args, kwargs, 0, "width", 0), weight))


def _tabs_expanded(subject: Any, args: tuple, kwargs: dict, weight: Callable) -> float:
    return weight(subject) * max(_width(_arg(args, kwargs, 0, "tabsize", 8), weight), 1)


def _replaced(subject: Any, args: tuple, kwargs: dict, weight: Callable) -> float:
    old, new = weight(_arg(args, kwargs, 0, "old", "")), weight(_arg(args, kwargs, 1, "new", ""))
    occurrences = weight(subject) // max(old, 1) + 1
    return weight(subject) + occurrences * max(new - old, 0)


def _translated(subject: Any, args: tuple, kwargs: dict, weight: Callable) -> float:
    table = _arg(args, kwargs, 0, "table", {})
    longest = max((weight(v) for v in table.values()), default=1) if isinstance(table, dict) else 1
    return weight(subject) * max(longest, 1)


def _indented(subject: Any, args: tuple, kwargs: dict, weight: Callable) -> float:
    lines = subject.count("\n") + 1 if isinstance(subject, str) else weight(subject)
    return weight(subject) + lines * _width(_arg(args, kwargs, 0, "width", 4), weight)


def _wrapped(subject: Any, args: tuple, kwargs: dict, weight: Callable) -> float:
    breaks = weight(subject) // max(_width(_arg(args, kwargs, 0, "width", 79), weight), 1) + 1
    return weight(subject) + breaks * (weight(_arg(args, kwargs, 2, "wrapstring", "\n")) + 1)


def _centered(value: Any, args: tuple, kwargs: dict, weight: Callable) -> float:  # jinja's center(width=80)
    return max(weight(value), _width(_arg(args, kwargs, 0, "width", 80), weight))


def _batched(value: Any, args: tuple, kwargs: dict, weight: Callable) -> float:  # the last row is padded
    rows = _width(_arg(args, kwargs, 0, "linecount", 1), weight)
    return weight(value) + rows * weight(_arg(args, kwargs, 1, "fill_with"))


def _json_indented(value: Any, args: tuple, kwargs: dict, weight: Callable) -> float:
    indent = _arg(args, kwargs, 1, "indent") or 0  # our tojson(value, ensure_ascii, indent, ...)
    return weight(value) * (1 + _width(indent, weight))  # each item on a line of its own, indented


def _printf_formatted(value: Any, args: tuple, kwargs: dict, weight: Callable) -> float:  # jinja's format
    return _printf_size(str(value), [*args, *kwargs.values()], weight)


def _byte_length(subject: Any, args: tuple, kwargs: dict, weight: Callable) -> float:
    return _width(_arg(args, kwargs, 0, "length", 1), weight)


_METHOD_GROWTH: dict[str | None, Growth] = {
    "center": _padded,
    "ljust": _padded,
    "rjust": _padded,
    "zfill": _padded,
    "expandtabs": _tabs_expanded,
    "replace": _replaced,
    "translate": _translated,
    "to_bytes": _byte_length,
}

_FILTER_GROWTH: dict[str, Growth] = {
    "center": _centered,
    "indent": _indented,
    "wordwrap": _wrapped,
    "replace": _replaced,
    "batch": _batched,
    "format": _printf_formatted,
    "tojson": _json_indented,
}

_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)


def _printf_size(template: str, values: Iterable, weight: Callable) -> float:
    """An upper bound on `template % values`: each conversion as wide as its width or precision
    (`*`: taken from the arguments) or as the largest value."""
    values = list(values)
    fields, widest, starred = 0, 0, False
    for match in _PRINTF_SPEC.finditer(template):
        width, precision, conversion = match.groups()
        if conversion == "%":
            continue
        fields += 1
        starred = starred or "*" in (width, precision)
        widest = max([widest, *(_decimal(n) for n in (width, precision) if n and n != "*")])
    return len(template) + fields * max(widest, _widest_value(values, as_widths=starred, weight=weight))


def _format_size(template: str, values: list, weight: Callable) -> float:
    """An upper bound on `template.format(...)`: each field as wide as the numbers in its format
    spec (a nested `{}` spec: taken from the arguments) or as the largest value."""
    try:
        specs = [spec or "" for _, field, spec, _ in string.Formatter().parse(template) if field is not None]
    except ValueError:
        return len(template)  # a malformed template: formatting it fails before it builds anything
    widest = max([0, *(_decimal(n) for spec in specs for n in re.findall(r"\d+", spec))])
    nested = any("{" in spec for spec in specs)
    return len(template) + len(specs) * max(widest, _widest_value(values, as_widths=nested, weight=weight))


def _widest_value(values: list, *, as_widths: bool, weight: Callable) -> float:
    """The largest value as printed; with `as_widths`, integers count as the widths they may set."""
    return max([0, *(weight(v) for v in values), *(abs(v) for v in values if as_widths and isinstance(v, int))])


def _decimal(digits: str) -> float:
    # a number too long to parse is a width beyond any budget
    return int(digits) if len(digits) < 100 else math.inf
