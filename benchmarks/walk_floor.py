"""The data movement of the Mosaic GPU lightning walks, without their math: what the memory system gives that access
pattern on this card.

    python -m benchmarks.walk_floor --shapes=1x64x32768,1x64x131072 --out=$OUT/walk_floor.json

A copy walk is a Mosaic GPU kernel with the grid, TMA boxes, stages and stores of one of the lightning kernels
(``pallas_kernels.lightning.pallas_mosaic_gpu``), and no compute: per chunk it waits for its loads, stores its output
tiles and refills the slot. So its time is a floor for the walk on the same [B, T, H, D] layout: each TMA box is C
rows of one head, 2*D bytes each, H*D*2 bytes apart, read chunk by chunk by B*H*tiles programs that drift apart, which
is not the contiguous stream that the card's nominal bandwidth (and an XLA copy) gets. Patterns:

  walk: the forward walk (and the backward's dq walk): streams q, k [C, D] and the program's v tile [C, block_v] per
    chunk, one [C, block_v] output tile. Per (row, head): 2 programs at D = 128, block_v = 64.
  pair: the paired reverse walks (``fused_backward_scan``): streams k, q, dO, v [C, D], two [C, block_v] output tiles
    (dv, dk), walked from the last chunk.
  stream: an XLA fusion reading three [B, T, H, D] arrays and writing one (the forward's bytes, contiguous).

Every pattern is timed with the same host wall-clock method as ``benchmarks.lightning``
(``benchmarks.timing.time_pipelined``) and reported
as ms and TB/s over the bytes that cross HBM (each array once; the tile programs' repeated q, k reads are L2 hits).
The walks run for every (chunk, block_v, stages) given that fits in shared memory, ``--rounds`` times interleaved
(the median is reported), each with the bytes its TMA loads keep in flight (programs x stages x a stage's loads):
what decides how close a walk gets to the stream (``benchmarks/RESULTS.md``, "What bounds the walks").
"""
from __future__ import annotations

import itertools
import json

from absl import app, flags

flags.DEFINE_list("shapes", ["1x64x32768", "1x64x131072"], "BxHxN")
flags.DEFINE_list("patterns", ["stream", "walk", "pair"], "which access patterns to time")
flags.DEFINE_integer("head_dim", 128, "D")
flags.DEFINE_list("chunk", ["64"], "tokens per chunk (each value is timed)")
flags.DEFINE_list("block_v", ["64"], "Dv tile per program (the Mosaic kernel's default: 64; each value is timed)")
flags.DEFINE_list("stages", ["4"], "TMA stages (each value that fits in shared memory is timed)")
flags.DEFINE_integer("rounds", 1, "time every walk this many times, interleaved; the median is reported",
                     lower_bound=1)
flags.DEFINE_string("out", None, "write the rows as JSON here")
FLAGS = flags.FLAGS


def copy_walk(streams, *, n_out: int, tile_streams: tuple, chunk: int, block_v: int, stages: int, reverse: bool,
              interpret: bool = False):
    """Walk ``streams`` (each [R, L, H, D]) as the lightning kernel does and write ``n_out`` [R, L, H, D] outputs.

    Grid (D / block_v, H, R). Per chunk each program TMA-loads every stream (the full D, or for the streams listed
    in ``tile_streams`` its block_v columns) into a ``stages``-deep ring, then stores one [C, block_v] SMEM tile per
    output at its columns. The stored tiles are never written: only the bytes matter. Returns the outputs.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    from pallas_kernels.compat import pl, plgpu
    from pallas_kernels.lightning.pallas_mosaic_gpu import _smem_transforms

    rows, length, heads, d = streams[0].shape
    n_chunks = length // chunk
    stages = min(stages, n_chunks)
    dtype = streams[0].dtype
    t = _smem_transforms(min(d, block_v), dtype)
    widths = [block_v if i in tile_streams else d for i in range(len(streams))]

    def kernel(*refs):
        ins, outs = refs[:len(streams)], refs[len(streams):len(streams) + n_out]
        slots, out_smem, bars = refs[len(streams) + n_out:]
        tile, head, row = lax.axis_index("tile"), lax.axis_index("head"), lax.axis_index("row")
        cols = pl.ds(tile * block_v, block_v)

        def chunk_of(step):
            return (n_chunks - 1 - step) if reverse else step

        def issue(step, slot):
            at = pl.ds(chunk_of(step) * chunk, chunk)
            for i, (ref, smem) in enumerate(zip(ins, slots)):
                src = ref.at[row, at, head, cols] if i in tile_streams else ref.at[row, at, head]
                plgpu.copy_gmem_to_smem(src, smem.at[slot], bars.at[slot])

        for step in range(stages):
            issue(step, step)

        def body(step, carry):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(bars.at[slot])
            at = pl.ds(chunk_of(step) * chunk, chunk)
            plgpu.wait_smem_to_gmem(n_out, wait_read_only=True)  # the previous step's stores have read their tiles
            for j, out in enumerate(outs):
                plgpu.copy_smem_to_gmem(out_smem.at[j], out.at[row, at, head, cols])

            @pl.when(step + stages < n_chunks)
            def _():
                issue(step + stages, slot)
            return carry

        lax.fori_loop(0, n_chunks, body, 0)
        plgpu.wait_smem_to_gmem(0)

    scratch = [[plgpu.SMEM((stages, chunk, w), dtype, transforms=t) for w in widths],
               plgpu.SMEM((n_out, chunk, block_v), dtype, transforms=t),
               plgpu.Barrier(num_arrivals=len(streams), num_barriers=stages)]
    out_type = [jax.ShapeDtypeStruct((rows, length, heads, d), dtype)] * n_out
    return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=(d // block_v, heads, rows),
                        grid_names=("tile", "head", "row"),
                        interpret=plgpu.InterpretGPUParams() if interpret else None,
                        kernel_name="copy_walk")(*streams)


def pattern_fn(name: str, *, chunk: int, block_v: int, stages: int, d: int):
    """name -> (jitted fn of (q, k, v, do), number of [B, T, H, D] arrays that cross HBM once, bytes one program's
    TMA loads keep in flight), or None where the walk does not fit in shared memory."""
    import jax

    from pallas_kernels.lightning.pallas_mosaic_gpu import SMEM_LIMIT_BYTES
    if name == "stream":
        return jax.jit(lambda q, k, v, do: q * 0.5 + k * 0.25 + v), 4, 0
    if name not in ("walk", "pair"):
        raise app.UsageError(f"unknown pattern {name!r}")
    walk = name == "walk"
    stage_bytes = chunk * ((2 * d + block_v) if walk else 4 * d) * 2
    # The copy walk's own scratch (``copy_walk``: the stage slots and its output tiles), not the kernels' walker
    # scratch that ``pallas_mosaic_gpu.smem_bytes`` counts.
    if stages * stage_bytes + (1 if walk else 2) * chunk * block_v * 2 > SMEM_LIMIT_BYTES:
        return None
    if walk:
        return jax.jit(lambda q, k, v, do: copy_walk((q, k, v), n_out=1, tile_streams=(2,), chunk=chunk,
                                                     block_v=block_v, stages=stages, reverse=False)), 4, \
            stages * stage_bytes
    return jax.jit(lambda q, k, v, do: copy_walk((k, q, do, v), n_out=2, tile_streams=(), chunk=chunk,
                                                 block_v=block_v, stages=stages, reverse=True)), 6, \
        stages * stage_bytes


def main(argv):
    del argv
    import jax

    import jax.numpy as jnp

    import numpy as np

    from benchmarks.timing import time_pipelined
    d, rows = FLAGS.head_dim, []
    for text in FLAGS.shapes:
        b, h, n = (int(x) for x in text.split("x"))
        q, k, v, do = (jax.random.normal(key, (b, n, h, d), jnp.bfloat16)
                       for key in jax.random.split(jax.random.PRNGKey(0), 4))
        array_bytes = q.size * q.dtype.itemsize
        walks = {}
        for name in FLAGS.patterns:
            for chunk, block_v, stages in ([(0, 0, 0)] if name == "stream" else itertools.product(
                    *(map(int, FLAGS[f].value) for f in ("chunk", "block_v", "stages")))):
                made = pattern_fn(name, chunk=chunk, block_v=block_v, stages=stages, d=d)
                if made is not None:
                    walks[(name, chunk, block_v, stages)] = made
        times = {key: [] for key in walks}
        for _ in range(FLAGS.rounds):
            for key, (fn, _, _) in walks.items():
                times[key].append(time_pipelined(fn, q, k, v, do))
        for (name, chunk, block_v, stages), (_, arrays, program_bytes) in walks.items():
            sec = float(np.median(times[(name, chunk, block_v, stages)]))
            programs = b * h * (d // block_v) if block_v else 0
            rows.append({"shape": text, "pattern": name, "chunk": chunk, "block_v": block_v, "stages": stages,
                         "programs": programs, "in_flight_MB": programs * program_bytes / 1e6, "ms": sec * 1e3,
                         "rounds_ms": [t * 1e3 for t in times[(name, chunk, block_v, stages)]], "arrays": arrays,
                         "TB/s": arrays * array_bytes / sec / 1e12, "device": jax.devices()[0].device_kind})
            print(json.dumps(rows[-1]), flush=True)
        del q, k, v, do
    print("\n| shape | pattern | chunk | block_v | stages | programs | MB in flight | ms | HBM arrays | TB/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['pattern']} | {r['chunk']} | {r['block_v']} | {r['stages']} | {r['programs']} | "
              f"{r['in_flight_MB']:.1f} | {r['ms']:.3f} | {r['arrays']} | {r['TB/s']:.2f} |")
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
