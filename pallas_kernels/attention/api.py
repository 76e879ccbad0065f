"""Public entry point for softmax attention: ``attention(q, k, v, mask, implementation=None)``.

One contract for every backend: q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh] (GQA: query head h uses KV head
h // (H / Hkv)), scale 1/sqrt(Dh), softmax in fp32, mask given as slots (``Mask``), rows with no visible key give
zeros; output [B, Tq, H, Dh] in q's dtype, differentiable in q, k and v.

Backends and what they take (``unsupported``):
  xla            einsum over the dense mask (``reference``): every mask; memory O(Tq x Tk).
  xla_blockwise  online softmax over tiles: every mask; memory O(Tq x block).
  cudnn          cuDNN flash, bf16/fp16: causal sequences without segment ids, and KV-cache chunks.
  pallas_triton  jax's Triton flash kernel: causal sequences, with or without segment ids.
  pallas_tpu     jax's TPU splash kernel: causal sequences, with or without segment ids.

``implementation=None`` decides per platform the program is lowered for (``pallas_kernels.platform``), in the order
of ``FALLBACK_ORDER``: with more than one query and bf16/fp16 inputs, the first fused kernel that runs natively on
the platform and supports the call (cuda: cudnn, then pallas_triton; rocm: pallas_triton; tpu: pallas_tpu);
otherwise xla up to ``BLOCKWISE_MIN_KEYS`` keys, xla_blockwise beyond. Single-token decode is always xla (its scores
are one row per head, and the step is a memory-bound read of the cache). fp32 inputs keep the XLA paths.

An explicit ``implementation`` is that backend or a one-line error saying why it cannot take the call; a kernel
backend runs compiled on its platform and in interpret mode (cudnn: jax's XLA stand-in) when lowered for cpu.

``return_lse=True`` also returns each row's logsumexp (fp32 [B, Tq, H], natural log of the sum of exp(scaled score)
over the visible keys; ``reference.MASKED`` for a row with none), differentiable like the output: what merging
partial attentions over disjoint key sets needs (ring attention, ``sharding.sequence_parallel``). Only the XLA
paths return it; the default then picks among them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.attention import cudnn, pallas_tpu, pallas_triton, reference, xla_blockwise
from pallas_kernels.attention.mask import Mask

IMPLEMENTATIONS = ("xla", "xla_blockwise", "cudnn", "pallas_triton", "pallas_tpu")
BACKENDS = {"xla": reference, "xla_blockwise": xla_blockwise, "cudnn": cudnn, "pallas_triton": pallas_triton,
            "pallas_tpu": pallas_tpu}
KERNELS = ("cudnn", "pallas_triton", "pallas_tpu")  # the fused kernels, in the order the default tries them
FALLBACK_ORDER = (*KERNELS, "xla", "xla_blockwise")
# Without a fused kernel, attention over more keys than this runs blockwise: the einsum's [B, H, Tq, Tk] fp32 scores
# are 1 GiB per sequence at 64 heads and 2048 x 2048.
BLOCKWISE_MIN_KEYS = 2048
# The input dtypes for which the default takes a fused kernel; fp32 stays on the XLA paths, whose matmuls are fp32.
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
LSE_BACKENDS = ("xla", "xla_blockwise")  # the backends that return the logsumexp


def _check_inputs(q, k, v, mask: Mask):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q must be [B, Tq, H, Dh] and k, v [B, Tk, Hkv, Dh]; got shapes {q.shape}, {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape [B, Tk, Hkv, Dh]; got {k.shape} and {v.shape}")
    (b, tq, nh, hd), (bk, tk, nkv, hdk) = q.shape, k.shape
    if bk != b or hdk != hd:
        raise ValueError(f"q [B, Tq, H, Dh]={q.shape} and k [B, Tk, Hkv, Dh]={k.shape} differ in B or Dh")
    if nh % nkv:
        raise ValueError(f"query heads H={nh} must be a multiple of KV heads Hkv={nkv}")
    expected = {"q_slot": (b, tq), "k_slot": (b, tk), "q_segment": (b, tq), "k_segment": (b, tk),
                "k_valid": (b, tk)}
    for name, shape in expected.items():
        x = getattr(mask, name)
        if x is not None and x.shape != shape:
            raise ValueError(f"mask.{name} must be {shape} for q {q.shape} and k {k.shape}; got {x.shape}")


def default_implementation(target: str, q, k, mask: Mask, return_lse: bool = False) -> str:
    """The backend ``implementation=None`` uses when lowering for platform ``target`` (see the module docstring)."""
    if q.shape[1] > 1 and jnp.dtype(q.dtype) in KERNEL_DTYPES and not return_lse:
        for name in KERNELS:
            backend = BACKENDS[name]
            if target in backend.native_platforms() and backend.unsupported(q, k, mask) is None:
                return name
    return "xla" if q.shape[1] == 1 or k.shape[1] <= BLOCKWISE_MIN_KEYS else "xla_blockwise"


@functools.cache
def _function(name: str, return_lse: bool = False):
    """The backend's attention, jitted once (a model's layers and the per-platform branches reuse its traces)."""
    if name in KERNELS:
        return jax.jit(BACKENDS[name].attention, static_argnames="interpret")
    if return_lse:
        return jax.jit(functools.partial(BACKENDS[name].attention, return_lse=True))
    return jax.jit(BACKENDS[name].attention)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, *, implementation: str | None = None,
              return_lse: bool = False):
    """Masked GQA softmax attention (the contract in the module docstring).

    Args:
      q: [B, Tq, H, Dh]; k, v: [B, Tk, Hkv, Dh] with H a multiple of Hkv.
      mask: ``Mask`` (``Mask.causal(B, T, segment_ids)``, ``Mask.cache(index, Tq, Tk, start)``, or any slots).
      implementation: None (per target platform), or one of ``IMPLEMENTATIONS``.
      return_lse: also return the rows' logsumexp (the XLA paths only).

    Returns:
      [B, Tq, H, Dh] in q's dtype; with ``return_lse``, (that, logsumexp [B, Tq, H] fp32).
    """
    _check_inputs(q, k, v, mask)
    if implementation is None:
        chosen = {p: default_implementation(p, q, k, mask, return_lse) for p in platform.PLATFORMS}
        return platform.select({p: _function(name, return_lse) for p, name in chosen.items()}, q, k, v, mask,
                               fallback=_function(chosen["cpu"], return_lse))
    if implementation not in BACKENDS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    backend = BACKENDS[implementation]
    reason = backend.unsupported(q, k, mask)
    if reason is None and return_lse and implementation not in LSE_BACKENDS:
        reason = "returns no logsumexp (return_lse: xla and xla_blockwise only)"
    if reason is not None:
        raise ValueError(f"attention implementation {implementation!r} cannot compute this call: it {reason}")
    if implementation in KERNELS:
        return platform.kernel(_function(implementation), backend.native_platforms(), q, k, v, mask)
    return _function(implementation, return_lse)(q, k, v, mask)
