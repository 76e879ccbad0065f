"""Per-device memory of a sharding plan, on abstract shapes (no weights); ``python -m experiments.plan`` runs it.

Run it in a process that has as many (fake) devices as the mesh: ``XLA_FLAGS=--xla_force_host_platform_device_count=128
JAX_PLATFORMS=cpu python -m experiments.plan --mesh data=16,expert=8 --mode train ...``.

* parameters: exact, from ``state_shardings`` (each Param's shard shape x its dtype);
* optimizer state: AdamW m and v in fp32 (2 x the fp32 shard) -- params are the fp32 masters;
* activations/temporaries: ``jax.jit(step).lower(ShapeDtypeStructs).compile().memory_analysis()`` of a train step
  (loss + grads, remat per ``--remat_granularity``) or of a prefill forward, compiled at ``--layers`` (reduced depth;
  the scanned periods make the temporaries grow linearly with depth, so two depths give the slope, and the report
  extrapolates ``peak_bytes`` to the full depth);
* on XLA:CPU: compiled with ``CPU_AS_ACCELERATOR`` and a kernel-sized grouped-matmul stand-in, so the buffers are
  those of the GPU/TPU kernels, not of CPU expansions; ``--dump DIR`` prints what is live at the peak.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import glob
import json
import math
import os
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1
from m1jax.train import TrainConfig, abstract_train_state, make_train_step, train_state_shardings
from pallas_kernels.gmm import backends as gmm_backends
from sharding.rules import batch_sharding, fsdp_params, state_shardings

# Compiling on XLA:CPU for a GPU/TPU plan, two CPU habits are switched off: float-normalization-bf16 rewrites every
# bf16 dot and collective to f32 after partitioning (f32 copies of bf16 operands, f32 all-gathers of bf16 weights);
# the default (concurrency-optimised) scheduler starts independent work early, e.g. every zero-initialised scatter
# buffer of a whole backward pass at once (M1 train step, 8 layers, capacity 1.25: 130 GB -> 85 GB of temporaries).
CPU_AS_ACCELERATOR = {"xla_disable_hlo_passes": "float-normalization-bf16",
                      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def param_bytes_per_device(cfg: ModelConfig, mesh, fsdp: bool, dtype=None) -> int:
    """Largest per-device byte count of the parameters (dtype: override the stored dtype, e.g. bf16 for inference)."""
    _, params = nnx.split(nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)
    shardings = state_shardings(params, mesh, fsdp=fsdp)
    total = 0
    for x, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * jnp.dtype(dtype or x.dtype).itemsize
    return total


def _group_loop(lhs, rhs, group_sizes, out_dtype):
    """lhs [M, K] x rhs [G, K, N] -> [M, N]: a scan over groups, each writing its rows (one [M, N] product live)."""
    ends = jnp.cumsum(group_sizes)
    rows = jnp.arange(lhs.shape[0])

    def body(out, group):
        w, start, end = group
        inside = ((rows >= start) & (rows < end))[:, None]
        return jnp.where(inside, jnp.dot(lhs, w, preferred_element_type=jnp.float32).astype(out_dtype), out), None

    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype)
    return jax.lax.scan(body, out, (rhs, ends - group_sizes, ends))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_like_gmm(lhs, rhs, group_sizes, out_dtype):
    return _group_loop(lhs, rhs, group_sizes, out_dtype)


def _kernel_like_gmm_fwd(lhs, rhs, group_sizes, out_dtype):
    return _group_loop(lhs, rhs, group_sizes, out_dtype), (lhs, rhs, group_sizes)


def _kernel_like_gmm_bwd(out_dtype, residuals, g):
    """As the kernels' VJPs (megablox gmm/tgmm, the Triton dlhs/drhs): dlhs is a grouped matmul with the transposed
    weights, drhs one [K, N] product per group; nothing but the inputs is saved from the forward."""
    lhs, rhs, group_sizes = residuals
    dlhs = _group_loop(g, jnp.swapaxes(rhs, 1, 2), group_sizes, lhs.dtype)
    ends = jnp.cumsum(group_sizes)
    rows = jnp.arange(lhs.shape[0])

    def one_group(bounds):
        start, end = bounds
        inside = ((rows >= start) & (rows < end))[:, None]
        return jnp.dot(jnp.where(inside, lhs, 0).T, g, preferred_element_type=jnp.float32).astype(rhs.dtype)

    drhs = jax.lax.map(one_group, (ends - group_sizes, ends))
    return dlhs, drhs, None


_kernel_like_gmm.defvjp(_kernel_like_gmm_fwd, _kernel_like_gmm_bwd)


def _grouped_matmul_group_loop(lhs, rhs, group_sizes, out_dtype, tiling=None):
    """``ragged_dot`` with the grouped-matmul kernels' memory: the same values (rows past the groups give zeros), but
    the live buffers are the ``[M, N]`` output and one ``[M, N]`` product, forward and backward (custom VJP)."""
    del tiling
    return _kernel_like_gmm(lhs, rhs, group_sizes, jnp.dtype(out_dtype))


@contextlib.contextmanager
def kernel_like_grouped_matmul():
    """While compiling on XLA:CPU: the ``ragged_dot`` grouped-matmul backend replaced by the group loop above.

    XLA:CPU expands ``jax.lax.ragged_dot`` into a dense ``[G, M, N]`` product (G = local experts): at M1's shapes
    that alone is ~340 GB of temporaries per device that no GPU/TPU kernel allocates (pallas_triton, tokamax and
    megablox write ``[M, N]``). The plan is for those backends, so it compiles with kernel-sized buffers.
    """
    original = gmm_backends.ragged_dot
    gmm_backends.ragged_dot = _grouped_matmul_group_loop
    try:
        yield
    finally:
        gmm_backends.ragged_dot = original


def compiled_memory(cfg: ModelConfig, mesh, *, batch: int, length: int, fsdp: bool, mode: str,
                    tc: TrainConfig | None = None, dump_to: str | None = None) -> dict:
    """memory_analysis() of the jitted train step or of the prefill forward on abstract inputs.

    train: ``m1jax.train.make_train_step`` itself (fused chunked-vocab LM head + CE, grads, clipping, AdamW, the
    state donated), so arguments are params + AdamW moments and temporaries include the fp32 grads.
    prefill: the backbone's forward in bf16 weights, returning the last hidden state.
    Traced under ``sharding.rules.fsdp_params(fsdp)`` (bf16 weight gathers). On XLA:CPU, compiled with the options
    in ``CPU_AS_ACCELERATOR`` and the grouped-matmul stand-in. Returns memory_analysis() fields and ``peak_bytes``;
    ``dump_to``: also write XLA's dumps there (``peak_breakdown`` reads them).
    """
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    b_sh = batch_sharding(mesh, (batch, length))
    if mode == "train":
        tc = tc or TrainConfig()
        graphdef, state = abstract_train_state(cfg, tc)
        s_sh = train_state_shardings(state, mesh, fsdp)
        batch_arrays = {"inputs": tokens, "targets": tokens, "positions": tokens,
                        "loss_mask": jax.ShapeDtypeStruct((batch, length), jnp.float32)}
        step = make_train_step(graphdef, tc, s_sh, {k: b_sh for k in batch_arrays})
        args = (state, batch_arrays)
    else:
        graphdef, params = nnx.split(nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)
        p_sh = state_shardings(params, mesh, fsdp=fsdp)
        params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)

        def prefill(p, t):
            return nnx.merge(graphdef, p).backbone(t).hidden[:, -1]

        step = jax.jit(prefill, in_shardings=(p_sh, b_sh), out_shardings=NamedSharding(mesh, P()))
        args = (params, tokens)
    cpu = mesh.devices.flat[0].platform == "cpu"
    options = dict(CPU_AS_ACCELERATOR) if cpu else {}
    if dump_to:
        options.update(xla_dump_to=dump_to, xla_dump_hlo_as_text=True)
    with jax.set_mesh(mesh), fsdp_params(fsdp), (kernel_like_grouped_matmul() if cpu else contextlib.nullcontext()):
        compiled = step.lower(*args).compile(compiler_options=options)
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                            "alias_size_in_bytes", "generated_code_size_in_bytes")
           if hasattr(m, k)}
    # What the device holds at the peak: inputs, outputs not written over donated inputs, and the temporaries.
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                         + out["temp_size_in_bytes"])
    return out


def peak_breakdown(dump_to: str, n: int = 25) -> list[str]:
    """What is live at the compiled module's memory peak, from XLA's dumps in ``dump_to`` (``--dump``): the buffers of
    the peak in the live-range report, grouped by (shape, producing op, jax op name), largest first, as lines
    ``GB count shape op op_name``."""
    def newest(pattern):
        found = sorted(glob.glob(os.path.join(dump_to, pattern)), key=os.path.getmtime)
        return found[-1] if found else None

    hlo, live = newest("*after_optimizations.txt"), newest("*after_optimizations-live-range.txt")
    if hlo is None or live is None:
        return []
    producers = {}
    with open(hlo) as f:
        for line in f:
            m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+\[[^\]]*\])\S* ([\w-]+)\(.*", line)
            if m:
                op_name = re.search(r'op_name="([^"]*)"', line)
                producers[m.group(1)] = (m.group(2), m.group(3), op_name.group(1) if op_name else "")
    with open(live) as f:
        text = f.read()
    peak = text[text.index("(peak):"):text.index("Stack trace breakdown")] if "(peak):" in text else ""
    total, count = collections.Counter(), collections.Counter()
    for name, size in re.findall(r"^\s*(\S+?)(?:\{[^}]*\})?: (\d+) bytes", peak, re.MULTILINE):
        key = producers.get(name, ("?", "?", name))
        total[key] += int(size)
        count[key] += 1
    return [f"{b / 1e9:7.2f} GB {count[k]:4d}x {k[0]} {k[1]} {k[2][-120:]}" for k, b in total.most_common(n)]


def plan_report(mesh, *, mesh_spec: str, mode: str, batch: int, length: int, depths, fsdp: bool,
                capacity_factor: float | None = None, grad_accum: int = 1, remat_granularity: str = "period",
                dump: str | None = None, log=print) -> dict:
    """M1's per-device memory on ``mesh``: parameter bytes, the compiled step at each of ``depths`` (layers, multiples
    of 8), and the peak extrapolated to 80 layers (the scanned periods make it linear in depth)."""
    full = ModelConfig.m1(compute_dtype="bfloat16", remat=mode == "train", moe_implementation="expert_parallel",
                         moe_capacity_factor=capacity_factor, remat_granularity=remat_granularity)
    report = dict(mesh=mesh_spec, mode=mode, batch=batch, length=length, fsdp=fsdp, capacity_factor=capacity_factor,
                  remat_granularity=remat_granularity, grad_accum=grad_accum,
                  param_bytes_fp32=param_bytes_per_device(full, mesh, fsdp),
                  param_bytes_bf16=param_bytes_per_device(full, mesh, fsdp, jnp.bfloat16), compiled={})
    for layers in depths:
        cfg = full.replace(num_hidden_layers=layers, layer_types=full.layer_types[:layers])
        dump_to = None if dump is None else os.path.join(dump, f"{mode}_{layers}")
        report["compiled"][layers] = compiled_memory(cfg, mesh, batch=batch, length=length, fsdp=fsdp, mode=mode,
                                                     dump_to=dump_to, tc=TrainConfig(grad_accum=grad_accum))
        log(json.dumps({layers: report["compiled"][layers]}))
        if dump_to:
            log("\n".join(peak_breakdown(dump_to)))
    depths = sorted(report["compiled"])
    if len(depths) >= 2:  # scanned periods: linear in depth
        (l1, a), (l2, b) = ((d, report["compiled"][d]["peak_bytes"]) for d in depths[:2])
        report["peak_bytes_per_layer"] = (b - a) / (l2 - l1)
        report["peak_bytes_at_full_depth"] = a + report["peak_bytes_per_layer"] * (full.num_hidden_layers - l1)
    return report
