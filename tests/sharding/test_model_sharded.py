"""The full model's loss and gradients under jax.jit with shardings equal the single-device computation."""
import jax
import numpy as np
import pytest

from sharding.mesh import make_mesh
from tests import tiny_model as H

MESHES = ["data=8", "expert=8", "sequence=8", "data=2,expert=2,sequence=2", "data=2,sequence=4"]


def _local_shapes_of_shard_maps_calling(jaxpr, name) -> list[list[tuple]]:
    """For each shard_map (at any depth) whose body calls a jitted function named ``name``: its body's input shapes
    (one device's blocks)."""
    return [[tuple(v.aval.shape) for v in eqn.params["jaxpr"].invars] for eqn in H.equations(jaxpr)
            if eqn.primitive.name == "shard_map"
            and any(inner.params.get("name") == name for inner in H.equations(eqn.params["jaxpr"]))]


@pytest.fixture(scope="module")
def reference():
    cfg = H.tiny_config()
    _, params = H.init(cfg)
    tokens, segments = H.batch(cfg)
    return cfg, params, tokens, segments, H.loss_and_grads(cfg, params, tokens, segments)


@pytest.mark.parametrize("spec,fsdp", [(m, False) for m in MESHES] + [("data=2,expert=2,sequence=2", True)])
def test_gspmd_matches_single_device(reference, spec, fsdp):
    cfg, params, tokens, segments, (loss_ref, grads_ref) = reference
    loss, grads = H.loss_and_grads(cfg, params, tokens, segments, mesh=make_mesh(spec), fsdp=fsdp)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    H.assert_close_tree(grads, grads_ref)


@pytest.mark.parametrize("spec", ["data=2,expert=2,sequence=2"])
def test_expert_parallel_model_matches_single_device(reference, spec):
    """moe_implementation="expert_parallel" (shard_map + all-to-all) == the single-device sorted MoE."""
    cfg, params, tokens, segments, (loss_ref, grads_ref) = reference
    cfg_ep = cfg.replace(moe_implementation="expert_parallel")
    loss, grads = H.loss_and_grads(cfg_ep, params, tokens, segments, mesh=make_mesh(spec))
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    H.assert_close_tree(grads, grads_ref)


def test_sequence_mesh_takes_the_sequence_parallel_paths(reference):
    """Under a mesh with sequence > 1 both attention kinds run in shard_map with all-gathers over sequence."""
    cfg, params, tokens, segments, _ = reference
    graphdef, _ = H.init(cfg)
    with jax.set_mesh(make_mesh("data=2,sequence=4")):
        text = str(jax.make_jaxpr(lambda p: H.lm_loss(p, graphdef, tokens, segments))(params))
    assert text.count("shard_map") >= 2 and "all_gather" in text and "sequence" in text


@pytest.mark.parametrize("implementation", [None, "pallas_triton"])
def test_lightning_kernel_runs_per_device_on_batch_and_heads(reference, implementation):
    """Without sequence sharding the lightning kernel runs in shard_map over batch and heads (a pallas_call has no
    partitioning rule); loss and gradients equal one device, also with the Pallas kernel (interpret mode on CPU)."""
    cfg, params, tokens, segments, (loss_ref, grads_ref) = reference
    cfg = cfg.replace(lightning_implementation=implementation)
    mesh = make_mesh("data=2,expert=2,tensor=2")
    graphdef, _ = H.init(cfg)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda p: H.lm_loss(p, graphdef, tokens, segments))(params).jaxpr
    # the lightning implementation's jitted function (pallas_kernels.lightning.api._implementation) runs inside a
    # shard_map, on a quarter of the batch (data x expert) and half of the heads (tensor)
    local = _local_shapes_of_shard_maps_calling(jaxpr, "kernel" if implementation else "_chunked")
    b, t = tokens.shape
    assert local and all(shapes[0] == (b // 4, t, cfg.num_attention_heads // 2, cfg.head_dim) for shapes in local)
    loss, grads = H.loss_and_grads(cfg, params, tokens, segments, mesh=mesh)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    H.assert_close_tree(grads, grads_ref)
