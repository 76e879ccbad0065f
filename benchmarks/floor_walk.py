"""The floor's work of a lightning pass as a kernel: exactly the bytes and the wgmma FLOPs that the floor counts, and
nothing else, on the Mosaic GPU walks' grid. Its time on a card is what the floor's work itself takes there, the
reachable end of "% of the floor" (``benchmarks.lightning --impls=floor_walk``).

The floor (``benchmarks.lightning.floor_seconds``) divides a count of bytes and FLOPs by the card's datasheet peaks. A
power-capped card does not reach both peaks at once, so a kernel's "% of the floor" mixes how much work it does beyond
the floor's with how much of the peaks the card gives to that work. ``floor_walk`` separates the two: it moves the
floor's arrays through HBM once each and issues the floor's wgmma FLOPs, with no recurrence between chunks, no decay
arithmetic beyond the scores' mask, and no other work. Timed side by side with a lightning kernel on the same card,
the floor walk's time over the kernel's is the share of the reachable speed that the kernel gets.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.compat import pl, plgpu
from pallas_kernels.lightning.pallas_mosaic_gpu import (_accumulate, _consumer_registers, _initial_state, _intra_decay,
                                                      _leave_cluster, _producer, _release_slot, _smem_transforms)

# The floor's count of a lightning pass (``benchmarks.lightning.floor_seconds``), per token, head and D: the forward
# 4 (C + D) wgmma FLOPs over 4 [B, T, H, D] arrays (q, k, v in; o out), the backward 10 (C + D) over 7 (q, k, v, dO
# in; dq, dk, dv out). ``floor_walk`` does exactly that work.
FLOOR_MODES = {"fwd": (3, 1), "bwd": (4, 3)}  # mode -> (streams read, outputs written)


def floor_walk(streams, c, s, *, mode: str, chunk: int, block_v: int, stages: int, cluster: bool,
               interpret: bool = False):
    """The floor's work of a lightning pass and nothing else: its bytes and its wgmma FLOPs, laid out as the Mosaic GPU
    split walk (``pallas_mosaic_gpu._split_kernel``).

    mode "fwd": streams (q, k, v), one output; "bwd": streams (q, k, v, dO), three outputs. Each [R, L, H, D]; c:
    [D, block_v] in the streams' dtype, a stand-in for the state's bf16 copy (random values: a tensor core's energy
    depends on its data); s: [H] float32 decay rates for the scores' causal decay mask. Grid (D / block_v tiles, H, R),
    under ``cluster`` one cluster per (row, head) whose programs load every full-width stream once (TMA multicast).

    Per chunk and program, with ``tile`` the program's block_v columns and ``half`` the first block_v of D (so the
    two-tile programs of a head together compute each [C, C] score matrix once, as the floor counts):
      warpgroup 0 (outputs): fwd  P = mask * (q[:, half] k[:, half]^T);  o = q c + P v[:, tile]
                             bwd  P = mask * (dO[:, half] v[:, half]^T), P' = mask * (q[:, half] k[:, half]^T);
                                  dq = dO c + P k[:, tile], dk = v c + P q[:, tile], dv = k c + P' dO[:, tile]
      warpgroup 1 (the carried terms, accumulated over the walk): fwd  S += k^T v[:, tile];
                                  bwd  S += k^T v[:, tile], S' += q^T dO[:, tile]
      warpgroup 2 issues the TMA loads.
    That is 4 C (C + D) block_v FLOPs forward and 10 C (C + D) block_v backward, the floor's per chunk and tile, with
    no state chain between warpgroups, no decays beyond the mask, and everything walked forward in time. So its time
    is what the floor's work alone takes on this grid and card (a measurement, not a proven bound).

    Returns (outputs [R, L, H, D] each, carried sums [R, H, D, D] float32 each); ``floor_walk_reference`` computes
    the same values.
    """
    if mode not in FLOOR_MODES:
        raise ValueError(f"floor_walk mode is one of {sorted(FLOOR_MODES)}; got {mode!r}")
    n_in, n_out = FLOOR_MODES[mode]
    if len(streams) != n_in:
        raise ValueError(f"floor_walk mode {mode!r} takes {n_in} streams; got {len(streams)}")
    rows, length, heads, d = streams[0].shape
    if d % block_v or length % chunk:
        raise ValueError(f"floor_walk needs block_v | D and chunk | L; got D={d}, block_v={block_v}, L={length}, "
                         f"chunk={chunk}")
    tiles, n_chunks, dtype = d // block_v, length // chunk, streams[0].dtype
    n_carried = 1 if mode == "fwd" else 2
    stages = max(1, min(stages, n_chunks))
    tiled = (False, False, True) if mode == "fwd" else (False,) * 4  # the forward's v: the program's columns only
    t = _smem_transforms(min(d, block_v), dtype)

    def kernel(s_ref, c_ref, *refs):
        refs = list(refs)
        ins = [refs.pop(0) for _ in range(n_in)]
        outs = [refs.pop(0) for _ in range(n_out)]
        carried_out = [refs.pop(0) for _ in range(n_carried)]
        slots = [refs.pop(0) for _ in range(n_in)]
        c_sm, o_sm, probs_sm, load_bars, consumed_bars, c_bar, done_bar = refs
        tile = lax.axis_index("cluster" if cluster else "tile")
        head, row, wg = lax.axis_index("head"), lax.axis_index("row"), lax.axis_index("wg")
        cols, half = pl.ds(tile * block_v, block_v), pl.ds(0, block_v)
        multicast = dict(collective_axes="cluster") if cluster else {}

        def issue_loads(step, slot):
            at = pl.ds(step * chunk, chunk)
            for ref, smem, own in zip(ins, slots, tiled):
                src = ref.at[row, at, head, cols] if own else ref.at[row, at, head]
                plgpu.copy_gmem_to_smem(src, smem.at[slot], load_bars.at[slot], **({} if own else multicast))

        release = functools.partial(_release_slot, consumed_bars, stages=stages, n_chunks=n_chunks)
        leave = functools.partial(_leave_cluster, done_bar)

        def masked(scores, mask, j):
            probs = (scores * mask).astype(dtype)
            if interpret:  # the interpreter's wgmma reads operands from SMEM only
                probs_sm[j] = probs
                plgpu.commit_smem()
                return probs_sm.at[j]
            return probs

        @pl.when(wg == 0)
        def _outputs():
            plgpu.set_max_registers(_consumer_registers(2), action="increase")
            plgpu.copy_gmem_to_smem(c_ref, c_sm, c_bar)
            plgpu.barrier_wait(c_bar)
            mask = _intra_decay(s_ref[head], chunk, False)

            def body(step, carry):
                slot, buf = lax.rem(step, stages), lax.rem(step, 2)
                plgpu.barrier_wait(load_bars.at[slot])
                x = [smem.at[slot] for smem in slots]
                # (A of the scores, B of the scores) per score matrix, then per output (A of its c term, which
                # score matrix, the stream whose tile columns P multiplies).
                if mode == "fwd":
                    q, k, v = x
                    score_pairs, terms = [(q, k)], [(q, 0, v)]
                else:
                    q, k, v, do = x
                    score_pairs, terms = [(do, v), (q, k)], [(do, 0, k), (v, 0, q), (k, 1, do)]

                def scores_of(*accs):
                    for acc, (a, b) in zip(accs, score_pairs):
                        plgpu.wgmma(acc, a.at[:, half], b.at[:, half].T)
                    return tuple(acc[...] for acc in accs)

                scores = pl.run_scoped(scores_of, *(plgpu.ACC((chunk, chunk), jnp.float32) for _ in score_pairs))
                probs = [masked(sc, mask, j) for j, sc in enumerate(scores)]
                plgpu.wait_smem_to_gmem(n_out, wait_read_only=True)  # the stores that last used this buffer
                for j, (a, p, b) in enumerate(terms):
                    def term(acc, a=a, p=p, b=b):
                        plgpu.wgmma(acc, a, c_sm)
                        plgpu.wgmma(acc, probs[p], b if b.shape[-1] == block_v else b.at[:, cols])
                        return acc[...]

                    o_sm[buf, j] = pl.run_scoped(term, plgpu.ACC((chunk, block_v), jnp.float32)).astype(dtype)
                release(step, slot)
                plgpu.commit_smem()
                for j, out in enumerate(outs):
                    plgpu.copy_smem_to_gmem(o_sm.at[buf, j], out.at[row, pl.ds(step * chunk, chunk), head, cols])
                return carry

            lax.fori_loop(0, n_chunks, body, 0)
            plgpu.wait_smem_to_gmem(0)
            leave()

        @pl.when(wg == 1)
        def _carried():
            plgpu.set_max_registers(_consumer_registers(2), action="increase")

            def body(step, sums):
                slot = lax.rem(step, stages)
                plgpu.barrier_wait(load_bars.at[slot])
                x = [smem.at[slot] for smem in slots]
                pairs = [(x[1], x[2])] if mode == "fwd" else [(x[1], x[2]), (x[0], x[3])]

                def issue(*accs):
                    for acc, (a, b) in zip(accs, pairs):
                        plgpu.wgmma(acc, a.T, b if b.shape[-1] == block_v else b.at[:, cols])

                sums = _accumulate(issue, sums, interpret)
                release(step, slot)
                return sums

            zeros = tuple(_initial_state(None, row, head, cols, (d, block_v)) for _ in range(n_carried))
            sums = lax.fori_loop(0, n_chunks, body, zeros)
            for ref, total in zip(carried_out, sums):
                ref.at[row, head, :, cols][...] = total
            leave()

        pl.when(wg == 2)(lambda: _producer(issue_loads, consumed_bars, stages=stages, n_chunks=n_chunks))

    scratch = [
        *[plgpu.SMEM((stages, chunk, block_v if own else d), dtype, transforms=t) for own in tiled],
        plgpu.SMEM((d, block_v), dtype, transforms=t),  # c
        plgpu.SMEM((2, n_out, chunk, block_v), dtype, transforms=t),  # the outputs' tiles, double-buffered
        plgpu.SMEM((2, chunk, chunk), dtype, transforms=t) if interpret else None,  # P (interpret mode only)
        plgpu.Barrier(num_arrivals=n_in, num_barriers=stages),  # one arrival per TMA copy
        plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=2, num_barriers=stages) if cluster
        else plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # slot read by both warpgroups (of the cluster)
        plgpu.Barrier(num_arrivals=1),  # c loaded
        plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=2) if cluster else None,  # all done
    ]
    launch = (dict(grid=(heads, rows), grid_names=("head", "row"), cluster=(tiles,), cluster_names=("cluster",))
              if cluster else dict(grid=(tiles, heads, rows), grid_names=("tile", "head", "row")))
    out_type = ([jax.ShapeDtypeStruct((rows, length, heads, d), dtype)] * n_out
                + [jax.ShapeDtypeStruct((rows, heads, d, d), jnp.float32)] * n_carried)
    results = plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, **launch, num_threads=3, thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret else None, kernel_name=f"floor_walk_{mode}",
    )(s, c, *streams)
    return tuple(results[:n_out]), tuple(results[n_out:])


def floor_walk_reference(streams, c, s, *, mode: str, chunk: int, block_v: int):
    """``floor_walk``'s outputs and carried sums in float64 NumPy (the same terms, computed independently)."""
    x = [np.asarray(a, np.float64) for a in streams]
    c = np.asarray(c, np.float64)
    rows, length, heads, d = x[0].shape
    i = np.arange(chunk)
    dist = i[:, None] - i[None, :]
    outs = [np.zeros_like(x[0]) for _ in range(FLOOR_MODES[mode][1])]
    carried = [np.zeros((rows, heads, d, d)) for _ in range(1 if mode == "fwd" else 2)]
    for r in range(rows):
        for h in range(heads):
            mask = np.where(dist >= 0, np.exp(-float(s[h]) * np.maximum(dist, 0)), 0.0)
            for step in range(length // chunk):
                at = slice(step * chunk, (step + 1) * chunk)
                blk = [a[r, at, h] for a in x]
                if mode == "fwd":
                    q, k, v = blk
                    pairs, terms, sums = [(q, k)], [(q, 0, v)], [(k, v)]
                else:
                    q, k, v, do = blk
                    pairs, terms, sums = [(do, v), (q, k)], [(do, 0, k), (v, 0, q), (k, 1, do)], [(k, v), (q, do)]
                for tile in range(d // block_v):
                    cols = slice(tile * block_v, (tile + 1) * block_v)
                    probs = [mask * (a[:, :block_v] @ b[:, :block_v].T) for a, b in pairs]
                    for out, (a, p, b) in zip(outs, terms):
                        out[r, at, h, cols] = a @ c + probs[p] @ b[:, cols]
                    for total, (a, b) in zip(carried, sums):
                        total[r, h, :, cols] += a.T @ b[:, cols]
    return outs, carried


def smem_bytes(mode: str, *, chunk: int, d: int, block_v: int, stages: int, itemsize: int = 2) -> int:
    """Shared memory of a compiled ``floor_walk``: the stage slots, c and the double-buffered output tiles."""
    n_in, n_out = FLOOR_MODES[mode]
    stage = chunk * (2 * d + block_v) if mode == "fwd" else chunk * n_in * d
    return (stages * stage + d * block_v + 2 * n_out * chunk * block_v) * itemsize


def floor_pass_fn(s, d: int, with_bwd: bool, *, chunk: int, block_v: int, stages: int, cluster: bool):
    """Jitted (q, k, v) -> the forward's floor walk, or (q, k, v, dO) -> the forward's and then the backward's (two
    launches: the floor's 4 + 7 arrays and 14 C (C + D) FLOPs a token and head). Each walk takes the most stages up
    to ``stages`` that fit in shared memory (the backward's four full-width streams: 2 at D = 128)."""
    from pallas_kernels.lightning.pallas_mosaic_gpu import SMEM_LIMIT_BYTES

    c = jax.random.normal(jax.random.PRNGKey(7), (d, block_v), jnp.float32).astype(jnp.bfloat16) * 0.1

    def walk(mode, streams):
        fits = [n for n in range(stages, 0, -1)
                if smem_bytes(mode, chunk=chunk, d=d, block_v=block_v, stages=n) <= SMEM_LIMIT_BYTES]
        if not fits:
            raise ValueError(f"floor_walk {mode} does not fit in shared memory at chunk={chunk}, D={d}")
        return floor_walk(streams, c.astype(streams[0].dtype), s, mode=mode, chunk=chunk, block_v=block_v,
                          stages=fits[0], cluster=cluster)

    if with_bwd:
        return jax.jit(lambda q, k, v, do: (walk("fwd", (q, k, v)), walk("bwd", (q, k, v, do))))
    return jax.jit(lambda q, k, v: walk("fwd", (q, k, v)))
