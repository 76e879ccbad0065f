"""The attention mask as slots: which keys each query sees, without a [Tq, Tk] array.

Query i of row b sees key j iff
    k_slot[b, j] <= q_slot[b, i]                      (causal by slot)
    and q_segment[b, i] == k_segment[b, j]            (when segment ids are given: packed documents)
    and k_valid[b, j]                                 (when given: e.g. a KV cache's filled, unpadded slots).
Slots are positions in the sequence or in the KV cache. ``Mask.causal`` and ``Mask.cache`` build the two masks the
model uses and record their structure (``layout``), which is what the fused kernels can express; any other slots
give a "general" mask that only the XLA paths take.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SEQUENCE = "sequence"  # q_slot = k_slot = 0 .. T-1, optional segment ids (training, packed documents)
CACHE = "cache"        # queries at slots index .. index+Tq-1 against a KV cache whose valid slots start at start[b]
GENERAL = "general"    # any slots (e.g. a sequence shard's queries against all-gathered keys)
LAYOUTS = (SEQUENCE, CACHE, GENERAL)


def slot_mask(q_slot, k_slot, q_segment=None, k_segment=None, k_valid=None) -> jax.Array:
    """[B, Tq, Tk] bool from q_slot [B, Tq], k_slot [B, Tk] and the optional [B, Tq] / [B, Tk] / [B, Tk] terms."""
    mask = k_slot[:, None, :] <= q_slot[:, :, None]
    if q_segment is not None:
        mask &= q_segment[:, :, None] == k_segment[:, None, :]
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """The mask's terms (see the module docstring), unevaluated. Positional construction has ``slot_mask``'s
    signature, so the class itself is a mask builder (``sharding.sequence_parallel`` takes one)."""
    q_slot: jax.Array                     # [B, Tq] int32
    k_slot: jax.Array                     # [B, Tk] int32
    q_segment: jax.Array | None = None    # [B, Tq] int
    k_segment: jax.Array | None = None    # [B, Tk] int
    k_valid: jax.Array | None = None      # [B, Tk] bool
    layout: str = dataclasses.field(default=GENERAL, metadata=dict(static=True))
    cache_index: jax.Array | None = None  # CACHE only: int32 scalar, slot of the first query
    cache_start: jax.Array | None = None  # CACHE only: [B] int32, first valid cache slot (left padding)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"mask layout must be one of {LAYOUTS}; got {self.layout!r}")
        if (self.q_segment is None) != (self.k_segment is None):
            raise ValueError("give both q_segment and k_segment, or neither")

    @classmethod
    def causal(cls, batch: int, length: int, segment_ids: jax.Array | None = None) -> Mask:
        """Causal self-attention over ``length`` tokens; ``segment_ids`` [B, T] (packed documents) or None."""
        slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
        return cls(slots, slots, segment_ids, segment_ids, layout=SEQUENCE)

    @classmethod
    def cache(cls, index: jax.Array, length: int, cache_length: int, start: jax.Array) -> Mask:
        """``length`` queries at slots index .. index+length-1 against a ``cache_length``-slot KV cache whose valid
        slots are start[b] .. (start: [B] int; index: int32 scalar, may be traced). Prefill chunks and decode."""
        batch = start.shape[0]
        index = jnp.asarray(index, jnp.int32)
        start = jnp.asarray(start, jnp.int32)
        q_slot = jnp.broadcast_to(index + jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
        k_slot = jnp.broadcast_to(jnp.arange(cache_length, dtype=jnp.int32)[None], (batch, cache_length))
        return cls(q_slot, k_slot, k_valid=k_slot >= start[:, None], layout=CACHE, cache_index=index,
                   cache_start=start)

    def dense(self) -> jax.Array:
        """[B, Tq, Tk] bool."""
        return slot_mask(self.q_slot, self.k_slot, self.q_segment, self.k_segment, self.k_valid)
