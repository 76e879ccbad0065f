"""Probe (sixteenth session, taken out with split_state=2): whole-head forward programs (128-wide split walks, 64 at B1 H64) with the state in one
or two warpgroups (split_state 1, 2) against the default forward, B1 H64 D128; bitwise check, default protocol (rounds), 3 s sustained, energy."""
import dataclasses, json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from benchmarks import lightning as bl, timing, power
from pallas_kernels.lightning import pallas

OUT = os.environ.get("OUT", "/tmp")
log_f = open(os.path.join(OUT, "two_states.jsonl"), "a")
def log(row):
    print(json.dumps(row), flush=True); log_f.write(json.dumps(row) + "\n"); log_f.flush()

what = sys.argv[1]
shapes = [tuple(int(x) for x in s.split("x")) for s in sys.argv[2].split(",")]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
names = sys.argv[4].split(",") if len(sys.argv) > 4 else ["default", "whole", "two_states"]
d = 128
results = []
nv = power.nvml_handle() if what == "time" else None
for (b, h, n) in shapes:
    s = jnp.asarray(bl.minimax_slopes(h) * 4)
    fitted = dataclasses.replace(pallas.default_config("mosaic_gpu", jnp.bfloat16, b, h, n, d, d), groups=1)
    whole = dataclasses.replace(fitted, block_v=128, multicast=0, num_stages=2)
    variants = {"default": fitted, "whole": whole, "two_states": dataclasses.replace(whole, split_state=2)}
    variants = {k: variants[k] for k in names}
    log({"shape": [b, h, n], "configs": {k: repr(c) for k, c in variants.items()}})
    q, k, v, do = bl.make_inputs(jax.random.PRNGKey(0), b, h, n, d)
    modes = ("fwd", "fwdbwd")
    fns = {(name, mode): bl.ours_fn(s, c, mode == "fwdbwd", backend="mosaic_gpu")
           for name, c in variants.items() for mode in modes}
    args = {"fwd": (q, k, v), "fwdbwd": (q, k, v, do)}
    if what == "check":
        for mode in modes:
            t0 = time.time()
            a = jax.tree.leaves(jax.block_until_ready(fns[("default", mode)](*args[mode])))
            for name in variants:
                t0 = time.time()
                w = jax.tree.leaves(jax.block_until_ready(fns[(name, mode)](*args[mode])))
                diff = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(a, w))
                log({"shape": [b, h, n], "mode": mode, "impl": name, "max_diff_vs_default": diff, "s": time.time() - t0})
        continue
    for key, fn in fns.items():
        jax.block_until_ready(fn(*args[key[1]]))
    floor = {m: bl.floor_seconds(b, h, n, d, m, bl.PEAKS["H200"]) for m in modes}
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

if what == "time":
    print("\nshape        mode   protocol     " + "  ".join(f"{n:>28}" for n in names))
    for (b, h, n) in shapes:
        for mode in ("fwd", "fwdbwd"):
            for protocol in ("default", "sustained3s", "energy2s"):
                r = {x["impl"]: x for x in results if x["shape"] == [b, h, n] and x["mode"] == mode and x["protocol"] == protocol}
                cells = []
                for nm in names:
                    x = r.get(nm)
                    cells.append(f"{x['ms']:.3f} ({x['pct_floor']:.1f}%)" + (f" {x['mJ_per_call']:.0f}mJ {x['sm_mhz_median']}" if protocol == "energy2s" else "") if x else "-")
                print(f"{b}x{h}x{n:<7} {mode:6} {protocol:12} " + "  ".join(f"{c:>28}" for c in cells))
