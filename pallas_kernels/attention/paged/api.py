"""Public entry points for attention over a paged KV cache (the serving engine's softmax layers).

The cache of a softmax layer is a pool of fixed-size pages shared by all sequences: ``k_pages``, ``v_pages``
[Hkv, total_pages, page_size, D] (jax's layout: KV head first), and a page table per sequence, ``page_indices``
[B, pages_per_sequence] int32: slot s of row b lives at slot ``s % page_size`` of page ``page_indices[b, s //
page_size]``. Every table entry must be a valid page index in [0, total_pages): entries past a row's filled pages
are never attended, but a kernel may read the pages of its last compute block (point unused entries at any page,
e.g. 0).

* ``paged_attention(q, k_pages, v_pages, lengths, page_indices, *, implementation=None) -> [B, H, D]``: one new
  token per row (decode); q [B, H, D] attends to the row's first ``lengths[b]`` slots (its own K/V already
  written). The kernels read only the filled pages and split the work over the context (flash decoding).
* ``paged_prefill_attention(q, k_pages, v_pages, start, page_indices, *, implementation=None) -> [T, H, D]``: a
  prefill chunk of one sequence, q [T, H, D] at slots start .. start+T-1 (its K/V already written), causal.

Both: GQA (query head h reads KV head h // (H / Hkv)), scale 1/sqrt(D), softmax in fp32, output in q's dtype; a row
of length 0 gives zeros. Inference only (no gradients through the kernels).

Decode backends (``IMPLEMENTATIONS``; ``unsupported`` says what each takes):
  xla            ``reference``: gathers the row's whole page table into a contiguous K/V, masks by length.
  pallas_triton  jax's Triton paged attention: flash decoding with context splits (``pallas_triton.plan``).
  pallas_tpu     jax's Mosaic TPU paged attention: walks the filled pages with double-buffered DMA.
``implementation=None`` decides per platform the program is lowered for (``pallas_kernels.platform``): the kernel
native to it when it takes the call and the inputs are bf16/fp16 (cuda/rocm: pallas_triton, tpu: pallas_tpu),
else xla. An explicit kernel runs compiled on its platform and in Pallas interpret mode when lowered for cpu.

The prefill chunk gathers the sequence's pages into a contiguous K/V and calls ``pallas_kernels.attention``'s
``attention`` with ``Mask.cache`` (its ``implementation`` is that api's: cuDNN on cuda, XLA elsewhere by default).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.attention import api as attention_api
from pallas_kernels.attention.mask import Mask
from pallas_kernels.attention.paged import pallas_tpu, pallas_triton, reference

IMPLEMENTATIONS = ("xla", "pallas_triton", "pallas_tpu")
BACKENDS = {"xla": reference, "pallas_triton": pallas_triton, "pallas_tpu": pallas_tpu}
KERNELS = ("pallas_triton", "pallas_tpu")
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check_pages(k_pages, v_pages, n_heads: int, head_dim: int):
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [Hkv, total_pages, page_size, D]; got {k_pages.shape} "
                         f"and {v_pages.shape}")
    if k_pages.shape[-1] != head_dim:
        raise ValueError(f"q's head dim {head_dim} differs from the pages' D={k_pages.shape[-1]}")
    if n_heads % k_pages.shape[0]:
        raise ValueError(f"query heads H={n_heads} must be a multiple of KV heads Hkv={k_pages.shape[0]}")


def _check_decode(q, k_pages, v_pages, lengths, page_indices):
    if q.ndim != 3:
        raise ValueError(f"q must be [B, H, D] (one token per row); got shape {q.shape}")
    _check_pages(k_pages, v_pages, q.shape[1], q.shape[2])
    if lengths.shape != (q.shape[0],) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be [B]=({q.shape[0]},) integers; got {lengths.shape} {lengths.dtype}")
    if page_indices.ndim != 2 or page_indices.shape[0] != q.shape[0]:
        raise ValueError(f"page_indices must be [B={q.shape[0]}, pages_per_sequence]; got {page_indices.shape}")


def default_implementation(target: str, q, k_pages, page_indices) -> str:
    """The decode backend ``implementation=None`` uses when lowering for platform ``target``."""
    if jnp.dtype(q.dtype) in KERNEL_DTYPES:
        for name in KERNELS:
            backend = BACKENDS[name]
            if target in backend.native_platforms() and backend.unsupported(q, k_pages, page_indices) is None:
                return name
    return "xla"


@functools.cache
def _function(name: str):
    """The backend's decode attention, jitted once (the layers and the per-platform branches reuse its traces)."""
    if name in KERNELS:
        return jax.jit(BACKENDS[name].paged_attention, static_argnames="interpret")
    return jax.jit(BACKENDS[name].paged_attention)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, lengths: jax.Array,
                    page_indices: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """One-token-per-row attention over a paged KV cache (flash decoding; the contract in the module docstring).

    Args:
      q: [B, H, D], one new token per row.
      k_pages, v_pages: [Hkv, total_pages, page_size, D], H a multiple of Hkv.
      lengths: [B] int32, filled cache slots per row (the new token's K/V already written); 0 gives zeros.
      page_indices: [B, pages_per_sequence] int32, every entry in [0, total_pages).
      implementation: None (per target platform), or one of ``IMPLEMENTATIONS``.

    Returns:
      [B, H, D] in q's dtype.
    """
    _check_decode(q, k_pages, v_pages, lengths, page_indices)
    args = (q, k_pages, v_pages, lengths.astype(jnp.int32), page_indices.astype(jnp.int32))
    if implementation is None:
        chosen = {p: default_implementation(p, q, k_pages, page_indices) for p in platform.PLATFORMS}
        return platform.select({p: _function(name) for p, name in chosen.items()}, *args,
                               fallback=_function(chosen["cpu"]))
    if implementation not in BACKENDS:
        raise ValueError(f"unknown paged attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    backend = BACKENDS[implementation]
    reason = backend.unsupported(q, k_pages, page_indices)
    if reason is not None:
        raise ValueError(f"paged attention implementation {implementation!r} cannot compute this call: it {reason}")
    if implementation in KERNELS:
        return platform.kernel(_function(implementation), backend.native_platforms(), *args)
    return _function(implementation)(*args)


def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, start: jax.Array,
                            page_indices: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """A prefill chunk of one sequence against its pages, causal (the contract in the module docstring).

    Args:
      q: [T, H, D], the chunk's queries at cache slots start .. start+T-1.
      k_pages, v_pages: [Hkv, total_pages, page_size, D]; the chunk's own K/V already written.
      start: int32 scalar (may be traced), the slot of the chunk's first token.
      page_indices: [pages_per_sequence] int32, the sequence's page table (entries in [0, total_pages)), holding at
        least start + T slots.
      implementation: ``pallas_kernels.attention``'s (None: per target platform).

    Returns:
      [T, H, D] in q's dtype.
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [T, H, D] (one sequence's chunk); got shape {q.shape}")
    _check_pages(k_pages, v_pages, q.shape[1], q.shape[2])
    if page_indices.ndim != 1:
        raise ValueError(f"page_indices must be [pages_per_sequence] (one sequence's table); got {page_indices.shape}")
    slots = page_indices.shape[0] * k_pages.shape[2]
    if q.shape[0] > slots:
        raise ValueError(f"a chunk of {q.shape[0]} tokens does not fit the table's {slots} slots")
    k, v = (reference.gather_pages(x, page_indices[None].astype(jnp.int32)) for x in (k_pages, v_pages))
    mask = Mask.cache(jnp.asarray(start, jnp.int32), q.shape[0], slots, jnp.zeros((1,), jnp.int32))
    return attention_api.attention(q[None], k, v, mask, implementation=implementation)[0]
