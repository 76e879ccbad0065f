"""Serving: the continuous-batching engine against static batches of m1jax.generate, the prefix cache, and the
paged decode step against the memory-traffic floor.

    python -m benchmarks.serve --out=/tmp/serve.json      # the full plan: m1-1b, bf16, one GPU (~6-8 minutes)
    python -m benchmarks.serve --smoke --out=/tmp/s.json  # tiny scale on CPU (the test suite runs this)

Parts (``--parts``; each records its numbers or its error, and the run goes on):
* workload: the same requests (Poisson arrivals at --rate, prompt lengths log-uniform in [--prompt_min,
  --prompt_max], output lengths uniform in [--output_min, --output_max], greedy, no stop tokens) through the
  continuous engine and the static engine (batches of --static_batch, padded to the longest prompt and output
  allowed). Per engine: output tokens/s over the run, TTFT, inter-token latency and end-to-end latency percentiles
  measured by the client (time stamps of streamed events). The static engine streams a batch's tokens when the batch
  ends, so its inter-token latency is not meaningful (n/a). Both engines compile everything before the clock starts
  (``ContinuousEngine.warmup``, one batch for the static engine).
* prefix: TTFT of a request whose first --prefix_tokens tokens an earlier request shared (warm) against a request
  with a new prefix of that length (cold), on an idle engine whose programs are compiled (by a cold and a warm
  request on another prefix first); target >= 10x.
* decode: one engine decode step at --decode_batch rows of --decode_context tokens each (pools filled with a
  constant), against the time to read the KV cache, the lightning states (read and written) and the weights without
  the embedding table once, at the copy bandwidth measured in the same run and at the card's nominal bandwidth
  (--nominal_bandwidth_gbs); target within 2x. Two measures: one synchronous step (inputs over, the program, results
  back), and the steady-state time per step of --decode_reps back-to-back ``ContinuousEngine.step`` calls at that
  shape, pipelined (``EngineConfig.overlap``: step N + 1 dispatched before step N is read back) and synchronous.
* profile: where the time of the decode step (--decode_batch x --decode_context) and of a warm prefix request goes.
  Decode: the step's wall time, the compiled program alone on device-resident inputs (the rest is host work: page
  tables, padding, transfers, dispatch), a ``jax.profiler`` trace of --profile_steps steps summed per kernel (the top
  kernels, kernel categories, device busy time against the wall time, host<->device copies), and the paged attention
  kernel alone at the step's page-table width and at the width the engine used before (one page more than 128K);
  then the pipelined engine's steady state: its time per step and the trace of --profile_steps engine steps.
  Warm request (a --prefix_tokens prefix cached, --prefix_suffix new tokens): its TTFT split into the prefix-cache
  lookup, the snapshot restore (and copy-on-write page), the prefill program, the first token's sampling and the
  rest (host bookkeeping), each device part timed to completion, and the top kernels of its trace. About 2 minutes
  on an H200: ``python -m benchmarks.serve --parts=profile --out=profile.json``.
A table is printed last; --out gets the JSON (rewritten after every part).
"""
from __future__ import annotations

import asyncio
import json
import platform
import time
import traceback

import numpy as np
from absl import app, flags

from benchmarks.profiling import device_trace

FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Tiny model and sizes (CPU); overrides the size flags.")
flags.DEFINE_string("preset", "m1-1b", "Model preset.")
flags.DEFINE_list("parts", ["workload", "prefix", "decode"], "What to run.")
flags.DEFINE_integer("requests", 192, "Requests in the workload.")
flags.DEFINE_float("rate", 16.0, "Poisson arrival rate of the workload (requests/s).")
flags.DEFINE_integer("prompt_min", 128, "Shortest workload prompt.")
flags.DEFINE_integer("prompt_max", 4096, "Longest workload prompt.")
flags.DEFINE_integer("output_min", 32, "Shortest workload output.")
flags.DEFINE_integer("output_max", 512, "Longest workload output.")
flags.DEFINE_integer("max_batch", 64, "Continuous engine: sequence slots.")
flags.DEFINE_integer("page_size", 128, "Continuous engine: tokens per KV page.")
flags.DEFINE_integer("chunk", 512, "Prefill chunk of both engines in the workload.")
flags.DEFINE_integer("min_decode_rows", 16, "Continuous engine: smallest decode row bucket.")
flags.DEFINE_integer("static_batch", 64, "Static engine: rows per batch.")
flags.DEFINE_float("static_timeout", 1.0, "Static engine: run a partial batch after this many seconds.")
flags.DEFINE_integer("prefix_tokens", 32768, "Shared prefix length of the prefix-cache measurement.")
flags.DEFINE_integer("prefix_suffix", 64, "Tokens after the shared prefix.")
flags.DEFINE_integer("prefix_chunk", 2048, "Prefill chunk (and snapshot interval) of the prefix measurement.")
flags.DEFINE_integer("decode_batch", 64, "Rows of the decode-step measurement.")
flags.DEFINE_integer("decode_context", 131072, "Tokens per row of the decode-step measurement.")
flags.DEFINE_integer("decode_reps", 20, "Timed decode steps.")
flags.DEFINE_integer("profile_steps", 3, "Decode steps (and warm requests) in the profile part's traces.")
flags.DEFINE_integer("profile_top", 12, "Kernels listed per trace in the profile part.")
flags.DEFINE_float("nominal_bandwidth_gbs", 4800.0, "The card's HBM bandwidth (H200: 4.8 TB/s).")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_string("out", None, "JSON output path.")

SMOKE = dict(preset="tiny", requests=6, rate=50.0, prompt_min=4, prompt_max=40, output_min=2, output_max=8,
             max_batch=4, page_size=8, chunk=16, min_decode_rows=4, static_batch=4, static_timeout=0.05,
             prefix_tokens=64, prefix_suffix=8, prefix_chunk=16, decode_batch=4, decode_context=256, decode_reps=2,
             profile_steps=2)


def _settings() -> dict:
    names = ["preset", "parts", "requests", "rate", "prompt_min", "prompt_max", "output_min", "output_max",
             "max_batch", "page_size", "chunk", "min_decode_rows", "static_batch", "static_timeout", "prefix_tokens",
             "prefix_suffix", "prefix_chunk", "decode_batch", "decode_context", "decode_reps", "nominal_bandwidth_gbs",
             "seed", "profile_steps", "profile_top"]
    s = {n: FLAGS[n].value for n in names}
    if FLAGS.smoke:
        s.update(SMOKE)
    return s


def _model(s):
    from flax import nnx

    from m1jax.config import ModelConfig
    from m1jax.model import init_model
    cfg = ModelConfig.preset(s["preset"], compute_dtype="bfloat16", param_dtype="bfloat16")
    return cfg, nnx.split(init_model(cfg, seed=0))


def _percentiles(values) -> dict:
    if not len(values):
        return {}
    v = np.asarray(values) * 1e3
    return {f"p{q}_ms": float(np.percentile(v, q)) for q in (50, 90, 99)}


# ------------------------------------------------------------------------------------------------ workload
def _workload(s, cfg):
    """[(arrival offset s, prompt ids, max_tokens)] for the Poisson workload."""
    rng = np.random.default_rng(s["seed"])
    arrivals = np.cumsum(rng.exponential(1.0 / s["rate"], s["requests"]))
    lengths = np.exp(rng.uniform(np.log(s["prompt_min"]), np.log(s["prompt_max"]), s["requests"])).astype(int)
    outputs = rng.integers(s["output_min"], s["output_max"] + 1, s["requests"])
    return [(float(t), rng.integers(0, cfg.vocab_size, int(n)).tolist(), int(m))
            for t, n, m in zip(arrivals, lengths, outputs)]


async def _drive(engine, requests):
    """Submit at the arrival times, time-stamp every streamed event -> per-request records."""
    from m1jax.serve.types import SamplingParams
    start = time.perf_counter()

    async def one(arrival, prompt, max_tokens):
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        submitted = time.perf_counter()
        handle = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        stamps = [time.perf_counter() async for event in handle.stream() if event.token_id is not None]
        return {"submitted": submitted, "stamps": stamps, "cached": handle.cached_prompt_tokens}

    return await asyncio.gather(*(one(*r) for r in requests))


def _summarise_run(records, streamed: bool) -> dict:
    first = min(r["submitted"] for r in records)
    last = max(r["stamps"][-1] for r in records)
    tokens = sum(len(r["stamps"]) for r in records)
    itl = [b - a for r in records for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {"requests": len(records), "output_tokens": tokens, "wall_s": last - first,
            "output_tokens_per_s": tokens / (last - first),
            "ttft": _percentiles([r["stamps"][0] - r["submitted"] for r in records]),
            "itl": _percentiles(itl) if streamed else "n/a (a batch's tokens arrive together)",
            "e2e": _percentiles([r["stamps"][-1] - r["submitted"] for r in records])}


def _run_engine(engine, requests, streamed, warmups=()):
    """Start the engine, drive each warm-up request list and then ``requests``, stop it (an engine is started once:
    the static engine does not restart); the summary of ``requests``."""
    engine.start()
    try:
        for warm in warmups:
            asyncio.run(_drive(engine, warm))
        records = asyncio.run(_drive(engine, requests))
    finally:
        engine.stop()
    return _summarise_run(records, streamed)


def part_workload(s, cfg, split, results):
    from m1jax.serve.config import EngineConfig
    from m1jax.serve.engine import ContinuousEngine
    from m1jax import generate as gen
    from m1jax.serve.static import StaticEngine, StaticEngineConfig
    requests = _workload(s, cfg)
    context = s["prompt_max"] + s["output_max"]
    results["workload"] = {"prompt_tokens": sum(len(p) for _, p, _ in requests),
                           "max_output_tokens": sum(m for _, _, m in requests)}
    config = EngineConfig(max_batch=s["max_batch"], max_context=context, page_size=s["page_size"],
                          chunk_size=s["chunk"], token_budget=s["max_batch"] + 2 * s["chunk"],
                          snapshot_interval=s["chunk"] * 4, min_decode_rows=s["min_decode_rows"],
                          min_chunk=s["chunk"], min_context_bucket=context)
    engine = ContinuousEngine(split, config)
    t0 = time.perf_counter()
    engine.warmup()
    results["workload"]["continuous_compile_s"] = time.perf_counter() - t0
    results["workload"]["continuous"] = _run_engine(engine, requests, streamed=True)
    results["workload"]["continuous"]["prefilled_tokens"] = engine.stats()["prefilled_tokens"]
    del engine
    _save(results)

    # One decode-length bucket (the static engine rounds max_tokens up to a power of two, at least this), and one
    # warm-up batch per prompt bucket of the workload, so that no compilation falls inside the measured run.
    new_bucket = 1 << (s["output_max"] - 1).bit_length()
    static = StaticEngine(split, StaticEngineConfig(max_batch_size=s["static_batch"],
                                                    batch_timeout_s=s["static_timeout"], chunk_size=s["chunk"],
                                                    min_new_tokens_bucket=new_bucket))
    warmups = [[(0.0, [1] * length, s["output_max"])] * s["static_batch"]
               for length in sorted({gen.bucket_length(len(p), s["chunk"]) for _, p, _ in requests})]
    t0 = time.perf_counter()
    results["workload"]["static"] = _run_engine(static, requests, streamed=False, warmups=warmups)
    # Warm-up batches and the run share one start (the static engine does not restart); their time is reported.
    results["workload"]["static_warmup_and_run_s"] = time.perf_counter() - t0

# ------------------------------------------------------------------------------------------------ prefix
def _prefix_engine(s, cfg, split):
    """An engine sized for the prefix measurement, its programs compiled by a cold and a warm request on another
    prefix; returns (engine, ttft(prompt) -> (ttft s, cached tokens), prompt(prefix) -> prefix + new suffix, rng)."""
    from m1jax.serve.config import EngineConfig
    from m1jax.serve.engine import ContinuousEngine
    from m1jax.serve.types import SamplingParams
    n, chunk, suffix = s["prefix_tokens"], s["prefix_chunk"], s["prefix_suffix"]
    context = n + suffix + 16
    engine = ContinuousEngine(split, EngineConfig(
        max_batch=2, max_context=context, page_size=s["page_size"], chunk_size=chunk, token_budget=2 + chunk,
        snapshot_interval=chunk, min_chunk=min(64, chunk), min_context_bucket=context))
    rng = np.random.default_rng(s["seed"] + 1)
    params = SamplingParams(max_tokens=4, temperature=0.0)

    def ttft(prompt):
        handle = engine.submit(prompt, params)
        engine.run_until_idle()
        handle.result()
        return handle.time_to_first_token_s, handle.cached_prompt_tokens

    def prompt(prefix):
        return prefix + rng.integers(0, cfg.vocab_size, suffix).tolist()

    first = rng.integers(0, cfg.vocab_size, n).tolist()
    ttft(prompt(first))  # compiles the cold path's programs
    ttft(prompt(first))  # and the warm path's (restoring a snapshot)
    return engine, ttft, prompt, rng


def part_prefix(s, cfg, split, results):
    n = s["prefix_tokens"]
    t0 = time.perf_counter()
    engine, ttft, prompt, rng = _prefix_engine(s, cfg, split)
    compile_s = time.perf_counter() - t0
    shared = rng.integers(0, cfg.vocab_size, n).tolist()
    cold, cold_cached = ttft(prompt(shared))
    before = engine.stats()["prefilled_tokens"]
    warm, warm_cached = ttft(prompt(shared))
    results["prefix"] = {"prefix_tokens": n, "suffix_tokens": s["prefix_suffix"], "chunk": s["prefix_chunk"],
                         "first_run_s": compile_s, "cold_ttft_ms": 1e3 * cold, "warm_ttft_ms": 1e3 * warm,
                         "speedup": cold / warm, "cold_cached_tokens": cold_cached, "warm_cached_tokens": warm_cached,
                         "warm_prefilled_tokens": engine.stats()["prefilled_tokens"] - before,
                         "prefix_cache_bytes": engine.stats()["prefix_cache_bytes"]}


# ------------------------------------------------------------------------------------------------ decode
def _copy_bandwidth_gbs() -> float:
    import jax
    import jax.numpy as jnp
    x = jnp.ones((256 * 2 ** 20,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda a: a + 1)
    jax.block_until_ready(f(x))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / min(times) / 1e9


def _decode_setup(s, cfg, split):
    """The engine's device programs at --decode_batch rows of --decode_context tokens (pools filled with a constant,
    each row in its own pages) and the arguments of one decode step."""
    import jax
    import jax.numpy as jnp

    from m1jax.serve.config import EngineConfig
    from m1jax.serve.programs import DevicePrograms, row_settings
    batch, context = s["decode_batch"], s["decode_context"]
    config = EngineConfig(max_batch=batch, max_context=context + s["page_size"], page_size=s["page_size"],
                          min_decode_rows=batch, min_context_bucket=context + s["page_size"],
                          token_budget=batch + 512)
    device = DevicePrograms(*split, cfg, config)
    device.pools = jax.tree_util.tree_map(lambda a: jnp.full_like(a, 0.01), device.pools)
    per_seq = config.pages_per_sequence
    pages = [np.arange(1 + i * per_seq, 1 + (i + 1) * per_seq, dtype=np.int32) for i in range(batch)]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, batch).tolist()  # distinct tokens: the rows spread over the experts
    rows = row_settings([], batch, config.max_stop_tokens)
    return device, (tokens, [False] * batch, list(range(1, batch + 1)), pages, [context] * batch, rows, False)


def _decoding_engine(s, cfg, split, overlap: bool, steps: int):
    """A ContinuousEngine with --decode_batch requests decoding at --decode_context tokens each, for ``steps`` more
    decode steps: 1-token prompts are admitted and prefilled as the engine does it, then their lengths are set to the
    context (the pools hold a constant, as in ``_decode_setup``, so the cached tokens are whatever the lengths say;
    each request's pages, allocated at admission for its max_tokens, cover them). Sampled at temperature 1 with a
    seed per request (no top-k / top-p: the step runs without the sort), so the rows spread over the experts."""
    import jax
    import jax.numpy as jnp

    from m1jax.serve.config import EngineConfig
    from m1jax.serve.engine import ContinuousEngine
    from m1jax.serve.types import SamplingParams
    batch, context = s["decode_batch"], s["decode_context"]
    max_tokens = context + steps + 2
    config = EngineConfig(max_batch=batch, max_context=1 + max_tokens, page_size=s["page_size"],
                          min_decode_rows=batch, min_context_bucket=1 + max_tokens, token_budget=batch + 512,
                          prefix_cache_bytes=0, overlap=overlap)
    engine = ContinuousEngine(split, config)
    engine.device.pools = jax.tree_util.tree_map(lambda a: jnp.full_like(a, 0.01), engine.device.pools)
    rng = np.random.default_rng(0)
    for i in range(batch):
        engine.submit([int(rng.integers(0, cfg.vocab_size))], SamplingParams(max_tokens=max_tokens, seed=i))
    while len(engine._active) < batch or any(r.next_token is None for r in engine._active.values()):
        engine.step()
    for request in engine._active.values():
        request.length = context
    return engine


def _engine_step_ms(engine, warm: int, reps: int) -> float:
    """Steady-state wall time per ``engine.step()`` (ms): ``warm`` steps first (compiling, filling the pipeline)."""
    for _ in range(warm):
        engine.step()
    t0 = time.perf_counter()
    for _ in range(reps):
        engine.step()
    return 1e3 * (time.perf_counter() - t0) / reps


def _floor_bytes(cfg, split, device, batch: int, context: int) -> tuple[int, int, int]:
    """What a decode step must move at least: (the weights without the embedding table, the KV cache of every
    softmax layer (bf16), the lightning states read and written)."""
    import jax
    embedding = cfg.vocab_size * cfg.hidden_size
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(split[1])) - embedding * 2
    kv_bytes = sum(2 * cfg.num_key_value_heads * cfg.head_dim * 2 for t in cfg.layer_types if t == "softmax")
    return weight_bytes, kv_bytes * batch * context, 2 * batch * device.snapshot_bytes


def _sync_step(device, args):
    """One synchronous decode step: inputs over, the program, results back."""
    return device.fetch(device.decode(*args))


def part_decode(s, cfg, split, results):
    batch, context = s["decode_batch"], s["decode_context"]
    device, args = _decode_setup(s, cfg, split)
    t0 = time.perf_counter()
    _sync_step(device, args)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(s["decode_reps"]):
        t0 = time.perf_counter()
        _sync_step(device, args)
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    weight_bytes, kv_bytes, state_bytes = _floor_bytes(cfg, split, device, batch, context)
    floor = weight_bytes + kv_bytes + state_bytes
    bandwidth = _copy_bandwidth_gbs()
    results["decode"] = {"batch": batch, "context": context, "step_ms": 1e3 * step, "first_call_s": compile_s,
                         "kv_bytes": kv_bytes, "weight_bytes": weight_bytes, "lightning_state_bytes": state_bytes,
                         "copy_bandwidth_gbs": bandwidth,
                         "floor_ms_measured_bw": 1e3 * floor / (bandwidth * 1e9),
                         "floor_ms_nominal_bw": 1e3 * floor / (s["nominal_bandwidth_gbs"] * 1e9)}
    d = results["decode"]
    d["ratio_to_floor"] = d["step_ms"] / d["floor_ms_measured_bw"]
    del device
    for name, overlap in (("pipelined", True), ("engine_sync", False)):
        engine = _decoding_engine(s, cfg, split, overlap, steps=s["decode_reps"] + 4)
        d[f"{name}_step_ms"] = _engine_step_ms(engine, 3, s["decode_reps"])
        d[f"{name}_ratio_to_floor"] = d[f"{name}_step_ms"] / d["floor_ms_measured_bw"]
        del engine
    results["decode"]["paged_attention"] = _paged_attention_split(cfg, batch, context, s["page_size"], bandwidth,
                                                                  s["decode_reps"])


def _paged_attention_split(cfg, batch: int, context: int, page_size: int, bandwidth_gbs: float, reps: int,
                           width: int | None = None, implementations=None) -> dict:
    """One softmax layer's paged decode attention alone at the decode step's shape, per implementation that takes it
    (ms per layer, and the step's share: times the softmax layer count), against reading that layer's KV once.
    ``width``: the page table's width (default: the row's pages; entries past them point at page 0)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.attention.paged import IMPLEMENTATIONS, paged_attention
    from pallas_kernels.attention.paged.api import BACKENDS
    per_seq = -(-context // page_size)
    k_pages = jnp.full((cfg.num_key_value_heads, batch * per_seq + 1, page_size, cfg.head_dim), 0.01, jnp.bfloat16)
    v_pages = k_pages + 0.01
    q = jax.random.normal(jax.random.key(0), (batch, cfg.num_attention_heads, cfg.head_dim), jnp.bfloat16)
    table = 1 + jnp.arange(batch * per_seq, dtype=jnp.int32).reshape(batch, per_seq)
    table = jnp.pad(table, ((0, 0), (0, (width or per_seq) - per_seq)))
    lengths = jnp.full((batch,), context, jnp.int32)
    softmax_layers = sum(t == "softmax" for t in cfg.layer_types)
    platform_name = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())  # the kernels' platform names
    layer_kv_bytes = 2 * batch * context * cfg.num_key_value_heads * cfg.head_dim * 2
    out = {"softmax_layers": softmax_layers, "layer_kv_bytes": layer_kv_bytes, "table_width": table.shape[1],
           "layer_floor_ms": 1e3 * layer_kv_bytes / (bandwidth_gbs * 1e9)}
    for name in implementations or IMPLEMENTATIONS:
        if BACKENDS[name].unsupported(q, k_pages, table) is not None or (
                name != "xla" and platform_name not in BACKENDS[name].native_platforms()):
            continue
        try:
            fn = jax.jit(lambda *a, name=name: paged_attention(*a, implementation=name))
            fn(q, k_pages, v_pages, lengths, table).block_until_ready()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(q, k_pages, v_pages, lengths, table).block_until_ready()
                times.append(time.perf_counter() - t0)
            ms = 1e3 * float(np.median(times))
            out[name] = {"layer_ms": ms, "step_ms": ms * softmax_layers,
                         "ratio_to_layer_floor": ms / out["layer_floor_ms"]}
        except Exception as e:  # noqa: BLE001  (a backend that fails is recorded, the others still run)
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


# ------------------------------------------------------------------------------------------------ profile
def _profile_decode(s, cfg, split) -> dict:
    import jax

    from m1jax.serve import programs
    device, args = _decode_setup(s, cfg, split)
    tokens, fed_back, slots, pages, lengths, rows, filtering = args
    _sync_step(device, args)  # compiles
    wall = []
    for _ in range(s["decode_reps"]):
        t0 = time.perf_counter()
        _sync_step(device, args)
        wall.append(time.perf_counter() - t0)
    width = device.table_width(max(lengths) + 1, decode=True)
    inputs = jax.device_put((np.asarray(tokens, np.int32), np.asarray(fed_back, bool), np.asarray(slots, np.int32),
                             device._table(pages, len(tokens), width), np.asarray(lengths, np.int32), rows))

    def program_only():
        sampled, device.pools, device.feedback = programs._decode_jit(
            device.static, device.params, device.pools, device.feedback, *inputs, device.repeats, filtering)
        jax.block_until_ready(sampled)

    program_only()
    on_device = []
    for _ in range(s["decode_reps"]):
        t0 = time.perf_counter()
        program_only()
        on_device.append(time.perf_counter() - t0)
    out = {"batch": len(tokens), "context": lengths[0], "table_width": width,
           "step_wall_ms": 1e3 * float(np.median(wall)), "program_ms": 1e3 * float(np.median(on_device))}
    out["host_ms"] = out["step_wall_ms"] - out["program_ms"]
    out["floor_bytes"] = sum(_floor_bytes(cfg, split, device, len(tokens), lengths[0]))
    try:
        out["trace"] = device_trace(lambda: _sync_step(device, args), s["profile_steps"], s["profile_top"])
    except Exception as e:  # noqa: BLE001  (no profiler on this host: the timings above still stand)
        out["trace"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    del device, inputs
    bandwidth = _copy_bandwidth_gbs()
    out["copy_bandwidth_gbs"] = bandwidth
    out["floor_ms"] = 1e3 * out["floor_bytes"] / (bandwidth * 1e9)
    old_width = -(-(lengths[0] + s["page_size"]) // s["page_size"])  # before decode_table_width
    out["paged_attention"] = {
        f"width_{w}": _paged_attention_split(cfg, len(tokens), lengths[0], s["page_size"], bandwidth,
                                             s["decode_reps"], width=w)
        for w in sorted({width, old_width})}
    engine = _decoding_engine(s, cfg, split, True, steps=s["decode_reps"] + s["profile_steps"] + 4)
    pipelined = {"step_ms": _engine_step_ms(engine, 3, s["decode_reps"])}
    pipelined["ratio_to_floor"] = pipelined["step_ms"] / out["floor_ms"]
    try:
        pipelined["trace"] = device_trace(engine.step, s["profile_steps"], s["profile_top"])
    except Exception as e:  # noqa: BLE001
        pipelined["trace"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    out["pipelined"] = pipelined
    return out


class _Timed:
    """Wraps callables to record how long each call took (device results waited for) under a label."""

    def __init__(self):
        self.ms: dict[str, list[float]] = {}

    def wrap(self, label: str, fn, wait=None):
        """``fn`` timed; ``wait(result)``: the device arrays to wait for before the clock stops (None: none)."""
        import jax

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            if wait is not None:
                jax.block_until_ready(wait(result))
            self.ms.setdefault(label, []).append(1e3 * (time.perf_counter() - t0))
            return result
        return timed


def _profile_prefix(s, cfg, split) -> dict:
    engine, ttft, prompt, rng = _prefix_engine(s, cfg, split)
    shared = rng.integers(0, cfg.vocab_size, s["prefix_tokens"]).tolist()
    cold, _ = ttft(prompt(shared))
    timer = _Timed()
    device, cache = engine.device, engine.prefix_cache
    cache.lookup = timer.wrap("prefix lookup", cache.lookup)
    device.restore = timer.wrap("snapshot restore", device.restore, wait=lambda _: device.pools)
    device.copy_page = timer.wrap("copy-on-write page", device.copy_page, wait=lambda _: device.pools)
    device.prefill = timer.wrap("prefill program", device.prefill, wait=lambda logits: logits)
    device.sample = timer.wrap("first-token sampling", device.sample)  # returns host arrays: it waits itself
    warm = []
    for _ in range(s["profile_steps"]):
        for values in timer.ms.values():
            values.clear()
        t, cached = ttft(prompt(shared))
        warm.append((t, cached, {k: v[0] for k, v in timer.ms.items() if v}))
    t, cached, parts = sorted(warm, key=lambda w: w[0])[len(warm) // 2]  # the median request
    out = {"prefix_tokens": s["prefix_tokens"], "suffix_tokens": s["prefix_suffix"], "cold_ttft_ms": 1e3 * cold,
           "warm_ttft_ms": 1e3 * t, "warm_cached_tokens": cached, "parts_ms": parts,
           "other_host_ms": 1e3 * t - sum(parts.values())}
    # The device kernels of one warm request (submission to its last token: prefill, sampling, its decode steps).
    try:
        out["trace"] = device_trace(lambda: ttft(prompt(shared)), s["profile_steps"], s["profile_top"])
    except Exception as e:  # noqa: BLE001
        out["trace"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def part_profile(s, cfg, split, results):
    results["profile"] = {"decode": _profile_decode(s, cfg, split)}
    _save(results)
    results["profile"]["warm_prefix"] = _profile_prefix(s, cfg, split)


# ------------------------------------------------------------------------------------------------ report
def _save(results):
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump(results, fh, indent=1)


def _table(results) -> str:
    lines = [f"serving benchmark: {results['settings']['preset']} bf16 on {results['device_kind']}"]
    w = results.get("workload", {})
    for name in ("continuous", "static"):
        r = w.get(name)
        if isinstance(r, dict):
            itl = r["itl"].get("p50_ms") if isinstance(r["itl"], dict) else None
            lines.append(f"  {name:10s} {r['output_tokens_per_s']:9.1f} tok/s  TTFT p50/p90/p99 "
                         f"{r['ttft']['p50_ms']:.0f}/{r['ttft']['p90_ms']:.0f}/{r['ttft']['p99_ms']:.0f} ms  "
                         f"ITL p50 {'n/a' if itl is None else f'{itl:.1f} ms'}  "
                         f"e2e p50 {r['e2e']['p50_ms']:.0f} ms")
    if isinstance(w.get("continuous"), dict) and isinstance(w.get("static"), dict):
        lines.append(f"  throughput continuous/static: "
                     f"{w['continuous']['output_tokens_per_s'] / w['static']['output_tokens_per_s']:.2f}x")
    p = results.get("prefix")
    if isinstance(p, dict) and "speedup" in p:
        lines.append(f"  prefix {p['prefix_tokens']} tokens: TTFT cold {p['cold_ttft_ms']:.1f} ms, warm "
                     f"{p['warm_ttft_ms']:.1f} ms ({p['speedup']:.1f}x, target >= 10x; warm prefilled "
                     f"{p['warm_prefilled_tokens']} tokens)")
    d = results.get("decode")
    if isinstance(d, dict) and "step_ms" in d:
        lines.append(f"  decode step {d['batch']} x {d['context']}: {d['step_ms']:.2f} ms; floor "
                     f"{d['floor_ms_measured_bw']:.2f} ms at {d['copy_bandwidth_gbs']:.0f} GB/s "
                     f"({d['ratio_to_floor']:.2f}x, target <= 2x; {d['floor_ms_nominal_bw']:.2f} ms at nominal)")
        if "pipelined_step_ms" in d:
            lines.append(f"    engine steady state per step: pipelined {d['pipelined_step_ms']:.2f} ms "
                         f"({d['pipelined_ratio_to_floor']:.2f}x the floor), synchronous "
                         f"{d['engine_sync_step_ms']:.2f} ms ({d['engine_sync_ratio_to_floor']:.2f}x)")
        for name, r in d.get("paged_attention", {}).items():
            if isinstance(r, dict) and "layer_ms" in r:
                lines.append(f"    paged attention {name}: {r['layer_ms']:.2f} ms per layer x "
                             f"{d['paged_attention']['softmax_layers']} = {r['step_ms']:.2f} ms "
                             f"({r['ratio_to_layer_floor']:.2f}x its KV read)")
            elif isinstance(r, dict) and "error" in r:
                lines.append(f"    paged attention {name}: {r['error']}")
    lines += _profile_table(results.get("profile"))
    for part in results["settings"]["parts"]:
        if isinstance(results.get(part), dict) and "error" in results[part]:
            lines.append(f"  {part}: {results[part]['error']}")
    return "\n".join(lines)


def _trace_lines(trace, indent: str = "    ") -> list[str]:
    if not isinstance(trace, dict) or "error" in trace:
        return [f"{indent}trace: {trace.get('error') if isinstance(trace, dict) else trace}"]
    if not trace["devices"]:
        return [f"{indent}trace: no device kernels recorded (a CPU run, or no CUPTI on this host)"]
    lines = [f"{indent}device busy {trace['device_busy_ms']:.2f} ms in {trace['kernels_per_step']:.0f} kernels; "
             f"copies {trace['copies_per_step'] or 'none'}"]
    lines += [f"{indent}  {c:22s} {v['ms']:7.2f} ms  {v['calls']:5.0f} kernels" for c, v in trace["categories"].items()]
    lines.append(f"{indent}top kernels (ms per run, calls):")
    lines += [f"{indent}  {t['ms']:7.3f} {t['calls']:4.0f}  {t['kernel']}" for t in trace["top"]]
    return lines


def _profile_table(p) -> list[str]:
    if not isinstance(p, dict):
        return []
    lines = []
    d = p.get("decode")
    if isinstance(d, dict) and "step_wall_ms" in d:
        lines.append(f"  profile: decode step {d['batch']} x {d['context']} (table {d['table_width']} pages): wall "
                     f"{d['step_wall_ms']:.2f} ms = program {d['program_ms']:.2f} ms + host {d['host_ms']:.2f} ms; "
                     f"floor {d.get('floor_ms', float('nan')):.2f} ms")
        trace = d.get("trace")
        if isinstance(trace, dict) and trace.get("devices"):
            lines.append(f"    program minus device busy (launch gaps, syncs): "
                         f"{d['program_ms'] - trace['device_busy_ms']:.2f} ms")
        lines += _trace_lines(trace)
        for key, r in d.get("paged_attention", {}).items():
            for name, v in r.items():
                if isinstance(v, dict) and "layer_ms" in v:
                    lines.append(f"    paged attention {name} at {key}: {v['layer_ms']:.2f} ms per layer "
                                 f"({v['ratio_to_layer_floor']:.2f}x its KV read)")
        pipe = d.get("pipelined")
        if isinstance(pipe, dict) and "step_ms" in pipe:
            lines.append(f"  profile: pipelined engine steady state: {pipe['step_ms']:.2f} ms per step "
                         f"({pipe['ratio_to_floor']:.2f}x the floor)")
            lines += _trace_lines(pipe.get("trace"))
    w = p.get("warm_prefix")
    if isinstance(w, dict) and "warm_ttft_ms" in w:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in w["parts_ms"].items())
        lines.append(f"  profile: warm request ({w['prefix_tokens']} cached + {w['suffix_tokens']} new): TTFT "
                     f"{w['warm_ttft_ms']:.2f} ms (cold {w['cold_ttft_ms']:.1f}) = {parts}, other host "
                     f"{w['other_host_ms']:.2f} ms")
        lines += _trace_lines(w.get("trace"))
    return lines


PARTS = {"workload": part_workload, "prefix": part_prefix, "decode": part_decode, "profile": part_profile}


def main(argv):
    del argv
    import jax
    s = _settings()
    unknown = set(s["parts"]) - set(PARTS)
    if unknown:
        raise app.UsageError(f"unknown parts {sorted(unknown)}; choose from {sorted(PARTS)}")
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__,
               "device_kind": jax.devices()[0].device_kind, "python": platform.python_version(), "settings": s}
    t0 = time.perf_counter()
    cfg, split = _model(s)
    results["model_init_s"] = time.perf_counter() - t0
    for name in s["parts"]:
        t0 = time.perf_counter()
        try:
            PARTS[name](s, cfg, split, results)
        except Exception as e:  # record and go on (out of memory, say)
            results[name] = {**results.get(name, {}), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
        print(f"{name}: {time.perf_counter() - t0:.1f}s {json.dumps(results.get(name))}", flush=True)
        _save(results)
    print(_table(results))


if __name__ == "__main__":
    app.run(main)
