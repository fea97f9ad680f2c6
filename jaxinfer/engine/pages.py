"""PagePool: which KV-cache pages are free, held (with reference counts) or holding a cached prefix.

Page 0 is the null page: never handed out, it is where the unused entries of a page table point. A page whose
count falls to 0 joins the free queue: at its front if it holds nothing reusable, at its back if the prefix cache
still maps a hash to it, so allocation takes empty pages first and then evicts cached ones least recently freed
first (an OrderedDict: O(1) move_to_end / popitem). A cached page that a prefix hit claims leaves the queue.
Allocation is all or nothing.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from jaxinfer.engine.prefix_cache import PrefixCache

NULL_PAGE = 0


class PagePool:
    def __init__(self, num_pages: int, prefix_cache: PrefixCache | None = None):
        if not (isinstance(num_pages, int) and num_pages >= 2):
            raise ValueError(f"num_pages={num_pages!r} must be an int >= 2 (page 0 is the null page)")
        self.num_pages = num_pages
        self.prefix_cache = prefix_cache
        self.refcount = [0] * num_pages
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(1, num_pages))

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages an allocation can take now: empty ones and cached ones nobody holds."""
        return len(self._free)

    @property
    def num_cached_free(self) -> int:
        cache = self.prefix_cache
        return 0 if cache is None else sum(1 for page in self._free if cache.holds(page))

    @property
    def num_held(self) -> int:
        return self.num_usable - len(self._free)

    def free_order(self) -> list[int]:
        """The free queue, next to be handed out first."""
        return list(self._free)

    def is_free(self, page: int) -> bool:
        return page in self._free

    def allocate(self, n: int) -> list[int] | None:
        """n pages with count 1, or None (and nothing changed) if fewer than n are free."""
        if n > len(self._free):
            return None
        pages = [self._free.popitem(last=False)[0] for _ in range(n)]
        for page in pages:
            if self.prefix_cache is not None:
                self.prefix_cache.evict(page)
            self.refcount[page] = 1
        return pages

    def share(self, pages: Iterable[int]) -> None:
        """One more holder for each page (a prefix hit); a cached page nobody held leaves the free queue."""
        for page in pages:
            assert page != NULL_PAGE
            if self.refcount[page] == 0:
                del self._free[page]
            self.refcount[page] += 1

    def release(self, pages: list[int]) -> None:
        """One holder fewer for each page. Released last page first, so that of a finished request's cached
        pages the tail (the least shared) is evicted before the head (a prefix others are likelier to share)."""
        for page in reversed(pages):
            assert self.refcount[page] > 0, f"page {page} released more often than held"
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                self._free[page] = None
                if self.prefix_cache is None or not self.prefix_cache.holds(page):
                    self._free.move_to_end(page, last=False)
