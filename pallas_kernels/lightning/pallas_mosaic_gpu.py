"""Lightning scan on Hopper GPUs: one Mosaic GPU kernel (TMA + wgmma) that keeps the state on chip for a whole row.

Grid ``(Dv / width, H, rows)``. A walker (one warpgroup) walks its row's chunks (forward or reverse) for one
``block_v``-wide Dv tile and carries its ``[Dk, block_v]`` float32 state in wgmma accumulator registers. Three program
shapes (``KernelConfig.consumers``, ``KernelConfig.split_state``):

* 0: one warpgroup per program (``width`` = block_v); it issues its own TMA loads ``stages`` chunks ahead.
* 1 or 2 (warp specialization, as jax's Hopper attention): a producer warpgroup issues every TMA load and refills a
  slot as soon as each consumer has arrived on its "consumed" barrier; each consumer warpgroup walks its own
  ``block_v`` tile (``width`` = consumers * block_v) and both read the same q, k slots (loaded once per program). Two
  consumers keep two independent dependency chains in flight on one SM: one's wgmmas run while the other does its
  register math, which one warpgroup's strictly serial chunk chain cannot do.
* ``split_state`` (walks with outputs, ``_split_kernel``; the default): the walker's work in two warpgroups and a
  producer. The chunk recurrence only runs through the state, so one warpgroup carries the state alone (scale v, S =
  carry S + k^T v_w) and hands each chunk's bf16 S to the other, which makes the outputs (q k^T, q S, the decays, P v)
  without waiting on its own previous chunk. On an H200 the chunk chain went from 1.22 to 0.91 us with memory to spare,
  and the forward at B1 H64 from 0.690 to 0.592 ms at 32K (with ``multicast``, below). ``multicast``: the Dv-tile
  programs of a (row, head) as one thread-block cluster, each loading part of every chunk's q and k rows into all of
  them (TMA multicast): q and k cross L2 once per (row, head), and fewer bytes are in flight.

Per chunk (C tokens), per walker:

    TMA   q, k [C, Dk] and v [C, block_v] into SMEM slot (``stages`` slots)
    wgmma scores = q k^T [C, C]  and  inter = q S_bf16 [C, block_v]            (both in flight together)
          meanwhile v is scaled by its state decay in fp32 and stored (bf16) for the state update
    regs  scores *= intra-chunk decay (hoisted [C, C] table);  o = inter * (row decay of q)
    wgmma o += scores_bf16 v   and   S = carry * S + k^T v_scaled                  (both in flight together)
          the slot is free now: refilled (or the producer told) before the stores
    TMA   o (bf16) to HBM; S rounded to bf16 into SMEM for the next chunk's ``q S``.

So ``q k^T`` is computed once per (chunk, walker), nothing but q, k, v, o crosses HBM, and the TMA of the next
chunks runs under both wgmma pairs. The Dv-tile programs of one (row, head) each read the same q, k chunks, from L2
while they walk close together. (Launch order does not pair them: Pallas's grid is row-major, so the tile axis, first,
varies slowest; at B1 H64 the 128 programs are all resident at once on 132 SMs anyway.) Reading q, k once per
(row, head) instead (``multicast``) did not speed up the one-warpgroup walk on an H200 (code 96e991c): its serial
chunk chain, not the re-reads, bound it. With the state chain split off it does: 0.592 against 0.619 ms at B1 H64 32K,
2.549 against 2.644 ms at 128K (`benchmarks/RESULTS.md`). The paired backward's tile programs as such a cluster
(code 10cca68) were 1.00-1.01x in a forward + backward and were taken out again.

The math is ``chunk_math``'s (``walk_step``): the same geometry (``a``, ``b``, the last partial chunk, chunks wholly
in the padding), decay factors computed in float32, the state rounded to the input dtype for the tensor cores and its
decay applied in float32 after. One difference: the state update scales v (the walker's ``[C, block_v]`` tile) rather
than k by the per-token decay before rounding to bf16, which has the same rounding error and half the work at
``block_v`` = Dk / 2.

The split walk's outputs are bit-identical to the one-warpgroup walk's: the same operations and roundings, only
distributed over two warpgroups.

Rows are zero-padded past their valid tokens (``ops.scan_sequence`` guarantees it), so padded keys add nothing to the
scores or the state; the kernel only has to get the decay distances right.

The backward's dv and dk walks in one launch (``fused_backward_scan``, ``KernelConfig.fused_backward`` = 1), both
reverse walks over the same chunks (``ops``: dv walks q=k, k=q, v=dO; dk walks q=v, k=dO, v=q). With ``split_state``
(the default) each walk's programs are split walks of their own, up to 128 columns wide (``_walks_kernel``,
``PAIRED_WALKS``, ``pair_width``): at D = 128 a head's dv and dk programs each compute q k^T once per chunk, where tile
programs computed it per tile; on an H200 0.94-1.02 ms against 1.24-1.33 ms for the pair below at B1 H64 32K. With
``multicast`` they are one cluster that loads q and dO once for both (``_slot_orders``; 4.06 against 4.25 ms at 128K,
within the spread at 32K). The pair with both walks in one program and a state warpgroup for both (four warpgroups)
reached 1.14-1.21 ms. Without ``split_state`` one program per (Dv tile, head, row) runs them as two consumer warpgroups
(``pair``): a producer warpgroup loads each chunk of k, q, dO and v once, and walker 0 (dv) and walker 1 (dk) each
carry their own [D, block_v] state, as in two separate walks. What it saves: one read of q and dO (a pass over 2 of the
8 arrays the two walks move), one launch, and, mostly, the two walks' serial chunk chains now share each SM, so one's
wgmmas run while the other does its register math (measured on an H200: 0.98 ms against 2 x 0.64 ms at B1 H64 32K).
Needs Dk = Dv (the walkers share scratch shapes); at D = 128 its 64 KiB per TMA stage leave room for 2 stages. An
earlier version held one state dS for both gradients, split by columns across two walkers that handed its bf16 copy to
each other through SMEM every chunk: 64 programs at B1 H64 and both [C, C] score matrices per walker made it 0.82x the
separate walks, and it was replaced (``benchmarks/RESULTS.md``).

Limits (``check_supported``, one-line ValueError): bf16/fp16 inputs, Dk and Dv multiples of 64, block_v a multiple
of 32 dividing both and ``width`` dividing both (the backward's walks swap Dk and Dv), 0-2 consumers, ``split_state``
only with 0 consumers, ``multicast`` only with ``split_state`` and 2 to ``MAX_CLUSTER`` Dv tiles that split a chunk into
multiples of 8 rows, chunk 64 or 128, the scratch within Hopper's 227 KiB of SMEM (chunk 128 with ``block_v`` 128 does
not fit), no segment ids (``doc``): use the Triton kernel for packed documents.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import pl, plgpu
from pallas_kernels.lightning.config import KernelConfig, RowLayout


def _smem_transforms(minor: int, dtype):
    """Tiling + swizzle for SMEM tiles that TMA fills and wgmma reads, the widest swizzle a row of ``minor`` elements
    allows. One for all tiles: a wgmma's two SMEM operands must share it (k^T and the v tile in the state update)."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _row_vector(values_of_pos, chunk: int):
    """[C] float32 in the layout of a wgmma accumulator's rows, ``values_of_pos(pos)`` for pos = 0..C-1."""
    pos = plgpu.broadcasted_iota(jnp.int32, (chunk,), 0, layout=plgpu.Layout.WGMMA.reduce(1))
    return values_of_pos(pos)


def _scale_rows(x, w):
    """x [C, N] (wgmma layout) times w [C] per row."""
    return x * lax.broadcast_in_dim(w, x.shape, [0])


def _decay(s, dist, valid):
    """exp(-s * dist) where ``valid`` (dist >= 0 there), else 0; float32."""
    return jnp.where(valid, jnp.exp(-s * jnp.maximum(dist, 0).astype(jnp.float32)), 0.0)


def _chunk_bounds(n_valid, c, chunk: int):
    """(valid tokens from chunk ``c``'s start, a, b) as in ``chunk_math.chunk_geometry``."""
    limit = n_valid - c * chunk
    return limit, jnp.minimum(limit, 0) - 1, jnp.minimum(limit, chunk) - 1


def _intra_decay(s, chunk: int, reverse: bool):
    """[C, C] float32 in wgmma layout: exp(-s |i - j|) where token j feeds token i in the walk's direction, else 0
    (loop-invariant: hoisted out of the chunk loop)."""
    i = plgpu.broadcasted_iota(jnp.int32, (chunk, chunk), 0, layout=plgpu.Layout.WGMMA)
    j = plgpu.broadcasted_iota(jnp.int32, (chunk, chunk), 1, layout=plgpu.Layout.WGMMA)
    dist = (j - i) if reverse else (i - j)
    return _decay(s, dist, dist >= 0)


def _query_decay(s, a, b, limit, chunk: int, reverse: bool):
    """[C] per-row decay of a chunk's queries from the state entering the chunk (``chunk_math.chunk_geometry``'s a, b;
    0 past the valid tokens)."""
    return _row_vector(lambda pos: _decay(s, (b - pos) if reverse else (pos - a), pos < limit), chunk)


def _scaled_v(v_ref, s, a, b, limit, chunk: int, reverse: bool, dtype):
    """v [C, block_v] scaled per token by its decay to the walk's end of the chunk (how it enters the state), in
    ``dtype`` for the state wgmma."""
    wt = _row_vector(lambda pos: _decay(s, (pos - a) if reverse else (b - pos), pos < limit), chunk)
    return _scale_rows(plgpu.load(v_ref, layout=plgpu.Layout.WGMMA).astype(jnp.float32), wt).astype(dtype)


def _hand_over(state, st_ref, ready_bar):
    """A state warpgroup hands ``state`` [Dk, Dv] (float32) in bf16 to the output warpgroups: ``st_ref``, then
    ``ready_bar``."""
    st_ref[...] = state.astype(st_ref.dtype)
    plgpu.commit_smem()
    plgpu.barrier_arrive(ready_bar)


def _step_state(state, k_ref, v_ref, vw_ref, s, a, b, limit, *, chunk: int, reverse: bool, interpret: bool):
    """A state warpgroup's chunk, its loads in: carry * state + k^T (v scaled to the chunk's end), with k ``k_ref``
    [C, Dk], v ``v_ref`` [C, Dv] and ``vw_ref`` the scaled v's SMEM. Returns the next state. The walks' forward state
    (k, v), dq walk's (v, k) and the reverse dS chain (q, dO) all take this step."""
    vw_ref[...] = _scaled_v(v_ref, s, a, b, limit, chunk, reverse, vw_ref.dtype)
    plgpu.commit_smem()
    carry = jnp.exp(-s * (b - a).astype(jnp.float32))
    (state,) = _accumulate(lambda acc: plgpu.wgmma(acc, k_ref.T, vw_ref), (state * carry,), interpret)
    return state


def _initial_state(init_ref, row, head, cols, shape):
    """A walker's fp32 state block ``shape`` = [Dk, width] in wgmma layout: its columns ``cols`` of the initial
    state [R, H, Dk, Dv] (``init_ref``), or zeros when there is none."""
    if init_ref is None:
        return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
    return plgpu.load(init_ref.at[row, head, :, cols], layout=plgpu.Layout.WGMMA, optimized=False)


def _accumulate(issue, inits, interpret: bool):
    """Final values of wgmma accumulators that start at ``inits`` (arrays, or None for an absent one) after
    ``issue(*accumulator refs)``.

    Compiled, the accumulators start from the given registers (``pl.run_state``), so nothing extra stays live while the
    wgmmas run. Mosaic GPU interpret mode does not implement ``run_state`` (jax 0.11.2), so there they start at zero
    and the initial values are added after: the same sums.
    """
    if not interpret:
        refs = tuple(None if x is None else plgpu.ACC.init(x) for x in inits)
        return pl.run_state(lambda accs: issue(*accs))(refs)

    present = [i for i, x in enumerate(inits) if x is not None]

    def run(*accs):
        refs = [None] * len(inits)
        for i, acc in zip(present, accs):
            refs[i] = acc
        issue(*refs)
        return tuple(acc[...] for acc in accs)

    sums = pl.run_scoped(run, *(plgpu.ACC(inits[i].shape, jnp.float32) for i in present))
    out = [None] * len(inits)
    for i, total in zip(present, sums):
        out[i] = inits[i] + total
    return tuple(out)


def _walker_operands(w, tile, *, pair: bool, with_output: bool, walkers: int, block_v: int):
    """Walker ``w``'s operands: (stream of its q or None, stream of its k, stream of its v, its v columns within that
    stream's SMEM tile, the output it writes, its columns of that output, its state and its initial state).

    One walk (forward or a backward walk): streams (q, k, v) with v loaded as the program's ``walkers * block_v``
    columns, walker w taking block ``w`` of them; every walker writes output 0. ``pair`` (the backward's two reverse
    walks in one program): streams (k, q, dO, v), all full width; walker 0 is the dv walk (q=k, k=q, v=dO), walker 1
    the dk walk (q=v, k=dO, v=q), each on Dv tile ``tile`` and writing its own output (dv, dk).
    """
    if pair:
        cols = pl.ds(tile * block_v, block_v)
        q, k, v = ((0, 1, 2), (3, 2, 1))[w]
        return q, k, v, cols, w, cols
    v_cols = None if walkers == 1 else pl.ds(w * block_v, block_v)  # None: the whole v tile
    w = 0 if w is None else w
    return (0 if with_output else None), (1 if with_output else 0), (2 if with_output else 1), v_cols, 0, \
        pl.ds((tile * walkers + w) * block_v, block_v)


def _kernel(*refs, layout: RowLayout, chunk: int, block_v: int, consumers: int, stages: int, reverse: bool,
            with_output: bool, has_init: bool, pair: bool, interpret: bool):
    n_walks = 2 if pair else 1  # outputs (o, final state, initial state): one per walk the program runs
    n_streams = 4 if pair else (3 if with_output else 2)
    refs = list(refs)
    s_ref = refs.pop(0)
    streams = [refs.pop(0) for _ in range(n_streams)]
    inits = [refs.pop(0) for _ in range(n_walks)] if has_init else [None] * n_walks
    outs = [refs.pop(0) for _ in range(n_walks)] if with_output else [None] * n_walks
    states_out = [refs.pop(0) for _ in range(n_walks)]
    slots = [refs.pop(0) for _ in range(n_streams)]
    vw_smem, st_smem, o_smem, probs_smem, load_bars, consumed_bars = refs

    specialized = consumers > 0
    walkers = max(consumers, 1)  # warpgroups that walk a Dv tile
    tile, head, row = lax.axis_index("tile"), lax.axis_index("head"), lax.axis_index("row")
    n_chunks = layout.length // chunk
    n_valid = layout.row_valid(row)
    s = s_ref[head]
    # Columns of each stream a program loads: all of them, except one walk's v (its walkers' tiles).
    stream_cols = [None] * n_streams
    if not pair:
        stream_cols[-1] = pl.ds(tile * walkers * block_v, walkers * block_v)

    def chunk_of(step):
        return (n_chunks - 1 - step) if reverse else step

    def issue_loads(step, slot):
        rows = pl.ds(chunk_of(step) * chunk, chunk)
        for ref, smem, cols in zip(streams, slots, stream_cols):
            src = ref.at[row, rows, head] if cols is None else ref.at[row, rows, head, cols]
            plgpu.copy_gmem_to_smem(src, smem.at[slot], load_bars.at[slot])

    def walk(w):
        """Walk the row for walker ``w``: the consumer warpgroup's index under warp specialization, else None. The
        per-walker scratch (a leading walker axis under warp specialization) is indexed by the traced warpgroup
        index even where ``w`` is static (the pair's walkers): a static index would reach ``run_state``'s lowering
        as a constant it rejects."""
        mine = (lambda ref: ref) if w is None else (lambda ref: ref.at[lax.axis_index("wg")])
        q_i, k_i, v_i, v_cols, out_i, cols = _walker_operands(w, tile, pair=pair, with_output=with_output,
                                                              walkers=walkers, block_v=block_v)
        o_ref, init_ref, state_out_ref = outs[out_i], inits[out_i], states_out[out_i]
        vw_w, st_w, o_w = mine(vw_smem), mine(st_smem), mine(o_smem) if with_output else None
        dk = slots[k_i].shape[-1]
        state0 = _initial_state(init_ref, row, head, cols, (dk, block_v))
        st_w[...] = state0.astype(st_w.dtype)
        plgpu.commit_smem()

        if with_output:
            decay_cc = _intra_decay(s, chunk, reverse)

        def body(step, state):
            slot = lax.rem(step, stages)
            c = chunk_of(step)
            limit, a, b = _chunk_bounds(n_valid, c, chunk)
            plgpu.barrier_wait(load_bars.at[slot])
            q_s = slots[q_i].at[slot] if with_output else None
            k_s = slots[k_i].at[slot]
            v_s = slots[v_i].at[slot] if v_cols is None else slots[v_i].at[slot].at[:, v_cols]

            def scale_v():
                vw_w[...] = _scaled_v(v_s, s, a, b, limit, chunk, reverse, vw_w.dtype)
                plgpu.commit_smem()

            o = None
            if with_output:
                def scores_and_inter(acc_s, acc_o):
                    plgpu.wgmma(acc_s, q_s, k_s.T)
                    plgpu.wgmma(acc_o, q_s, st_w)
                    scale_v()
                    return acc_s[...], acc_o[...]

                scores, inter = pl.run_scoped(scores_and_inter, plgpu.ACC((chunk, chunk), jnp.float32),
                                              plgpu.ACC((chunk, block_v), jnp.float32))
                o = _scale_rows(inter, _query_decay(s, a, b, limit, chunk, reverse))
                probs = (scores * decay_cc).astype(q_s.dtype)
            else:
                scale_v()
            carry = jnp.exp(-s * (b - a).astype(jnp.float32))

            if with_output and interpret:
                # The interpreter's wgmma reads operands from SMEM only; compiled, the scores stay in registers.
                mine(probs_smem)[...] = probs
                plgpu.commit_smem()
                probs = mine(probs_smem)

            def update(acc_o, acc_st):
                if with_output:
                    plgpu.wgmma(acc_o, probs, v_s)
                plgpu.wgmma(acc_st, k_s.T, vw_w)

            o, state = _accumulate(update, (o, state * carry), interpret)

            # The slot's last reader is done: refill it now, before this chunk's stores (under warp specialization,
            # tell the producer; only for slots it refills, so that it waits on every phase the barrier completes).
            @pl.when(step + stages < n_chunks)
            def _():
                if specialized:
                    plgpu.barrier_arrive(consumed_bars.at[slot])
                else:
                    issue_loads(step + stages, slot)

            if with_output:
                o_slot = lax.rem(step, 2)
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store that last used this slot has read it
                o_w[o_slot] = o.astype(o_w.dtype)
            st_w[...] = state.astype(st_w.dtype)
            plgpu.commit_smem()
            if with_output:
                plgpu.copy_smem_to_gmem(o_w.at[o_slot], o_ref.at[row, pl.ds(c * chunk, chunk), head, cols])
            return state

        state = lax.fori_loop(0, n_chunks, body, state0)
        state_out_ref.at[row, head, :, cols][...] = state
        plgpu.wait_smem_to_gmem(0)

    if not specialized:
        for step in range(min(stages, n_chunks)):
            issue_loads(step, step)
        walk(None)
        return

    # The pair's walkers read different streams: one branch each (static stream indices).
    _warp_specialized(walk, issue_loads, consumed_bars, walkers=consumers, stages=stages, n_chunks=n_chunks,
                      static_walker=pair)


def _warp_specialized(walk, issue_loads, consumed_bars, *, walkers: int, stages: int, n_chunks: int,
                      static_walker: bool):
    """Warpgroups 0..walkers-1 run ``walk(index)``; warpgroup ``walkers`` is the producer: it issues the first
    ``stages`` chunks' TMA loads, then refills each slot once every walker has arrived on its ``consumed`` barrier.
    ``static_walker``: pass each walker its index as a Python int (one branch per walker: scratch indexed by it must
    be static), else the traced warpgroup index (one branch for all)."""
    wg = lax.axis_index("wg")

    def consumer(index):
        plgpu.set_max_registers(_consumer_registers(walkers), action="increase")
        walk(index)

    if static_walker:
        for w in range(walkers):
            pl.when(wg == w)(functools.partial(consumer, w))
    else:
        pl.when(wg < walkers)(lambda: consumer(wg))

    pl.when(wg == walkers)(lambda: _producer(issue_loads, consumed_bars, stages=stages, n_chunks=n_chunks))


def _release_slot(consumed_bars, step, slot, *, stages: int, n_chunks: int):
    """A consumer warpgroup is done with chunk ``step``'s ``slot``: tell the producer (``_producer``), only for the
    slots it refills, since it waits on every phase the barrier completes."""
    @pl.when(step + stages < n_chunks)
    def _():
        plgpu.barrier_arrive(consumed_bars.at[slot])


def _leave_cluster(done_bar):
    """Before a cluster's program exits: wait until no peer may still signal its barriers (None: no cluster)."""
    if done_bar is not None:
        plgpu.barrier_arrive(done_bar)
        plgpu.barrier_wait(done_bar)


def _producer(issue_loads, consumed_bars, *, stages: int, n_chunks: int, before_loads=None):
    """The producer warpgroup: the first ``stages`` chunks' TMA loads, then each slot refilled once every consumer has
    arrived on its ``consumed`` barrier. ``before_loads(step)``, if given, runs before each step's loads."""
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
    before_loads = before_loads or (lambda step: None)
    for step in range(min(stages, n_chunks)):
        before_loads(step)
        issue_loads(step, step)
    if n_chunks > stages:
        @pl.loop(stages, n_chunks)
        def _(step):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(consumed_bars.at[slot])  # every consumer is done with the chunk step - stages
            before_loads(step)
            issue_loads(step, slot)


class Checkpoints(NamedTuple):
    """The forward walk's state entering every ``every``-th chunk, ``ref`` [R, J, H, Dk, Dv] in the inputs' dtype
    (J = ceil(chunks / every)): the forward saves them (``sm``, ``bar``: None), the one-launch backward's dq walk
    restarts from them (``sm``: a [Dk, Dv] SMEM buffer that the state warpgroup fills by TMA, ``bar`` its barrier)."""
    ref: Any
    every: int
    sm: Any = None
    bar: Any = None


def _stages(length: int, config: KernelConfig, most: int) -> int:
    """TMA stages of a walk over rows of ``length`` tokens: at most ``most`` and one a chunk. One-line ValueError
    when ``length`` is not a multiple of the chunk."""
    if length % config.chunk:
        raise ValueError(f"L={length} must be a multiple of the chunk {config.chunk}")
    return max(1, min(most, length // config.chunk))


def _segments(n_chunks: int, every: int) -> int:
    """Segments of ``every`` chunks (the last one partial) in a row of ``n_chunks``."""
    return -(-n_chunks // every)


def _last_segment(n_chunks: int, every: int) -> int:
    """Chunks in the last (possibly partial) segment: the one a restarting walk takes first."""
    return n_chunks - (_segments(n_chunks, every) - 1) * every


def _restart_order(step, n_chunks: int, every: int):
    """The chunk a restarting walk (``Checkpoints``) takes at ``step``: the segments from the last to the first, each
    forward in time from its checkpoint, i.e. in the order of the reverse walks' segments."""
    n_seg, first = _segments(n_chunks, every), _last_segment(n_chunks, every)
    later = jnp.maximum(step - first, 0)
    return jnp.where(step < first, (n_seg - 1) * every + step,
                     (n_seg - 2 - lax.div(later, every)) * every + lax.rem(later, every))


def _enters_segment(step, n_chunks: int, every: int):
    """Whether ``step`` enters a new segment of ``every`` chunks, for a reverse walk (chunk n - 1 - step) and so for
    a restarting one (``_restart_order``: at every step in the reverse walk's segment)."""
    return (step == 0) | (lax.rem(n_chunks - 1 - step, every) == every - 1)


def _meet_at_segments(bar, n_chunks: int, every: int):
    """A producer's ``before_loads``: before the loads of a step that enters a segment (``_enters_segment``), meet
    the cluster's other producer at ``bar`` (one arrival each). The two programs then walk the same segment at the
    same time, so whichever loads a chunk second finds it in L2."""
    def before_loads(step):
        @pl.when(_enters_segment(step, n_chunks, every))
        def _():
            plgpu.barrier_arrive(bar)
            plgpu.barrier_wait(bar)
    return before_loads


def _split_kernel(s_ref, q_ref, k_ref, v_ref, *refs, tile, layout: RowLayout, chunk: int, block_v: int, stages: int,
                  reverse: bool, has_init: bool, cluster: bool, interpret: bool,
                  shared: tuple[bool, bool, bool] = (True, True, False), registers: int | None = None,
                  save: Checkpoints | None = None, restart: Checkpoints | None = None, meet=None):
    """One walk with outputs on Dv tile ``tile`` in three warpgroups (``KernelConfig.split_state``): 0 makes the
    outputs, 1 carries the state, 2 issues the TMA loads.

    The chunk recurrence only runs through the state: S_{c+1} = carry S_c + k_c^T (v_c scaled). Everything else of a
    chunk (q k^T, q S_c, the decays, P v) hangs off it. So the state warpgroup walks that chain alone and hands each
    chunk's S_c, rounded to bf16, to the output warpgroup through SMEM (one buffer per TMA slot, ``st_sm``
    [stages, Dk, block_v], and a "ready" barrier each); the output warpgroup's chunks no longer wait on each other.
    The state warpgroup writes chunk c's S_c into slot c's buffer only once chunk c's loads are in. The producer
    refilled that slot only after both walking warpgroups released chunk c - stages, so the output warpgroup has read
    the S that the buffer held: no "free" barrier is needed (with one, 5-9% slower on an H200 and 5-7% more energy a
    call; ``benchmarks/RESULTS.md``, "The hand-over freed by the loads"). Same operations and roundings as
    ``_kernel``'s walk, so the outputs are bit-identical. Under ``cluster`` the programs of a (row, head) are one
    thread-block cluster and each loads part of every chunk of the ``shared`` streams (of q, k, v) into all of them
    (TMA multicast): q and k for the Dv-tile programs of one walk, q and dO for the backward's walk programs.
    ``registers``: the output and state warpgroups' register cap (default: the SM's registers less the producer's,
    split between the two).

    ``save``: a forward walk also stores the bf16 S_c it hands over at every ``save.every``-th chunk (``Checkpoints``).
    ``restart``: a forward walk (the dq walk) restarts from such states: it walks the segments between them from the
    last to the first (``_restart_order``), each forward in time, and has no final state (``state_out_ref`` None).
    ``meet``: with ``restart``, a cluster barrier at which the producer meets the other program's at every segment
    (``_meet_at_segments``). ``o_sm`` may hold one output buffer or two.
    """
    refs = list(refs)
    init_ref = refs.pop(0) if has_init else None
    o_ref, state_out_ref = refs.pop(0), refs.pop(0)
    q_sm, k_sm, v_sm, vw_sm, st_sm, o_sm, probs_sm, load_bars, consumed_bars, ready_bars, done_bar = refs
    head, row, wg = lax.axis_index("head"), lax.axis_index("row"), lax.axis_index("wg")
    cols = pl.ds(tile * block_v, block_v)
    dtype, dk = q_sm.dtype, q_sm.shape[-1]
    n_chunks = layout.length // chunk
    n_valid = layout.row_valid(row)
    s = s_ref[head]
    multicast = [dict(collective_axes="cluster") if cluster and share else {} for share in shared]
    registers = registers or _consumer_registers(2)

    def chunk_of(step):
        if restart is not None:
            return _restart_order(step, n_chunks, restart.every)
        return (n_chunks - 1 - step) if reverse else step

    def issue_loads(step, slot):
        rows = pl.ds(chunk_of(step) * chunk, chunk)
        plgpu.copy_gmem_to_smem(q_ref.at[row, rows, head], q_sm.at[slot], load_bars.at[slot], **multicast[0])
        plgpu.copy_gmem_to_smem(k_ref.at[row, rows, head], k_sm.at[slot], load_bars.at[slot], **multicast[1])
        plgpu.copy_gmem_to_smem(v_ref.at[row, rows, head, cols], v_sm.at[slot], load_bars.at[slot], **multicast[2])

    release = functools.partial(_release_slot, consumed_bars, stages=stages, n_chunks=n_chunks)
    leave = functools.partial(_leave_cluster, done_bar if cluster else None)
    o_buffers = o_sm.shape[0]
    if st_sm.shape[0] != stages:
        raise ValueError(f"the split walk hands S_c over in one buffer per TMA slot: {stages}, got {st_sm.shape[0]}")

    @pl.when(wg == 0)
    def _outputs():
        plgpu.set_max_registers(registers, action="increase")
        decay_cc = _intra_decay(s, chunk, reverse)

        def body(step, carry):
            slot, c = lax.rem(step, stages), chunk_of(step)
            limit, a, b = _chunk_bounds(n_valid, c, chunk)
            plgpu.barrier_wait(load_bars.at[slot])
            plgpu.barrier_wait(ready_bars.at[slot])  # S_c is in st_sm[slot]

            def scores_and_inter(acc_s, acc_o):
                plgpu.wgmma(acc_s, q_sm.at[slot], k_sm.at[slot].T)
                plgpu.wgmma(acc_o, q_sm.at[slot], st_sm.at[slot])
                return acc_s[...], acc_o[...]

            scores, inter = pl.run_scoped(scores_and_inter, plgpu.ACC((chunk, chunk), jnp.float32),
                                          plgpu.ACC((chunk, block_v), jnp.float32))
            o = _scale_rows(inter, _query_decay(s, a, b, limit, chunk, reverse))
            probs = (scores * decay_cc).astype(dtype)
            if interpret:  # the interpreter's wgmma reads operands from SMEM only
                probs_sm[...] = probs
                plgpu.commit_smem()
                probs = probs_sm
            (o,) = _accumulate(lambda acc_o: plgpu.wgmma(acc_o, probs, v_sm.at[slot]), (o,), interpret)
            release(step, slot)
            o_slot = lax.rem(step, o_buffers)
            plgpu.wait_smem_to_gmem(o_buffers - 1, wait_read_only=True)  # the store that last used it has read it
            o_sm[o_slot] = o.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_sm.at[o_slot], o_ref.at[row, pl.ds(c * chunk, chunk), head, cols])
            return carry

        lax.fori_loop(0, n_chunks, body, 0)
        plgpu.wait_smem_to_gmem(0)
        leave()

    @pl.when(wg == 1)
    def _state():
        plgpu.set_max_registers(registers, action="increase")

        def body(step, state):
            slot = lax.rem(step, stages)
            limit, a, b = _chunk_bounds(n_valid, chunk_of(step), chunk)
            # Chunk `step`'s loads are in, so the output warpgroup is done with chunk step - stages (see above) and
            # has read the S this slot's buffer held.
            plgpu.barrier_wait(load_bars.at[slot])
            if save is not None:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last checkpoint's store has read its buffer
            _hand_over(state, st_sm.at[slot], ready_bars.at[slot])
            state = _step_state(state, k_sm.at[slot], v_sm.at[slot], vw_sm, s, a, b, limit, chunk=chunk,
                                reverse=reverse, interpret=interpret)
            if save is not None:  # S_c, as handed over, is the checkpoint of the segment starting here
                @pl.when(lax.rem(step, save.every) == 0)
                def _():
                    plgpu.copy_smem_to_gmem(st_sm.at[slot],
                                            save.ref.at[row, lax.div(step, save.every), head, :, cols])
            release(step, slot)
            return state

        if restart is None:
            state = lax.fori_loop(0, n_chunks, body, _initial_state(init_ref, row, head, cols, (dk, block_v)))
            state_out_ref.at[row, head, :, cols][...] = state
        else:
            _walk_segments(body, restart, row, head, n_chunks)
        if save is not None:
            plgpu.wait_smem_to_gmem(0)
        leave()

    before_loads = None if meet is None else _meet_at_segments(meet, n_chunks, restart.every)
    pl.when(wg == 2)(lambda: _producer(issue_loads, consumed_bars, stages=stages, n_chunks=n_chunks,
                                       before_loads=before_loads))


def _walk_segments(body, restart: Checkpoints, row, head, n_chunks: int):
    """A restarting walk's state chain (``_split_kernel``'s state warpgroup): per segment, in ``_restart_order``, the
    state S^T from the segment's checkpoint (TMA into ``restart.sm``, the next segment's issued as soon as this one's is
    in registers), then ``body(step, state)`` for each of its chunks. The checkpoints hold the forward's S [Dk, Dv];
    the dq walk's state is S^T, read transposed from SMEM."""
    every, n_seg = restart.every, _segments(n_chunks, restart.every)

    def load_checkpoint(seg):
        plgpu.copy_gmem_to_smem(restart.ref.at[row, seg, head], restart.sm, restart.bar)

    def walk(seg, first_step, length):
        plgpu.barrier_wait(restart.bar)
        state = plgpu.load(restart.sm.T, layout=plgpu.Layout.WGMMA, optimized=True).astype(jnp.float32)
        state = body(first_step, state)  # its hand-over has used the registers: the buffer may be refilled

        @pl.when(seg > 0)
        def _():
            load_checkpoint(seg - 1)

        lax.fori_loop(first_step + 1, first_step + length, body, state)

    load_checkpoint(n_seg - 1)
    first = _last_segment(n_chunks, every)
    walk(n_seg - 1, 0, first)
    if n_seg > 1:
        @pl.loop(0, n_seg - 1)
        def _(i):
            walk(n_seg - 2 - i, first + i * every, every)


# Programs the sequence split aims for: one per SM of an H100/H200 (132), since a 4-stage program takes most of an
# SM's shared memory; splitting further costs an extra read of k and v (measured: at B1 H64 32K one group of 128
# programs was the fastest config of the sweep, 0.67 ms; the split ones took 0.84 ms and more).
TARGET_PROGRAMS = 132
# Thread blocks one cluster may hold portably on Hopper (``multicast``: one per Dv tile).
MAX_CLUSTER = 8
# Shared memory one program may use on Hopper (227 KiB).
SMEM_LIMIT_BYTES = 232448
# Per-thread registers of the producer warpgroup under warp specialization (it only issues TMA copies); the consumers
# share the rest of the SM's 64K registers (``_consumer_registers``), as in jax's own Hopper kernels.
PRODUCER_REGISTERS = 40


def _consumer_registers(consumers: int) -> int:
    """Per-thread register cap of each consumer warpgroup: 512 warpgroup-registers per thread-slot minus the
    producer's, split evenly, rounded down to a multiple of 8, at most 256 (``setmaxnreg``'s limits)."""
    return int(min(256, (512 - PRODUCER_REGISTERS) // consumers) // 8 * 8)


def tile_width(config: KernelConfig, dv: int) -> int:
    """Columns of Dv one program covers: ``block_v`` per walking warpgroup."""
    return min(config.block_v, dv) * max(config.consumers, 1)


def smem_bytes(chunk: int, dk: int, block_v: int, stages: int, itemsize: int, *, consumers: int = 0,
               with_output: bool = True, pair: bool = False, split: bool = False, interpret: bool = False) -> int:
    """SMEM of one program (see ``_walk_call``'s scratch): the stream slots (q, k and the walkers' v columns; the
    pair's four full-width streams, Dk = Dv), and each walker's scaled v, bf16 state and o buffers; ``split``: the
    split walk's (``_split_walk_call``: one v tile, a bf16 state per stage)."""
    if split:
        total = stages * (chunk * (2 * dk + block_v) + dk * block_v) + chunk * block_v + 2 * chunk * block_v
        return (total + (chunk * chunk if interpret else 0)) * itemsize + 8 * (3 * stages + 1)
    walkers = 2 if pair else max(consumers, 1)
    per_stage = chunk * (4 * dk if pair else dk * (2 if with_output else 1) + walkers * block_v)
    total = stages * per_stage + walkers * (chunk * block_v + dk * block_v)
    if with_output:
        total += walkers * (2 * chunk * block_v + (chunk * chunk if interpret else 0))
    return total * itemsize + 8 * stages * (2 if consumers or pair else 1)  # + the load (and consumed) barriers


def check_supported(dtype, dk: int, dv: int, config: KernelConfig, has_doc: bool):
    """One-line ValueError for what the Mosaic GPU kernel does not handle (checked for the forward walk and the
    backward's walks, which swap Dk and Dv)."""
    if has_doc:
        raise ValueError("the Mosaic GPU lightning kernel does not support segment_ids; use the Triton kernel")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"the Mosaic GPU lightning kernel needs bf16 or fp16 inputs; got {jnp.dtype(dtype).name}")
    if config.consumers not in (0, 1, 2):
        raise ValueError(f"the Mosaic GPU lightning kernel takes 0, 1 or 2 consumer warpgroups; got "
                         f"consumers={config.consumers}")
    for a, b in ((dk, dv), (dv, dk)):  # the forward walk's (Dk, Dv), the backward's swapped walks
        tile = min(config.block_v, b)
        if a % 64 or b % 64 or tile % 32 or a % min(tile, a) or b % tile_width(config, b):
            raise ValueError(f"the Mosaic GPU lightning kernel needs Dk and Dv multiples of 64 and block_v (times "
                             f"the consumers) a multiple of 32 dividing both; got Dk={dk}, Dv={dv}, "
                             f"block_v={config.block_v}, consumers={config.consumers}")
    if config.chunk not in (64, 128):
        raise ValueError(f"the Mosaic GPU lightning kernel needs chunk 64 or 128; got {config.chunk}")
    if config.split_state not in (0, 1) or (config.split_state and config.consumers):
        raise ValueError(f"split_state is 0 or 1, and 1 only with consumers=0 (its program is an output, a state and "
                         f"a producer warpgroup); got split_state={config.split_state}, consumers={config.consumers}")
    if config.dq_checkpoints < 0 or (config.dq_checkpoints and (config.fused_backward != 2 or not config.split_state)):
        raise ValueError(f"dq_checkpoints is 0 or a positive number of chunks, and only with fused_backward=2 and "
                         f"split_state=1; got dq_checkpoints={config.dq_checkpoints}, "
                         f"fused_backward={config.fused_backward}, split_state={config.split_state}")
    if config.multicast not in (0, 1) or (config.multicast and not config.split_state):
        raise ValueError(f"multicast is 0 or 1, and 1 only with split_state=1; got multicast={config.multicast}, "
                         f"split_state={config.split_state}")
    for a, b in ((dk, dv), (dv, dk)):
        tiles = b // min(config.block_v, b)
        if config.multicast and not (2 <= tiles <= MAX_CLUSTER and config.chunk % (8 * tiles) == 0):
            raise ValueError(f"multicast needs 2 to {MAX_CLUSTER} Dv tiles per walk that split a chunk into "
                             f"multiples of 8 rows; got Dk={dk}, Dv={dv}, block_v={config.block_v}, "
                             f"chunk={config.chunk}")
    need = max(smem_bytes(config.chunk, a, min(config.block_v, b), config.num_stages, jnp.dtype(dtype).itemsize,
                          consumers=config.consumers, split=bool(config.split_state)) for a, b in ((dk, dv), (dv, dk)))
    if need > SMEM_LIMIT_BYTES:
        raise ValueError(f"the Mosaic GPU lightning kernel would need {need} bytes of shared memory (> "
                         f"{SMEM_LIMIT_BYTES}) at chunk={config.chunk}, block_v={config.block_v}, "
                         f"num_stages={config.num_stages}, consumers={config.consumers}, Dk={dk}, Dv={dv}; use "
                         f"fewer stages, consumers or smaller tiles")


def _walk_call(streams, s, inits, *, layout: RowLayout, chunk: int, block_v: int, consumers: int, reverse: bool,
               with_output: bool, pair: bool, stages: int, interpret: bool, name: str):
    """``_kernel`` over ``streams`` (each [R, L, H, D]: (q, k, v), (k, v) or the pair's (k, q, dO, v)); grid
    (Dv tiles, H, R). inits: one [R, H, Dk, Dv] float32 per walk, or None. Returns (outputs [R, L, H, Dv] per walk or
    None, final states [R, H, Dk, Dv] float32 per walk)."""
    rows, length, heads, dk = streams[1 if with_output and not pair else 0].shape
    dv = streams[2 if pair else -1].shape[-1]
    walkers = 2 if pair else max(consumers, 1)
    n_walks = 2 if pair else 1
    dtype = streams[0].dtype
    t = _smem_transforms(min(dk, block_v), dtype)
    mine = (walkers,) if consumers else ()  # per-walker scratch: a leading walker axis under warp specialization
    widths = [x.shape[-1] for x in streams]
    if not pair:
        widths[-1] = walkers * block_v  # one walk's v: the program's tiles
    scratch = [plgpu.SMEM((stages, chunk, width), dtype, transforms=t) for width in widths] + [
        plgpu.SMEM((*mine, chunk, block_v), dtype, transforms=t),  # v scaled by its state decay
        plgpu.SMEM((*mine, dk, block_v), dtype, transforms=t),  # state rounded to the input dtype (wgmma operand)
        plgpu.SMEM((*mine, 2, chunk, block_v), dtype, transforms=t) if with_output else None,  # o, double-buffered
        plgpu.SMEM((*mine, chunk, chunk), dtype, transforms=t)
        if with_output and interpret else None,  # scores (interpret mode only, see _kernel)
        plgpu.Barrier(num_arrivals=len(streams), num_barriers=stages),  # one arrival per TMA copy
        plgpu.Barrier(num_arrivals=consumers, num_barriers=stages) if consumers else None,  # slot free again
    ]
    out_type = ([jax.ShapeDtypeStruct((rows, length, heads, dv), dtype)] * n_walks if with_output else [])
    out_type += [jax.ShapeDtypeStruct((rows, heads, dk, dv), jnp.float32)] * n_walks
    has_init = inits[0] is not None
    kernel = functools.partial(_kernel, layout=layout, chunk=chunk, block_v=block_v, consumers=consumers,
                               stages=stages, reverse=reverse, with_output=with_output, has_init=has_init,
                               pair=pair, interpret=interpret)
    threads = dict(num_threads=consumers + 1, thread_name="wg") if consumers else {}
    outs = plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch,
        grid=(dv // ((1 if pair else walkers) * block_v), heads, rows), grid_names=("tile", "head", "row"),
        **threads, interpret=plgpu.InterpretGPUParams() if interpret else None, kernel_name=name,
    )(s, *streams, *(inits if has_init else ()))
    return (outs[:n_walks] if with_output else None), outs[-n_walks:]


def _slot_orders(walks: tuple[tuple[int, int, int], ...]) -> list[tuple[int, int, int]]:
    """Per walk, the scratch slots (0: q's, 1: k's, 2: v's) its q, k and v streams are loaded into: walk 0's own, and
    a later walk's stream that walk 0 also reads takes walk 0's slot for it, so that a cluster's multicast of that
    stream writes the same SMEM in every program (the dk walk's dO and q go to the dv walk's v and k slots)."""
    slot_of = {stream: i for i, stream in enumerate(walks[0])}
    orders = []
    for walk in walks:
        free = iter(i for i in range(3) if i not in {slot_of[x] for x in walk if x in slot_of})
        orders.append(tuple(slot_of[x] if x in slot_of else next(free) for x in walk))
    return orders


def _walks_kernel(s_ref, *refs, walks: tuple[tuple[int, int, int], ...], n_streams: int, tiles: int,
                 has_init: bool, cluster: bool, save_every: int = 0, **kwargs):
    """Program p of a row and head runs walk ``walks[p // tiles]`` (indices of its q, k and v among the streams) on Dv
    tile ``p % tiles`` as ``_split_kernel``; under ``cluster`` p is the program's place in the cluster, and the
    streams that every walk reads (all but v for one walk) are loaded once for the cluster (several walks need one
    tile: a stream may then sit in another role's slot, ``_slot_orders``; unclustered, every walk keeps its roles' slots,
    whose widths differ when a walk has several tiles). ``save_every``: one walk that also saves its states
    (``Checkpoints``), the last output."""
    refs = list(refs)
    streams = [refs.pop(0) for _ in range(n_streams)]
    inits = [refs.pop(0) for _ in walks] if has_init else [None] * len(walks)
    outs = [refs.pop(0) for _ in walks]
    states_out = [refs.pop(0) for _ in walks]
    save = Checkpoints(refs.pop(0), save_every) if save_every else None
    slots, scratch = refs[:3], refs[3:]
    program = lax.axis_index("cluster" if cluster else "program")
    everywhere = set.intersection(*(set(walk) for walk in walks))
    orders = _slot_orders(walks) if cluster else [(0, 1, 2)] * len(walks)
    for w, ((q, k, v), order) in enumerate(zip(walks, orders)):
        own = [streams[q], streams[k], streams[v]] + ([inits[w]] if has_init else [])
        shared = (True, True, False) if len(walks) == 1 else tuple(x in everywhere for x in (q, k, v))
        run = functools.partial(_split_kernel, s_ref, *own, outs[w], states_out[w], *(slots[i] for i in order),
                                *scratch, tile=program % tiles, has_init=has_init, cluster=cluster, shared=shared,
                                save=save, **kwargs)
        if len(walks) == 1:
            run()
        else:
            pl.when(program // tiles == w)(run)


def _split_walk_call(streams, s, inits, *, walks: tuple[tuple[int, int, int], ...], layout: RowLayout, chunk: int,
                     block_v: int, stages: int, reverse: bool, cluster: bool, interpret: bool, name: str,
                     save_every: int = 0):
    """``_walks_kernel`` over ``streams`` (each [R, L, H, D]: one walk's (q, k, v), or the backward's (k, q, dO, v)
    with ``PAIRED_WALKS``); grid (walks x Dv tiles, H, R), or (H, R) with those programs of a (row, head) as one
    cluster (several walks: one tile each). inits: one [R, H, Dk, Dv] float32 per walk, or None. The walks share
    walk 0's shapes. Returns (outputs [R, L, H, Dv], final states [R, H, Dk, Dv] float32), one per walk, and with
    ``save_every`` (one forward walk) its states every that many chunks ([R, J, H, Dk, Dv], ``Checkpoints``)."""
    q_i, k_i, v_i = walks[0]
    rows, length, heads, dk = streams[k_i].shape
    dv = streams[v_i].shape[-1]
    dtype = streams[0].dtype
    t = _smem_transforms(min(dk, block_v), dtype)
    tiles = dv // block_v
    scratch = [
        plgpu.SMEM((stages, chunk, dk), dtype, transforms=t),  # q slots
        plgpu.SMEM((stages, chunk, dk), dtype, transforms=t),  # k slots
        plgpu.SMEM((stages, chunk, block_v), dtype, transforms=t),  # the program's v tile
        plgpu.SMEM((chunk, block_v), dtype, transforms=t),  # v scaled by its state decay (the state warpgroup's)
        plgpu.SMEM((stages, dk, block_v), dtype, transforms=t),  # S_c in bf16, handed over: one buffer a slot
        plgpu.SMEM((2, chunk, block_v), dtype, transforms=t),  # o, double-buffered
        plgpu.SMEM((chunk, chunk), dtype, transforms=t) if interpret else None,  # scores (interpret mode only)
        plgpu.Barrier(num_arrivals=3, num_barriers=stages),  # one arrival per TMA copy
        # Slot free again: both walking warpgroups (of every program of a cluster: the copies write all of them).
        plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=2, num_barriers=stages) if cluster
        else plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # S_c ready in its buffer
        plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=2) if cluster else None,  # all done
    ]
    if cluster and len(walks) > 1 and tiles > 1:
        raise ValueError("a cluster of several walks takes one Dv tile per walk (its streams swap slots)")
    launch = (dict(grid=(heads, rows), grid_names=("head", "row"), cluster=(len(walks) * tiles,),
                   cluster_names=("cluster",))
              if cluster else dict(grid=(len(walks) * tiles, heads, rows), grid_names=("program", "head", "row")))
    has_init = inits[0] is not None
    if save_every and (len(walks) > 1 or reverse):
        raise ValueError("only one forward walk saves its states")
    kernel = functools.partial(_walks_kernel, walks=walks, n_streams=len(streams), tiles=tiles, has_init=has_init,
                               cluster=cluster, save_every=save_every, layout=layout, chunk=chunk, block_v=block_v,
                               stages=stages, reverse=reverse, interpret=interpret)
    out_type = ([jax.ShapeDtypeStruct((rows, length, heads, dv), dtype)] * len(walks)
                + [jax.ShapeDtypeStruct((rows, heads, dk, dv), jnp.float32)] * len(walks))
    if save_every:
        out_type.append(jax.ShapeDtypeStruct((rows, _segments(length // chunk, save_every), heads, dk, dv), dtype))
    outs = plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, **launch, num_threads=3, thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret else None, kernel_name=name,
    )(s, *streams, *(inits if has_init else ()))
    n = len(walks)
    return (outs[:n], outs[n:2 * n]) + ((outs[2 * n],) if save_every else ())


def chunk_scan(q, k, v, s, init, doc, *, layout: RowLayout, reverse: bool, with_output: bool,
               config: KernelConfig, interpret: bool = False):
    """Walk every row of ``k, v`` (and ``q`` when ``with_output``) chunk by chunk; ``pallas_triton.chunk_scan``'s
    contract (zero-padded rows, L a multiple of ``config.chunk``) without segment ids (``doc`` must be None).

    Returns (o [R, L, H, Dv] in v's dtype or None, state [R, H, Dk, Dv] float32). ``interpret`` runs the kernel in
    Mosaic GPU interpret mode (CPU).
    """
    rows, length, heads, dk = k.shape
    dv = v.shape[-1]
    check_supported(k.dtype, dk, dv, config, doc is not None)
    stages = _stages(length, config, config.num_stages)
    if with_output and config.split_state:
        o, state, _ = _split_walk(q, k, v, s, init, layout=layout, reverse=reverse, config=config, stages=stages,
                                  interpret=interpret)
        return o, state
    consumers = config.consumers
    outs, states = _walk_call(
        ([q] if with_output else []) + [k, v], s, [init], layout=layout, chunk=config.chunk,
        block_v=min(config.block_v, dv), consumers=consumers, reverse=reverse, with_output=with_output, pair=False,
        stages=stages, interpret=interpret,
        name=f"lightning_mgpu_{'rev' if reverse else 'fwd'}{'' if with_output else '_state'}"
             f"{f'_ws{consumers}' if consumers else ''}")
    return (outs[0] if with_output else None), states[0]


def _split_walk(q, k, v, s, init, *, layout: RowLayout, reverse: bool, config: KernelConfig, stages: int,
                interpret: bool, save_every: int = 0):
    """One split walk with outputs (``_split_walk_call``): (o, final state, its saved states or None)."""
    outs, states, *saved = _split_walk_call(
        [q, k, v], s, [init], walks=((0, 1, 2),), layout=layout, chunk=config.chunk,
        block_v=min(config.block_v, v.shape[-1]), stages=stages, reverse=reverse, cluster=bool(config.multicast),
        interpret=interpret, save_every=save_every,
        name=f"lightning_mgpu_{'rev' if reverse else 'fwd'}_split{'_multicast' if config.multicast else ''}"
             f"{'_states' if save_every else ''}")
    return outs[0], states[0], (saved[0] if saved else None)


def forward_with_states(q, k, v, s, init, *, layout: RowLayout, config: KernelConfig, interpret: bool = False):
    """The forward walk (``chunk_scan`` with outputs) that also saves its state entering every
    ``config.dq_checkpoints``-th chunk, for the one-launch backward's dq walk to restart from (``Checkpoints``).

    q, k: [R, L, H, D]; v: [R, L, H, D] (zero-padded rows, L a multiple of ``config.chunk``); s: [H]; init:
    [R, H, D, D] float32 or None. Returns (o [R, L, H, D] in v's dtype, final state [R, H, D, D] float32, states
    [R, ceil(L / (chunk * dq_checkpoints)), H, D, D] in q's dtype)."""
    rows, length, heads, dk = k.shape
    check_supported(k.dtype, dk, v.shape[-1], config, False)
    check_one_launch_supported(k.dtype, dk, v.shape[-1], config)
    if not config.dq_checkpoints or not config.split_state:
        raise ValueError(f"forward_with_states needs dq_checkpoints > 0 and split_state=1; got "
                         f"dq_checkpoints={config.dq_checkpoints}, split_state={config.split_state}")
    stages = _stages(length, config, config.num_stages)
    return _split_walk(q, k, v, s, init, layout=layout, reverse=False, config=config, stages=stages,
                       interpret=interpret, save_every=config.dq_checkpoints)


# Under ``split_state`` the backward's dv and dk walks run as programs of their own (``PAIRED_WALKS``), each as wide as
# these allow: D = 128 in one Dv tile, so q k^T is computed once per chunk and walk and each program reads three
# streams, not four. A [D, width] float32 state takes D * width / 128 registers a thread of the state warpgroup: at
# most 128 (D = 128 whole; D = 256 in 64-wide tiles), as the forward's [Dk, 64] state at Dk = 256.
PAIR_WALK_WIDTH = 128
PAIR_STATE_ELEMENTS = 128 * 128
# The backward's streams (k, q, dO, v) as ``ops``' dv walk (q=k, k=q, v=dO) and dk walk (q=v, k=dO, v=q).
PAIRED_WALKS = ((0, 1, 2), (3, 2, 1))


def pair_width(d: int, config: KernelConfig) -> int:
    """Dv columns of each paired program: ``config.block_v`` (the two warpgroup walkers of ``_kernel``), or under
    ``split_state`` the widest of 128 and 64 that divides D and keeps the [D, width] state within
    ``PAIR_STATE_ELEMENTS`` (the walk programs; ``config.block_v`` where none does)."""
    if config.split_state:
        fits = [w for w in (PAIR_WALK_WIDTH, 64) if d % w == 0 and d * w <= PAIR_STATE_ELEMENTS]
        if fits:
            return fits[0]
    return min(config.block_v, d)


def pair_stages(chunk: int, d: int, itemsize: int, config: KernelConfig) -> int:
    """TMA stages of the paired reverse walks: the most, up to ``config.num_stages``, whose scratch fits (0: none)."""
    width, split = pair_width(d, config), bool(config.split_state)
    return next((st for st in range(config.num_stages, 0, -1)
                 if smem_bytes(chunk, d, width, st, itemsize, pair=not split, split=split) <= SMEM_LIMIT_BYTES), 0)


def check_fused_supported(dtype, dk: int, dv: int, config: KernelConfig):
    """One-line ValueError for what the paired reverse walks (``fused_backward_scan``) do not handle, on top of
    ``check_supported``."""
    if config.fused_backward not in (0, 1, 2):
        raise ValueError(f"fused_backward is 0 (three backward walks), 1 (dk and dv from one paired reverse walk) or "
                         f"2 (the whole backward in one launch); got {config.fused_backward}")
    if config.fused_backward == 2:
        check_one_launch_supported(dtype, dk, dv, config)
    if dk != dv:
        raise ValueError(f"the fused Mosaic GPU backward needs Dk == Dv (its two walkers share scratch shapes); got "
                         f"Dk={dk}, Dv={dv}")
    if not pair_stages(config.chunk, dk, jnp.dtype(dtype).itemsize, config):
        raise ValueError(f"the fused Mosaic GPU backward does not fit in shared memory at chunk={config.chunk}, "
                         f"width={pair_width(dk, config)}, D={dk}; use chunk 64 or a smaller block_v")


def fused_backward_scan(q, k, v, d_o, s, init, *, layout: RowLayout, config: KernelConfig,
                        interpret: bool = False):
    """The backward's two reverse walks in one launch: dk, dv and the reverse walk's final state.

    ``ops``' dv walk (q=k, k=q, v=dO) and dk walk (q=v, k=dO, v=q). Under ``config.split_state`` each walk's Dv tiles
    (``pair_width``: all of D = 128 in one) are programs of their own, each a split walk (``_split_kernel``): a head's
    two programs compute q k^T once each and, with ``multicast`` at one tile per walk, load q and dO once as one
    cluster. Otherwise one program per (Dv tile, head, row) runs both as two consumer warpgroups over the same
    TMA-loaded chunks of q, k, v and dO (``_kernel``'s ``pair``).

    q, k: [R, L, H, D]; v, d_o: [R, L, H, D] (zero-padded rows, L a multiple of ``config.chunk``; Dk = Dv); s: [H];
    init: [R, H, D, D] float32 state entering the reverse walk (the gradient of the forward's final state) or None.
    Returns (dk [R, L, H, D], dv [R, L, H, D] in the inputs' dtype, state [R, H, D, D] float32, the dv walk's).
    """
    rows, length, heads, dk = k.shape
    dv = v.shape[-1]
    check_supported(k.dtype, dk, dv, config, False)
    check_fused_supported(k.dtype, dk, dv, config)
    stages = _stages(length, config, pair_stages(config.chunk, dk, jnp.dtype(k.dtype).itemsize, config))
    block_v = pair_width(dv, config)
    inits = [None, None] if init is None else [init, jnp.swapaxes(init, -1, -2)]
    if config.split_state:
        cluster = bool(config.multicast) and block_v == dv  # the two walk programs of a head load q and dO once
        (dv_out, dk_out), (state, _) = _split_walk_call(
            [k, q, d_o, v], s, inits, walks=PAIRED_WALKS, layout=layout, chunk=config.chunk, block_v=block_v,
            stages=stages, reverse=True, cluster=cluster, interpret=interpret,
            name=f"lightning_mgpu_rev_pair_split{'_multicast' if cluster else ''}")
    else:
        (dv_out, dk_out), (state, _) = _walk_call(
            [k, q, d_o, v], s, inits, layout=layout, chunk=config.chunk, block_v=block_v, consumers=2, reverse=True,
            with_output=True, pair=True, stages=stages, interpret=interpret, name="lightning_mgpu_rev_pair")
    return dk_out, dv_out, state


# ``fused_backward`` = 2: the whole backward in one launch. Program 0 of a (head, row) walks dq (forward in time, the
# whole head in one split walk: no second q k^T); program 1 walks dv and dk backward from ONE dS chain: its state
# warpgroup carries dS = sum q^T (dO scaled) once, and two output warpgroups read it, the dk one transposed (its own
# walk's state is dS^T). The paired walk programs computed dS twice, once per program. Four warpgroups a program
# (dq programs leave the fourth idle); their per-thread register caps: dv output, dk output, state (the producer has
# PRODUCER_REGISTERS; 136 + 136 + 200 + 40 = 512), and the dq walk's output and state (216 + 216 + 40 + 24 <= 512).
SHARED_STATE_REGISTERS = (136, 136, 200)
ONE_LAUNCH_DQ_REGISTERS = 216
IDLE_REGISTERS = 24  # setmaxnreg's minimum
ONE_LAUNCH_STAGES = 2
ONE_LAUNCH_MAX_D = 128  # a [D, D] float32 state within the state warpgroup's 200 registers


def _shared_state_pair(s_ref, k_ref, q_ref, do_ref, v_ref, init_ref, dv_ref, dk_ref, state_out_ref, k_sm, q_sm,
                       do_sm, v_sm, dow_sm, st_sm, o_sm, probs_sm, load_bars, consumed_bars, ready_bar, free_bar, *,
                       layout: RowLayout, chunk: int, stages: int, interpret: bool, meet=None, every: int = 0):
    """A head's dv and dk walks (backward in time) from one dS chain, in four warpgroups: 0 makes dv, 1 makes dk,
    2 carries dS (``init_ref``'s [D, D] where given), 3 loads k, q, dO and v.

    dv = (k q^T masked) dO + k dS and dk = (v dO^T masked) q + v dS^T, chunk by chunk (``PAIRED_WALKS``' dv and dk
    walks). The state warpgroup hands each chunk's dS in bf16 to both output warpgroups through one SMEM buffer
    ("ready": written; "free": both have read it). dv and the final dS are bit-identical to the paired walk
    programs'; dk differs by the rounding of dS^T: the dk walk rounded its own chain, dO^T (q scaled), to bf16.
    ``meet``: a cluster barrier at which the producer meets the dq walk program's at every segment of ``every``
    chunks (``_meet_at_segments``).
    """
    head, row, wg = lax.axis_index("head"), lax.axis_index("row"), lax.axis_index("wg")
    dtype, d = q_sm.dtype, q_sm.shape[-1]
    n_chunks = layout.length // chunk
    n_valid = layout.row_valid(row)
    s = s_ref[head]

    def chunk_of(step):
        return n_chunks - 1 - step

    def issue_loads(step, slot):
        rows = pl.ds(chunk_of(step) * chunk, chunk)
        for ref, sm in ((k_ref, k_sm), (q_ref, q_sm), (do_ref, do_sm), (v_ref, v_sm)):
            plgpu.copy_gmem_to_smem(ref.at[row, rows, head], sm.at[slot], load_bars.at[slot])

    release = functools.partial(_release_slot, consumed_bars, stages=stages, n_chunks=n_chunks)

    def outputs(w, a_sm, b_sm, p_sm, out_ref, transposed):
        """Output warpgroup ``w``: scores a b^T and a dS (dS^T when ``transposed``), then P p, into ``out_ref``."""
        plgpu.set_max_registers(SHARED_STATE_REGISTERS[w], action="increase")
        decay_cc = _intra_decay(s, chunk, True)
        state = st_sm.T if transposed else st_sm

        def body(step, carry):
            slot, c = lax.rem(step, stages), chunk_of(step)
            limit, a, b = _chunk_bounds(n_valid, c, chunk)
            plgpu.barrier_wait(load_bars.at[slot])
            plgpu.barrier_wait(ready_bar)

            def scores_and_inter(acc_s, acc_o):
                plgpu.wgmma(acc_s, a_sm.at[slot], b_sm.at[slot].T)
                plgpu.wgmma(acc_o, a_sm.at[slot], state)
                return acc_s[...], acc_o[...]

            scores, inter = pl.run_scoped(scores_and_inter, plgpu.ACC((chunk, chunk), jnp.float32),
                                          plgpu.ACC((chunk, d), jnp.float32))
            plgpu.barrier_arrive(free_bar)
            o = _scale_rows(inter, _query_decay(s, a, b, limit, chunk, True))
            probs = (scores * decay_cc).astype(dtype)
            if interpret:  # the interpreter's wgmma reads operands from SMEM only
                probs_sm.at[w][...] = probs
                plgpu.commit_smem()
                probs = probs_sm.at[w]
            (o,) = _accumulate(lambda acc_o: plgpu.wgmma(acc_o, probs, p_sm.at[slot]), (o,), interpret)
            release(step, slot)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's store has read the buffer
            o_sm.at[w][...] = o.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_sm.at[w], out_ref.at[row, pl.ds(c * chunk, chunk), head])
            return carry

        lax.fori_loop(0, n_chunks, body, 0)
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == 0)(lambda: outputs(0, k_sm, q_sm, do_sm, dv_ref, False))
    pl.when(wg == 1)(lambda: outputs(1, v_sm, do_sm, q_sm, dk_ref, True))

    @pl.when(wg == 2)
    def _state():
        plgpu.set_max_registers(SHARED_STATE_REGISTERS[2], action="increase")

        def body(step, state):
            slot = lax.rem(step, stages)
            limit, a, b = _chunk_bounds(n_valid, chunk_of(step), chunk)

            @pl.when(step >= 1)
            def _():
                plgpu.barrier_wait(free_bar)  # both output warpgroups have read the last dS

            _hand_over(state, st_sm, ready_bar)
            plgpu.barrier_wait(load_bars.at[slot])
            state = _step_state(state, q_sm.at[slot], do_sm.at[slot], dow_sm, s, a, b, limit, chunk=chunk,
                                reverse=True, interpret=interpret)
            release(step, slot)
            return state

        state = lax.fori_loop(0, n_chunks, body, _initial_state(init_ref, row, head, pl.ds(0, d), (d, d)))
        state_out_ref.at[row, head][...] = state
        plgpu.barrier_wait(free_bar)  # observe the last phase: each barrier's phases are counted by its waiters

    before_loads = None if meet is None else _meet_at_segments(meet, n_chunks, every)
    pl.when(wg == 3)(lambda: _producer(issue_loads, consumed_bars, stages=stages, n_chunks=n_chunks,
                                       before_loads=before_loads))


def _one_launch_scratch(kind: str, chunk: int, d: int, stages: int, dtype, interpret: bool,
                        restart: bool = False) -> list:
    """Scratch of a one-launch backward program: ``"dq"`` (``_split_kernel``'s at one whole-head tile) or ``"pair"``
    (``_shared_state_pair``'s); allocated inside each program's branch, so the launch takes the larger. ``restart``:
    the dq walk restarts from checkpoints: their [D, D] buffer and its barrier last, and one dq buffer, not two (the
    checkpoint's 32 KiB fit in Hopper's shared memory in its place)."""
    t = _smem_transforms(d, dtype)
    streams, scores = (3, 1) if kind == "dq" else (4, 2)
    scratch = [plgpu.SMEM((stages, chunk, d), dtype, transforms=t) for _ in range(streams)] + [
        plgpu.SMEM((chunk, d), dtype, transforms=t),  # the scaled v (the dq walk's k, the pair's dO)
        plgpu.SMEM((stages, d, d) if kind == "dq" else (d, d), dtype, transforms=t),  # the state in bf16
        plgpu.SMEM((1 if restart else 2, chunk, d), dtype, transforms=t),  # outputs (dq's double-buffered; dv, dk)
        plgpu.SMEM((scores, chunk, chunk) if scores > 1 else (chunk, chunk), dtype, transforms=t)
        if interpret else None,
        plgpu.Barrier(num_arrivals=streams, num_barriers=stages),  # one arrival per TMA copy
        plgpu.Barrier(num_arrivals=streams - 1, num_barriers=stages),  # slot free: every walking warpgroup
    ]
    if kind == "dq":
        scratch += [plgpu.Barrier(num_arrivals=1, num_barriers=stages)]  # S ready, per buffer (one a slot)
        if restart:
            scratch += [plgpu.SMEM((d, d), dtype, transforms=t), plgpu.Barrier(num_arrivals=1)]  # a checkpoint
        return scratch
    return scratch + [plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=2)]  # dS ready / read by both


def _one_launch_kernel(s_ref, k_ref, q_ref, do_ref, v_ref, dq_start, pair_init, dq_ref, dv_ref, dk_ref, state_ref,
                       *rest, layout: RowLayout, chunk: int, stages: int, every: int, interpret: bool):
    """Program 0 of a (head, row): the dq walk (``_split_kernel`` on dO, v, k, the whole head); program 1: the dv and
    dk walks (``_shared_state_pair``, from ``pair_init``); ``state_ref`` takes the pair's final state (d_init).

    ``every`` = 0: the dq walk runs forward from ``dq_start`` (its initial state), and ``rest`` is the output for its
    final state (unused). ``every`` > 0: ``dq_start`` holds the forward's states every ``every`` chunks
    (``Checkpoints``), the dq walk restarts from them segment by segment in the pair's order, the two programs are one
    cluster, and ``rest`` is the barrier at which their producers meet at every segment."""
    (extra,) = rest
    meet, dq_state_ref = (extra, None) if every else (None, extra)
    program = lax.axis_index("cluster" if every else "program")
    d, dtype = k_ref.shape[-1], k_ref.dtype
    scratch = {kind: [x for x in _one_launch_scratch(kind, chunk, d, stages, dtype, interpret, restart=bool(every) and kind == "dq")
                      if x is not None] for kind in ("dq", "pair")}
    # The interpreter keys a cluster barrier by how many buffers and barriers each thread has allocated before it, and
    # carries that count over from one cluster to the next: the two programs pad their allocations to one number.
    ids = {kind: sum(math.prod(getattr(x, "num_barriers", ())) for x in xs) for kind, xs in scratch.items()}

    def run_in_scope(run, kind):
        pad = max(ids.values()) - ids[kind]
        padding = [plgpu.Barrier(num_arrivals=1, num_barriers=pad)] if interpret and every and pad else []
        n = len(scratch[kind])
        pl.run_scoped(lambda *refs: run(*refs[:n]), *scratch[kind], *padding, collective_axes="wg")

    @pl.when(program == 0)
    def _dq():
        def run(*scratch):
            scratch = list(scratch)
            restart = None
            if every:
                bar, sm = scratch.pop(), scratch.pop()
                restart = Checkpoints(dq_start, every, sm, bar)
            probs = scratch.pop(6) if interpret else None
            _split_kernel(s_ref, do_ref, v_ref, k_ref, *([] if every else [dq_start]), dq_ref, dq_state_ref,
                          *scratch[:6], probs, *scratch[6:], None, tile=0, layout=layout, chunk=chunk, block_v=d,
                          stages=stages, reverse=False, has_init=not every, cluster=False, interpret=interpret,
                          registers=ONE_LAUNCH_DQ_REGISTERS, restart=restart, meet=meet)
            pl.when(lax.axis_index("wg") == 3)(lambda: plgpu.set_max_registers(IDLE_REGISTERS, action="decrease"))

        run_in_scope(run, "dq")

    @pl.when(program == 1)
    def _pair():
        def run(*scratch):
            scratch = list(scratch)
            probs = scratch.pop(7) if interpret else None
            _shared_state_pair(s_ref, k_ref, q_ref, do_ref, v_ref, pair_init, dv_ref, dk_ref, state_ref,
                               *scratch[:7], probs, *scratch[7:], layout=layout, chunk=chunk, stages=stages,
                               interpret=interpret, meet=meet, every=every)

        run_in_scope(run, "pair")


def check_one_launch_supported(dtype, dk: int, dv: int, config: KernelConfig):
    """One-line ValueError for what the one-launch backward (``fused_backward`` = 2) does not handle. Within these
    limits its shared memory fits: at most 208 KiB a program (D = 128, chunk 64, ``ONE_LAUNCH_STAGES``), 224 KiB with
    ``dq_checkpoints``."""
    del dtype  # bf16 or fp16, as check_supported asks
    if dk != dv or dk > ONE_LAUNCH_MAX_D or config.chunk != 64:
        raise ValueError(f"the one-launch Mosaic GPU backward (fused_backward=2) needs Dk == Dv <= "
                         f"{ONE_LAUNCH_MAX_D} and chunk 64; got Dk={dk}, Dv={dv}, chunk={config.chunk}")


def one_launch_backward_scan(q, k, v, d_o, s, init, d_final, *, layout: RowLayout, config: KernelConfig,
                             interpret: bool = False, states=None):
    """The whole backward of one walk per row in one launch: (dq, dk, dv, d_init).

    2 x H x R programs: per (head, row) the dq walk and the dv + dk pair from one dS chain (``_one_launch_kernel``).
    q, k, v, d_o: [R, L, H, D] (zero-padded rows, L a multiple of 64, Dk = Dv = D <= 128); s: [H]; init: the forward's
    initial state [R, H, D, D] float32 or None; d_final: the gradient of its final state [R, H, D, D] float32.
    states: None, or the forward's states every ``config.dq_checkpoints`` chunks (``forward_with_states``; they
    include the initial state, so ``init`` is not read): the dq walk restarts from them in the pair's order, and each
    head's two programs are one cluster that walks in step, so the dq walk's k, v and dO come from L2.
    Returns dq, dk, dv [R, L, H, D] in the inputs' dtype and d_init [R, H, D, D] float32 (the reverse walk's state).
    """
    rows, length, heads, d = k.shape
    check_supported(k.dtype, d, v.shape[-1], config, False)
    check_one_launch_supported(k.dtype, d, v.shape[-1], config)
    stages = _stages(length, config, ONE_LAUNCH_STAGES)
    every = config.dq_checkpoints if states is not None else 0
    n_seg = _segments(length // config.chunk, every) if every else 0
    if states is not None and (not every or states.shape != (rows, n_seg, heads, d, d)):
        raise ValueError(f"states must be [R, ceil(chunks / dq_checkpoints), H, D, D] = {(rows, n_seg, heads, d, d)} "
                         f"with dq_checkpoints > 0; got {states.shape} at dq_checkpoints={config.dq_checkpoints}")
    kernel = functools.partial(_one_launch_kernel, layout=layout, chunk=config.chunk, stages=stages, every=every,
                               interpret=interpret)
    out_type = ([jax.ShapeDtypeStruct((rows, length, heads, d), k.dtype)] * 3
                + [jax.ShapeDtypeStruct((rows, heads, d, d), jnp.float32)])
    if every:
        dq_start = states.astype(k.dtype)
        launch = dict(grid=(heads, rows), grid_names=("head", "row"), cluster=(2,), cluster_names=("cluster",),
                      scratch_types=[plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=1)])
    else:
        dq_start = jnp.zeros_like(d_final) if init is None else jnp.swapaxes(init, -1, -2)  # the dq walk's S^T
        out_type.append(jax.ShapeDtypeStruct((rows, heads, d, d), jnp.float32))  # its final state (unused)
        launch = dict(grid=(2, heads, rows), grid_names=("program", "head", "row"))
    dq, dv, dk, d_init, *_ = plgpu.kernel(
        kernel, out_type=out_type, **launch, num_threads=4, thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=f"lightning_mgpu_backward_one_launch{'_restart' if every else ''}",
    )(s, k, q, d_o, v, dq_start, d_final.astype(jnp.float32))
    return dq, dk, dv, d_init
