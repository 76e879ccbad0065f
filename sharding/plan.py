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
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1
from sharding.mesh import make_mesh
from sharding.rules import batch_sharding, constrain, state_shardings


def param_bytes_per_device(cfg: ModelConfig, mesh, fsdp: bool, dtype=None) -> int:
    """Largest per-device byte count of the parameters (dtype: override the stored dtype, e.g. bf16 for inference)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)
    shardings = state_shardings(params, mesh, fsdp=fsdp)
    total = 0
    for x, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * jnp.dtype(dtype or x.dtype).itemsize
    return total


def compiled_memory(cfg: ModelConfig, mesh, *, batch: int, length: int, fsdp: bool, mode: str) -> dict:
    """memory_analysis() of the jitted train step (loss+grads) or prefill forward on abstract inputs."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)
    p_sh = state_shardings(params, mesh, fsdp=fsdp)
    if mode == "prefill":
        params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    b_sh = batch_sharding(mesh, (batch, length))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def loss(p, t):
        out = nnx.merge(graphdef, p)(t)
        logits = constrain(out.logits, ("batch", "length", "vocab"))  # else GSPMD may replicate [B, T, V]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], axis=-1)) + 1e-3 * out.aux_loss

    def prefill(p, t):
        return nnx.merge(graphdef, p).backbone(t).hidden[:, -1]

    if mode == "train":
        fn, out_sh = jax.value_and_grad(loss), (NamedSharding(mesh, P()), p_sh)
    else:
        fn, out_sh = prefill, NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn, in_shardings=(p_sh, b_sh), out_shardings=out_sh).lower(params, tokens).compile()
    m = compiled.memory_analysis()
    return {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                             "generated_code_size_in_bytes") if hasattr(m, k)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mesh", required=True)
    ap.add_argument("--mode", choices=("train", "prefill"), default="train")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--layers", default="8,16", help="depths to compile (multiples of 8)")
    ap.add_argument("--fsdp", type=int, default=1)
    args = ap.parse_args()
    mesh = make_mesh(args.mesh)
    dtype = "bfloat16"
    full = ModelConfig.m1(compute_dtype=dtype, remat=args.mode == "train", moe_implementation="expert_parallel")
    report = dict(mesh=args.mesh, mode=args.mode, batch=args.batch, length=args.length, fsdp=bool(args.fsdp),
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
