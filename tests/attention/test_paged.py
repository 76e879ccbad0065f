"""Paged-KV-cache attention against the float64 oracle: every decode backend, and the prefill chunk.

The cache is a pool of pages in a shuffled order; rows have different lengths (a partly filled last page, a row
of length 0, a full table); unfilled slots and unused pages hold junk that must not leak in; GQA (4 query heads on
2 KV heads). The oracle sees each row's slots as a contiguous K/V (assembled here in NumPy from the pages) with a
length mask. CPU runs the kernels in Pallas interpret mode; the TPU interpreter rounds its dots' operands to bf16,
so the kernels are checked on bf16 inputs at the bf16 tolerance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention.paged import pallas_triton
from pallas_kernels.attention.paged import (IMPLEMENTATIONS, default_implementation, paged_attention,
                                            paged_prefill_attention)

H, HKV, D, PAGE, PAGES_PER_SEQ, TOTAL = 4, 2, 128, 16, 4, 19
SPARE = TOTAL - 1  # a page no row owns
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _pool(rng, batch):
    """Pages in random order, each row owning distinct pages (never SPARE); slots past a row's length hold junk."""
    k_pages, v_pages = (rng.standard_normal((HKV, TOTAL, PAGE, D)) for _ in range(2))
    order = rng.permutation(SPARE)[:batch * PAGES_PER_SEQ].reshape(batch, PAGES_PER_SEQ)
    return k_pages, v_pages, order.astype(np.int32)


def _contiguous(pages, table):
    """[Hkv, N, page, D], [P] -> [P * page, Hkv, D]: the row's slots in order."""
    return np.transpose(pages[:, table], (1, 2, 0, 3)).reshape(-1, HKV, D)


def _decode_oracle(at, q, k_pages, v_pages, lengths, tables):
    outs = []
    for b, length in enumerate(lengths):
        k, v = _contiguous(k_pages, tables[b]), _contiguous(v_pages, tables[b])
        slots = np.arange(k.shape[0])[None]
        mask = at.mask(np.full((1, 1), k.shape[0]), slots, k_valid=slots < length)
        outs.append(at.oracle(q[b][None, None], k[None], v[None], mask)["o"][0, 0])
    return np.stack(outs)


def _cast(dtype, *xs):
    return tuple(jnp.asarray(x, dtype) for x in xs)


def _as64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


LENGTHS = {"mixed": [37, 0, 64, 1], "one_row_partial_page": [50]}  # partly filled last pages, empty row, full table


@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_decode_matches_oracle(impl, lengths, at):
    lengths = LENGTHS[lengths]
    rng = np.random.default_rng(len(lengths))
    k_pages, v_pages, tables = _pool(rng, len(lengths))
    q = rng.standard_normal((len(lengths), H, D))
    dtype = jnp.float32 if impl == "xla" else jnp.bfloat16
    q, k_pages, v_pages = _cast(dtype, q, k_pages, v_pages)
    run = jax.jit(lambda *a: paged_attention(*a, implementation=impl))
    out = run(q, k_pages, v_pages, jnp.asarray(lengths, jnp.int32), jnp.asarray(tables))
    want = _decode_oracle(at, _as64(q), _as64(k_pages), _as64(v_pages), lengths, tables)
    assert out.dtype == dtype and out.shape == q.shape
    assert at.rel_err(_as64(out), want) < TOLERANCE[dtype]
    empty = np.asarray(lengths) == 0
    np.testing.assert_array_equal(_as64(out)[empty], 0.0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_unused_table_entries_are_never_attended(impl, at):
    """Entries past a row's filled pages point at a page full of huge values: the result does not change."""
    rng = np.random.default_rng(5)
    k_pages, v_pages, tables = _pool(rng, 2)
    k_pages[:, SPARE], v_pages[:, SPARE] = 1e4, -1e4
    tables = tables.copy()
    tables[:, 2:] = SPARE  # rows of length <= 32 fill only their first 2 pages
    q = rng.standard_normal((2, H, D))
    lengths = [20, 32]
    dtype = jnp.float32 if impl == "xla" else jnp.bfloat16
    q, k_pages, v_pages = _cast(dtype, q, k_pages, v_pages)
    out = paged_attention(q, k_pages, v_pages, jnp.asarray(lengths, jnp.int32), jnp.asarray(tables),
                          implementation=impl)
    want = _decode_oracle(at, _as64(q), _as64(k_pages), _as64(v_pages), lengths, tables)
    assert at.rel_err(_as64(out), want) < TOLERANCE[dtype]


@pytest.mark.parametrize("batch,pages,page_size,want", [(1, 64, 16, (16, 4)), (64, 64, 16, (2, 8)),
                                                       (4, 12, 16, (12, 1)), (64, 1024, 128, (2, 1)),
                                                       (64, 1024, 512, (2, 1))])
def test_triton_splits_the_context_when_rows_and_heads_are_few(batch, pages, page_size, want):
    """(context splits, pages per compute block) for M1's 8 KV heads x 8 query heads each; a block holds at most
    MAX_BLOCK_TOKENS tokens (the K/V blocks must fit shared memory), at least one page."""
    assert pallas_triton.plan(batch, 8, 8, pages, page_size) == want


@pytest.mark.parametrize("start,length", [(0, 20), (21, 9), (40, 24)])
def test_prefill_chunk_matches_oracle(start, length, at):
    """Queries at slots start .. start+T-1 of one sequence, causal against its pages (later slots hold junk)."""
    rng = np.random.default_rng(start)
    k_pages, v_pages, tables = _pool(rng, 1)
    q = rng.standard_normal((length, H, D))
    out = jax.jit(paged_prefill_attention)(*_cast(jnp.float32, q, k_pages, v_pages), jnp.int32(start),
                                           jnp.asarray(tables[0]))
    k, v = _contiguous(k_pages, tables[0]), _contiguous(v_pages, tables[0])
    mask = at.mask(start + np.arange(length)[None], np.arange(k.shape[0])[None])
    want = at.oracle(q[None], k[None], v[None], mask)["o"][0]
    assert at.rel_err(out, want) < 1e-5


@pytest.mark.parametrize("target,dtype,head_dim,want", [
    ("cpu", jnp.bfloat16, 128, "xla"), ("cuda", jnp.bfloat16, 128, "pallas_triton"),
    ("rocm", jnp.float16, 64, "pallas_triton"), ("tpu", jnp.bfloat16, 128, "pallas_tpu"),
    ("tpu", jnp.bfloat16, 64, "xla"),        # Mosaic wants D % 128 == 0
    ("cuda", jnp.bfloat16, 96, "xla"),       # Triton wants a power-of-two D
    ("cuda", jnp.float32, 128, "xla")])      # fp32 keeps the XLA path
def test_default_implementation_per_platform(target, dtype, head_dim, want):
    q = jax.ShapeDtypeStruct((2, 8, head_dim), dtype)
    k_pages = jax.ShapeDtypeStruct((2, 10, 16, head_dim), dtype)
    assert default_implementation(target, q, k_pages, jax.ShapeDtypeStruct((2, 4), jnp.int32)) == want


@pytest.mark.parametrize("bad,message", [
    ("q_rank", "q must be"), ("pages", "k_pages and v_pages"), ("heads", "multiple of KV heads"),
    ("lengths", "lengths must be"), ("table", "page_indices must be"), ("impl", "unknown paged attention"),
    ("kernel", "cannot compute this call")])
def test_bad_calls_raise_one_line_errors(bad, message):
    q, pages = jnp.zeros((2, 4, 128)), jnp.zeros((2, 6, 16, 128))
    lengths, table = jnp.zeros((2,), jnp.int32), jnp.zeros((2, 3), jnp.int32)
    args = {"q_rank": (q[None], pages, pages, lengths, table), "pages": (q, pages, pages[:1], lengths, table),
            "heads": (q[:, :3], pages, pages, lengths, table), "lengths": (q, pages, pages, lengths[:1], table),
            "table": (q, pages, pages, lengths, table[0]), "impl": (q, pages, pages, lengths, table),
            "kernel": (q, pages[..., :96], pages[..., :96], lengths, table)}[bad]
    impl = {"impl": "flash", "kernel": "pallas_tpu"}.get(bad)
    if bad == "kernel":
        args = (q[..., :96],) + args[1:]
    with pytest.raises(ValueError, match=message):
        paged_attention(*args, implementation=impl)
