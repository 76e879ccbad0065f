"""The paged cache against independent computations: the model's uncached forward (every position's logits), a
float64 NumPy softmax attention over the gathered pages, and the float64 lightning recurrence."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax.cache import PagedCache
from m1jax.layers.attention import paged_attention
from m1jax.layers.lightning import decay_rates, state_after
from tests.serve.conftest import CFG, TOL, full_logits

PAGE, PAGES, SLOTS, WIDTH = 4, 16, 3, 8


@functools.partial(jax.jit, static_argnums=0)
def _paged_forward(graphdef, state, pools, tokens, slots, table, lengths, num_new):
    out = nnx.merge(graphdef, state)(tokens, cache=PagedCache(pools, slots, table, lengths, num_new, repeats=2))
    return out.logits, out.cache.layers


def test_paged_forward_equals_uncached_forward_for_chunks_and_decode(split):
    """Two sequences in scattered pages, prefilled in right-padded chunks of different lengths (two rows per call:
    the general mask; one row: the KV-cache mask), then decoded; pages are partly filled after every call."""
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, CFG.vocab_size, n) for n in (22, 18)]
    tables = np.array([[5, 2, 9, 7, 11, 3, 0, 0], [1, 12, 4, 8, 6, 0, 0, 0]], np.int32)
    slots = np.array([2, 1], np.int32)
    pools = PagedCache.init_pools(CFG, num_slots=SLOTS, num_pages=PAGES, page_size=PAGE, kv_dtype="float32")
    # (rows, tokens per row): chunks of up to 8 (right-padded), then single-token decode calls
    schedule = [((0, 1), (7, 3)), ((0, 1), (5, 8)), ((0, 1), (1, 1)), ((0,), (6,)), ((0, 1), (1, 1)),
                ((1,), (3,)), ((0, 1), (1, 1)), ((0, 1), (1, 1))]
    done = [0, 0]
    got = [[], []]
    for rows, counts in schedule:
        t = 1 if max(counts) == 1 else 8
        tokens = np.zeros((len(rows), t), np.int32)
        for i, (row, n) in enumerate(zip(rows, counts)):
            tokens[i, :n] = sequences[row][done[row]:done[row] + n]
        rows = list(rows)
        logits, pools = _paged_forward(*split, pools, tokens, slots[rows], tables[rows],
                                       np.asarray([done[r] for r in rows], np.int32), np.asarray(counts, np.int32))
        for i, (row, n) in enumerate(zip(rows, counts)):
            got[row].append(np.asarray(logits[i, :n]))
            done[row] += n
    assert done == [22, 18]
    for row in range(2):
        want = full_logits(split, sequences[row])
        np.testing.assert_allclose(np.concatenate(got[row]), want, rtol=0, atol=TOL)
        assert float(np.std(want)) > 0.3  # not near-constant logits


def _attention_numpy(q, k, v, length):
    """One query [H, D] against keys/values [S, Hkv, D] (first ``length`` valid), float64, GQA."""
    h, d = q.shape
    group = h // k.shape[1]
    out = np.zeros((h, d))
    for head in range(h):
        kh, vh = k[:length, head // group].astype(np.float64), v[:length, head // group].astype(np.float64)
        scores = kh @ q[head].astype(np.float64) / np.sqrt(d)
        p = np.exp(scores - scores.max())
        out[head] = (p / p.sum()) @ vh
    return out


def test_paged_attention_against_numpy():
    rng = np.random.default_rng(1)
    b, h, hkv, d, total, ps, width = 3, 4, 2, 8, 12, 4, 5
    q = rng.normal(size=(b, h, d)).astype(np.float32)
    k_pages, v_pages = (rng.normal(size=(hkv, total, ps, d)).astype(np.float32) for _ in range(2))
    tables = np.stack([rng.permutation(np.arange(1, total))[:width] for _ in range(b)]).astype(np.int32)
    lengths = np.array([1, 9, 20], np.int32)  # one key; a partly filled third page; every page full
    got = np.asarray(jax.jit(paged_attention)(q, k_pages, v_pages, lengths, tables))
    for row in range(b):
        k = np.concatenate([k_pages[:, p] for p in tables[row]], axis=1).transpose(1, 0, 2)  # [S, Hkv, D]
        v = np.concatenate([v_pages[:, p] for p in tables[row]], axis=1).transpose(1, 0, 2)
        np.testing.assert_allclose(got[row], _attention_numpy(q[row], k, v, lengths[row]), rtol=1e-5, atol=1e-5)


def test_state_after_ignores_right_padding():
    """The state after each row's first num_new tokens equals the float64 recurrence over those tokens only."""
    rng = np.random.default_rng(2)
    b, t, h, d = 3, 6, 2, 4
    k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(2))
    state = rng.normal(size=(b, h, d, d)).astype(np.float32)
    num_new = np.array([6, 2, 0], np.int32)
    decay = np.asarray(decay_rates(h, 0, 4))
    got = np.asarray(state_after(jnp.asarray(state), jnp.asarray(k), jnp.asarray(v), jnp.asarray(decay),
                                 jnp.asarray(num_new)))
    lam = np.exp(-decay.astype(np.float64))[:, None, None]
    for row in range(b):
        s = state[row].astype(np.float64)
        for j in range(num_new[row]):
            s = lam * s + np.einsum("hk,hv->hkv", k[row, j], v[row, j])
        np.testing.assert_allclose(got[row], s, rtol=1e-5, atol=1e-5)
