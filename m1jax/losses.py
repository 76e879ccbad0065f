"""Next-token cross-entropy through the LM head without materialising ``[tokens, vocab]`` logits.

``linear_cross_entropy(hidden, kernel, targets)`` computes, per token, ``logsumexp(h @ W) - (h @ W)[target]`` by walking
the vocabulary in chunks of ``chunk_size`` columns: the forward keeps a running (max, sum-exp) pair and the target
logit, so only ``[N, chunk]`` fp32 logits exist at a time; the backward (``jax.custom_vjp``) recomputes each chunk's
logits from the saved ``logsumexp`` and accumulates ``dh += dZ_c W_cᵀ`` and ``dW_c = hᵀ dZ_c``. For M1 (V = 200064)
at 16K tokens the full fp32 logits would be 13 GB; the chunked form keeps ``N * chunk * 4`` bytes.

With ``fp32=True`` (M1's FP32 LM head, docs/model.md §6) both matmul operands are fp32, multiplied at
``fp32_precision`` ("float32": HIGHEST; "bf16_3x": XLA's three bf16 passes; "bf16_3x_fused": the same three bf16
products as one GEMM of split operands), exactly as ``m1jax.layers.embed.lm_logits`` (every matmul here, forward and
backward, goes through ``m1jax.layers.embed.HeadMatmul``); otherwise they are in ``hidden``'s dtype with fp32
accumulation.
``implementation="full"`` is the plain fp32-logits form (the baseline the chunked one is tested and timed against).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from m1jax.layers.embed import head_matmul

IMPLEMENTATIONS = ("chunked", "full")


def linear_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, chunk_size: int = 8192,
                         fp32: bool = True, fp32_precision: str = "float32",
                         implementation: str = "chunked") -> jax.Array:
    """hidden [N, D], kernel [D, V], targets [N] int -> per-token negative log-likelihood [N] float32."""
    if hidden.ndim != 2 or kernel.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, D], kernel [D, V], targets [N]; got {hidden.shape}, {kernel.shape}, "
                         f"{targets.shape}")
    if hidden.shape[1] != kernel.shape[0]:
        raise ValueError(f"hidden width {hidden.shape[1]} != kernel rows {kernel.shape[0]}")
    head_matmul(fp32, fp32_precision, hidden.dtype)  # validates fp32_precision
    head = (fp32, fp32_precision)
    if implementation == "full":
        logits = _logits(hidden, kernel, head)
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    if implementation != "chunked":
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _chunked_ce(hidden, kernel, targets.astype(jnp.int32), min(chunk_size, kernel.shape[1]), head)


def _logits(h, w, head):
    """[N, D] x [D, V] -> fp32 [N, V] (differentiable), multiplied as the model's LM head.
    ``head`` = (fp32, fp32_precision), hashable so it can be a custom_vjp nondiff argument."""
    return head_matmul(*head, h.dtype).matmul(h, w, (1, 0))


def _chunks(vocab: int, chunk: int):
    """(number of full chunks, size of the tail chunk or 0)."""
    return vocab // chunk, vocab % chunk


def _walk(fn, carry, w, chunk):
    """Apply ``carry = fn(carry, start, w_chunk)`` to every vocabulary chunk: a scan over the full chunks, then the
    tail (static size) if V is not a multiple of ``chunk``. Returns the final carry."""
    n_full, tail = _chunks(w.shape[1], chunk)

    def body(c, start):
        return fn(c, start, jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1)), None

    carry, _ = jax.lax.scan(body, carry, jnp.arange(n_full, dtype=jnp.int32) * chunk)
    if tail:
        start = n_full * chunk
        carry = fn(carry, jnp.int32(start), w[:, start:])
    return carry


def _forward_stats(h, w, targets, chunk, head):
    """Running logsumexp and target logit over vocabulary chunks: returns (lse [N], target_logit [N])."""
    n = h.shape[0]
    mm = head_matmul(*head, h.dtype)
    h_op = mm.lhs(h, 1, w.dtype)  # prepared (cast or split) once for every chunk

    def step(carry, start, w_c):
        m, s, tgt = carry
        z = mm.dot(h_op, mm.rhs(w_c, 0, h.dtype), (1, 0))         # [N, c]
        m_new = jnp.maximum(m, z.max(axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(axis=-1)
        local = targets - start
        inside = (local >= 0) & (local < w_c.shape[1])
        picked = jnp.take_along_axis(z, jnp.clip(local, 0, w_c.shape[1] - 1)[:, None], axis=-1)[:, 0]
        return m_new, s, tgt + jnp.where(inside, picked, 0.0)

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    m, s, tgt = _walk(step, init, w, chunk)
    return m + jnp.log(s), tgt


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_ce(h, w, targets, chunk, head):
    lse, tgt = _forward_stats(h, w, targets, chunk, head)
    return lse - tgt


def _chunked_ce_fwd(h, w, targets, chunk, head):
    lse, tgt = _forward_stats(h, w, targets, chunk, head)
    return lse - tgt, (h, w, targets, lse)


def _chunked_ce_bwd(chunk, head, residuals, g):
    """d nll_n / d z_nv = softmax(z_n)_v - [v == target_n]; chained through z = h W chunk by chunk."""
    h, w, targets, lse = residuals
    mm = head_matmul(*head, h.dtype)
    # h's two roles, prepared once for every chunk: contracted on D against W_c, on N against dZ_c (fp32)
    h_z, h_dw = mm.lhs(h, 1, w.dtype), mm.lhs(h, 0, jnp.float32)
    g = g.astype(jnp.float32)

    def step(carry, start, w_c):
        dh, dw = carry
        z = mm.dot(h_z, mm.rhs(w_c, 0, h.dtype), (1, 0))
        local = targets - start
        onehot = jnp.arange(w_c.shape[1], dtype=jnp.int32)[None, :] == local[:, None]
        dz = (jnp.exp(z - lse[:, None]) - onehot) * g[:, None]    # [N, c] fp32
        dh = dh + mm.dot(mm.lhs(dz, 1, w.dtype), mm.rhs(w_c, 1, dz.dtype), (1, 1))     # dZ_c W_cᵀ [N, D]
        dw_c = mm.dot(h_dw, mm.rhs(dz, 0, h.dtype), (0, 0))                             # hᵀ dZ_c [D, c]
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), start, axis=1)
        return dh, dw

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
    dh, dw = _walk(step, init, w, chunk)
    return dh.astype(h.dtype), dw, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
