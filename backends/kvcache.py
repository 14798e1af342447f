"""Per-conversation KV caches kept between turns: a bounded LRU, engine-agnostic.

An entry is (token ids, cache) where the cache holds exactly those tokens. A reply takes its
conversation's entry out (so no other reply can touch it), reuses the longest common prefix
with its new prompt, and puts the grown cache back. Bounded by entries and by total tokens;
the least recently used go first. Knows nothing of torch beyond `len(ids)`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable


class SessionCaches:
    def __init__(self, max_tokens: int, max_entries: int) -> None:
        self.max_tokens, self.max_entries = max_tokens, max_entries
        self._entries: "OrderedDict[Hashable, tuple[list[int], Any]]" = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: Hashable) -> tuple[list[int], Any] | None:
        with self._lock:
            return self._entries.pop(key, None)

    def put(self, key: Hashable, ids: list[int], cache: Any) -> None:
        if len(ids) > self.max_tokens or self.max_entries < 1:
            return
        with self._lock:
            self._entries[key] = (ids, cache)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries or self.tokens() > self.max_tokens:
                self._entries.popitem(last=False)

    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
