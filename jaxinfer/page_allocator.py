"""Host-side page bookkeeping for the paged KV cache, in plain Python, outside every jitted function.

Invariants: a page belongs to at most one live sequence; free + owned pages == the pool; a request that
cannot be met changes nothing.
"""

from __future__ import annotations

import numpy as np


class PagePoolExhausted(ValueError):
    """Raised when the pool cannot hold a request; the allocator is left exactly as it was."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, pages_per_seq: int):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("pages_per_seq", pages_per_seq)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive int")
        self.num_pages = num_pages
        self.page_size = page_size
        self.pages_per_seq = pages_per_seq
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out low pages first
        self._owned: dict[int, list[int]] = {}  # seq_id -> its pages, in position order

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages(self, seq_id: int) -> list[int]:
        return list(self._owned.get(seq_id, ()))

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def reserve(self, requests: dict[int, int]) -> None:
        """Grow each seq_id to hold its number of tokens; all of them or, on PagePoolExhausted, none."""
        extra = {}
        for seq_id, num_tokens in requests.items():
            if num_tokens < 0:
                raise ValueError(f"num_tokens={num_tokens} for sequence {seq_id} must be >= 0")
            needed = self.pages_needed(num_tokens)
            if needed > self.pages_per_seq:
                raise PagePoolExhausted(
                    f"sequence {seq_id} needs {needed} pages for {num_tokens} tokens, more than "
                    f"pages_per_seq={self.pages_per_seq} (page_size={self.page_size})"
                )
            extra[seq_id] = max(0, needed - len(self._owned.get(seq_id, ())))
        total = sum(extra.values())
        if total > len(self._free):
            raise PagePoolExhausted(
                f"page pool too small: the request needs {total} more pages of {self.page_size} tokens, "
                f"{len(self._free)} of num_pages={self.num_pages} are free"
            )
        for seq_id, n in extra.items():
            self._owned.setdefault(seq_id, []).extend(self._free.pop() for _ in range(n))

    def free(self, seq_id: int) -> None:
        """Return a sequence's pages to the pool (a no-op for a sequence that holds none)."""
        self._free.extend(reversed(self._owned.pop(seq_id, [])))

    def page_table(self, max_seqs: int) -> np.ndarray:
        """[max_seqs, pages_per_seq] int32 for the device; unused entries point at page 0 (never read unmasked)."""
        table = np.zeros((max_seqs, self.pages_per_seq), np.int32)
        for seq_id, pages in self._owned.items():
            if not 0 <= seq_id < max_seqs:
                raise ValueError(f"seq_id={seq_id} outside the page table's {max_seqs} rows")
            table[seq_id, : len(pages)] = pages
        return table
