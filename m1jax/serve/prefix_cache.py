"""The hybrid prefix cache: a trie over blocks of N prompt tokens whose nodes keep what a new request needs to start
after that prefix instead of at token 0.

A node at depth d stands for the prefix of m = d * N tokens. It keeps
* the lightning states of every lightning layer after those m tokens (a snapshot: fp32, its size independent of m);
* references to the KV pages that hold tokens 0 .. m - 1 of every softmax layer (shared read-only: a page is
  written only at positions past every prefix that refers to it, and a request that continues from a prefix ending
  inside a page copies that page first).
Softmax layers need the whole prefix's keys and values, lightning layers only the state at its end, so the two
parts together are the hybrid model's complete cache of the prefix.

Nodes are made only from prompt prefill chunks that end on a multiple of N (the engine ends chunks there), so a
snapshot is bit-for-bit the state a cold prefill of the same tokens computes. Eviction: least recently used leaves
first, while the bytes held (snapshots + distinct pages referred to) exceed the budget, or when the engine needs free
pages. Host-side bookkeeping only; the device arrays are the snapshots' and the engine's page pools.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Sequence

import numpy as np

from m1jax.serve.pages import PagePool


def block_key(tokens) -> bytes:
    """The trie key of a block of token ids: their int32 bytes. (A tuple of Python ints costs a conversion per token:
    a few ms per lookup of a 32K-token prompt, on every admission.)"""
    return np.ascontiguousarray(tokens, np.int32).tobytes()


@dataclasses.dataclass(eq=False)
class PrefixNode:
    """One block of the trie (the root has length 0 and no data)."""
    length: int                                  # m: prefix tokens up to and including this block
    parent: PrefixNode | None = None
    children: dict = dataclasses.field(default_factory=dict)  # block_key(block tokens) -> PrefixNode
    pages: tuple[int, ...] = ()                  # pages holding tokens 0 .. m - 1
    snapshot: Any = None                         # lightning states after m tokens (device arrays)
    last_used: int = 0
    alive: bool = True


class PrefixCache:
    """Token-block trie with LRU eviction under a byte budget.

    block: N tokens per node; budget_bytes: 0 disables the cache; page_bytes: one page of every softmax layer (K and
    V); snapshot_bytes: one snapshot; pages: the engine's ``PagePool`` (the cache holds references in it).
    """

    def __init__(self, block: int, budget_bytes: int, page_bytes: int, snapshot_bytes: int, pages: PagePool):
        self.block = block
        self.budget_bytes = budget_bytes
        self.page_bytes = page_bytes
        self.snapshot_bytes = snapshot_bytes
        self._pages = pages
        self.root = PrefixNode(length=0)
        self._clock = itertools.count(1)
        self._nodes: set[PrefixNode] = set()
        self._page_holders: dict[int, int] = {}  # page -> nodes referring to it
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def num_nodes(self) -> int:
        return len(self._nodes)

    @property
    def num_pages(self) -> int:
        """Distinct pages the cache refers to."""
        return len(self._page_holders)

    @property
    def bytes(self) -> int:
        return len(self._page_holders) * self.page_bytes + len(self._nodes) * self.snapshot_bytes

    def _touch(self, node: PrefixNode) -> None:
        stamp = next(self._clock)
        while node is not None:  # ancestors are never older than their descendants
            node.last_used = stamp
            node = node.parent

    def lookup(self, tokens: Sequence[int], max_length: int) -> PrefixNode:
        """The deepest cached prefix of ``tokens`` no longer than ``max_length`` (the root when none)."""
        node = self.root
        n = self.block
        tokens = np.asarray(tokens)
        while node.length + n <= max_length:
            child = node.children.get(block_key(tokens[node.length:node.length + n]))
            if child is None:
                break
            node = child
        if node is not self.root:
            self._touch(node)
        return node

    def insert(self, parent: PrefixNode, block_tokens: Sequence[int], pages: Sequence[int],
               make_snapshot: Callable[[], Any]) -> PrefixNode:
        """The child of ``parent`` for the next N tokens, made from ``pages`` (holding tokens 0 .. m - 1) and
        ``make_snapshot()`` unless it exists; then eviction down to the budget (which may evict it: check
        ``alive``)."""
        if not parent.alive:
            raise ValueError("cannot extend an evicted prefix")
        if len(block_tokens) != self.block:
            raise ValueError(f"a prefix block holds {self.block} tokens, got {len(block_tokens)}")
        key = block_key(block_tokens)
        node = parent.children.get(key)
        if node is None:
            node = PrefixNode(length=parent.length + self.block, parent=parent, pages=tuple(pages),
                              snapshot=make_snapshot())
            parent.children[key] = node
            self._nodes.add(node)
            self._pages.incref(node.pages)
            for p in node.pages:
                self._page_holders[p] = self._page_holders.get(p, 0) + 1
        self._touch(node)
        self.evict_to_budget()
        return node

    def _evict(self, node: PrefixNode) -> None:
        del node.parent.children[next(k for k, v in node.parent.children.items() if v is node)]
        self._nodes.discard(node)
        node.alive = False
        node.snapshot = None
        for p in node.pages:
            self._page_holders[p] -= 1
            if self._page_holders[p] == 0:
                del self._page_holders[p]
        self._pages.decref(node.pages)
        self.evictions += 1

    def _evict_lru_leaf(self) -> bool:
        leaves = [n for n in self._nodes if not n.children]
        if not leaves:
            return False
        self._evict(min(leaves, key=lambda n: n.last_used))
        return True

    def evict_to_budget(self) -> None:
        while self.bytes > self.budget_bytes and self._evict_lru_leaf():
            pass

    def evict_for_pages(self, wanted_free: int) -> None:
        """Evict least recently used leaves until the page pool has ``wanted_free`` free pages or the cache is empty
        (pages that running requests still hold are not freed by evicting)."""
        while self._pages.num_free < wanted_free and self._evict_lru_leaf():
            pass

    def clear(self) -> None:
        while self._evict_lru_leaf():
            pass
