"""Lightning attention layer (70 of M1's 80 layers): docs/model.md §3."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.cache import LightningSlots
from m1jax.config import ModelConfig
from m1jax.layers.common import matmul, param, param_value
from m1jax.layers.norms import RMSNorm
from pallas_kernels.lightning import lightning_attention, lightning_decode
from sharding.kernel_parallel import lightning_batch_head_parallel
from sharding.sequence_parallel import lightning_sequence_parallel, sequence_shards


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes as MiniMax's remote code and vLLM compute them (2^(-8(h+1)/H) for power-of-2 H; the
    "closest power of two + interleave" rule otherwise)."""
    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def decay_rates(num_heads: int, layer_index: jax.Array | int, num_layers: int) -> jax.Array:
    """[H] float32 rates s_{l,h} = slope_h * (1 - l/(L-1) + 1e-5); per-step factor exp(-s).

    ``layer_index`` is the *global* layer index (softmax layers count) and may be traced, so scanned layers share
    one compiled body.
    """
    slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
    layer = jnp.asarray(layer_index, jnp.float32)
    factor = (1.0 - layer / (num_layers - 1) + 1e-5) if num_layers > 1 else jnp.float32(1.0 + 1e-5)
    return slopes * factor


class LightningAttention(nnx.Module):
    """h [B, T, D] -> [B, T, D]; optional fp32 recurrent state [B, H, Dk, Dv] in and out (decoding, chunked prefill).

    qkv_proj is fused and per-head interleaved (head h owns columns h*3*Dh ... h*3*Dh + 3*Dh - 1, ordered q, k, v), so
    sharding its output axis over heads keeps whole heads together.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, w, std, pd = cfg.hidden_size, cfg.attention_width, cfg.initializer_range, cfg.param_dtype
        self.qkv_proj = param(rngs, (d, 3 * w), ("embed", "heads"), std=std, dtype_name=pd)
        self.output_gate = param(rngs, (d, w), ("embed", "heads"), std=std, dtype_name=pd)
        self.norm = RMSNorm(w, cfg.lightning_norm_eps, axes=("heads",), param_dtype=pd,
                            implementation=cfg.norm_implementation, rngs=rngs)
        self.out_proj = param(rngs, (w, d), ("heads", "embed"), std=std, dtype_name=pd)

    def __call__(self, h: jax.Array, layer_index, *, segment_ids=None, state=None, valid=None):
        """Args:
          h: [B, T, D] normalised layer input (compute dtype).
          layer_index: global layer index (int or traced scalar).
          segment_ids: [B, T] packed-document ids (state resets at changes), or None.
          state: [B, H, Dk, Dv] fp32 state before the first token (decoding); the new state is returned. Or the
            layer's ``LightningSlots`` of a paged cache: the rows' states are read from their slots, their first
            ``num_new`` tokens are real (the rest right padding), and the pool with the new states is returned.
          valid: [B, T] bool; False tokens (left padding) contribute nothing to the state.
        Returns (out [B, T, D], new state, or the updated ``LightningSlots``, or None).
        """
        slots = state if isinstance(state, LightningSlots) else None
        if slots is not None:
            state = slots.read(materialize=h.shape[1] > 1)
        cfg = self.cfg
        cdt = jnp.dtype(cfg.compute_dtype)
        b, t, _ = h.shape
        heads, hd = cfg.num_attention_heads, cfg.head_dim
        # SiLU on the whole fused q,k,v vector, in fp32 (as vLLM/SGLang do), on the projection rounded to cdt.
        qkv = _silu_fp32(matmul(h, param_value(self.qkv_proj, cdt), cdt)).reshape(b, t, heads, 3 * hd)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        if valid is not None:
            keep = valid[:, :, None, None].astype(cdt)
            k, v = k * keep, v * keep
        decay = decay_rates(heads, layer_index, cfg.num_hidden_layers)
        if state is not None and t == 1 and segment_ids is None:
            o, new_state = lightning_decode(q[:, 0], k[:, 0], v[:, 0], decay, state)
            o = o[:, None]
        else:
            attend = functools.partial(lightning_attention, implementation=cfg.lightning_implementation,
                                       block_size=cfg.block_size)
            if valid is None and sequence_shards(t) > 1:  # mesh with sequence > 1: LASP-2 style, one state all-gather
                attend = functools.partial(lightning_sequence_parallel, lightning_attention=attend)
            else:  # under a mesh: the kernel runs per device on its batch rows and heads (no-op without a mesh)
                attend = functools.partial(lightning_batch_head_parallel, lightning_attention=attend)
            o, new_state = attend(q, k, v, decay, initial_state=state, segment_ids=segment_ids,
                                  return_final_state=True)
        # One norm over all heads (eps 1e-6) in fp32, times sigmoid(gate) in fp32, rounded once: the gated norm.
        # The gate logits stay in cdt (the matmul rounds to it; the norm upcasts them), so its backward keeps them
        # at 2 bytes an element, not 4.
        gate_logits = matmul(h, param_value(self.output_gate, cdt), cdt)
        o = self.norm(o.reshape(b, t, heads * hd), gate=gate_logits, norm_dtype=jnp.float32, out_dtype=cdt)
        out = matmul(o, param_value(self.out_proj, cdt), cdt)
        if slots is not None:
            # Right padding would decay the kernel's final state past the last real token: recompute it per row.
            # (Decode rows feed one real token, or none: then the state stays.)
            new_state = (state_after(state, k, v, decay, slots.num_new) if t > 1
                         else jnp.where((slots.num_new > 0)[:, None, None, None], new_state, state))
            return out, slots.write(new_state)
        return out, (new_state if state is not None else None)


@jax.checkpoint
def _silu_fp32(x: jax.Array) -> jax.Array:
    """silu(x) computed in fp32 and rounded back to x's dtype ([..., 3W] fused q, k, v projection).

    Rematerialised: the backward keeps x (2 bytes an element in bf16) and recomputes the fp32 chain in its own
    fusion. Autodiff of the plain expression keeps fp32 copies of x and sigmoid(x) and more (12 bytes an element
    at m1-1b on an H200), and a layer scan stacks them for every layer: 16 GiB of the scanned m1-1b step's
    residuals at 4 x 8K tokens.
    """
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def state_after(state: jax.Array, k: jax.Array, v: jax.Array, decay: jax.Array, num_new: jax.Array) -> jax.Array:
    """The state after each row's first ``num_new[b]`` tokens (docs/model.md §3.4 with m = num_new[b]):
    ``lambda^m S + sum_{j<m} lambda^(m-1-j) k_j^T v_j``.

    state [B, H, Dk, Dv] f32 before the chunk; k [B, T, H, Dk], v [B, T, H, Dv]; decay [H] rates; num_new [B] int.
    The tokens past num_new (right padding) are ignored whatever they hold. Exact fp32 products.
    """
    t = k.shape[1]
    m = num_new.astype(jnp.float32)[:, None]  # [B, 1]
    age = m - 1.0 - jnp.arange(t, dtype=jnp.float32)[None]  # [B, T]: decay steps from token j to the last real one
    weight = jnp.where((age >= 0)[..., None], jnp.exp(-decay[None, None] * jnp.maximum(age, 0.0)[..., None]), 0.0)
    k_scaled = k.astype(jnp.float32) * weight[..., None]  # [B, T, H, Dk]
    added = jnp.einsum("bthk,bthv->bhkv", k_scaled, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jnp.exp(-decay[None] * m)[:, :, None, None] * state + added
