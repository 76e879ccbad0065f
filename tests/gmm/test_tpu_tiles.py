"""Megablox tiles sized to the TPU generation's scoped VMEM (``pallas_kernels.gmm.tpu_tiles``), and the default
megablox path (tiles from the lookup) against the per-group reference in interpret mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gmm import grouped_matmul, reference, tpu_tiles

MIB = 2 ** 20


@pytest.mark.parametrize("tile,reported", [((1024, 2048, 2048), 40 * MIB), ((512, 2048, 2048), 28 * MIB)])
def test_vmem_estimate_is_what_the_tpu_compiler_reports(tile, reported):
    """The TPU compiler's refusals of megablox's forward on M1's up projection (bf16 in and out) said "Scoped
    allocation with size 40.00M" for (1024, 2048, 2048); (512, 2048, 2048) was refused at the 16 MiB limit and
    compiled at 32 MiB (v6e)."""
    tm, tk, tn = tile
    gmm_only = 2 * (tm * tk + tk * tn) * 2 + tm * tn * (2 * 2 + 4)
    assert gmm_only == reported
    assert tpu_tiles.vmem_bytes(tm, tk, tn, 2, 2) >= reported


@pytest.mark.parametrize("limit,k,n,want", [
    (16 * MIB, 6144, 9216, (512, 1024, 1024)),   # v5e, v5p: M1's up projection
    (16 * MIB, 9216, 6144, (512, 1024, 1024)),   # ... its down projection (and the up projection's d_lhs)
    (32 * MIB, 6144, 9216, (512, 2048, 1024)),   # v6e: 9216 = 4.5 x 2048, so tn stays 1024
    (32 * MIB, 9216, 6144, (512, 1024, 2048)),
    (16 * MIB, 64, 384, (512, 64, 128)),         # a dim below 128 is taken whole; 384 = 3 x 128
    (16 * MIB, 6144, 200, None)])                # 200: no tile
def test_fit_takes_the_largest_tile_within_the_limit(limit, k, n, want):
    got = tpu_tiles.fit(16384, k, n, 2, 2, limit)
    assert got == want
    if got is not None:
        assert tpu_tiles.vmem_bytes(*got, 2, 2) + tpu_tiles.HEADROOM <= limit


def test_rows_shrink_only_when_no_tile_fits():
    assert tpu_tiles.fit(100, 256, 256, 2, 2, 16 * MIB) == (100, 256, 256)  # fewer rows than TM: one tile of all
    assert tpu_tiles.fit(4096, 2048, 2048, 4, 4, 9 * MIB) == (512, 512, 512)  # smaller k, n tiles first
    assert tpu_tiles.fit(4096, 2048, 2048, 4, 4, 3 * MIB) == (256, 128, 128)  # not even 128 x 128 at 512 rows


def test_default_megablox_tiles_match_the_reference_in_interpret_mode():
    """No explicit tiling: the lookup's tiles (here tk = 256, tn = 128) over ragged groups and 5 rows in no group,
    values and gradients (those rows: zero output, zero gradient)."""
    rng = np.random.default_rng(0)
    sizes = jnp.asarray([13, 0, 27, 5], jnp.int32)
    x = jnp.asarray(rng.standard_normal((50, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 256, 384)), jnp.float32)
    assert tpu_tiles.fit(50, 256, 384, 4, 4, 16 * MIB) == (50, 256, 128)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

    kernel = lambda x, w: grouped_matmul(x, w, sizes, implementation="megablox")  # noqa: E731
    oracle = lambda x, w: reference.grouped_matmul(x, w, sizes)  # noqa: E731
    out = np.asarray(jax.jit(kernel)(x, w))
    # fp32 operands, as test_gmm's megablox case: fp32 rounding only (a path that rounded them to bf16 would be off
    # by about 4e-3 of the values)
    np.testing.assert_allclose(out, oracle(x, w), rtol=1e-5, atol=1e-4)
    got, want = (jax.jit(jax.grad(loss(f), argnums=(0, 1)))(x, w) for f in (kernel, oracle))
    for g, r in zip(got, want):
        assert np.linalg.norm(g - r) <= 1e-5 * np.linalg.norm(r)
    ungrouped = slice(int(sizes.sum()), None)  # the 5 rows in no group
    assert not out[ungrouped].any() and not np.asarray(got[0])[ungrouped].any()
