"""The MiniMax-M1 decoder: embed -> N hybrid layers -> final norm -> LM head.

Layers are grouped into identical *periods* (M1: 7 lightning + 1 softmax = 8 layers, repeated 10 times). Parameters
of the R repeats are stacked on a leading "layers" axis and the forward pass is a ``lax.scan`` over the repeats, so
80 layers compile as one 8-layer body. The global layer index (which sets the lightning decay) is scanned data.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax.cache import HybridCache, PagedCache
from m1jax.config import ModelConfig
from m1jax.layers.decoder import DecoderLayer
from m1jax.layers.embed import Embed, LMHead, lm_logits
from m1jax.layers.moe import aux_loss_from_stats, load_balancing_stats
from m1jax.layers.norms import RMSNorm
from sharding.rules import constrain

# Logical axes of the residual stream; sharding.rules maps them to mesh axes (a no-op with no mesh set).
_ACTIVATION = ("batch", "length", "embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    logits: jax.Array | None       # [B, T, V] float32 (None from ``backbone``)
    aux_loss: jax.Array            # scalar: Switch load-balancing loss, unscaled (multiply by router_aux_loss_coef)
    cache: HybridCache | PagedCache | None = None
    hidden: jax.Array | None = None  # [B, T, D] final-norm output (``return_hidden=True``)


class Period(nnx.Module):
    """The layers of one period, in order (``cfg.layer_types[:period]``)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, t, rngs=rngs) for t in cfg.layer_types[:cfg.layer_period]])

    def __call__(self, x, repeat_index, stats, *, positions, segment_ids, cache_layers, cache_index, cache_start,
                 valid, remat_layers: bool = False):
        """cache_layers: None, or per layer what it takes as its cache (``HybridCache.layer_values`` or
        ``PagedCache.layer_values``); the layers' new cache values come back in the same order.
        remat_layers: each layer rematerialised (the backward keeps its input and recomputes it, one at a time)."""
        period = len(self.layers)
        new_values = []
        f_sum, p_sum = stats
        for pos, layer in enumerate(self.layers):
            value = None if cache_layers is None else cache_layers[pos]
            layer_graph, layer_state = nnx.split(layer)

            def run_layer(state, x, layer_index, positions, segment_ids, cache, cache_index, cache_start, valid,
                          layer_graph=layer_graph):
                return nnx.merge(layer_graph, state)(
                    x, layer_index=layer_index, positions=positions, segment_ids=segment_ids, cache=cache,
                    cache_index=cache_index, cache_start=cache_start, valid=valid)

            if remat_layers:  # prevent_cse=True: with False, XLA hoisted all 8 layers' recomputations (see docs)
                run_layer = jax.checkpoint(run_layer)
            x, router_logits, experts, new_value = run_layer(
                layer_state, x, repeat_index * period + pos, positions, segment_ids, value, cache_index,
                cache_start, valid)
            f, p = load_balancing_stats(router_logits, experts, layer.cfg.num_local_experts,
                                        None if valid is None else valid.reshape(-1))
            f_sum, p_sum = f_sum + f, p_sum + p
            new_values.append(new_value)
        return x, (f_sum, p_sum), (None if cache_layers is None else tuple(new_values))


def _document_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] position of each token inside its packed document."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class MiniMaxM1(nnx.Module):
    """``model(tokens, positions=None, segment_ids=None, cache=None)`` -> ModelOutput(logits, aux_loss, cache)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        std = cfg.initializer_range
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, std=std, param_dtype=cfg.param_dtype, rngs=rngs)
        repeats = cfg.num_hidden_layers // cfg.layer_period

        @nnx.split_rngs(splits=repeats)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_periods(r):
            return Period(cfg, rngs=r)

        self.periods = make_periods(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype,
                            implementation=cfg.norm_implementation, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        LMHead(cfg.hidden_size, cfg.vocab_size, std=std, param_dtype=cfg.param_dtype, rngs=rngs))

    # ------------------------------------------------------------------------------------------------ checks
    def _check_inputs(self, tokens, positions, segment_ids, cache):
        cfg = self.cfg
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [batch, length]; got {tokens.dtype}{tokens.shape}")
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr is not None and tuple(arr.shape) != tuple(tokens.shape):
                raise ValueError(f"{name} must have the shape of tokens {tokens.shape}; got {arr.shape}")
        if not isinstance(tokens, jax.core.Tracer):
            host = np.asarray(tokens)
            if host.size and (host.min() < 0 or host.max() >= cfg.vocab_size):
                raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}); "
                                 f"got min {host.min()}, max {host.max()}")
        if positions is not None and not isinstance(positions, jax.core.Tracer):
            host = np.asarray(positions)
            if host.size and (host.min() < 0 or host.max() >= cfg.max_position_embeddings):
                raise ValueError(f"positions must be in [0, max_position_embeddings={cfg.max_position_embeddings}); "
                                 f"got min {host.min()}, max {host.max()}")
        elif positions is None and cache is None and tokens.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        if isinstance(cache, PagedCache):
            if segment_ids is not None or positions is not None:
                raise ValueError("a paged cache sets positions from its lengths: give no segment_ids or positions")
            for name in ("slots", "lengths", "num_new"):
                if getattr(cache, name).shape != (tokens.shape[0],):
                    raise ValueError(f"paged cache {name} must be [batch]=({tokens.shape[0]},); got "
                                     f"{getattr(cache, name).shape}")
        elif cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids cannot be combined with a cache: left-pad the batch and set cache.start")
            if cache.start.shape != (tokens.shape[0],):
                raise ValueError(f"cache batch {cache.start.shape[0]} != tokens batch {tokens.shape[0]}")
            max_len = cache.max_length
            if max_len >= 0 and not isinstance(cache.index, jax.core.Tracer) and (
                    int(cache.index) + tokens.shape[1] > max_len):
                raise ValueError(f"cache overflow: index {int(cache.index)} + {tokens.shape[1]} new tokens > "
                                 f"cache length {max_len}")

    # ------------------------------------------------------------------------------------------------ forward
    def backbone(self, tokens, positions=None, segment_ids=None, cache: HybridCache | PagedCache | None = None):
        """tokens [B, T] -> ModelOutput(logits=None, aux_loss, cache, hidden=[B, T, D] after the final norm).

        With a ``PagedCache``, row b's tokens sit at positions lengths[b] .. (its pools are threaded through the
        layer scan as carried state, updated in place; ``HybridCache`` entries are scanned per repeat)."""
        cfg = self.cfg
        self._check_inputs(tokens, positions, segment_ids, cache)
        b, t = tokens.shape
        cdt = jnp.dtype(cfg.compute_dtype)
        valid = cache_index = cache_start = cache_layers = None
        paged = isinstance(cache, PagedCache)
        if paged:
            steps = jnp.arange(t, dtype=jnp.int32)[None]
            positions = cache.lengths[:, None] + steps
            valid = steps < cache.num_new[:, None]
        elif cache is not None:
            cache_index, cache_start, cache_layers = cache.index, cache.start, cache.layers
            slots = cache.index + jnp.arange(t, dtype=jnp.int32)[None]
            valid = slots >= cache.start[:, None]
            if positions is None:
                positions = jnp.maximum(slots - cache.start[:, None], 0)
        if positions is None:
            positions = (_document_positions(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t)))

        x = constrain(self.embed_tokens(tokens, cdt), _ACTIVATION)
        k, e = cfg.num_experts_per_tok, cfg.num_local_experts
        stats0 = (jnp.zeros((k, e), jnp.float32), jnp.zeros((e,), jnp.float32))
        graphdef, period_state = nnx.split(self.periods)
        repeats = cfg.num_hidden_layers // cfg.layer_period

        def run_period(carry, xs):
            x, stats, pools = carry
            state, r, layers = xs
            period = nnx.merge(graphdef, state)
            if paged:
                values = cache.layer_values(pools, r)
            else:
                values = None if layers is None else cache.layer_values(layers)
            x, stats, new_values = period(x, r, stats, positions=positions, segment_ids=segment_ids,
                                          cache_layers=values, cache_index=cache_index, cache_start=cache_start,
                                          valid=valid, remat_layers=remat_layers)
            if paged:
                pools, new_layers = PagedCache.pools_from(new_values), None
            else:
                new_layers = None if layers is None else HybridCache.entries_from(new_values)
            return (constrain(x, _ACTIVATION), stats, pools), new_layers

        # remat_granularity: "period" checkpoints the scanned period (its backward recomputes and holds all of its
        # layers), "layer" each layer (the scan keeps every layer's input), "nested" both (one input per period
        # is kept across the scan, one layer's intermediates at a time in the backward; a third forward pass).
        remat_layers = cfg.remat and cfg.remat_granularity in ("layer", "nested")
        if cfg.remat and cfg.remat_granularity in ("period", "nested"):
            run_period = jax.checkpoint(run_period, prevent_cse=False)
        xs = (period_state, jnp.arange(repeats, dtype=jnp.int32), cache_layers)
        carry = (x, stats0, cache.layers if paged else None)
        if cfg.scan_layers:
            (x, stats, pools), new_layers = jax.lax.scan(run_period, carry, xs)
        else:
            outs = []
            for r in range(repeats):
                carry, out = run_period(carry, jax.tree_util.tree_map(lambda a: a[r], xs))
                outs.append(out)
            (x, stats, pools) = carry
            new_layers = None if cache_layers is None else jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
        aux = aux_loss_from_stats(*stats, cfg.num_hidden_layers, e)
        new_cache = None
        if paged:
            new_cache = dataclasses.replace(cache, layers=pools)
        elif cache is not None:
            new_cache = HybridCache(layers=tuple(new_layers), index=cache.index + t, start=cache.start)
        return ModelOutput(logits=None, aux_loss=aux, cache=new_cache, hidden=constrain(self.norm(x), _ACTIVATION))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> float32 logits [..., V] (fp32 operands when cfg.lm_head_fp32)."""
        kernel = self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        logits = lm_logits(hidden, kernel, fp32=self.cfg.lm_head_fp32, compute_dtype=jnp.dtype(self.cfg.compute_dtype),
                           precision=self.cfg.lm_head_precision)
        return constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits

    def __call__(self, tokens, positions=None, segment_ids=None, cache: HybridCache | PagedCache | None = None,
                 return_hidden: bool = False) -> ModelOutput:
        out = self.backbone(tokens, positions, segment_ids, cache)
        return ModelOutput(logits=self.logits(out.hidden), aux_loss=out.aux_loss, cache=out.cache,
                           hidden=out.hidden if return_hidden else None)


def init_model(cfg: ModelConfig, seed: int = 0) -> MiniMaxM1:
    return MiniMaxM1(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> MiniMaxM1:
    """The model with ShapeDtypeStruct leaves (no memory): for shapes, sharding plans and restore targets."""
    return nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(params=0)))


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))

