"""The shared test base: every attention backend against the float64 oracle, values and gradients, on every mask.

Cases: GQA (4 query heads on 2 KV heads) everywhere; a causal sequence whose length is not a multiple of any block;
packed documents (segment ids); a prefill chunk against a left-padded, partly filled KV cache (slots past the chunk
hold junk that must not leak in, and one row's first queries fall in its padding: no valid key, zeros); one-token
decode; general slots (a sequence shard's queries at global slots, segments, one row with no valid key at all).
CPU runs the Pallas kernels in interpret mode and cuDNN's calls through jax's XLA stand-in (bf16, as cuDNN needs);
each backend either matches the oracle or rejects the case with a one-line error, as ``SUPPORTED`` says.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import IMPLEMENTATIONS, Mask, attention
from pallas_kernels.attention.api import LSE_BACKENDS
from pallas_kernels.attention.reference import MASKED

H, HKV, DH = 4, 2, 16


def _random(rng, b, tq, tk):
    q = rng.standard_normal((b, tq, H, DH))
    k, v = (rng.standard_normal((b, tk, HKV, DH)) for _ in range(2))
    return q, k, v


def _slots(b, t, start=0):
    return np.broadcast_to(start + np.arange(t, dtype=np.int32)[None], (b, t))


def causal(segments: bool):
    rng = np.random.default_rng(1 + segments)
    b, t = 2, 21
    q, k, v = _random(rng, b, t, t)
    seg = np.asarray([[0] * 8 + [1] * 7 + [2] * 6, [3] * 21], np.int32) if segments else None
    mask = Mask.causal(b, t, None if seg is None else jnp.asarray(seg))
    return q, k, v, mask, (_slots(b, t), _slots(b, t), seg, seg, None)


def cache(tq: int, index: int, start):
    """tq queries at slots index.. against a 24-slot cache filled up to index + tq; later slots hold junk."""
    rng = np.random.default_rng(10 + tq)
    b, s = len(start), 24
    q, k, v = _random(rng, b, tq, s)
    filled = (np.arange(s) < index + tq)[None, :, None, None]
    k, v = np.where(filled, k, 7.0), np.where(filled, v, -7.0)
    start = np.asarray(start, np.int32)
    mask = Mask.cache(jnp.int32(index), tq, s, jnp.asarray(start))
    return q, k, v, mask, (_slots(b, tq, index), _slots(b, s), None, None, _slots(b, s) >= start[:, None])


def general():
    """A sequence shard's 6 queries (global slots 10..15) against all 16 keys, two documents; row 1 has no valid
    key (every key marked invalid)."""
    rng = np.random.default_rng(20)
    b = 2
    q, k, v = _random(rng, b, 6, 16)
    seg = np.asarray([[0] * 12 + [1] * 4, [5] * 16], np.int32)
    valid = np.asarray([[True] * 16, [False] * 16])
    terms = (_slots(b, 6, 10), _slots(b, 16), seg[:, 10:], seg, valid)
    return q, k, v, Mask(*(jnp.asarray(x) for x in terms)), terms


CASES = {"causal": lambda: causal(False), "segments": lambda: causal(True),
         "cache_chunk": lambda: cache(6, 8, [0, 5, 11]), "cache_decode": lambda: cache(1, 17, [0, 5, 18]),
         "general": general}
ALL = set(CASES)
SUPPORTED = {"xla": ALL, "xla_blockwise": ALL, "cudnn": {"causal", "cache_chunk", "cache_decode"},
             "pallas_triton": {"causal", "segments"}, "pallas_tpu": {"causal", "segments"}}
DTYPE = {"cudnn": jnp.bfloat16}  # cuDNN computes in bf16/fp16 only; the others run in fp32 here
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative L2 error against the oracle (bf16: rounding)


def test_support_matrix_covers_every_backend():
    assert set(SUPPORTED) == set(IMPLEMENTATIONS)


@pytest.mark.parametrize("case", ["cache_chunk", "general"])
def test_cases_have_rows_without_keys(case, at):
    assert not at.mask(*CASES[case]()[4]).any(axis=-1).all()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_backend_matches_oracle(impl, case, at):
    q, k, v, mask, terms = CASES[case]()
    dtype = DTYPE.get(impl, jnp.float32)
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    if case not in SUPPORTED[impl]:
        with pytest.raises(ValueError, match=f"{impl}' cannot compute this call"):
            attention(q, k, v, mask, implementation=impl)
        return
    run = jax.jit(lambda q, k, v, mask: attention(q, k, v, mask, implementation=impl))
    out, vjp = jax.vjp(lambda q, k, v: run(q, k, v, mask), q, k, v)
    d_out = jnp.asarray(np.random.default_rng(0).standard_normal(out.shape), dtype)
    grads = vjp(d_out)
    dense = at.mask(*terms)
    as64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # noqa: E731  (the rounded inputs, exactly)
    want = at.oracle(as64(q), as64(k), as64(v), dense, as64(d_out))
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    assert at.rel_err(out.astype(jnp.float32), want["o"]) < tol
    empty = ~dense.any(axis=-1)  # [B, Tq] rows with no valid key
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32))[empty], 0.0)
    for name, got in zip(("dq", "dk", "dv"), grads):
        assert got.dtype == dtype, name
        assert at.rel_err(got.astype(jnp.float32), want[name]) < tol, name


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_logsumexp_matches_oracle(impl, case, at):
    """``return_lse``: the rows' logsumexp (MASKED where a row sees no key) and the gradients of a loss on both
    outputs; the kernels refuse it in one line."""
    q, k, v, mask, terms = CASES[case]()
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    if impl not in LSE_BACKENDS:
        with pytest.raises(ValueError, match="returns no logsumexp|cannot compute this call"):
            attention(q, k, v, mask, implementation=impl, return_lse=True)
        return
    run = jax.jit(lambda q, k, v, mask: attention(q, k, v, mask, implementation=impl, return_lse=True))
    (out, lse), vjp = jax.vjp(lambda q, k, v: run(q, k, v, mask), q, k, v)
    rng = np.random.default_rng(1)
    d_out, d_lse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    dense = at.mask(*terms)
    empty = ~dense.any(axis=-1)  # [B, Tq]
    d_lse[empty] = 0.0  # MASKED is a constant: no gradient flows from those rows
    grads = vjp((jnp.asarray(d_out, jnp.float32), jnp.asarray(d_lse, jnp.float32)))
    want = at.oracle(np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(v, np.float64), dense, d_out,
                     d_lse)
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
    assert at.rel_err(lse[~empty], want["lse"][~empty]) < 1e-5
    np.testing.assert_array_equal(np.asarray(lse)[empty], np.float32(MASKED))
    for name, got in zip(("dq", "dk", "dv"), grads):
        assert at.rel_err(got, want[name]) < 1e-5, name
