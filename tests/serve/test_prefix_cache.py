"""The hybrid prefix cache: a warm request equals the cold one bit for bit and computes only the uncached suffix;
prefixes ending inside a page (copy-on-write); eviction under a small budget; the trie and page pool by hand."""
import numpy as np
import pytest

from m1jax.serve.pages import PagePool
from m1jax.serve.prefix_cache import PrefixCache
from m1jax.serve.types import SamplingParams
from tests.serve.conftest import ENGINE, generate_greedy, make_engine, random_prompts

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.95, seed=3)


def _run(engine, prompt, params):
    before = engine.stats()["prefilled_tokens"]
    handle = engine.submit(prompt, params)
    engine.run_until_idle()
    return handle.result(), engine.stats()["prefilled_tokens"] - before


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_warm_request_equals_cold_bit_for_bit_and_prefills_only_the_suffix(split, params):
    prompt = random_prompts(10, (31,))[0]
    engine = make_engine(split)
    cold, cold_prefilled = _run(engine, prompt, params)
    warm, warm_prefilled = _run(engine, prompt, params)
    assert cold_prefilled == 31 and cold.cached_prompt_tokens == 0
    assert warm.cached_prompt_tokens == 30 and warm_prefilled == 1  # snapshots every 6 tokens; the last one computed
    assert warm.token_ids == cold.token_ids
    assert warm.logprobs == cold.logprobs  # identical floats, not close ones
    if params is GREEDY:
        assert list(cold.token_ids) == generate_greedy(split, [prompt])[0][0]


def test_prefix_ending_inside_a_page_is_copied_not_shared(split):
    """B shares 18 tokens with A: its cached prefix (18 tokens, 4.5 pages) ends inside a page that A wrote, and B
    writes other tokens into the rest of that page. B copies the page; A's cached page stays intact (A warm again is
    unchanged), and B warm equals B cold."""
    a = random_prompts(11, (29,))[0]
    b = a[:18] + random_prompts(12, (11,))[0]
    engine = make_engine(split)
    a_cold, _ = _run(engine, a, GREEDY)
    b_warm, b_prefilled = _run(engine, b, GREEDY)
    assert b_warm.cached_prompt_tokens == 18 and b_prefilled == 11
    a_warm, _ = _run(engine, a, GREEDY)
    assert a_warm.cached_prompt_tokens == 24 and a_warm.logprobs == a_cold.logprobs
    b_cold, _ = _run(make_engine(split, prefix_cache_bytes=0), b, GREEDY)
    assert b_warm.token_ids == b_cold.token_ids and b_warm.logprobs == b_cold.logprobs


def test_eviction_under_a_small_budget_keeps_outputs_exact(split):
    """A budget of about three nodes' snapshots and pages: older prefixes are evicted while new ones are cached, the
    budget holds after every request, and every output equals the engine without a cache."""
    p0, p1, p2 = random_prompts(13, (26, 33, 19))
    prompts = [p0, p0[:13] + p2[:10], p1, p1, p2]  # a partial hit and a repeat among new prefixes
    small = make_engine(split)
    one_node = small.device.snapshot_bytes + 2 * small.device.page_bytes
    small = make_engine(split, prefix_cache_bytes=3 * one_node)
    uncached = make_engine(split, prefix_cache_bytes=0)
    for prompt in prompts:
        got, _ = _run(small, prompt, GREEDY)
        want, _ = _run(uncached, prompt, GREEDY)
        assert got.token_ids == want.token_ids
        np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
        assert small.prefix_cache.bytes <= 3 * one_node
    stats = small.stats()
    assert stats["prefix_cache_evictions"] > 0 and stats["cached_prompt_tokens"] > 0
    # nothing leaks: every page is free or held by the cache
    assert stats["free_pages"] + small.prefix_cache.num_pages == ENGINE.total_pages - 1
    small.prefix_cache.clear()
    assert small.stats()["free_pages"] == ENGINE.total_pages - 1 and small.prefix_cache.bytes == 0


def test_trie_lookup_lru_eviction_and_page_references():
    pool = PagePool(10)
    cache = PrefixCache(block=2, budget_bytes=1000, page_bytes=10, snapshot_bytes=100, pages=pool)
    pages = pool.allocate(4)
    a1 = cache.insert(cache.root, [1, 2], pages[:1], lambda: "s12")
    a2 = cache.insert(a1, [3, 4], pages[:2], lambda: "s1234")
    b1 = cache.insert(cache.root, [5, 6], pages[2:3], lambda: "s56")
    assert cache.insert(cache.root, [1, 2], [9], lambda: pytest.fail("exists")) is a1
    assert [pool.refs(p) for p in pages] == [3, 2, 2, 1]  # the caller's reference + one per node
    assert cache.num_nodes == 3 and cache.num_pages == 3 and cache.bytes == 3 * 10 + 3 * 100
    assert cache.lookup([1, 2, 3, 4, 7], 5) is a2 and cache.lookup([1, 2, 3, 4], 3) is a1
    assert cache.lookup([1, 2, 9, 9], 4) is a1 and cache.lookup([7, 7], 2) is cache.root
    assert a2.snapshot == "s1234" and a2.length == 4 and a2.pages == tuple(pages[:2])
    cache.lookup([5, 6], 2)  # b1 is now the most recently used; a2 the least recently used leaf
    cache.budget_bytes = 250
    cache.evict_to_budget()
    assert not a2.alive and a1.alive and b1.alive and a2.snapshot is None  # leaves only, LRU first
    assert [pool.refs(p) for p in pages] == [2, 1, 2, 1] and cache.bytes == 2 * 10 + 2 * 100
    pool.decref(pages)  # the caller lets go: only the cache holds pages now
    assert pool.num_free == 9 - 2
    cache.evict_for_pages(9)
    assert cache.num_nodes == 0 and pool.num_free == 9
    with pytest.raises(ValueError, match="evicted"):
        cache.insert(a1, [3, 4], [], lambda: None)


def test_page_pool_reference_counts():
    pool = PagePool(4)
    pages = pool.allocate(3)
    assert sorted(pages) == [1, 2, 3] and pool.num_free == 0  # page 0 is scratch, never handed out
    with pytest.raises(RuntimeError, match="out of KV pages"):
        pool.allocate(1)
    pool.incref(pages[:1])
    pool.decref(pages)
    assert pool.num_free == 2 and pool.refs(pages[0]) == 1
    pool.decref(pages[:1])
    assert pool.num_free == 3
    with pytest.raises(RuntimeError, match="released more often"):
        pool.decref(pages[:1])
