"""The decoding caches of the hybrid model. Two kinds, which the layers dispatch on:

``HybridCache`` (static batches, ``m1jax.generate``): fp32 lightning states for lightning layers, a preallocated
contiguous KV cache for softmax layers. Layout follows the model's scan over layer periods: ``layers[pos]`` is the
entry of position ``pos`` inside the period, stacked over the R repeats of the period:
* lightning position: ``{"state": [R, B, H, Dk, Dv] float32}`` (size independent of the sequence length);
* softmax position:  ``{"k": [R, B, S, Hkv, Dh], "v": [R, B, S, Hkv, Dh]}`` in ``kv_dtype``.
``index`` (int32 scalar) is the next slot to write; ``start`` [B] is each row's first valid slot, so a batch of
prompts of different lengths is left-padded (padded slots are masked for softmax layers and contribute nothing to
lightning states).

``PagedCache`` (the serving engine, ``m1jax.serve``): pools shared by all sequences plus, per call, which slot and
pages each batch row uses. See its docstring and docs/serving.md.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from m1jax.config import LIGHTNING, ModelConfig
from pallas_kernels.attention.paged.reference import gather_pages


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridCache:
    layers: tuple
    index: jax.Array
    start: jax.Array

    @property
    def max_length(self) -> int:
        for entry in self.layers:
            if "k" in entry:
                return entry["k"].shape[2]
        return -1  # no softmax layers: no length limit

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_length: int, *, kv_dtype: str = "bfloat16",
             start: jax.Array | None = None) -> "HybridCache":
        period = cfg.layer_period
        repeats = cfg.num_hidden_layers // period
        layers = []
        for layer_type in cfg.layer_types[:period]:
            if layer_type == LIGHTNING:
                shape = (repeats, batch, cfg.num_attention_heads, cfg.head_dim, cfg.head_dim)
                layers.append({"state": jnp.zeros(shape, jnp.float32)})
            else:
                shape = (repeats, batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
                layers.append({"k": jnp.zeros(shape, kv_dtype), "v": jnp.zeros(shape, kv_dtype)})
        start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        if start.shape != (batch,):
            raise ValueError(f"start must be [batch]=({batch},), got {start.shape}")
        return cls(layers=tuple(layers), index=jnp.zeros((), jnp.int32), start=start)

    def lightning_bytes(self) -> int:
        return sum(e["state"].nbytes for e in self.layers if "state" in e)

    def kv_bytes(self) -> int:
        return sum(e["k"].nbytes + e["v"].nbytes for e in self.layers if "k" in e)

    @staticmethod
    def layer_values(entries: tuple) -> tuple:
        """One repeat's entries -> what each layer takes: the state [B, H, Dk, Dv] or the (k, v) pair."""
        return tuple(e["state"] if "state" in e else (e["k"], e["v"]) for e in entries)

    @staticmethod
    def entries_from(values: tuple) -> tuple:
        """What each layer returned -> entries (the inverse of ``layer_values``)."""
        return tuple({"k": v[0], "v": v[1]} if isinstance(v, tuple) else {"state": v} for v in values)


# ------------------------------------------------------------------------------------------------ paged cache
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LightningSlots:
    """What a lightning layer gets from a ``PagedCache``: its layer's state pool and the rows' slots.

    pool [R, N, H, Dk, Dv] float32 (all repeats of the period position; this layer is ``repeat``); slots, lengths,
    num_new [B] int32 (see ``PagedCache``). A row with ``lengths == 0`` starts from the zero state whatever its slot
    held, so a slot needs no reset between sequences.
    """
    pool: jax.Array
    repeat: jax.Array
    slots: jax.Array
    lengths: jax.Array
    num_new: jax.Array

    def read(self, materialize: bool = False) -> jax.Array:
        """The rows' states before this call's tokens: [B, H, Dk, Dv] float32.

        ``materialize`` (prefill chunks): gather the states into their own buffer first. Otherwise XLA fuses the read
        into the chunk's consumers, which then still read the pool when ``write`` updates it in place, and it copies
        the whole pool (twice per layer) instead. A decode step reads them once and has no such copy: fusing is
        cheaper there."""
        state = self.pool[self.repeat, self.slots]
        if materialize:
            state = jax.lax.optimization_barrier(state)
        return jnp.where((self.lengths == 0)[:, None, None, None], 0.0, state)

    def write(self, states: jax.Array) -> "LightningSlots":
        """The pool with the rows' new states [B, H, Dk, Dv] stored in their slots."""
        return dataclasses.replace(self, pool=self.pool.at[self.repeat, self.slots].set(states))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV:
    """What a softmax layer gets from a ``PagedCache``: the K and V page pools of its period position and the rows'
    page tables.

    k_pages, v_pages [Hkv, R * P, page_size, Dh]: the R repeats' pools laid end to end, so that layer ``repeat``
    owns global pages ``repeat * P .. repeat * P + P - 1`` and a paged attention kernel takes the whole array (a
    slice per layer would be a copy of the pool on every call). page_table [B, Pb] int32 logical pages 0..P-1 (the
    same for every layer); lengths, num_new [B] int32.
    """
    k_pages: jax.Array
    v_pages: jax.Array
    repeat: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    num_new: jax.Array
    repeats: int = dataclasses.field(metadata=dict(static=True), default=1)

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    def layer_pages(self) -> jax.Array:
        """[B, Pb] int32 global page ids of this layer."""
        return self.page_table + self.repeat * (self.k_pages.shape[1] // self.repeats)

    def write(self, k: jax.Array, v: jax.Array) -> "PagedKV":
        """The pools with this call's keys and values k, v [B, T, Hkv, Dh] written at positions lengths ..
        lengths + num_new - 1 of each row; right-padding tokens go to the layer's scratch page 0 (never read)."""
        b, t = k.shape[:2]
        ps = self.page_size
        positions = self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
        valid = jnp.arange(t)[None] < self.num_new[:, None]
        logical = jnp.minimum(positions // ps, self.page_table.shape[1] - 1)
        pages = jnp.take_along_axis(self.layer_pages(), logical, axis=1)
        scratch = self.repeat * (self.k_pages.shape[1] // self.repeats)
        pages = jnp.where(valid, pages, scratch)
        offsets = positions % ps

        def put(pool, x):  # pool[:, pages, offsets] has shape [Hkv, B, T, Dh]
            return pool.at[:, pages, offsets].set(jnp.moveaxis(x, 2, 0).astype(pool.dtype))

        return dataclasses.replace(self, k_pages=put(self.k_pages, k), v_pages=put(self.v_pages, v))

    def gather(self) -> tuple[jax.Array, jax.Array]:
        """The rows' keys and values as contiguous caches: (k, v) each [B, Pb * page_size, Hkv, Dh]."""
        return gather_pages(self.k_pages, self.layer_pages()), gather_pages(self.v_pages, self.layer_pages())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """The serving engine's cache: pools shared by all sequences, and this call's rows.

    ``layers[pos]`` per period position (R repeats of the period):
    * lightning: ``{"state": [R, N, H, Dk, Dv] float32}``, one state per sequence slot (N slots);
    * softmax: ``{"k": [Hkv, R * P, page_size, Dh], "v": same}`` in the KV dtype: P pages per layer (see
      ``PagedKV``). Page 0 of each layer is scratch: padding writes land there and no sequence owns it.
    Per call with tokens [B, T]: row b continues the sequence in lightning slot ``slots[b]`` whose first
    ``lengths[b]`` tokens are cached, in the logical pages ``page_table[b]`` (token i lives in page
    ``page_table[b, i // page_size]`` at offset ``i % page_size``); its first ``num_new[b]`` tokens are real and the
    rest is right padding (it writes nothing and leaves the state as after the last real token). ``repeats`` is R.
    """
    layers: tuple
    slots: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    num_new: jax.Array
    repeats: int = dataclasses.field(metadata=dict(static=True), default=1)

    @staticmethod
    def init_pools(cfg: ModelConfig, *, num_slots: int, num_pages: int, page_size: int,
                   kv_dtype: str = "bfloat16") -> tuple:
        """Zeroed pools (``layers``) for ``num_slots`` sequences and ``num_pages`` pages per softmax layer."""
        period = cfg.layer_period
        repeats = cfg.num_hidden_layers // period
        layers = []
        for layer_type in cfg.layer_types[:period]:
            if layer_type == LIGHTNING:
                shape = (repeats, num_slots, cfg.num_attention_heads, cfg.head_dim, cfg.head_dim)
                layers.append({"state": jnp.zeros(shape, jnp.float32)})
            else:
                shape = (cfg.num_key_value_heads, repeats * num_pages, page_size, cfg.head_dim)
                layers.append({"k": jnp.zeros(shape, kv_dtype), "v": jnp.zeros(shape, kv_dtype)})
        return tuple(layers)

    def layer_values(self, pools: tuple, repeat: jax.Array) -> tuple:
        """What each layer of repeat ``repeat`` takes: ``LightningSlots`` or ``PagedKV`` over ``pools``."""
        values = []
        for entry in pools:
            if "state" in entry:
                values.append(LightningSlots(entry["state"], repeat, self.slots, self.lengths, self.num_new))
            else:
                values.append(PagedKV(entry["k"], entry["v"], repeat, self.page_table, self.lengths, self.num_new,
                                      self.repeats))
        return tuple(values)

    @staticmethod
    def pools_from(values: tuple) -> tuple:
        """What each layer returned (updated views) -> pools (the inverse of ``layer_values``)."""
        return tuple({"state": v.pool} if isinstance(v, LightningSlots) else {"k": v.k_pages, "v": v.v_pages}
                     for v in values)
