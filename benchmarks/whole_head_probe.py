"""Probe (fifteenth session, taken out with split_state=2): the forward as whole-head split walks (64 programs, 128 wide,
a cluster of 2, 3 stages), B1 H64 D128; default protocol, 3 s sustained, and energy."""
import dataclasses, json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from benchmarks import lightning as bl, timing, power
from pallas_kernels.lightning import pallas

OUT = os.environ.get("OUT", "/tmp")
log_f = open(os.path.join(OUT, "wholehead.jsonl"), "a")
def log(row):
    print(json.dumps(row), flush=True); log_f.write(json.dumps(row) + "\n"); log_f.flush()

shapes = [tuple(int(x) for x in s.split("x")) for s in sys.argv[1].split(",")]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
d = 128
results = []
nv = power.nvml_handle()
for (b, h, n) in shapes:
    s = jnp.asarray(bl.minimax_slopes(h) * 4)
    fitted = dataclasses.replace(pallas.default_config("mosaic_gpu", jnp.bfloat16, b, h, n, d, d), groups=1)
    variants = {"default": fitted,
                "whole": dataclasses.replace(fitted, block_v=128, multicast=0, num_stages=2),
                "whole2": dataclasses.replace(fitted, block_v=128, multicast=0, num_stages=2, split_state=2),
                "tile2": dataclasses.replace(fitted, block_v=64, multicast=0, num_stages=4, split_state=2)}
    q, k, v, do = bl.make_inputs(jax.random.PRNGKey(0), b, h, n, d)
    fns = {(name, mode): bl.ours_fn(s, c, mode == "fwdbwd", backend="mosaic_gpu")
           for name, c in variants.items() for mode in ("fwd", "fwdbwd")}
    args = {"fwd": (q, k, v), "fwdbwd": (q, k, v, do)}
    t0 = time.time()
    outs = {key: jax.block_until_ready(fn(*args[key[1]])) for key, fn in fns.items()}
    log({"shape": [b, h, n], "compiled_s": time.time() - t0})
    for mode in ("fwd", "fwdbwd"):
        a = jax.tree.leaves(outs[("default", mode)])
        for name in variants:
            w = jax.tree.leaves(outs[(name, mode)])
            diff = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(a, w))
            log({"shape": [b, h, n], "mode": mode, "impl": name, "max_diff_vs_default": diff})
    del outs
    floor = {m: bl.floor_seconds(b, h, n, d, m, bl.PEAKS["H200"]) for m in ("fwd", "fwdbwd")}
    for protocol, warm in (("default", timing.WARMUP_SECONDS), ("sustained3s", 3.0)):
        times = {key: [] for key in fns}
        for r in range(rounds if protocol == "default" else 1):
            for key, fn in fns.items():
                times[key].append(timing.time_pipelined(fn, *args[key[1]], warmup_seconds=warm) * 1e3)
        for key, ts in times.items():
            ms = float(np.median(ts))
            row = {"shape": [b, h, n], "impl": key[0], "mode": key[1], "protocol": protocol, "ms": ms,
                   "rounds": ts, "pct_floor": 100 * floor[key[1]] * 1e3 / ms}
            log(row); results.append(row)
    if nv is not None:
        for key, fn in fns.items():
            e = power.energy_per_call(lambda: fn(*args[key[1]]), jax.block_until_ready, nvml=nv)
            row = {"shape": [b, h, n], "impl": key[0], "mode": key[1], "protocol": "energy2s", **e,
                   "pct_floor": 100 * floor[key[1]] * 1e3 / e["ms"]}
            log(row); results.append(row)

names = list(variants)
print("\nshape        mode   protocol     " + "  ".join(f"{n:>22}" for n in names))
for (b, h, n) in shapes:
    for mode in ("fwd", "fwdbwd"):
        for protocol in ("default", "sustained3s", "energy2s"):
            r = {x["impl"]: x for x in results if x["shape"] == [b, h, n] and x["mode"] == mode and x["protocol"] == protocol}
            cells = []
            for nm in names:
                x = r.get(nm)
                cells.append(f"{x['ms']:.3f} ({x['pct_floor']:.1f}%)" + (f" {x['mJ_per_call']:.0f}mJ {x['sm_mhz_median']}" if protocol == "energy2s" else "") if x else "-")
            print(f"{b}x{h}x{n:<7} {mode:6} {protocol:12} " + "  ".join(f"{c:>22}" for c in cells))
