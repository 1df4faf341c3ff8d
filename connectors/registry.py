"""Read-only registries by name, with a helpful miss.

Used for formats, scorers and query strategies::

    FORMATS: Registry[FormatSpec] = Registry("format")

    @FORMATS.register("coco")
    class CocoFormat: ...

    FORMATS["cocoo"]  # UsageError: unknown format 'cocoo'; choose one of: coco, voc, ...

Entries can be registered lazily (``register_lazy(name, "module:attr", hint=...)``) so
that optional backends are imported only when asked for, with an install hint when the
import fails.

A registry built with a ``loader`` calls it once, before its first read (a look-up, a
listing, a count, a membership test): the loader imports every module that registers
entries, so what a registry holds never depends on which module was imported first.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from connectors.errors import UsageError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A name → object mapping that refuses duplicates and explains misses."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, tuple[str, str | None]] = {}
        self._loader = loader

    def _load(self) -> None:
        """Run the loader once (entries it registers while running are kept)."""
        loader, self._loader = self._loader, None
        if loader is not None:
            try:
                loader()
            except BaseException:
                self._loader = loader
                raise

    def in_order(self) -> list[str]:
        """The names in the order they were registered (lazy entries last)."""
        self._load()
        return [*self._entries, *(n for n in self._lazy if n not in self._entries)]

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if name in self._entries or name in self._lazy:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def register_lazy(self, name: str, target: str, *, hint: str | None = None) -> None:
        """Register ``"package.module:attribute"`` to be imported on first use."""
        if name in self._entries or name in self._lazy:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._lazy[name] = (target, hint)

    def __getitem__(self, name: str) -> T:
        self._load()
        if name in self._entries:
            return self._entries[name]
        if name in self._lazy:
            target, hint = self._lazy[name]
            module_name, _, attr = target.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                extra = f" ({hint})" if hint else ""
                raise UsageError(
                    f"{self.kind} {name!r} needs a missing package{extra}: {exc}"
                ) from exc
            obj = getattr(module, attr)
            self._entries[name] = obj
            del self._lazy[name]
            return obj
        choices = ", ".join(sorted(self))
        close = difflib.get_close_matches(name, list(self), n=1)
        did_you_mean = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown {self.kind} {name!r}{did_you_mean}; choose one of: {choices}")

    def __iter__(self) -> Iterator[str]:
        self._load()
        yield from sorted({*self._entries, *self._lazy})

    def __len__(self) -> int:
        self._load()
        return len({*self._entries, *self._lazy})

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries or name in self._lazy
