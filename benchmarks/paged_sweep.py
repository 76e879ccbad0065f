"""Launch configs of jax's Triton paged decode kernel at one decode shape, each timed alone (median of jitted calls).

    python -m benchmarks.paged_sweep                      # m1-1b's decode step: 64 rows x 128K + 1 tokens, 2 KV heads
    python -m benchmarks.paged_sweep --head_dim=128 --kv_heads=8 --q_heads=64   # M1's softmax layers

Sweeps context splits x pages per compute block x warps x pipeline stages at the page-table width the engine uses
(``m1jax.serve.programs.decode_table_width``), prints one line per config as it is measured and the fastest last,
against the time to read the layer's KV once at --bandwidth_gbs. The chosen config lives in
``pallas_kernels.attention.paged.pallas_triton`` (``MAX_BLOCK_TOKENS``, ``NUM_WARPS``, ``NUM_STAGES``, ``plan``).
"""
from __future__ import annotations

import itertools
import json
import time
import warnings

import numpy as np
from absl import app, flags

flags.DEFINE_integer("batch", 64, "Rows.")
flags.DEFINE_integer("context", 131073, "Tokens per row (128K + the token being decoded).")
flags.DEFINE_integer("q_heads", 16, "Query heads.")
flags.DEFINE_integer("kv_heads", 2, "KV heads.")
flags.DEFINE_integer("head_dim", 64, "Head dim.")
flags.DEFINE_integer("page_size", 128, "Tokens per page.")
flags.DEFINE_list("splits", ["4", "8", "16", "32"], "Context splits (those dividing the width).")
flags.DEFINE_list("pages_per_block", ["1", "2", "4"], "Pages per compute block.")
flags.DEFINE_list("warps", ["4", "8"], "Triton warps.")
flags.DEFINE_list("stages", ["1", "2", "3"], "Triton pipeline stages.")
flags.DEFINE_integer("reps", 5, "Timed calls per config.")
flags.DEFINE_float("bandwidth_gbs", 4300.0, "HBM bandwidth for the KV-read floor (the H200's measured copy rate).")
flags.DEFINE_string("out", None, "Write the rows as JSON here.")
FLAGS = flags.FLAGS
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block


def main(_):
    import jax
    import jax.numpy as jnp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged

    from m1jax.serve.programs import decode_table_width
    b, ps, d, context = FLAGS.batch, FLAGS.page_size, FLAGS.head_dim, FLAGS.context
    per_seq = -(-context // ps)
    width = decode_table_width(per_seq, ps)
    k_pages = jnp.full((FLAGS.kv_heads, b * per_seq + 1, ps, d), 0.01, jnp.bfloat16)
    v_pages = k_pages + 0.01
    q = jax.random.normal(jax.random.key(0), (b, FLAGS.q_heads, d), jnp.bfloat16)
    table = jnp.pad(1 + jnp.arange(b * per_seq, dtype=jnp.int32).reshape(b, per_seq), ((0, 0), (0, width - per_seq)))
    lengths = jnp.full((b,), context, jnp.int32)
    floor_ms = 2 * b * context * FLAGS.kv_heads * d * 2 / (FLAGS.bandwidth_gbs * 1e9) * 1e3
    print(f"{jax.devices()[0].device_kind}: {b} rows x {context} tokens, width {width} pages; KV-read floor "
          f"{floor_ms:.3f} ms", flush=True)
    rows = []
    for splits, per_block, warps, stages in itertools.product(*(map(int, FLAGS[n].value) for n in
                                                                ("splits", "pages_per_block", "warps", "stages"))):
        if width % splits or (width // splits) % per_block or 2 * per_block * ps * d * 2 * stages > SMEM_BYTES:
            continue
        fn = jax.jit(lambda *a, s=splits, p=per_block, w=warps, st=stages: gpu_paged.paged_attention(
            *a, block_h=16, pages_per_compute_block=p, k_splits=s, num_warps=w, num_stages=st))
        args = (q, k_pages, v_pages, table, lengths)
        row = {"splits": splits, "pages_per_block": per_block, "warps": warps, "stages": stages}
        try:
            fn(*args).block_until_ready()
            times = []
            for _ in range(FLAGS.reps):
                t0 = time.perf_counter()
                fn(*args).block_until_ready()
                times.append(time.perf_counter() - t0)
            row["ms"] = 1e3 * float(np.median(times))
            row["x_floor"] = row["ms"] / floor_ms
        except Exception as e:  # noqa: BLE001  (a config the compiler rejects is recorded; the sweep goes on)
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
    timed = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    print("fastest:")
    for r in timed[:8]:
        print(f"  {r['ms']:.3f} ms ({r['x_floor']:.2f}x floor): {r['splits']} splits, {r['pages_per_block']} pages "
              f"per block, {r['warps']} warps, {r['stages']} stages")
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump({"width": width, "floor_ms": floor_ms, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
