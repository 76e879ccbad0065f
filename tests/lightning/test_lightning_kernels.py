"""Pallas lightning kernels (Triton, Mosaic GPU and TPU bodies, Pallas interpret mode on CPU) against the float64
oracle.

Forward output, final state and every gradient (dq, dk, dv, d_initial_state), on odd lengths, several chunk sizes,
Dv tiles and sequence-group counts (including a group wholly in the padding), with and without segment ids and an
initial state. The Mosaic GPU kernel takes bf16, head dims that are multiples of 64 and no segment ids; its backward
walks run the same kernel (Dk and Dv swap there, hence the Dk != Dv case), or dk and dv come from its fused backward
walk.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import pallas, pallas_mosaic_gpu
from pallas_kernels.lightning.config import KernelConfig

# (backend, dtype, B, T, H, Dk, Dv, chunk, block_v, groups, segments, init)
CASES = [
    ("triton", "float32", 2, 37, 2, 16, 8, 16, 8, 1, False, False),
    ("triton", "float32", 1, 53, 2, 8, 16, 8, 8, 3, True, True),
    ("triton", "float32", 2, 37, 1, 16, 16, 8, 16, 4, True, False),  # group 3 is all padding
    ("triton", "bfloat16", 2, 29, 2, 16, 16, 16, 16, 2, True, True),
    ("tpu", "float32", 2, 45, 2, 16, 8, 16, 8, 1, True, True),
    ("tpu", "float32", 1, 61, 3, 8, 8, 8, 8, 3, False, True),
    ("tpu", "bfloat16", 1, 33, 2, 16, 16, 8, 16, 2, True, True),
    ("mosaic_gpu", "bfloat16", 1, 100, 1, 64, 64, 64, 64, 1, False, True),  # partial last chunk
    ("mosaic_gpu", "bfloat16", 2, 200, 2, 64, 128, 64, 64, 3, False, False),  # two Dv tiles, Dk != Dv
    ("mosaic_gpu", "bfloat16", 1, 130, 1, 64, 64, 64, 64, 4, False, True),  # group 3 is all padding
    ("mosaic_gpu", "bfloat16", 1, 90, 1, 64, 64, 64, 32, 1, False, True),  # 32-wide tiles (64-byte swizzle)
]
# Mosaic GPU with a chosen number of TMA stages: (case as above, consumers, num_stages). consumers 0 is one warpgroup
# that loads for itself; with warp specialization a producer warpgroup loads and the consumers walk block_v-wide tiles
# of one (row, head); the backward's swapped walks change the programs per row.
MOSAIC_STAGED = [
    (("mosaic_gpu", "bfloat16", 1, 300, 1, 128, 64, 128, 64, 1, False, True), 0, 2),  # more chunks than TMA stages
    (("mosaic_gpu", "bfloat16", 2, 200, 2, 64, 128, 64, 32, 3, False, True), 2, 3),  # 2 programs, state pass
    (("mosaic_gpu", "bfloat16", 1, 300, 1, 128, 64, 64, 64, 1, False, False), 1, 1),  # one slot: load waits for use
    (("mosaic_gpu", "bfloat16", 1, 100, 1, 128, 128, 64, 64, 1, False, True), 2, 3),  # 128-wide, fewer chunks than slots
]
# Mosaic GPU with the fused backward (the dv and dk reverse walks as two consumer warpgroups of one program, on the
# same loaded chunks; Dk = Dv): (case as above, consumers of the forward and dq walks, TMA stages asked for; the pair
# uses the most of them that fit).
MOSAIC_FUSED = [
    (("mosaic_gpu", "bfloat16", 1, 150, 2, 64, 64, 64, 64, 1, False, True), 0, 4),  # partial last chunk, 4 stages fit
    (("mosaic_gpu", "bfloat16", 1, 150, 1, 128, 128, 64, 64, 1, False, True), 0, 4),  # two Dv tiles; 2 stages fit
    (("mosaic_gpu", "bfloat16", 2, 200, 2, 64, 64, 64, 32, 3, False, False), 0, 2),  # split, 32-wide tiles
    (("mosaic_gpu", "bfloat16", 1, 130, 1, 64, 64, 64, 32, 4, False, True), 0, 1),  # group 3 all padding, 1 slot
    # default_config's split regime: a 2-consumer forward and dq walk over a split, the paired reverse walks
    (("mosaic_gpu", "bfloat16", 1, 300, 1, 128, 128, 64, 64, 3, False, True), 2, 2),
]
# Mosaic GPU with the state chain in a warpgroup of its own (split_state; the walks with outputs): (case as above, TMA
# stages, fused backward, multicast: the Dv-tile programs of a (row, head) as one cluster).
MOSAIC_SPLIT_STATE = [
    (("mosaic_gpu", "bfloat16", 1, 150, 2, 64, 64, 64, 64, 1, False, True), 2, 1, 0),  # one tile, partial last chunk
    (("mosaic_gpu", "bfloat16", 1, 300, 1, 128, 128, 64, 64, 1, False, True), 3, 1, 1),  # the default: cluster of 2
    # the whole backward in one launch (fused 2): a dq walk program and a dv + dk program from one dS chain per head
    (("mosaic_gpu", "bfloat16", 1, 200, 2, 128, 128, 64, 64, 1, False, True), 3, 2, 1),  # initial state, part chunk
    (("mosaic_gpu", "bfloat16", 2, 130, 1, 64, 64, 64, 64, 1, False, False), 2, 2, 0),  # D = 64, two rows
    (("mosaic_gpu", "bfloat16", 1, 50, 1, 128, 128, 64, 64, 1, False, True), 3, 2, 1),  # a row of one chunk
    (("mosaic_gpu", "bfloat16", 1, 300, 1, 128, 128, 64, 64, 3, False, True), 3, 2, 1),  # a split: the paired walks
    (("mosaic_gpu", "bfloat16", 1, 200, 1, 128, 128, 64, 64, 1, False, True), 2, 0, 1),  # reverse split walks
    (("mosaic_gpu", "bfloat16", 2, 200, 2, 128, 128, 64, 32, 3, False, False), 4, 1, 1),  # cluster of 4, split rows
    (("mosaic_gpu", "bfloat16", 1, 100, 1, 64, 128, 64, 64, 1, False, True), 1, 0, 0),  # Dk != Dv, one slot
    (("mosaic_gpu", "bfloat16", 1, 130, 1, 192, 192, 64, 64, 1, False, True), 2, 1, 0),  # walk programs of 3 tiles
]
# The one-launch backward whose dq walk restarts from the forward's states (dq_checkpoints: chunks between them; the
# two programs of a head as one cluster): (case as above, TMA stages, multicast, dq_checkpoints).
MOSAIC_DQ_CHECKPOINTS = [
    (("mosaic_gpu", "bfloat16", 1, 330, 2, 128, 128, 64, 64, 1, False, True), 3, 1, 4),  # 6 chunks: segments 2 + 4
    (("mosaic_gpu", "bfloat16", 2, 250, 1, 64, 64, 64, 64, 1, False, False), 2, 0, 1),  # a state every chunk
    (("mosaic_gpu", "bfloat16", 1, 150, 1, 128, 128, 64, 64, 1, False, True), 3, 1, 8),  # one partial segment
]
TOL = {"float32": 1e-4, "bfloat16": 1e-2}


@pytest.mark.parametrize("case,consumers,stages,fused,split,multicast,checkpoints",
                         [(c, 0, None, 0, 0, 0, 0) for c in CASES] + [(*c, 0, 0, 0, 0) for c in MOSAIC_STAGED]
                         + [(c, consumers, stages, 1, 0, 0, 0) for c, consumers, stages in MOSAIC_FUSED]
                         + [(c, 0, stages, fused, 1, multicast, 0)
                            for c, stages, fused, multicast in MOSAIC_SPLIT_STATE]
                         + [(c, 0, stages, 2, 1, multicast, every)
                            for c, stages, multicast, every in MOSAIC_DQ_CHECKPOINTS],
                         ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else None)
def test_forward_and_gradients_match_oracle(case, consumers, stages, fused, split, multicast, checkpoints, lt):
    backend, dtype, batch, length, heads, dk, dv, chunk, block_v, groups, segments, init = case
    prob = lt.random_problem(sum(case[2:8]), batch, length, heads, dk, dv, segments=segments, init=init)
    config = KernelConfig(chunk=chunk, block_v=block_v, groups=groups, consumers=consumers,
                          num_stages=stages or pallas.DEFAULT_CONFIGS[backend].num_stages, fused_backward=fused,
                          split_state=split, multicast=multicast, dq_checkpoints=checkpoints)
    cast = lambda x: jnp.asarray(x, dtype)
    # The oracle sees exactly the (rounded) inputs the kernel sees.
    q, k, v, d_o = (np.asarray(cast(prob[n]).astype(jnp.float32)) for n in ("q", "k", "v", "d_o"))
    want = lt.oracle(q, k, v, prob["decay"], initial_state=prob["initial_state"], segment_ids=prob["segment_ids"],
                     d_o=d_o, d_final=prob["d_final"])
    init_state = None if prob["initial_state"] is None else jnp.asarray(prob["initial_state"])
    seg = None if prob["segment_ids"] is None else jnp.asarray(prob["segment_ids"])

    def run(q, k, v, init_state):
        return pallas.lightning_attention_pallas(q, k, v, jnp.asarray(prob["decay"]), initial_state=init_state,
                                                 segment_ids=seg, backend=backend, config=config, interpret=True)

    (o, final), vjp = jax.vjp(run, cast(q), cast(k), cast(v), init_state)
    dq, dk_, dv_, d_init = vjp((cast(d_o), jnp.asarray(prob["d_final"])))
    assert o.dtype == jnp.dtype(dtype) and final.dtype == jnp.float32
    got = {"o": o, "final": final, "dq": dq, "dk": dk_, "dv": dv_}
    if init:
        got["d_init"] = d_init
    else:
        assert d_init is None
    errors = {name: lt.rel_err(np.asarray(jnp.asarray(x, jnp.float32)), want[name]) for name, x in got.items()}
    assert all(e <= TOL[dtype] for e in errors.values()), errors


def test_oracle_adjoint_matches_autodiff_of_the_recurrence(lt):
    """The oracle's hand-written adjoint agrees with jax.grad of the (independent) pure-JAX recurrence."""
    from pallas_kernels.lightning import reference
    prob = lt.random_problem(3, 2, 19, 2, 8, 4, segments=True, init=True)
    want = lt.oracle(prob["q"], prob["k"], prob["v"], prob["decay"], initial_state=prob["initial_state"],
                     segment_ids=prob["segment_ids"], d_o=prob["d_o"], d_final=prob["d_final"])

    def loss(q, k, v, init_state):
        o, final = reference.lightning_attention_recurrent(q, k, v, jnp.asarray(prob["decay"]),
                                                           initial_state=init_state,
                                                           segment_ids=jnp.asarray(prob["segment_ids"]))
        return jnp.sum(o * prob["d_o"]) + jnp.sum(final * prob["d_final"])

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*(jnp.asarray(prob[n]) for n in ("q", "k", "v", "initial_state")))
    for name, g in zip(("dq", "dk", "dv", "d_init"), grads):
        assert lt.rel_err(g, want[name]) < 1e-5, name


def test_decay_gets_no_gradient(lt):
    prob = lt.random_problem(5, 1, 9, 1, 8, 8, segments=False, init=False)
    q, k, v = (jnp.asarray(prob[n]) for n in ("q", "k", "v"))
    config = KernelConfig(chunk=8, block_v=8, groups=1)
    grad = jax.grad(lambda s: jnp.sum(pallas.lightning_attention_pallas(
        q, k, v, s, config=config, interpret=True)[0]))(jnp.asarray(prob["decay"]))
    assert not np.any(np.asarray(grad))


def test_pick_groups_avoids_padding_the_rows():
    """The sequence split picks a group count that cuts T into whole chunks when one is near its target: a pad
    copies q, k and v (3x the time of the walk at 1M on an H200)."""
    from pallas_kernels.lightning.config import pick_groups
    # B1 H8 1M, 2 tiles, 132 SMs: the target is 9 groups; 2^20 / (9 * 64) is not whole, 8 is.
    assert pick_groups(1, 8, 1 << 20, 2, 64, 132) == 8
    # 1009 chunks (a prime): no count from 9 down to 5 divides it, so the target stays.
    assert pick_groups(1, 8, 64 * 1009, 2, 64, 132) == 9
    # Enough programs without a split.
    assert pick_groups(1, 64, 32768, 2, 64, 132) == 1


@pytest.mark.parametrize("batch,heads,length,dk,dv,consumers,stages,fused,split,multicast,checkpoints", [
    # M1's 64 heads: 128 programs fill the SMs without a split; the two tiles of a head as a cluster in 3 stages
    # (and the whole backward in one launch at D = 128, its dq walk restarting from the forward's states every 4
    # chunks; a sequence split falls back to the paired walks)
    (1, 64, 1 << 20, 128, 128, 0, 3, 2, 1, 1, 4),
    (1, 8, 1 << 20, 128, 128, 2, 2, 2, 0, 0, 0),  # 8 heads need a split: the two tiles of a head in one program
    (1, 8, 4096, 128, 128, 0, 3, 2, 1, 1, 4),  # too short to split: one program per tile keeps twice the programs
    (1, 8, 1 << 20, 64, 64, 0, 4, 1, 1, 0, 0),  # one 64-wide tile per head: nothing to pair or to multicast
    # Dk != Dv: three backward walks; the forward has one Dv tile, and a fourth stage's [128, 64] state would not fit
    (1, 8, 1 << 20, 128, 64, 0, 3, 0, 1, 0, 0),
])
def test_mosaic_default_config_fits_the_call(batch, heads, length, dk, dv, consumers, stages, fused, split,
                                             multicast, checkpoints):
    config = pallas.default_config("mosaic_gpu", jnp.bfloat16, batch, heads, length, dk, dv)
    assert (config.consumers, config.num_stages, config.fused_backward, config.split_state, config.multicast,
            config.dq_checkpoints) == (consumers, stages, fused, split, multicast, checkpoints)
    assert config.groups is None
    pallas_mosaic_gpu.check_supported(jnp.bfloat16, dk, dv, config, False)  # the fitted config is one it takes


def test_clustered_walk_programs_load_each_shared_stream_into_one_slot():
    """The backward's dv and dk walk programs multicast the streams both read (q and dO) into the same SMEM slot of
    both programs. The interpreter does not model multicast (a wrong slot order passes the oracle cases there), so
    the order is checked here: in every walk, each stream that all walks read sits in the slot walk 0 gives it, and
    each walk fills slots 0-2 once. Slots hold [C, D] tiles, so a stream may take another role's slot."""
    from pallas_kernels.lightning.pallas_mosaic_gpu import PAIRED_WALKS, _slot_orders
    k, q, d_o, v = range(4)  # the backward's streams, as fused_backward_scan passes them
    assert PAIRED_WALKS == ((k, q, d_o), (v, d_o, q))  # ops: dv walks (q=k, k=q, v=dO); dk walks (q=v, k=dO, v=q)
    orders = _slot_orders(PAIRED_WALKS)
    slot = [dict(zip(walk, order)) for walk, order in zip(PAIRED_WALKS, orders)]
    assert all(sorted(order) == [0, 1, 2] for order in orders)
    assert slot[1][q] == slot[0][q] and slot[1][d_o] == slot[0][d_o]
    assert orders[0] == (0, 1, 2)  # one walk (and walk 0) keeps q, k, v in their own slots


@pytest.mark.parametrize("d", [64, 128, 192, 256, 512])
def test_walk_programs_take_the_widest_tile_whose_state_fits(d):
    """The backward's walk programs cover whole Dv tiles and carry a [D, width] float32 state in one warpgroup's
    registers: at most 128 x 128 elements (128 a thread), else the config's block_v as the other walks."""
    from pallas_kernels.lightning.pallas_mosaic_gpu import pair_width
    config = KernelConfig(chunk=64, block_v=64, fused_backward=1, split_state=1)
    width = pair_width(d, config)
    fitting = [w for w in (64, 128) if d % w == 0 and d * w <= 128 * 128]
    assert d % width == 0 and width == (max(fitting) if fitting else 64)
    assert pair_width(d, dataclasses.replace(config, split_state=0)) == 64  # the two-warpgroup pair: block_v


@pytest.mark.parametrize("n_chunks,every", [(6, 4), (4, 1), (3, 8), (8, 4), (9, 2)])
def test_restarting_dq_walk_walks_each_chunk_once_in_the_pair_walks_segment(n_chunks, every):
    """The dq walk that restarts from the forward's states (``dq_checkpoints``) takes every chunk once, each segment
    forward in time from its first chunk, and at every step is in the segment that the dv and dk walks (backward in
    time: chunk n - 1 - step) are in, so the two programs read the same chunks' k, v and dO at about the same time.
    Both producers meet at the same steps (each waits at every meeting)."""
    from pallas_kernels.lightning.pallas_mosaic_gpu import _enters_segment, _restart_order
    steps = jnp.arange(n_chunks)
    order = np.asarray(_restart_order(steps, n_chunks, every))
    assert sorted(order) == list(range(n_chunks))
    segment_of = lambda chunk: np.asarray(chunk) // every
    np.testing.assert_array_equal(segment_of(order), segment_of(n_chunks - 1 - steps))
    starts = order % every == 0
    assert all(order[t] == order[t - 1] + 1 for t in range(1, n_chunks) if not starts[t])  # forward within a segment
    enters = np.array([np.asarray(_enters_segment(t, n_chunks, every)) for t in range(n_chunks)])
    reverse = n_chunks - 1 - steps
    for walk in (order, np.asarray(reverse)):  # the restarting walk's and the reverse walk's segment changes
        np.testing.assert_array_equal(enters, np.r_[True, segment_of(walk[1:]) != segment_of(walk[:-1])])


@pytest.mark.parametrize("option", ["fused_backward", "split_state", "multicast", "dq_checkpoints"])
def test_program_shape_options_are_mosaic_gpu_only(option):
    x = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(ValueError, match=f"{option} is a Mosaic GPU kernel option"):
        pallas.lightning_attention_pallas(x, x, x, jnp.ones(1), config=KernelConfig(chunk=8, **{option: 1}),
                                          interpret=True)


def test_triton_rejects_non_power_of_two_head_dim():
    x = jnp.zeros((1, 4, 1, 12))
    with pytest.raises(ValueError, match="power-of-two"):
        pallas.lightning_attention_pallas(x, x, x, jnp.ones(1), interpret=True)


@pytest.mark.parametrize("what,dtype,dims,chunk,seg,match", [
    ("segment ids", jnp.bfloat16, (64, 64), 64, True, "segment_ids"),
    ("fp32", jnp.float32, (64, 64), 64, False, "bf16 or fp16"),
    ("head dim", jnp.bfloat16, (96, 64), 64, False, "multiples of 64"),
    ("tile", jnp.bfloat16, (64, 64), 64, False, "multiple of 32"),
    ("chunk", jnp.bfloat16, (64, 64), 32, False, "chunk 64 or 128"),
    ("shared memory", jnp.bfloat16, (128, 128), 128, False, "shared memory"),
    ("consumers", jnp.bfloat16, (64, 64), 64, False, "consumer warpgroups"),
    ("consumer tiles", jnp.bfloat16, (128, 64), 64, False, "times the consumers"),
    ("fused value", jnp.bfloat16, (128, 128), 64, False, "fused_backward is 0"),
    ("one launch dims", jnp.bfloat16, (128, 64), 64, False, "fused_backward=2\\) needs Dk == Dv <= 128"),
    ("fused dims", jnp.bfloat16, (128, 64), 64, False, "needs Dk == Dv"),
    ("fused shared memory", jnp.bfloat16, (128, 128), 128, False, "fused Mosaic GPU backward does not fit"),
    ("split value", jnp.bfloat16, (128, 128), 64, False, "split_state is 0 or 1"),
    ("split with consumers", jnp.bfloat16, (128, 128), 64, False, "only with consumers=0"),
    ("multicast unsplit", jnp.bfloat16, (128, 128), 64, False, "only with split_state=1"),
    ("multicast one tile", jnp.bfloat16, (64, 64), 64, False, "needs 2 to 8 Dv tiles"),
    ("split shared memory", jnp.bfloat16, (128, 128), 64, False, "shared memory"),
    ("checkpoints negative", jnp.bfloat16, (128, 128), 64, False, "dq_checkpoints is 0 or a positive number"),
    ("checkpoints paired", jnp.bfloat16, (128, 128), 64, False, "only with fused_backward=2 and split_state=1"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_mosaic_gpu_rejects_what_it_does_not_handle(what, dtype, dims, chunk, seg, match):
    q = jnp.zeros((1, 8, 1, dims[0]), dtype)
    v = jnp.zeros((1, 8, 1, dims[1]), dtype)
    block_v = {"tile": 16, "consumer tiles": 64, "fused shared memory": 64, "fused dims": 64, "one launch dims": 64,
               "split with consumers": 64, "multicast one tile": 64}.get(what, 128)
    consumers = {"consumers": 3, "consumer tiles": 2, "split with consumers": 1}.get(what, 0)
    split = {"split value": 2, "split with consumers": 1, "multicast one tile": 1,
             "split shared memory": 1, "checkpoints paired": 1}.get(what, 0)
    # 3 stages of 128-wide tiles fit the one-warpgroup walk (224 KiB), not the split walk's double-buffered state.
    config = KernelConfig(chunk=chunk, block_v=block_v, num_stages=3 if what == "split shared memory" else 2,
                          consumers=consumers, split_state=split, multicast=int(what.startswith("multicast")),
                          fused_backward={"fused value": 3, "fused dims": 1, "fused shared memory": 1,
                                          "one launch dims": 2, "checkpoints paired": 1}.get(what, 0),
                          dq_checkpoints={"checkpoints negative": -1, "checkpoints paired": 2}.get(what, 0))
    segment_ids = jnp.zeros((1, 8), jnp.int32) if seg else None
    with pytest.raises(ValueError, match=match):
        pallas.lightning_attention_pallas(q, q, v, jnp.ones(1), segment_ids=segment_ids, backend="mosaic_gpu",
                                          config=config, interpret=True)
