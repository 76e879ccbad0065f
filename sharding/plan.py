"""Per-device memory of a sharding plan, on abstract shapes (no weights): ``python -m sharding.plan``.

Run it in a process that has as many (fake) devices as the mesh: ``XLA_FLAGS=--xla_force_host_platform_device_count=128
JAX_PLATFORMS=cpu python -m sharding.plan --mesh data=16,expert=8 --mode train ...``.

* parameters: exact, from ``state_shardings`` (each Param's shard shape x its dtype);
* optimizer state: AdamW m and v in fp32 (2 x the fp32 shard) -- params are the fp32 masters;
* activations/temporaries: ``jax.jit(step).lower(ShapeDtypeStructs).compile().memory_analysis()`` of a train step
  (loss + grads, remat per period) or of a prefill forward, compiled at ``--layers`` (reduced depth; the scanned
  periods make the temporaries grow linearly with depth, so two depths give the slope).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1
from m1jax.train import TrainConfig, abstract_train_state, make_train_step, train_state_shardings
from pallas_kernels.gmm import backends as gmm_backends
from sharding.mesh import make_mesh
from sharding.rules import batch_sharding, state_shardings


def param_bytes_per_device(cfg: ModelConfig, mesh, fsdp: bool, dtype=None) -> int:
    """Largest per-device byte count of the parameters (dtype: override the stored dtype, e.g. bf16 for inference)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)
    shardings = state_shardings(params, mesh, fsdp=fsdp)
    total = 0
    for x, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * jnp.dtype(dtype or x.dtype).itemsize
    return total


def _grouped_matmul_group_loop(lhs, rhs, group_sizes, out_dtype, tiling=None):
    """``ragged_dot`` as a loop over groups (masked dense matmuls): the same values, but the live buffers are the
    ``[M, N]`` output and one ``[M, N]`` product, as with the GPU/TPU grouped-matmul kernels."""
    del tiling
    ends = jnp.cumsum(group_sizes)
    rows = jnp.arange(lhs.shape[0])

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def body(acc, group):
        w, start, end = group
        inside = (rows >= start) & (rows < end)
        return acc + jnp.dot(jnp.where(inside[:, None], lhs, 0), w, preferred_element_type=jnp.float32), None

    acc = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    acc, _ = jax.lax.scan(body, acc, (rhs, ends - group_sizes, ends))
    return acc.astype(out_dtype)


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
                    tc: TrainConfig | None = None) -> dict:
    """memory_analysis() of the jitted train step or of the prefill forward on abstract inputs.

    train: ``m1jax.train.make_train_step`` itself (fused chunked-vocab LM head + CE, grads, clipping, AdamW, the
    state donated), so arguments are params + AdamW moments and temporaries include the fp32 grads.
    prefill: the backbone's forward in bf16 weights, returning the last hidden state.
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
    with jax.set_mesh(mesh), (kernel_like_grouped_matmul() if cpu else contextlib.nullcontext()):
        compiled = step.lower(*args).compile()
    m = compiled.memory_analysis()
    return {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                             "alias_size_in_bytes", "generated_code_size_in_bytes")
            if hasattr(m, k)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mesh", required=True)
    ap.add_argument("--mode", choices=("train", "prefill"), default="train")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--layers", default="8,16", help="depths to compile (multiples of 8)")
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--capacity_factor", type=float, default=None,
                    help="expert-parallel MoE capacity factor (default: dropless, the worst-case buffer)")
    args = ap.parse_args()
    mesh = make_mesh(args.mesh)
    dtype = "bfloat16"
    full = ModelConfig.m1(compute_dtype=dtype, remat=args.mode == "train", moe_implementation="expert_parallel",
                         moe_capacity_factor=args.capacity_factor)
    report = dict(mesh=args.mesh, mode=args.mode, batch=args.batch, length=args.length, fsdp=bool(args.fsdp),
                  capacity_factor=args.capacity_factor,
                  param_bytes_fp32=param_bytes_per_device(full, mesh, bool(args.fsdp)),
                  param_bytes_bf16=param_bytes_per_device(full, mesh, bool(args.fsdp), jnp.bfloat16), compiled={})
    for layers in (int(x) for x in args.layers.split(",") if x):
        cfg = full.replace(num_hidden_layers=layers, layer_types=full.layer_types[:layers])
        report["compiled"][layers] = compiled_memory(cfg, mesh, batch=args.batch, length=args.length,
                                                     fsdp=bool(args.fsdp), mode=args.mode)
        print(json.dumps({layers: report["compiled"][layers]}), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
