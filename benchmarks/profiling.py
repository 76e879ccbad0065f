"""Where a jitted program's device time goes: ``jax.profiler`` traces summed per kernel and per kind of kernel.

Shared by the benchmarks that profile (``benchmarks.serve --parts=profile``, ``benchmarks.layer_profile``).
"""
from __future__ import annotations

import json


def device_trace(run, steps: int, top_n: int = 12) -> dict:
    """``run()`` ``steps`` times under ``jax.profiler``; the trace's device kernels summed per name (ms per run),
    by category (the ``top_n`` heaviest kernels listed), the device busy time per run (kernels only), and the
    copies and memsets per run: how many of each name and the ms they take (``copies_per_step``,
    ``copy_ms_per_step``)."""
    import gzip
    import glob
    import tempfile

    import jax
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            for _ in range(steps):
                run()
        paths = glob.glob(f"{log_dir}/plugins/profile/*/*.trace.json.gz")
        if not paths:
            return {"error": "the profiler wrote no trace"}
        with gzip.open(paths[0]) as fh:
            events = json.load(fh)["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {pid for pid, name in processes.items() if "/device:" in name}
    # GPU kernels sit on the device's stream lines; lines derived from them (XLA Ops, XLA Modules, Steps) would count
    # them twice.
    streams = {key for key, name in threads.items() if key[0] in device and "stream" in name.lower()}
    per_kernel, copies, copy_ms = {}, {}, {}
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device or (streams and (e["pid"], e.get("tid")) not in streams):
            continue
        name = e.get("name", "?")
        if "memcpy" in name.lower() or "memset" in name.lower():
            copies[name] = copies.get(name, 0) + 1
            copy_ms[name] = copy_ms.get(name, 0.0) + e.get("dur", 0) / 1e3
            continue
        total, count = per_kernel.get(name, (0.0, 0))
        per_kernel[name] = (total + e.get("dur", 0) / 1e3, count + 1)
    categories = {}
    for name, (ms, count) in per_kernel.items():
        cat = kernel_category(name)
        c_ms, c_count = categories.get(cat, (0.0, 0))
        categories[cat] = (c_ms + ms, c_count + count)
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    return {"devices": sorted(processes[p] for p in device), "steps": steps,
            "device_busy_ms": sum(ms for ms, _ in per_kernel.values()) / steps,
            "kernels_per_step": sum(n for _, n in per_kernel.values()) / steps,
            "top": [{"kernel": k[:90], "ms": ms / steps, "calls": n / steps} for k, (ms, n) in top[:top_n]],
            "categories": {c: {"ms": ms / steps, "calls": n / steps} for c, (ms, n) in
                           sorted(categories.items(), key=lambda kv: -kv[1][0])},
            "copies_per_step": {k: n / steps for k, n in copies.items()},
            "copy_ms_per_step": {k: ms / steps for k, ms in copy_ms.items()}}


# Kernel name fragments -> what they are (XLA names fusions by their root op; Pallas kernels by their function).
CATEGORIES = (("paged_attention", "paged attention"), ("gmm", "MoE grouped matmul"), ("flash", "prefill attention"),
               ("cudnn", "prefill attention"), ("gemm", "dense matmul"), ("cublas", "dense matmul"),
               ("cutlass", "dense matmul"), ("xmma", "dense matmul"), ("nvjet", "dense matmul"), ("scatter", "scatter"),
               ("dynamic_update_slice", "dynamic-update-slice"), ("dynamic-update-slice", "dynamic-update-slice"),
               ("dynamic_slice", "dynamic-slice"), ("dynamic-slice", "dynamic-slice"), ("copy", "copy"),
               ("transpose", "copy"), ("sort", "sort"), ("reduce", "reduction"), ("gather", "gather"),
               ("triton", "other triton"))


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((cat for fragment, cat in CATEGORIES if fragment in low), "other fusion")
