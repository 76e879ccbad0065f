"""Under FSDP the expert weights' gradients leave the expert-parallel shard_map reduce-scattered, not all-reduced:
the FSDP train step of a small M1-pattern model compiled for a v5p slice (from this CPU host), collective bytes per
device counted in the compiled HLO against a hand count of the expert weights' bytes."""
import pytest

from m1jax import aot
from m1jax.config import ModelConfig
from sharding.mesh import make_mesh

# Two 8-layer periods (the scan runs twice); D and F multiples of 128 so the TPU grouped-matmul tiles fit.
LAYERS, D, F, E = 16, 256, 384, 4
MESH = {"data": 2, "expert": 2, "sequence": 2}


def _train_collectives():
    cfg = ModelConfig.tiny(num_hidden_layers=LAYERS, hidden_size=D, intermediate_size=F, num_local_experts=E,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, rotary_dim=32, vocab_size=512,
                           compute_dtype="bfloat16", remat=True, remat_granularity="layer",
                           moe_implementation="expert_parallel", moe_capacity_factor=1.25)
    mesh = make_mesh(",".join(f"{k}={v}" for k, v in MESH.items()), devices=aot.topology_devices("v5p:2x2x2"))
    compiled = aot.lower_workload("train", cfg, mesh, batch=8, length=256, fsdp=True).compile()
    return aot.collective_bytes(compiled.as_text())["bytes"]


def test_expert_weight_gradients_are_reduce_scattered():
    """Per device, each layer's three expert weights (w1, w3 [E, D, F], w2 [E, F, D], bf16 in the backward) hold
    E / expert local experts, split over data x sequence by FSDP. Their gradients must be reduce-scattered to that
    shard (at least the shard's bytes of reduce-scatter per layer) and not all-reduced whole: the total all-reduce
    bytes stay below the local experts' full gradient bytes (which the all-reduce moved before)."""
    local_full = LAYERS * 3 * (E // MESH["expert"]) * D * F * 2            # bf16 bytes of the local experts' grads
    shard = local_full // (MESH["data"] * MESH["sequence"])                  # their FSDP shard
    moved = _train_collectives()
    print(f"expert grads: full {local_full} B, shard {shard} B; collectives {moved}")
    assert moved["reduce-scatter"] >= shard, moved
    assert moved["all-reduce"] < local_full, moved
