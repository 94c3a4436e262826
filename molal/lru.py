"""A small thread-safe LRU mapping, bounded by entries and (optionally) by a size measure.

Every per-process cache of the service is one of these (loaded mixtures and models, project states, task
files read from Label Studio, the secret registry): nothing a request can name grows a process's memory or
its open files without bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most ``max_entries`` entries and (with ``sizeof``) at most ``max_size`` in total; the least recently
    used go first. ``on_evict(key, value)`` is called (outside the lock) for each entry pushed out."""

    def __init__(self, max_entries: int, *, max_size: int | None = None, sizeof: Callable[[V], int] | None = None,
                 on_evict: Callable[[K, V], None] | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if (max_size is None) != (sizeof is None):
            raise ValueError("max_size and sizeof go together")
        self.max_entries = max_entries
        self.max_size = max_size
        self._sizeof = sizeof
        self._on_evict = on_evict
        self._d: OrderedDict[K, V] = OrderedDict()
        self.size = 0
        self._lock = threading.Lock()

    def _measure(self, v: V) -> int:
        return self._sizeof(v) if self._sizeof is not None else 0

    def get(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            if key not in self._d:
                return default
            self._d.move_to_end(key)
            return self._d[key]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)

    def __iter__(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._d))

    def put(self, key: K, value: V) -> None:
        """Insert or replace ``key`` (most recently used). A value larger than ``max_size`` is not kept."""
        evicted: list[tuple[K, V]] = []
        with self._lock:
            if key in self._d:
                old = self._d.pop(key)
                self.size -= self._measure(old)
                if old is not value:
                    evicted.append((key, old))
            self._d[key] = value
            self.size += self._measure(value)
            while self._d and (len(self._d) > self.max_entries
                               or (self.max_size is not None and self.size > self.max_size)):
                k, v = self._d.popitem(last=False)
                self.size -= self._measure(v)
                evicted.append((k, v))
        self._evicted(evicted)

    def setdefault(self, key: K, make: Callable[[], V]) -> V:
        """The value at ``key``, made with ``make()`` (under the lock: made once) when absent."""
        evicted: list[tuple[K, V]] = []
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
            value = make()
            self._d[key] = value
            self.size += self._measure(value)
            while len(self._d) > 1 and (len(self._d) > self.max_entries
                                        or (self.max_size is not None and self.size > self.max_size)):
                k, v = self._d.popitem(last=False)
                self.size -= self._measure(v)
                evicted.append((k, v))
        self._evicted(evicted)
        return value

    def pop(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            if key not in self._d:
                return default
            v = self._d.pop(key)
            self.size -= self._measure(v)
            return v

    def clear(self) -> None:
        with self._lock:
            items = list(self._d.items())
            self._d.clear()
            self.size = 0
        self._evicted(items)

    def _evicted(self, items: list[tuple[K, V]]) -> None:
        if self._on_evict is not None:
            for k, v in items:
                self._on_evict(k, v)


__all__ = ["LRU"]
