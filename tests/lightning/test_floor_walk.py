"""``benchmarks.floor_walk``: the floor's work of a lightning pass as a kernel. Interpret mode against the same terms in
float64 NumPy (so the kernel does the work its docstring counts, no more and no less), and the compiled lowering for
cuda (TMA multicast, wgmma with register operands, the shared-memory budget) through ``jax.export``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from benchmarks import floor_walk as fw

R, L, H, D, CHUNK, BLOCK_V = 1, 192, 2, 128, 64, 64


def _inputs(mode):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    n_in = fw.FLOOR_MODES[mode][0]
    streams = [(jax.random.normal(key, (R, L, H, D), jnp.float32) * 0.5).astype(jnp.bfloat16)
               for key in keys[:n_in]]
    c = (jax.random.normal(keys[4], (D, BLOCK_V), jnp.float32) * 0.1).astype(jnp.bfloat16)
    return streams, c, jnp.array([0.5, 0.05], jnp.float32)


def _rel(x, ref):
    x = np.asarray(x, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_floor_walk_computes_its_terms(mode):
    """Three chunks in two stages (a slot refilled), two Dv tiles, two heads with different masks: every output tile
    and carried sum against the reference. bf16 outputs and P: about 2e-3; the fp32 carried sums: about 1e-7."""
    streams, c, s = _inputs(mode)
    outs, carried = fw.floor_walk(streams, c, s, mode=mode, chunk=CHUNK, block_v=BLOCK_V, stages=2, cluster=False,
                                  interpret=True)
    ref_outs, ref_carried = fw.floor_walk_reference(streams, c, s, mode=mode, chunk=CHUNK, block_v=BLOCK_V)
    assert len(outs) == fw.FLOOR_MODES[mode][1] and len(carried) == len(ref_carried)
    for out, ref in zip(outs, ref_outs):
        assert _rel(out, ref) < 1e-2
    for total, ref in zip(carried, ref_carried):
        assert _rel(total, ref) < 1e-5


def test_floor_walk_terms_sum_to_the_floor_count():
    """Arithmetic, not the kernel: the terms that ``floor_walk``'s docstring lists per chunk, Dv tile and head (the
    ones ``test_floor_walk_computes_its_terms`` checks the kernel computes, no more and no fewer outputs) come to
    4 C (C + D) FLOPs forward and 10 C (C + D) backward, which summed over a pass are the floor's count at chunk 64
    (``benchmarks.lightning.floor_seconds``: 4 BHNd (64 + d) forward, 14 BHNd (64 + d) forward + backward, written
    out here: importing the benchmark would define absl flags that other tests' modules define too)."""
    c, d, bv = CHUNK, D, BLOCK_V
    scores, c_term, p_term, carried = 2 * c * c * bv, 2 * c * d * bv, 2 * c * c * bv, 2 * d * c * bv
    fwd = scores + c_term + p_term + carried
    bwd = 2 * scores + 3 * (c_term + p_term) + 2 * carried
    assert (fwd, bwd) == (4 * c * (c + d) * bv, 10 * c * (c + d) * bv)
    b, h, n = 1, 64, 8192
    for per_chunk, factor in ((fwd, 4), (fwd + bwd, 14)):
        assert per_chunk * (d // bv) * b * h * (n // c) == factor * b * h * n * d * (64 + d)


@pytest.mark.parametrize("mode,cluster", [("fwd", True), ("fwd", False), ("bwd", True)])
def test_floor_pass_lowers_for_cuda(mode, cluster):
    """The compiled kernels at M1's head dim: one Mosaic GPU call a walk; the backward gets the 2 stages that fit."""
    sds = jax.ShapeDtypeStruct
    x = sds((1, 1024, 4, D), jnp.bfloat16)
    fn = fw.floor_pass_fn(jnp.ones((4,), jnp.float32), D, mode == "bwd", chunk=CHUNK, block_v=BLOCK_V, stages=3,
                          cluster=cluster)
    text = export.export(fn, platforms=("cuda",))(*[x] * (4 if mode == "bwd" else 3)).mlir_module()
    assert text.count("floor_walk_fwd") >= 1
    assert ("floor_walk_bwd" in text) == (mode == "bwd")
    from pallas_kernels.lightning.pallas_mosaic_gpu import SMEM_LIMIT_BYTES
    fits = [n for n in (2, 3) if fw.smem_bytes("bwd", chunk=CHUNK, d=D, block_v=BLOCK_V, stages=n) <= SMEM_LIMIT_BYTES]
    assert fits == [2]


def test_floor_walk_rejects_bad_input():
    streams, c, s = _inputs("fwd")
    with pytest.raises(ValueError, match="takes 3 streams"):
        fw.floor_walk(streams[:2], c, s, mode="fwd", chunk=CHUNK, block_v=BLOCK_V, stages=2, cluster=False)
    with pytest.raises(ValueError, match="chunk \\| L"):
        fw.floor_walk(streams, c, s, mode="fwd", chunk=CHUNK, block_v=48, stages=2, cluster=False)
    with pytest.raises(ValueError, match="one of \\['bwd', 'fwd'\\]; got 'fwdbwd'"):
        fw.floor_walk(streams, c, s, mode="fwdbwd", chunk=CHUNK, block_v=BLOCK_V, stages=2, cluster=False)
