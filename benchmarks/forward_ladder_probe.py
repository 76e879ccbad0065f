"""PROTOTYPE probe (kept in history only; needs pallas_mosaic_gpu._PROBE from de5dd73 and 661a902): the ablation ladder of the split forward walk against benchmarks.floor_walk. Usage: python3 -m benchmarks.forward_ladder_probe 1x64x32768,1x64x131072 3 [variants]"""
import json, os, sys, time
import numpy as np, jax, jax.numpy as jnp
from benchmarks.lightning import make_inputs, minimax_slopes, floor_seconds, PEAKS
from benchmarks.timing import time_pipelined
from benchmarks.power import energy_per_call, nvml_handle
from benchmarks.floor_walk import floor_pass_fn
from pallas_kernels.lightning import pallas, pallas_mosaic_gpu as mg
from pallas_kernels.lightning.config import RowLayout

VARIANTS_ALL = {"default": (), "half_scores": ("half_scores",), "no_decay": ("no_decay",), "no_vw": ("no_vw",),
            "no_sync": ("no_sync",), "no_handover": ("no_handover", "no_sync"),
            "all": ("half_scores", "no_decay", "no_vw", "no_handover", "no_sync"), "vt": ("vt",), "vt_half": ("vt", "half_scores")}
VARIANTS = {k: v for k, v in VARIANTS_ALL.items() if len(sys.argv) < 4 or k in sys.argv[3].split(",")}
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
nvml = nvml_handle()
out = []
for shape in sys.argv[1].split(","):
    b, h, n = (int(x) for x in shape.split("x"))
    d = 128
    q, k, v, _ = make_inputs(jax.random.PRNGKey(2), b, h, n, d)
    s = jnp.asarray(minimax_slopes(h))
    config = pallas.default_config("mosaic_gpu", jnp.bfloat16, b, h, n, d, d)
    fns = {}
    for name, probe in VARIANTS.items():
        mg._PROBE = frozenset(probe)
        fn = jax.jit(lambda q, k, v: mg.chunk_scan(q, k, v, s, None, None, layout=RowLayout(n, n, 1), reverse=False,
                                                   with_output=True, config=config))
        o, st = fn(q, k, v)  # trace and compile under this probe
        jax.block_until_ready(o)
        fns[name] = fn
    mg._PROBE = frozenset()
    ref = np.asarray(fns["default"](q, k, v)[0], np.float32)
    fns["floor_walk"] = floor_pass_fn(s, d, False, chunk=config.chunk, block_v=config.block_v,
                                      stages=config.num_stages, cluster=bool(config.multicast))
    jax.block_until_ready(fns["floor_walk"](q, k, v))
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_pipelined(fn, q, k, v) * 1e3)
    floor_ms = floor_seconds(b, h, n, d, "fwd", PEAKS["H200"]) * 1e3
    for name, fn in fns.items():
        e = energy_per_call(lambda fn=fn: fn(q, k, v), jax.block_until_ready, nvml=nvml) if nvml else {}
        o_var = np.asarray(fn(q, k, v)[0], np.float32)
        same = bool(np.array_equal(o_var, ref)) if name != "floor_walk" else False
        e["rel_diff"] = float(np.linalg.norm(o_var - ref) / np.linalg.norm(ref)) if name != "floor_walk" else None
        row = {"shape": shape, "variant": name, "ms": float(np.median(times[name])), "rounds_ms": times[name],
               "pct_floor": 100 * floor_ms / float(np.median(times[name])), "o_equal_default": same, **e}
        out.append(row)
        print(json.dumps(row), flush=True)
    del q, k, v
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "ladder.json"), "w"), indent=1)
print("\n| shape | variant | ms median (% floor) | energy run ms | mJ a call | W | SM MHz | rel diff to default |")
print("|---|---|---|---|---|---|---|---|")
for r in out:
    print(f"| {r['shape']} | {r['variant']} | {np.median(r['rounds_ms']):.3f} ({r['pct_floor']:.1f}%) | {r.get('ms', 0):.3f} | "
          f"{r.get('mJ_per_call', 0):.0f} | {r.get('W', 0):.0f} | {r.get('sm_mhz_median', '-')} | {r.get('rel_diff')} |")
