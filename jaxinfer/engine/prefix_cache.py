"""The prefix cache: full pages of tokens, found again by a hash chain.

Page i of a sequence is keyed by h_i = H(h_{i-1}, tokens of page i) (BLAKE2b, 16 bytes; h_{-1} empty), so a key
names the whole prefix up to the page's end, not just the page. A hit compares the page's own token ids and its
parent's key too, so even a hash collision cannot hand out another prompt's K/V. Only full pages are cached: a
partial page is still being written by its request. This class is only the index (hash -> page); which pages are
free or held is PagePool's, which calls `evict` when it reuses a cached page.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np


def page_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(np.asarray(token_ids, np.int64).tobytes())
    return digest.digest()


def extend_hashes(hashes: list[bytes], token_ids: Sequence[int], page_size: int) -> None:
    """Append to `hashes` the chain of every full page of token_ids not hashed yet."""
    for i in range(len(hashes), len(token_ids) // page_size):
        parent = hashes[i - 1] if i else b""
        hashes.append(page_hash(parent, token_ids[i * page_size : (i + 1) * page_size]))


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: bytes
    parent: bytes
    token_ids: tuple[int, ...]


class PrefixCache:
    def __init__(self, page_size: int):
        self.page_size = page_size
        self._page_of: dict[bytes, int] = {}
        self._entry: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entry)

    def holds(self, page: int) -> bool:
        return page in self._entry

    def lookup(self, hashes: Sequence[bytes], token_ids: Sequence[int], max_pages: int) -> list[int]:
        """The cached pages of the longest prefix (at most max_pages pages) whose keys and token ids match."""
        pages = []
        ps = self.page_size
        for i, key in enumerate(hashes[:max_pages]):
            page = self._page_of.get(key)
            if page is None:
                break
            entry = self._entry[page]
            if entry.parent != (hashes[i - 1] if i else b"") or entry.token_ids != tuple(token_ids[i * ps : (i + 1) * ps]):
                break
            pages.append(page)
        return pages

    def insert(self, page: int, key: bytes, parent: bytes, token_ids: Sequence[int]) -> bool:
        """Map key -> page unless the key is cached already (the same prefix computed twice at once: the first
        copy stays, the second page stays private and is freed as empty). -> whether `page` is now cached."""
        assert len(token_ids) == self.page_size, "only full pages are cached"
        if key in self._page_of or page in self._entry:
            return False
        self._page_of[key] = page
        self._entry[page] = _Entry(key, parent, tuple(token_ids))
        return True

    def evict(self, page: int) -> None:
        """Forget a page (PagePool is handing it out for new tokens); a no-op for a page that holds nothing."""
        entry = self._entry.pop(page, None)
        if entry is not None:
            del self._page_of[entry.key]
