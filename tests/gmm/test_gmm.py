"""Grouped matmul: every implementation runnable on CPU against the per-group reference, values and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gmm import TileConfig, Tiling, api, backends, grouped_matmul, reference, schedule

# Small tiles so that a few dozen rows already cross tile and group boundaries (interpret mode is slow).
SMALL = Tiling.uniform(TileConfig(block_m=16, block_k=16, block_n=16, group_m=2))

# (name, M, K, N, group sizes): M is never a multiple of 16; K, N are not multiples of 16 in some cases.
CASES = [
    ("skewed_empty_tail", 75, 32, 48, (0, 40, 0, 3, 27)),   # empty first/middle groups, 5 rows in no group
    ("one_group_ragged_kn", 37, 24, 40, (0, 37, 0)),       # K, N not multiples of the tile, empty last group
]


def _inputs(case, dtype=jnp.float32, seed=0):
    _, m, k, n, sizes = case
    ka, kb, kc = jax.random.split(jax.random.PRNGKey(seed), 3)
    lhs = jax.random.normal(ka, (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(kb, (len(sizes), k, n), jnp.float32).astype(dtype)
    dout = jax.random.normal(kc, (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), dout


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x))
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def _impl_fn(impl):
    # Asked for explicitly, a Pallas kernel runs in Pallas interpret mode on CPU.
    return functools.partial(grouped_matmul, implementation=impl, tiling=SMALL if impl != "megablox" else None)


IMPLS = ["ragged_dot", "pallas_triton"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_values_and_gradients_match_reference(impl, case):
    lhs, rhs, sizes, dout = _inputs(case)
    fn = jax.jit(lambda x, w: _impl_fn(impl)(x, w, sizes))
    out, vjp = jax.vjp(fn, lhs, rhs)
    ref, ref_vjp = jax.vjp(lambda x, w: reference.grouped_matmul(x, w, sizes), lhs, rhs)
    assert _rel_err(out, ref) < 1e-5
    total = int(np.sum(case[4]))
    np.testing.assert_array_equal(np.asarray(out[total:]), 0)   # rows in no group are exactly zero
    (d_lhs, d_rhs), (r_lhs, r_rhs) = vjp(dout), ref_vjp(dout)
    assert _rel_err(d_lhs, r_lhs) < 1e-5
    assert _rel_err(d_rhs, r_rhs) < 1e-5


def test_pallas_triton_bf16_with_float32_output():
    lhs, rhs, sizes, dout = _inputs(CASES[0], jnp.bfloat16, seed=1)
    fn = lambda x, w: _impl_fn("pallas_triton")(x, w, sizes, preferred_element_type=jnp.float32)
    out, vjp = jax.vjp(fn, lhs, rhs)
    assert out.dtype == jnp.float32
    ref, ref_vjp = jax.vjp(lambda x, w: reference.grouped_matmul(x, w, sizes, jnp.float32), lhs, rhs)
    assert _rel_err(out, ref) < 1e-5  # bf16 products are exact in fp32, sums in fp32
    (d_lhs, d_rhs), (r_lhs, r_rhs) = vjp(dout.astype(jnp.float32)), ref_vjp(dout.astype(jnp.float32))
    assert d_lhs.dtype == jnp.bfloat16 and d_rhs.dtype == jnp.bfloat16
    assert _rel_err(d_lhs, r_lhs) < 1e-2 and _rel_err(d_rhs, r_rhs) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_weights_are_multiplied_in_the_rows_dtype(impl):
    """bf16 rows x fp32 master weights: the product of the weights rounded to bf16 (inside pallas_triton's custom
    VJP, before the call for the others) and d_rhs in fp32. pallas_triton writes d_rhs from its fp32 accumulator, so
    it holds the exact sums of the bf16 products to fp32 precision; the others round it to bf16 first (the cast's
    gradient)."""
    lhs, rhs, sizes, dout = _inputs(CASES[0], seed=2)
    lhs, dout = lhs.astype(jnp.bfloat16), dout.astype(jnp.bfloat16).astype(jnp.float32)
    fn = lambda x, w: _impl_fn(impl)(x, w, sizes, preferred_element_type=jnp.float32)
    out, vjp = jax.vjp(fn, lhs, rhs)
    rounded = rhs.astype(jnp.bfloat16).astype(jnp.float32)
    ref, ref_vjp = jax.vjp(lambda x, w: reference.grouped_matmul(x, w, sizes, jnp.float32),
                           lhs.astype(jnp.float32), rounded)
    assert out.dtype == jnp.float32
    assert _rel_err(out, ref) < 1e-5
    # The product with the unrounded weights is farther away than that by orders of magnitude.
    assert _rel_err(reference.grouped_matmul(lhs.astype(jnp.float32), rhs, sizes), ref) > 1e-4
    (d_lhs, d_rhs), (r_lhs, r_rhs) = vjp(dout), ref_vjp(dout)
    assert d_lhs.dtype == jnp.bfloat16 and d_rhs.dtype == jnp.float32
    assert _rel_err(d_lhs, r_lhs) < 1e-2
    assert _rel_err(d_rhs, r_rhs) < (1e-6 if impl == "pallas_triton" else 1e-2)


def test_megablox_in_interpret_mode():
    # megablox needs K and N divisible by its tiles; M and the group boundaries may be ragged.
    case = ("megablox", 40, 128, 128, (13, 0, 27))
    lhs, rhs, sizes, dout = _inputs(case)
    fn = lambda x, w: grouped_matmul(x, w, sizes, implementation="megablox", preferred_element_type=jnp.float32,
                                     tiling=Tiling.uniform(TileConfig(block_m=16, block_k=128, block_n=128)))
    out, vjp = jax.vjp(fn, lhs, rhs)
    ref, ref_vjp = jax.vjp(lambda x, w: reference.grouped_matmul(x, w, sizes), lhs, rhs)
    assert _rel_err(out, ref) < 1e-5
    (d_lhs, d_rhs), (r_lhs, r_rhs) = vjp(dout), ref_vjp(dout)
    assert _rel_err(d_lhs, r_lhs) < 1e-5 and _rel_err(d_rhs, r_rhs) < 1e-5


@pytest.mark.skipif(backends.tokamax_module() is None, reason="tokamax (optional) is not installed")
def test_tokamax_matches_reference():
    lhs, rhs, sizes, dout = _inputs(CASES[0])
    out, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, sizes, implementation="tokamax"), lhs, rhs)
    ref, ref_vjp = jax.vjp(lambda x, w: reference.grouped_matmul(x, w, sizes), lhs, rhs)
    assert _rel_err(out, ref) < 1e-5
    for got, want in zip(vjp(dout), ref_vjp(dout)):
        assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("block_m", [16, 64])
def test_schedule_writes_every_row_once(block_m):
    rng = np.random.default_rng(0)
    m = 203
    sizes = rng.multinomial(180, rng.dirichlet(np.full(9, 0.3)))  # skewed, usually with empty groups
    sizes[rng.integers(9)] = 0
    visits = np.asarray(schedule.row_tile_visits(jnp.asarray(sizes, jnp.int32), m, block_m))
    owner = np.full(m, -2)
    for group, tile, lo, hi in visits:
        rows = np.arange(tile * block_m, (tile + 1) * block_m)
        rows = rows[(rows >= lo) & (rows < hi)]
        if group < 0:
            assert rows.size == 0
            continue
        assert np.all(owner[rows] == -2), "a row is written twice"
        owner[rows] = group
    expected = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)] + [np.full(m - sizes.sum(), 9)])
    np.testing.assert_array_equal(owner, expected)


def test_bad_inputs_raise_clear_errors():
    lhs, rhs, sizes = jnp.zeros((8, 4)), jnp.zeros((2, 4, 6)), jnp.array([4, 4], jnp.int32)
    with pytest.raises(ValueError, match="contraction"):
        grouped_matmul(lhs, jnp.zeros((2, 5, 6)), sizes)
    with pytest.raises(ValueError, match=r"\[G, K, N\]"):
        grouped_matmul(lhs, jnp.zeros((4, 6)), sizes)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(lhs, rhs, jnp.array([8], jnp.int32))
    with pytest.raises(TypeError, match="int32"):
        grouped_matmul(lhs, rhs, sizes.astype(jnp.float32))
    with pytest.raises(TypeError, match="floating"):
        grouped_matmul(lhs.astype(jnp.int32), rhs, sizes)
    with pytest.raises(ValueError, match="unknown"):
        grouped_matmul(lhs, rhs, sizes, implementation="cutlass")
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_m=48)


def test_default_implementation_per_platform(monkeypatch):
    assert api.default_implementation("cpu", 256, 384) == "ragged_dot"
    assert api.default_implementation("tpu", 256, 384) == "megablox"
    assert api.default_implementation("tpu", 256, 200) == "ragged_dot"  # N not a multiple of megablox's tile
    for tokamax in (None, object()):  # measured faster: our Triton kernel first, whether or not tokamax is installed
        monkeypatch.setattr(backends, "tokamax_module", lambda tokamax=tokamax: tokamax)
        assert api.default_implementation("cuda", 256, 384) == "pallas_triton"
    # the preference order is walked, skipping an uninstalled tokamax
    monkeypatch.setattr(api, "GPU_PREFERENCE", ("tokamax", "pallas_triton"))
    assert api.default_implementation("cuda", 256, 200) == "tokamax"
    monkeypatch.setattr(backends, "tokamax_module", lambda: None)
    assert api.default_implementation("cuda", 256, 200) == "pallas_triton"


def test_implementations_equal_the_config_choices():
    from m1jax.config import GMM_IMPLEMENTATIONS
    assert api.IMPLEMENTATIONS == GMM_IMPLEMENTATIONS
