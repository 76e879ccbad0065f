"""cuDNN flash attention ("cudnn", NVIDIA GPUs, bf16/fp16): no [Tq, Tk] scores.

cuDNN masks only a row's tail (sequence lengths) and aligns causality top-left, with no segment ids, so it takes the
two masks whose structure fits: a causal sequence (one call), and a chunk of queries against a KV cache (two calls
merged by their logsumexps, below). The logsumexp comes from jax's cuDNN wrapper, in fp32 (the public
``jax.nn.dot_product_attention`` casts it to the output dtype, too coarse to merge partial attentions).

Tracing the real call needs the cuDNN library of jax's CUDA plugin on the host (jax's wrapper reads its version at
trace time); the lowering itself needs no GPU. ``native_platforms`` is therefore empty on a host without the plugin:
the default then skips cuDNN, and an explicit request cannot be lowered for cuda from such a host.
``interpret=True`` (for cpu, where cuDNN does not exist) computes the same calls with jax's XLA implementation of
``jax.nn.dot_product_attention``, so the masking and merging logic runs in CPU tests.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.attention import xla_blockwise
from pallas_kernels.attention.mask import CACHE, SEQUENCE, Mask

HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_HEAD_DIM = 128  # cuDNN's flash limit on every generation (256 from Hopper on)


def _wrapper():
    """jax's cuDNN attention wrapper (a private module: the public one casts the logsumexp to the output dtype)."""
    from jax._src.cudnn import fused_attention_stablehlo  # noqa: PLC0415
    return fused_attention_stablehlo


def native_platforms() -> tuple[str, ...]:
    """("cuda",) when this host can trace the cuDNN call, else (): the wrapper's check at trace time reads the cuDNN
    version from jax's CUDA plugin (``cuda_versions``, None without it)."""
    return ("cuda",) if _wrapper().cuda_versions is not None else ()


def unsupported(q, k, mask: Mask) -> str | None:
    """Why cuDNN cannot compute the call, or None."""
    del k
    if mask.layout not in (SEQUENCE, CACHE):
        return "needs a causal-sequence or KV-cache mask (Mask.causal / Mask.cache)"
    if mask.q_segment is not None:
        return "has no segment ids"
    if jnp.dtype(q.dtype) not in HALF:
        return f"computes in bf16/fp16 only (got {jnp.dtype(q.dtype).name})"
    if q.shape[-1] % 8 or q.shape[-1] > MAX_HEAD_DIM:
        return f"needs a head dim that is a multiple of 8 and at most {MAX_HEAD_DIM} (got {q.shape[-1]})"
    return None


def flash(q, k, v, *, causal: bool, q_lengths=None, kv_lengths=None, interpret: bool = False):
    """q [B, T, H, Dh], k/v [B, S, Hkv, Dh] -> (out [B, T, H, Dh], logsumexp [B, T, H] fp32); scale 1/sqrt(Dh).

    Valid queries/keys are the first ``q_lengths`` / ``kv_lengths`` [B] of each row (None: all); causal is aligned
    top-left (query i sees keys <= i).
    """
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    if interpret:
        out, lse = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, query_seq_lengths=q_lengths,
                                                key_value_seq_lengths=kv_lengths, implementation="xla",
                                                return_residual=True)
        return out, lse.astype(jnp.float32)
    cudnn_attention = _wrapper()
    padded = q_lengths is not None or kv_lengths is not None
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    mask = {(False, False): cudnn_attention.MaskType.NO_MASK, (False, True): cudnn_attention.MaskType.CAUSAL,
            (True, False): cudnn_attention.MaskType.PADDING,
            (True, True): cudnn_attention.MaskType.PADDING_CAUSAL}[(padded, causal)]
    if padded:
        q_lengths = jnp.full((b,), t, jnp.int32) if q_lengths is None else q_lengths.astype(jnp.int32)
        kv_lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)
    out, lse = cudnn_attention.dot_product_attention(q, k, v, None, None, q_lengths, kv_lengths, scale=scale,
                                                     mask_type=mask, return_residual=True)
    return out, jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)  # [B, H, T] -> [B, T, H]


def _shift_rows(x, shift):
    """out[b, i] = x[b, (i + shift[b]) % L] for x [B, L, ...], shift [B] int (a per-row roll to the left)."""
    return jax.vmap(lambda row, s: jnp.roll(row, -s, axis=0))(x, shift)


def _cache_attention_merged(q, k_cache, v_cache, index, start, interpret):
    """Queries at slots index .. index+T-1 against the cache's valid slots start[b] .., as two flash calls.

    The kernels mask only a row's tail and align causality top-left, so each row is rolled left by its padding:
    (1) past: the queries attend non-causally to the rolled cache's first index - start slots; (2) chunk: the rolled
    chunk (its own keys, slots index .. index+T-1 of the cache) attends causally to itself. The two results are
    weighted by their softmax masses exp(logsumexp). Queries before start[b] (padding) give zeros.
    """
    t = q.shape[1]
    k_new, v_new = (jax.lax.dynamic_slice_in_dim(x, index, t, axis=1) for x in (k_cache, v_cache))
    past_len = jnp.maximum(index - start, 0)
    rolled = jax.lax.cond(jnp.any(start > 0), lambda kv: tuple(_shift_rows(x, start) for x in kv),
                          lambda kv: kv, (k_cache, v_cache))
    o_past, lse_past = flash(q, *rolled, causal=False, kv_lengths=jnp.maximum(past_len, 1), interpret=interpret)
    pad = jnp.clip(start - index, 0, t)  # padded slots at the front of this chunk
    o_in, lse_in = flash(*(_shift_rows(x, pad) for x in (q, k_new, v_new)), causal=True,
                         q_lengths=jnp.maximum(t - pad, 1), kv_lengths=jnp.maximum(t - pad, 1), interpret=interpret)
    o_in, lse_in = _shift_rows(o_in, -pad), _shift_rows(lse_in, -pad)
    valid = (jnp.arange(t)[None, :] >= pad[:, None])[:, :, None]  # [B, T, 1]
    lse_past = jnp.where((past_len > 0)[:, None, None], lse_past, -jnp.inf)
    lse_in = jnp.where(valid, lse_in, 0.0)
    m = jnp.maximum(lse_past, lse_in)
    w_past, w_in = jnp.exp(lse_past - m), jnp.exp(lse_in - m)  # [B, T, H]
    o_past = jnp.where((past_len > 0)[:, None, None, None], o_past.astype(jnp.float32), 0.0)
    out = (w_past[..., None] * o_past + w_in[..., None] * o_in.astype(jnp.float32)) / (w_past + w_in)[..., None]
    return jnp.where(valid[..., None], out, 0.0).astype(q.dtype)


# cuDNN's backward takes no cotangent for the logsumexp (it drops it), which the merge differentiates through; the
# backward of the cache path is therefore the blockwise XLA attention's (the same function, exact gradients).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _cache_attention(q, k_cache, v_cache, index, start, interpret):
    return _cache_attention_merged(q, k_cache, v_cache, index, start, interpret)


def _cache_attention_fwd(q, k_cache, v_cache, index, start, interpret):
    return _cache_attention_merged(q, k_cache, v_cache, index, start, interpret), (q, k_cache, v_cache, index, start)


def _cache_attention_bwd(interpret, residuals, d_out):
    del interpret
    q, k_cache, v_cache, index, start = residuals
    mask = Mask.cache(index, q.shape[1], k_cache.shape[1], start)
    _, vjp = jax.vjp(lambda q, k, v: xla_blockwise.attention(q, k, v, mask), q, k_cache, v_cache)
    return (*vjp(d_out), None, None)


_cache_attention.defvjp(_cache_attention_fwd, _cache_attention_bwd)


def attention(q, k, v, mask: Mask, *, interpret: bool = False):
    """q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh] -> [B, Tq, H, Dh] (the api contract) for the masks ``unsupported``
    accepts; ``interpret``: jax's XLA stand-in for the cuDNN calls (CPU)."""
    if mask.layout == SEQUENCE:
        return flash(q, k, v, causal=True, interpret=interpret)[0]
    return _cache_attention(q, k, v, mask.cache_index, mask.cache_start, interpret)
