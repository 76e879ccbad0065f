"""sharding.mesh and sharding.rules on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sharding.mesh import MESH_AXES, make_mesh, parse_mesh_spec, resolve_mesh_shape
from sharding.rules import constrain, logical_to_mesh_spec, shard_state, state_shardings


def test_parse_and_resolve():
    assert parse_mesh_spec("data=2, expert=2,sequence=2") == {"data": 2, "expert": 2, "sequence": 2}
    assert resolve_mesh_shape("data=2,expert=2,sequence=2", 8) == (2, 2, 2, 1)
    assert resolve_mesh_shape("expert=2,data=-1", 8) == (4, 2, 1, 1)
    assert resolve_mesh_shape(None, 8) == (8, 1, 1, 1)
    assert resolve_mesh_shape({"sequence": 8}, 8) == (1, 1, 8, 1)
    for bad in ("data=2,data=2", "pipeline=2", "data=x", "data", "data=0", "data=-1,expert=-1"):
        with pytest.raises(ValueError):
            parse_mesh_spec(bad) if "-1,expert" not in bad else resolve_mesh_shape(bad, 8)
    with pytest.raises(ValueError, match="needs 4 devices but 8"):
        resolve_mesh_shape("data=2,expert=2", 8)


def test_make_mesh_axes():
    mesh = make_mesh("data=2,expert=2,sequence=2")
    assert mesh.axis_names == MESH_AXES and tuple(mesh.axis_sizes) == (2, 2, 2, 1)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert tuple(make_mesh("sequence=2", devices=jax.devices()[:2]).axis_sizes) == (1, 1, 2, 1)


def test_logical_to_mesh_spec():
    names = ("layers", "experts", "embed", "mlp")
    assert logical_to_mesh_spec(names) == P(None, "expert", None, "tensor")
    assert logical_to_mesh_spec(names, fsdp=True) == P(None, "expert", ("data", "sequence"), "tensor")
    assert logical_to_mesh_spec(("embed", "heads"), fsdp=True) == P(("data", "expert", "sequence"), "tensor")
    mesh = make_mesh("data=2,expert=2,sequence=2")
    # tensor has size 1 and is dropped; a dim that "expert" does not divide stays replicated.
    assert logical_to_mesh_spec(names, fsdp=True, shape=(1, 4, 8, 8), mesh=mesh) == P(None, "expert", ("data", "sequence"), None)
    assert logical_to_mesh_spec(names, fsdp=True, shape=(1, 4, 2, 8), mesh=mesh) == P(None, "expert", "data", None)
    assert logical_to_mesh_spec(names, shape=(1, 3, 8, 8), mesh=mesh) == P(None, None, None, None)
    assert logical_to_mesh_spec(("batch", "length"), shape=(2, 8), mesh=mesh) == P("data", "sequence")
    assert logical_to_mesh_spec(("batch", "length"), shape=(4, 8), mesh=mesh) == P(("data", "expert"), "sequence")


class _Tiny(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((4, 8, 6)), out_sharding=("experts", "embed", "mlp"), eager_sharding=False)
        self.b = nnx.Param(jnp.ones((6,)), out_sharding=("mlp",), eager_sharding=False)


def test_state_shardings_params_and_optimizer():
    import optax
    mesh = make_mesh("data=2,expert=2,sequence=2")
    model = _Tiny()
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    shardings = state_shardings(nnx.state(opt), mesh, fsdp=True)
    moments = shardings["opt_state"][0]
    want = P("expert", ("data", "sequence"), None)
    assert moments["mu"]["w"].get_value().spec == want == moments["nu"]["w"].get_value().spec
    assert moments["count"].get_value().spec == P()
    placed = shard_state(nnx.state(model, nnx.Param), mesh, fsdp=True)
    assert placed["w"].get_value().sharding.spec == want


def test_constrain():
    x = jnp.arange(32.0).reshape(4, 8)
    assert constrain(x, ("batch", "length")) is x  # no mesh: no-op
    mesh = make_mesh("data=2,expert=2,sequence=2")
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "length")))(x)
    assert y.sharding.spec == P(("data", "expert"), "sequence")
    assert jnp.array_equal(y, x * 2)
