"""RMSNorm: the Pallas-Triton kernels (interpret mode) and the xla path against a float64 numpy definition (values)
and against autodiff of the plain-JAX formula (gradients: the kernels' backward is written by hand)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.compat import TRITON_CALL_TARGET
from pallas_kernels.norms import Tiling, reference, rms_norm

# Small tiles: a few rows already make several row tiles, a masked row tail and backward programs that walk more
# than one tile (interpret mode is slow).
SMALL = Tiling(tile_elements=128, backward_programs=3)
EPS = 1e-6

# (name, x shape, norm dtype, out dtype, gated, x dtype): D is never a power of two.
CASES = [
    ("fp32", (13, 48), jnp.float32, jnp.float32, False, jnp.float32),
    ("bf16_decoder", (2, 7, 96), jnp.bfloat16, jnp.bfloat16, False, jnp.bfloat16),
    ("gated_lightning", (2, 9, 80), jnp.float32, jnp.bfloat16, True, jnp.bfloat16),
    ("gated_fp32", (11, 40), jnp.float32, jnp.float32, True, jnp.float32),
]


def _inputs(case, seed=0):
    _, shape, _, _, gated, x_dtype = case
    kx, kw, kg, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = (3.0 * jax.random.normal(kx, shape, jnp.float32)).astype(x_dtype)
    weight = 1.0 + 0.3 * jax.random.normal(kw, shape[-1:], jnp.float32)  # fp32 masters
    gate = 2.0 * jax.random.normal(kg, shape, jnp.float32) if gated else None
    dout = jax.random.normal(kd, shape, jnp.float32)
    return x, weight, gate, dout


def _float64_definition(x, weight, gate):
    """The norm in float64 numpy, without the intermediate roundings."""
    x, w = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w
    if gate is not None:
        y = y / (1.0 + np.exp(-np.asarray(gate, np.float64)))
    return y


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x))
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def _call(impl, case):
    _, _, norm_dtype, out_dtype, _, _ = case
    return functools.partial(rms_norm, eps=EPS, norm_dtype=norm_dtype, out_dtype=out_dtype, implementation=impl,
                             tiling=SMALL)


def _tolerance(case):
    """bf16 rounds the output (8 bits): its error against float64 is ~2^-9 relative; fp32 ~1e-7."""
    return 1e-5 if case[3] == jnp.float32 and case[2] == jnp.float32 else 1e-2


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["pallas_triton", "xla"])
def test_values_match_float64_definition(impl, case):
    x, weight, gate, _ = _inputs(case)
    out = jax.jit(lambda x, w, g: _call(impl, case)(x, w, gate=g))(x, weight, gate)
    assert out.dtype == case[3] and out.shape == x.shape
    assert _rel_err(out, _float64_definition(x, weight, gate)) < _tolerance(case)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_reference_roundings(case):
    """Same rounding points as reference.rms_norm: bitwise equal but for a few elements a step of the output dtype
    apart (the sums' order and the sigmoid's formula differ), where a missed rounding of a bf16 intermediate changes
    a large share of them."""
    x, weight, gate, _ = _inputs(case, seed=1)
    out = np.asarray(_call("pallas_triton", case)(x, weight, gate=gate), np.float64)
    ref = np.asarray(reference.rms_norm(x, weight, gate, eps=EPS, norm_dtype=case[2], out_dtype=case[3]), np.float64)
    ulp = float(jnp.finfo(case[3]).eps)
    np.testing.assert_allclose(out, ref, rtol=(4 if case[3] == jnp.float32 else 1) * ulp, atol=ulp)
    if case[3] == jnp.bfloat16:  # (fp32 results differ in the last bit often, from the order of the sums)
        assert np.mean(out != ref) < 0.03


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradients_match_autodiff_of_the_formula(case):
    x, weight, gate, dout = _inputs(case, seed=2)
    dout = dout.astype(case[3])
    args = (x, weight) + ((gate,) if gate is not None else ())

    def kernel(x, w, *g):
        return _call("pallas_triton", case)(x, w, gate=g[0] if g else None)

    def formula(x, w, *g):  # autodiff in float32 throughout, the formula without roundings
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS) * w
        return y * jax.nn.sigmoid(g[0]) if g else y

    out, vjp = jax.vjp(jax.jit(kernel), *args)
    _, ref_vjp = jax.vjp(formula, *(a.astype(jnp.float32) for a in args))
    grads, ref_grads = vjp(dout), ref_vjp(dout.astype(jnp.float32))
    for name, g, r, a in zip(("dx", "dweight", "dgate"), grads, ref_grads, args):
        assert g.dtype == a.dtype, name
        assert _rel_err(g, r) < _tolerance(case), name


def test_gradient_of_a_wrong_formula_is_detected():
    """The gradient test's tolerance separates a correct backward from one that drops the statistics' term."""
    case = CASES[0]
    x, weight, _, dout = _inputs(case, seed=3)
    _, vjp = jax.vjp(lambda x: _call("pallas_triton", case)(x, weight), x)
    rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS)
    wrong = dout * weight * rstd  # d/dx of x * rstd with rstd held constant
    assert _rel_err(vjp(dout)[0], wrong) > 10 * _tolerance(case)


@pytest.mark.parametrize("bad,match", [
    (dict(weight=jnp.ones((5,))), r"weight must be \[D\]"),
    (dict(gate=jnp.ones((3, 4))), "gate must have x's shape"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(x=jnp.ones((4, 8), jnp.int32)), "x must be a floating-point array"),
    (dict(implementation="cuda_magic"), "unknown rms_norm implementation"),
])
def test_bad_input_is_named(bad, match):
    kwargs = dict(x=jnp.ones((4, 8)), weight=jnp.ones((8,)), eps=EPS) | bad
    with pytest.raises((ValueError, TypeError), match=match):
        rms_norm(kwargs.pop("x"), kwargs.pop("weight"), **kwargs)


def _export_for_cuda(fn, *args):
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=dev)):
        return export.export(jax.jit(fn), platforms=("cuda",),
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)])(*args)


@pytest.mark.parametrize("gated", [False, True])
def test_kernel_lowers_one_pass_each_way_for_cuda(gated):
    """pallas_triton exported for cuda (whatever the host): one Triton kernel forward and one backward, the weight
    gradient in the masters' dtype; implementation=None lowers XLA's form (the measured default), no kernel."""
    x = jax.ShapeDtypeStruct((1000, 1536), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((1536,), jnp.float32)
    g = jax.ShapeDtypeStruct((1000, 1536), jnp.float32) if gated else None

    def loss(x, w, g, implementation="pallas_triton"):
        out = rms_norm(x, w, eps=EPS, gate=g, norm_dtype=jnp.float32 if gated else None, out_dtype=jnp.bfloat16,
                       implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    argnums = (0, 1, 2) if gated else (0, 1)
    exported = _export_for_cuda(jax.grad(loss, argnums=argnums), x, w, g)
    text = exported.mlir_module()
    assert len(re.findall(re.escape(TRITON_CALL_TARGET), text)) == 2
    assert "rms_norm_fwd_triton" in text and "rms_norm_bwd_triton" in text
    assert [a.dtype for a in exported.out_avals] == [jnp.bfloat16, jnp.float32] + ([jnp.float32] if gated else [])
    default = _export_for_cuda(jax.grad(functools.partial(loss, implementation=None), argnums=argnums), x, w, g)
    assert TRITON_CALL_TARGET not in default.mlir_module()


def _norm_values_and_grads(x, weight, gate, feature_axis):
    from sharding.kernel_parallel import norm_rows_parallel

    def norm(x, weight, gate, implementation="pallas_triton"):
        return rms_norm(x, weight, eps=EPS, gate=gate, norm_dtype=jnp.float32, implementation=implementation,
                        tiling=SMALL)

    fn = lambda x, w, g: norm_rows_parallel(norm, x, w, g, feature_axis=feature_axis)  # noqa: E731
    loss = lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
    return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(x, weight, gate)


@pytest.mark.parametrize("mesh_axes,feature_axis,per_device", [("data=2,sequence=2,tensor=2", "embed", True),
                                                               ("data=4,tensor=2", "heads", False)])
def test_rows_parallel_equals_unsharded(mesh_axes, feature_axis, per_device):
    """Under a mesh (8 CPU devices) the kernel runs per device on its rows; the weight's gradient is summed over
    them. Where the mesh splits D (heads over tensor) the XLA form runs instead. Both equal the plain call."""
    from sharding.mesh import make_mesh
    from tests.tiny_model import assert_close_tree
    x, weight, gate, _ = _inputs(("", (4, 6, 40), jnp.float32, jnp.float32, True, jnp.float32), seed=4)
    want = _norm_values_and_grads(x, weight, gate, feature_axis)
    with jax.set_mesh(make_mesh(mesh_axes)):
        got = _norm_values_and_grads(x, weight, gate, feature_axis)
        program = str(jax.make_jaxpr(functools.partial(_norm_values_and_grads, feature_axis=feature_axis))(
            x, weight, gate))
    assert ("shard_map" in program) == per_device
    assert ("rms_norm_fwd_triton" in program) == per_device
    assert_close_tree(got, want, rtol=1e-5)


@pytest.mark.parametrize("mesh_axes", [None, "data=2,sequence=2,tensor=2"])
def test_model_with_the_kernel_equals_the_model_with_xla(mesh_axes):
    """The tiny M1-pattern model (decoder norms, the lightning layers' gated output norm, the final norm) with
    norm_implementation="pallas_triton" (interpret mode) gives the loss and gradients of the xla norms, unsharded and
    sharded (where the tensor axis splits the lightning heads, that norm takes the XLA form)."""
    from sharding.mesh import make_mesh
    from tests.tiny_model import assert_close_tree, batch, init, loss_and_grads, tiny_config
    mesh = make_mesh(mesh_axes) if mesh_axes else None
    results = []
    for impl in ("xla", "pallas_triton"):
        cfg = tiny_config(norm_implementation=impl)
        _, params = init(cfg)
        tokens, segments = batch(cfg)
        results.append(loss_and_grads(cfg, params, tokens, segments, mesh=mesh))
    (loss_x, grads_x), (loss_k, grads_k) = results
    np.testing.assert_allclose(float(loss_k), float(loss_x), rtol=1e-6)
    assert_close_tree(grads_k, grads_x, rtol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas_triton"])
@pytest.mark.parametrize("gated", [False, True])
def test_backward_keeps_only_the_inputs(impl, gated):
    """What the VJP holds between forward and backward is x, the weight and the gate: no fp32 copies of [N, D]
    intermediates (autodiff of the formula holds 20 bytes an element where the inputs are 6)."""
    x = jnp.ones((64, 48), jnp.bfloat16)
    weight = jnp.ones((48,), jnp.float32)
    gate = jnp.ones((64, 48), jnp.float32) if gated else None
    f = functools.partial(rms_norm, eps=EPS, norm_dtype=jnp.float32 if gated else None, out_dtype=jnp.bfloat16,
                          implementation=impl, tiling=SMALL)
    _, vjp = jax.vjp(lambda x, w, *g: f(x, w, gate=g[0] if g else None), x, weight, *([gate] if gated else []))
    held = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp))
    inputs = sum(a.size * a.dtype.itemsize for a in (x, weight, gate) if a is not None)
    assert held <= inputs + 64, (held, inputs)
    _, plain_vjp = jax.vjp(lambda x, w, *g: reference.rms_norm(
        x, w, g[0] if g else None, eps=EPS, norm_dtype=jnp.float32 if gated else x.dtype, out_dtype=jnp.bfloat16),
        x, weight, *([gate] if gated else []))
    assert sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(plain_vjp)) > 2 * inputs  # the check bites
