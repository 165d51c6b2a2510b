"""A small name -> item registry that rejects duplicates (strategies, partitioners, tasks, presets)."""

from __future__ import annotations

from typing import Generic, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> Optional[T]:
        return self._items.get(name)

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"no {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
