"""Ahead-of-time compiles for a target that is not here: TPU slices from a CPU host, and what the compile reports.

With libtpu installed (the ``tpu`` or ``test`` extra), ``jax.experimental.topologies`` describes the devices of any TPU
slice on a CPU machine, and ``jax.jit(f).lower(...).compile()`` on a mesh of those devices runs the real TPU compiler:
the kernels lower to Mosaic (they pick their lowering by the platform being compiled for, see docs/kernels.md), and
the compiled program reports its per-device memory and FLOPs. MaxText's ``train_compile`` works the same way.

* ``topology_devices(name)``: JAX topology names (``"v5p:2x2x1"``, ``"v6e:16x16"``) or slice names (``"v5p-512"``,
  ``"v6e-256"``, ``"v5litepod-256"``; v4 and v5p slice names count TensorCores, two per chip, the others chips), and
  several slices over the data-center network (``"v6e-256x2"``).
* ``compile_report(compiled, hbm_bytes)``: argument, output, alias, temporary and peak bytes per device, FLOPs, and
  the bytes each collective kind moves per device per step (HLO text, while-loop trip counts applied), and whether it
  fits the chip's memory.
"""
from __future__ import annotations

import collections
import math
import os
import re
from typing import Any

import jax

# Chip grids of the standard slice shapes (the TPU generations' published topologies).
_CUBE_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 8960: "16x20x28"}
_GRID_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# slice-name prefix -> (JAX topology generation, TensorCores per chip counted by the slice name, chip grid table)
_GENERATIONS = {"v4": ("v4", 2, _CUBE_SHAPES), "v5p": ("v5p", 2, _CUBE_SHAPES), "v5e": ("v5e", 1, _GRID_SHAPES),
                "v5litepod": ("v5e", 1, _GRID_SHAPES), "v6e": ("v6e", 1, _GRID_SHAPES)}
# High-bandwidth memory per chip (bytes), by jax.Device.device_kind.
HBM_BYTES = {"TPU v4": 32 * 2 ** 30, "TPU v5": 95 * 2 ** 30, "TPU v5p": 95 * 2 ** 30, "TPU v5 lite": 16 * 2 ** 30,
             "TPU v6 lite": 32 * 2 ** 30}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")


def topology_name(name: str) -> tuple[str, int]:
    """(JAX topology name, number of slices) for ``name``: a JAX topology name (``v5p:2x2x1``) as is, or a slice name
    (``v5p-512`` -> ``v5p:4x8x8``), optionally times a number of slices joined over the data-center network
    (``v6e-256x2``: two 256-chip slices). Raises ValueError naming the valid forms."""
    base, slices = name, 1
    m = re.fullmatch(r"(.+)x(\d+)", name)
    if m and "-" in m.group(1) and ":" not in name:
        base, slices = m.group(1), int(m.group(2))
    if ":" in base:
        return base, slices
    prefix, _, count = base.partition("-")
    if prefix not in _GENERATIONS or not count.isdigit() or slices < 1:
        raise ValueError(f"topology {name!r}: expected a JAX topology name such as 'v5p:2x2x1' or a slice name "
                         f"<generation>-<size>[x<slices>] with generation in {sorted(_GENERATIONS)}, e.g. 'v5p-512' "
                         f"or 'v6e-256x2'")
    generation, cores_per_chip, shapes = _GENERATIONS[prefix]
    chips, rest = divmod(int(count), cores_per_chip)
    if rest or chips not in shapes:
        sizes = sorted(c * cores_per_chip for c in shapes)
        raise ValueError(f"slice {base!r}: {prefix} slices come in sizes {sizes}")
    return f"{generation}:{shapes[chips]}", slices


def topology_devices(name: str) -> list:
    """The devices of TPU slice(s) ``name`` (see ``topology_name``), described on this host by libtpu."""
    from jax.experimental import topologies

    topology, slices = topology_name(name)
    # libtpu takes a machine-wide lock per process unless told otherwise, and these compiles need no TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        description = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                   **({"num_slices": slices} if slices > 1 else {}))
    except Exception as e:
        hint = " (is libtpu installed? pip install 'jax[tpu]==0.11.2')" if "tpu" in str(e).lower() else ""
        raise RuntimeError(f"cannot describe TPU topology {name!r}{hint}: {str(e).splitlines()[0]}") from None
    return list(description.devices)


# ------------------------------------------------------------------------------------------------ HLO accounting
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")


def _type_bytes(type_text: str) -> float:
    """Bytes of an HLO result type (an array or a tuple of arrays)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        total += _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _parse_computations(hlo: str) -> dict[str, list[str]]:
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            computations[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)
    return computations


def _trip_count(condition: list[str]) -> int | None:
    """Iterations of a while loop from its condition computation: ``compare(i, constant(N)), direction=LT`` (XLA's
    form of a scan's loop) gives N; None when the condition is not of that form."""
    constants = [int(c) for line in condition for c in re.findall(r"constant\((\d+)\)", line)]
    if len(constants) == 1 and any("direction=LT" in line for line in condition):
        return constants[0]
    return None


def collective_bytes(hlo: str) -> dict[str, Any]:
    """Bytes each collective kind produces per device in one run of a compiled (SPMD-partitioned) HLO module.

    An instruction inside a while loop counts once per iteration (trip counts from the loop conditions, multiplied
    through nested loops and calls); ``unknown_trip_counts`` says how many loops had a condition of another form
    (counted once). Async pairs count at their ``-done``, whose result is the collective's output alone.
    """
    computations = _parse_computations(hlo)
    entry = next((m.group(1) for m in re.finditer(r"^ENTRY %?([\w.\-]+)", hlo, re.MULTILINE)), None)
    callees: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    unknown = 0
    for name, lines in computations.items():
        for line in lines:
            if " while(" in line:
                cond = re.search(r"condition=%?([\w.\-]+)", line)
                body = re.search(r"body=%?([\w.\-]+)", line)
                trips = _trip_count(computations.get(cond.group(1), [])) if cond else None
                unknown += trips is None
                if body:
                    callees[name].append((body.group(1), trips or 1))
                continue
            for callee in re.findall(r"\b(?:to_apply|calls)=%?([\w.\-]+)", line):
                callees[name].append((callee, 1))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                callees[name] += [(c.strip().lstrip("%"), 1) for c in group.split(",")]
    multiplier: dict[str, int] = collections.defaultdict(int)
    stack = [(entry, 1)] if entry else [(n, 1) for n in computations]
    seen: set[tuple[str, int]] = set()
    while stack:
        name, mult = stack.pop()
        if (name, mult) in seen:
            continue
        seen.add((name, mult))
        multiplier[name] = max(multiplier[name], mult)
        stack += [(callee, mult * trips) for callee, trips in callees.get(name, ())]
    totals: dict[str, float] = {kind: 0.0 for kind in COLLECTIVES}
    counts: dict[str, int] = {kind: 0 for kind in COLLECTIVES}
    for name, lines in computations.items():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            opcode = m.group(3)
            if opcode.endswith("-start"):
                continue  # an async pair counts at its -done: the start's result also holds the operands
            kind = opcode[:-len("-done")] if opcode.endswith("-done") else opcode
            if kind in totals:
                totals[kind] += _type_bytes(m.group(2)) * max(multiplier.get(name, 1), 1)
                counts[kind] += 1
    return {"bytes": {k: int(v) for k, v in totals.items()}, "instructions": counts,
            "unknown_trip_counts": unknown}


# ------------------------------------------------------------------------------------------------ reports
def hbm_bytes(device) -> int | None:
    return HBM_BYTES.get(getattr(device, "device_kind", ""))


def compile_report(compiled, device=None) -> dict[str, Any]:
    """Per-device memory, FLOPs and collective bytes of a compiled program, and whether it fits ``device``'s HBM.

    ``xla_flops`` and ``bytes_accessed`` are XLA's cost analysis, which counts a while loop's body once: a scanned
    layer stack or chunk loop is undercounted (a 16-layer tiny model reports about the 8-layer one's count). The
    collective bytes do multiply through loop trip counts (``collective_bytes``)."""
    m = compiled.memory_analysis()
    memory = {k.replace("_size_in_bytes", "_bytes"): int(getattr(m, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
        "generated_code_size_in_bytes")}
    # Live at the peak: the inputs, the outputs not written over donated inputs, and the temporaries.
    memory["peak_bytes"] = (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
                            + memory["temp_bytes"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report = {"memory": memory, "xla_flops": float(cost.get("flops", 0.0)),
              "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
              "collectives": collective_bytes(compiled.as_text())}
    capacity = hbm_bytes(device) if device is not None else None
    if capacity:
        report["hbm_bytes"] = capacity
        report["fits"] = memory["peak_bytes"] <= capacity
    return report


def format_bytes(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


# ------------------------------------------------------------------------------------------------ workloads
WORKLOADS = ("train", "prefill", "decode", "rl_update")


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def lower_workload(workload: str, cfg, mesh, *, batch: int, length: int, fsdp: bool = False, train_config=None,
                   update_config=None, new_tokens: int = 16):
    """``jax.jit(...).lower(...)`` of one workload of ``cfg`` on ``mesh``, on abstract inputs (no memory is used).

    train:     the training step (``m1jax.train.make_train_step``: fused fp32-head CE, grads, AdamW), a global batch
               of ``batch`` sequences of ``length`` tokens.
    prefill:   the forward over ``batch`` prompts of ``length`` tokens to the next-token logits (bf16 weights).
    decode:    one decode step of ``batch`` rows against a hybrid cache of ``length`` slots (bf16 weights, bf16 KV).
    rl_update: the RL update (``m1jax.rl.step.make_rl_update``) on ``batch`` rows of ``length`` prompt +
               ``new_tokens`` response tokens.
    Returns the Lowered object; ``.compile()`` it for the memory and cost analyses.
    """
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from m1jax.model import abstract_model
    from m1jax.train import (TrainConfig, abstract_train_state, batch_shardings, make_train_step, split_model,
                             train_state_shardings)
    from sharding.rules import fsdp_params, logical_to_mesh_spec, state_shardings

    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    replicated = NamedSharding(mesh, P())
    # Abstract states are built with no mesh set: under jax.set_mesh, nnx would read the parameters' logical axis
    # names as mesh axes. The steps are traced under the mesh (activation constraints, shard_map) and fsdp_params.
    if workload == "train":
        tc = train_config or TrainConfig()
        graphdef, state = abstract_train_state(cfg, tc)
        s_sh = train_state_shardings(state, mesh, fsdp)
        arrays = {"inputs": tokens, "targets": tokens, "positions": tokens, "segment_ids": tokens,
                  "loss_mask": jax.ShapeDtypeStruct((batch, length), jnp.float32)}
        step = make_train_step(graphdef, tc, s_sh, batch_shardings(mesh, (batch, length), tuple(arrays)), fsdp=fsdp)
        with jax.set_mesh(mesh):
            return step.lower(state, arrays)
    graphdef, params = split_model(abstract_model(cfg))
    p_sh = state_shardings(params, mesh, fsdp=fsdp)
    if workload == "rl_update":
        from m1jax.rl.step import UpdateConfig, init_opt_state, rl_update
        from sharding.rules import tree_shardings_like
        ucfg = update_config or UpdateConfig(mu=1)
        opt_state = jax.eval_shape(lambda p: init_opt_state(p, ucfg), params)
        o_sh = tree_shardings_like(opt_state, params, p_sh, mesh)
        rows = NamedSharding(mesh, logical_to_mesh_spec(("batch",), shape=(batch,), mesh=mesh))
        row_tokens = NamedSharding(mesh, logical_to_mesh_spec(("batch", None), shape=(batch, length), mesh=mesh))
        arrays = {"tokens": jax.ShapeDtypeStruct((batch, length + new_tokens), jnp.int32),
                  "start": jax.ShapeDtypeStruct((batch,), jnp.int32),
                  "mask": jax.ShapeDtypeStruct((batch, new_tokens), jnp.float32),
                  "sampler_logp": jax.ShapeDtypeStruct((batch, new_tokens), jnp.float32),
                  "advantages": jax.ShapeDtypeStruct((batch,), jnp.float32),
                  "group_ids": jax.ShapeDtypeStruct((batch,), jnp.int32)}
        a_sh = {k: (rows if v.ndim == 1 else row_tokens) for k, v in arrays.items()}

        def update(p, o, b):
            with fsdp_params(fsdp):
                return rl_update(p, o, b, 0, graphdef=graphdef, ucfg=ucfg)

        fn = jax.jit(update, in_shardings=(p_sh, o_sh, a_sh), out_shardings=(p_sh, o_sh, replicated),
                     donate_argnums=(0, 1))
        with jax.set_mesh(mesh):
            return fn.lower(params, opt_state, arrays)
    # Inference runs on bf16 weights.
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    b_sh = NamedSharding(mesh, logical_to_mesh_spec(("batch", "length"), shape=(batch, length), mesh=mesh))
    if workload == "prefill":
        def prefill(p, t):
            model = nnx.merge(graphdef, p)
            return model.logits(model.backbone(t).hidden[:, -1])

        with jax.set_mesh(mesh):
            return jax.jit(prefill, in_shardings=(p_sh, b_sh), out_shardings=replicated).lower(params, tokens)
    from m1jax.cache import HybridCache
    cache = jax.eval_shape(lambda: HybridCache.init(cfg, batch, length, kv_dtype="bfloat16"))
    cache_sh = jax.tree_util.tree_map(lambda x: _cache_sharding(x, mesh, batch), cache)
    step_tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    t_sh = NamedSharding(mesh, logical_to_mesh_spec(("batch", None), shape=(batch, 1), mesh=mesh))

    def decode_step(p, t, c):
        model = nnx.merge(graphdef, p)
        out = model.backbone(t, cache=c)
        return model.logits(out.hidden[:, -1]), out.cache

    fn = jax.jit(decode_step, in_shardings=(p_sh, t_sh, cache_sh), out_shardings=(replicated, cache_sh),
                 donate_argnums=2)
    with jax.set_mesh(mesh):
        return fn.lower(params, step_tokens, cache)


def _cache_sharding(leaf, mesh, batch: int):
    """Cache leaves: [R, B, ...] layer entries split over the batch axes (and KV heads over tensor); scalars
    replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding.rules import logical_to_mesh_spec
    if leaf.ndim == 5 and leaf.shape[1] == batch:
        names = (None, "batch", None, "kv", None) if leaf.dtype != jax.numpy.float32 else (None, "batch", "heads",
                                                                                            None, None)
        return NamedSharding(mesh, logical_to_mesh_spec(names, shape=leaf.shape, mesh=mesh))
    if leaf.ndim == 1 and leaf.shape[0] == batch:
        return NamedSharding(mesh, logical_to_mesh_spec(("batch",), shape=leaf.shape, mesh=mesh))
    return NamedSharding(mesh, P())


def compile_workloads(cfg, mesh, shapes: dict[str, dict], *, fsdp: bool = False, log=print) -> tuple[dict, list[str]]:
    """Compile each workload (``shapes``: workload -> ``lower_workload`` keyword arguments) for ``mesh``'s devices.

    Returns (report, failures): the report has the mesh, the model config and per workload ``compile_report``'s
    numbers (or the compiler's out-of-memory message); failures name each workload that does not fit the chip.
    Other compiler errors propagate.
    """
    import time

    device = mesh.devices.flat[0]
    report = {"devices": int(mesh.devices.size), "device_kind": device.device_kind,
              "mesh": dict(zip(mesh.axis_names, map(int, mesh.axis_sizes))), "fsdp": fsdp, "model": cfg.to_dict(),
              "workloads": {}}
    failed = []
    for workload, shape in shapes.items():
        t0 = time.perf_counter()
        try:
            compiled = lower_workload(workload, cfg, mesh, fsdp=fsdp, **shape).compile()
        except Exception as e:  # noqa: BLE001 -- the compiler's refusal for memory is this workload's answer
            text = str(e)
            if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
                raise
            report["workloads"][workload] = {"shape": shape, "error": text[:4000]}
            failed.append(f"{workload} does not fit {device.device_kind}: the TPU compiler ran out of memory: "
                          f"{text.splitlines()[0][:300]}")
            log(failed[-1])
            continue
        entry = dict(compile_report(compiled, device), shape=shape, compile_seconds=round(time.perf_counter() - t0, 1))
        report["workloads"][workload] = entry
        log(summary_line(workload, entry))
        if entry.get("fits") is False:
            failed.append(f"{workload} does not fit {device.device_kind}: peak "
                          f"{format_bytes(entry['memory']['peak_bytes'])} per device > "
                          f"{format_bytes(entry['hbm_bytes'])} HBM")
    return report, failed


def summary_line(workload: str, entry: dict) -> str:
    m = entry["memory"]
    moved = ", ".join(f"{k} {format_bytes(v)}" for k, v in entry["collectives"]["bytes"].items() if v)
    return (f"{workload:9s} peak {format_bytes(m['peak_bytes'])} (args {format_bytes(m['argument_bytes'])}, "
            f"temps {format_bytes(m['temp_bytes'])}, out {format_bytes(m['output_bytes'])}, aliased "
            f"{format_bytes(m['alias_bytes'])})  {entry['xla_flops'] / 1e12:.3f} TFLOP (XLA's count: loop bodies "
            f"once)  collectives: {moved or 'none'}  [{entry['compile_seconds']}s]")
