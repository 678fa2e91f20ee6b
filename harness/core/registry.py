"""A small typed registry: registration by decorator, lazy `module:attr` targets, entry points, listing by
pattern, "did you mean" on unknown names, and loud failure on duplicates (lm-eval's and timm's idea)."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T", bound=Callable)

__all__ = ["Registry", "VARIANTS", "KV_POLICIES", "METRICS", "register_variant", "register_kv_policy",
           "create_variant"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str | None = None, builtins: str | None = None):
        """`builtins`: the module whose import registers the built-in entries, imported by name on first look-up
        (a plugin, like an entry point: the core never imports the variants' code statically)."""
        self.kind, self.group, self.builtins = kind, entry_point_group, builtins
        self._items: dict[str, T | str] = {}
        self._entry_points_read = False

    def register(self, fn: T) -> T:
        """Decorator: registers `fn` under its own name."""
        self.add(fn.__name__, fn)
        return fn

    def add(self, name: str, target: T | str) -> None:
        """Registers a callable, or a lazy "module:attr" string imported on first use."""
        if not _NAME.match(name):
            raise ValueError(f"bad {self.kind} name {name!r}: use lower-case letters, digits and _")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered (by {self.origin(name)})")
        self._items[name] = target

    def _read_entry_points(self) -> None:
        if self._entry_points_read:
            return
        self._entry_points_read = True
        if self.builtins:
            importlib.import_module(self.builtins)
        if self.group is None:
            return
        for ep in entry_points(group=self.group):
            if ep.name not in self._items:
                self.add(ep.name, ep.value)

    def get(self, name: str) -> T:
        self._read_entry_points()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise KeyError(f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.list())}")
        target = self._items[name]
        if isinstance(target, str):
            module, attr = target.split(":")
            target = self._items[name] = getattr(importlib.import_module(module), attr)
        return target

    def list(self, pattern: str = "*", sort: bool = True) -> list[str]:
        """Names matching a shell-style pattern, sorted (or in registration order)."""
        self._read_entry_points()
        names = [n for n in self._items if fnmatch.fnmatch(n, pattern)]
        return sorted(names) if sort else names

    def origin(self, name: str) -> str:
        """Where an entry is defined, as 'module:line' (or the lazy target)."""
        target = self._items[name]
        if isinstance(target, str):
            return target
        if hasattr(target, "defined_at"):  # a factory made by a helper names the line that registered it
            return target.defined_at
        try:
            return f"{target.__module__}:{inspect.getsourcelines(target)[1]}"
        except (TypeError, OSError, AttributeError):
            return repr(target)

    def __contains__(self, name: str) -> bool:
        self._read_entry_points()
        return name in self._items


VARIANTS: Registry = Registry("variant", "varbench.variants", builtins="varbench.variants")
KV_POLICIES: Registry = Registry("KV policy", "varbench.kv_policies", builtins="varbench.variants")
METRICS: Registry = Registry("metric", "varbench.metrics")  # table columns: see harness/eval/metrics.py
register_variant = VARIANTS.register
register_kv_policy = KV_POLICIES.register


def create_variant(name: str, **kwargs):
    """Builds a registered variant by name (the built-in variants register on first look-up)."""
    return VARIANTS.get(name)(**kwargs)
