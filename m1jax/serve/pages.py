"""Host-side bookkeeping of the KV pages: a free list and a reference count per page.

A page is held by the sequences whose page tables list it and by the prefix-cache nodes that keep it; it returns to
the free list when the last holder lets go. Page 0 is the scratch page (padding writes land there) and is never
handed out. Page ids are the same in every softmax layer: one id names the page of every layer's pool.
"""
from __future__ import annotations

import numpy as np


class PagePool:
    """Reference-counted page ids 1 .. num_pages - 1."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs the scratch page and at least one more; got num_pages={num_pages}")
        self.num_pages = num_pages
        self._refs = np.zeros(num_pages, np.int64)
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refs(self, page: int) -> int:
        return int(self._refs[page])

    def allocate(self, n: int) -> list[int]:
        """n fresh pages, each with one reference (the caller's)."""
        if n > len(self._free):
            raise RuntimeError(f"out of KV pages: {n} wanted, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._refs[pages] = 1
        return pages

    def incref(self, pages) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} is not allocated")
            self._refs[p] += 1

    def decref(self, pages) -> None:
        """Drop one reference to each page; pages that reach zero are free again."""
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} released more often than held")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(int(p))
