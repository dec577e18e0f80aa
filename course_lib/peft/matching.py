"""Choosing modules by name: the patterns every injection in `course_lib.peft` accepts.

A model's modules have dotted names (`bert.encoder.layer.0.attention.self.query`); a PEFT method
is put on the modules whose names match a *pattern*. Two kinds of pattern are accepted, the same
two that Hugging Face peft accepts for `target_modules`:

- a string: a regular expression that must match the **whole** name (`re.fullmatch`), e.g.
  `r".*\\.(query|value)"` or `r"bert\\.encoder\\.layer\\.[0-2]\\..*\\.query"`;
- a list (or tuple, or set) of strings: a name matches when it equals one of them or ends with
  `"." + item`, e.g. `["query", "value"]` or `["output.dense"]` (the last components of the name).

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

__all__ = ["ModulePattern", "describe_pattern", "matching_module_names", "name_matches"]

#: A regex (full match on the dotted module name) or a list of name suffixes.
ModulePattern = str | Sequence[str]


def name_matches(name: str, pattern: ModulePattern) -> bool:
    """True when the dotted module `name` matches `pattern` (regex full match, or suffix list)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == item or name.endswith("." + item) for item in pattern)


def describe_pattern(pattern: ModulePattern) -> str:
    """The pattern as it should appear in an error message."""
    return repr(pattern) if isinstance(pattern, str) else repr(list(pattern))


def _check_pattern(pattern: object) -> None:
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"module pattern {pattern!r} is not a valid regular expression: {error}") from None
        return
    if not isinstance(pattern, Iterable) or not all(isinstance(item, str) for item in pattern):
        raise TypeError(
            f"a module pattern is a regex string or a list of name suffixes, got {pattern!r} "
            f"({type(pattern).__name__})"
        )


def matching_module_names(
    model: nn.Module,
    pattern: ModulePattern,
    *,
    module_type: type | tuple[type, ...] | Callable[[nn.Module], bool] | None = None,
    what: str = "target_modules",
) -> list[str]:
    """Names of the modules of `model` that match `pattern`, in `model.named_modules()` order.

    Raises ValueError when nothing matches, naming the pattern and a few module names of the
    model so that the fix is easy to see. With `module_type` (a class, a tuple of classes, or a
    predicate such as `course_lib.peft.layers.is_linear_like`), every match must be accepted by it,
    else TypeError names the offending module (e.g. LoRA put on a LayerNorm).
    """
    _check_pattern(pattern)
    names = [name for name, _ in model.named_modules() if name and name_matches(name, pattern)]
    if not names:
        examples = [name for name, _ in model.named_modules() if name]
        # show leaves first: those are what a pattern usually aims at
        leaves = [name for name, module in model.named_modules() if name and not list(module.children())]
        shown = (leaves or examples)[:8]
        raise ValueError(
            f"{what}={describe_pattern(pattern)} matches no module of {type(model).__name__}. "
            f"A string is a regex that must match the whole dotted name; a list matches name endings. "
            f"Some module names of this model: {shown}"
        )
    if module_type is not None:
        modules = dict(model.named_modules())
        is_class = isinstance(module_type, (type, tuple))
        for name in names:
            accepted = isinstance(modules[name], module_type) if is_class else module_type(modules[name])
            if not accepted:
                if isinstance(module_type, type):
                    expected = module_type.__name__
                elif isinstance(module_type, tuple):
                    expected = " or ".join(t.__name__ for t in module_type)
                else:
                    expected = getattr(module_type, "expects", module_type.__name__)
                found = type(modules[name])
                if found.__module__.startswith("course_lib.peft"):  # a wrapper this library put there
                    raise TypeError(
                        f"{what}={describe_pattern(pattern)} matches {name!r}, which is already a {found.__name__}: "
                        "a PEFT method was injected into this model before (inject_peft called twice?). Inject "
                        "once, or call merge_and_unload(model) first to fold the old one in"
                    )
                raise TypeError(
                    f"{what}={describe_pattern(pattern)} matches {name!r}, a {found.__name__}, "
                    f"but this method needs {expected} modules; narrow the pattern"
                )
    return names
