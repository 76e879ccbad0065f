"""RMSNorm on one GPU: the Triton kernels against XLA's fusion of the same formula, forward and forward + backward.

    python -m benchmarks.norms --out=/tmp/norms.json

Shapes (``--shapes``, ``name:rows:D:gated``): the decoder norms of m1-1b (hidden 1024), of the hidden-4096 preset and
of M1 (6144) over 4 x 8K tokens, and the lightning output norm (gated, fp32 gate logits, bf16 out) at m1-1b's width
(1024) and M1's (8192). x is bf16, the weight fp32. Each time is the median of pipelined calls
(``benchmarks.timing.time_pipelined``); the floor is the bytes the op must move at the card's HBM bandwidth
(``--hbm_tbps``): forward x + gate + out; backward x + gate + dout + dx + dgate (the weight is negligible). Before
timing, each shape's output and gradients from the kernel are compared with XLA's on the device (relative L2 error,
``check_rel_err``: bf16 rounding flips, and where x is bf16 XLA's weight gradient, which autodiff sums in bf16).
"""
from __future__ import annotations

import json

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["m1-1b:32768:1024:0", "h4096:32768:4096:0", "m1:32768:6144:0",
                             "m1-1b_gated:32768:1024:1", "m1_gated:32768:8192:1"], "name:rows:D:gated, ...")
flags.DEFINE_list("tilings", ["t2048", "t4096", "t8192"],
                  "Tilings of the Triton kernels to time: t<tile_elements>[w<num_warps>][s<backward_stages>]"
                  "[p<backward_programs>], e.g. t4096w8s2p1024 (unset letters: the Tiling default).")
flags.DEFINE_float("hbm_tbps", 4.8, "HBM bandwidth of the card, TB/s (H200: 4.8, H100 SXM: 3.35).")
flags.DEFINE_string("out", None, "Write the results as JSON here.")


def _bytes(rows, d, gated, with_bwd):
    per_elem = 2 + 2 + (4 if gated else 0)            # x, out, gate
    if with_bwd:
        per_elem += 2 + 2 + 2 + (4 + 4 if gated else 0)  # x again, dout, dx, gate again, dgate
    return rows * d * per_elem


def _tiling(text):
    """'t4096w8s2p1024' -> Tiling(tile_elements=4096, num_warps=8, backward_stages=2, backward_programs=1024)."""
    import re

    from pallas_kernels.norms import Tiling
    names = {"t": "tile_elements", "w": "num_warps", "s": "backward_stages", "p": "backward_programs"}
    parts = re.findall(r"([twsp])(\d+)", text)
    if "".join(f"{k}{v}" for k, v in parts) != text:
        raise ValueError(f"bad tiling {text!r}: expected t<N>[w<N>][s<N>][p<N>]")
    return Tiling(**{names[k]: int(v) for k, v in parts})


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import jit_timed, time_pipelined
    from pallas_kernels.norms import rms_norm

    results = []
    for spec in FLAGS.shapes:
        name, rows, d, gated = spec.split(":")
        rows, d, gated = int(rows), int(d), gated == "1"
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        x = jax.random.normal(keys[0], (rows, d), jnp.float32).astype(jnp.bfloat16)
        w = 1.0 + 0.1 * jax.random.normal(keys[1], (d,), jnp.float32)
        g = jax.random.normal(keys[2], (rows, d), jnp.float32) if gated else None
        dout = jax.random.normal(keys[3], (rows, d), jnp.float32).astype(jnp.bfloat16)
        settings = dict(eps=1e-6, norm_dtype=jnp.float32 if gated else None, out_dtype=jnp.bfloat16)
        impls = {"xla": dict(implementation="xla")}
        impls.update({f"triton_{t}": dict(implementation="pallas_triton", tiling=_tiling(t)) for t in FLAGS.tilings})
        def grads(kw):
            out, vjp = jax.vjp(lambda x, w, g: rms_norm(x, w, gate=g, **settings, **kw), x, w, g)
            return (out,) + vjp(dout)
        check = {}
        for part, got, want in zip(("out", "dx", "dw", "dgate"), grads(dict(implementation="pallas_triton")),
                                   grads(dict(implementation="xla"))):
            if want is not None:
                got, want = got.astype(jnp.float32), want.astype(jnp.float32)
                check[part] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        print(name, "check_rel_err", json.dumps(check), flush=True)
        for with_bwd in (False, True):
            floor_ms = _bytes(rows, d, gated, with_bwd) / (FLAGS.hbm_tbps * 1e12) * 1e3
            times = {}
            for impl, kw in impls.items():
                def fwd(x, w, g, kw=kw):
                    return rms_norm(x, w, gate=g, **settings, **kw)
                if with_bwd:
                    fn = jax.jit(lambda x, w, g, do, fwd=fwd: (
                        lambda out, vjp: (out, vjp(do)))(*jax.vjp(fwd, x, w, g)))
                    args = (x, w, g, dout)
                else:
                    fn, args = jit_timed(fwd, False), (x, w, g)
                times[impl] = time_pipelined(fn, *args) * 1e3
            best = min((t, n) for n, t in times.items() if n != "xla")
            row = dict(shape=name, rows=rows, d=d, gated=gated, check_rel_err=check,
                       pass_="fwd+bwd" if with_bwd else "fwd",
                       floor_ms=floor_ms, times_ms=times, best=best[1], xla_over_best=times["xla"] / best[0],
                       best_pct_floor=100 * floor_ms / best[0], xla_pct_floor=100 * floor_ms / times["xla"])
            results.append(row)
            print(json.dumps(row), flush=True)
    print("\n| shape | pass | xla ms (% floor) | best triton ms (% floor) | tiling | xla / triton |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shape']} [{r['rows']}, {r['d']}] | {r['pass_']} | {r['times_ms']['xla']:.3f} "
              f"({r['xla_pct_floor']:.0f}%) | {r['times_ms'][r['best']]:.3f} ({r['best_pct_floor']:.0f}%) | "
              f"{r['best']} | {r['xla_over_best']:.2f}x |")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(dict(hbm_tbps=FLAGS.hbm_tbps, devices=[str(d) for d in jax.devices()],
                           jax=jax.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    app.run(main)
