"""A thread-safe LRU cache of parameter graphs (or anything else built once per key)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
import threading
from typing import Generic, TypeVar

__all__ = ["GraphCache"]

_V = TypeVar("_V")


class GraphCache(Generic[_V]):
    """Thread-safe LRU keyed by a string: parameter graphs by content hash (e.g. a checkpoint's
    sha256), or anything else built once per key (templates by architecture)."""

    def __init__(self, maxsize: int = 512) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self._items: OrderedDict[str, _V] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(self, key: str, build: Callable[[], _V]) -> _V:
        """The cached graph for ``key``, calling ``build()`` only on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        graph = build()  # NOTE: built outside the lock; a racing duplicate build is harmless
        with self._lock:
            self._items[key] = graph
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return graph

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
