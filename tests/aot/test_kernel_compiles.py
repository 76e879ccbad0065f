"""The Mosaic kernels compile for v5e, v5p and v6e from this CPU host (libtpu's compiler, ``m1jax.aot``), with tiles
that fit each generation's scoped VMEM, and the compiled programs contain them (``tpu_custom_call``).

Each kernel is jitted on one device of the generation's topology, under a one-device mesh so that the kernels see
the device kind (``pallas_kernels.platform.tpu_device_kind``). Small shapes run in CI. With ``M1JAX_SLOW_COMPILES=1``
two more tests compile M1's shapes (lightning q/k/v [1, 8192, 64, 128] bf16, the expert matmuls [16384, 6144] x
[4, 6144, 9216] and the down projection, forward and backward) per generation, and a 1M-token ring-attention prefill
at M1's softmax shapes on v5p:2x2x4 with sequence=16; they print their numbers (docs/kernels.md, docs/sharding.md).
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m1jax import aot
from pallas_kernels import platform
from pallas_kernels.attention import Mask, attention
from pallas_kernels.attention.paged import paged_attention
from pallas_kernels.compat import TPU_CALL_TARGET
from pallas_kernels.gmm import backends, grouped_matmul, tpu_tiles
from pallas_kernels.lightning import lightning_attention
from sharding.mesh import make_mesh
from sharding.sequence_parallel import attention_sequence_parallel

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
SLOW = pytest.mark.skipif(os.environ.get("M1JAX_SLOW_COMPILES") != "1", reason="set M1JAX_SLOW_COMPILES=1")


@functools.cache
def _device(generation):
    return aot.topology_devices(TOPOLOGIES[generation])[0]


def _compile(fn, generation, *shapes):
    """fn jitted on one device of the generation, compiled for it: (compiled, seconds)."""
    mesh = Mesh(np.array([_device(generation)]), ("one",))
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P())) for s, d in shapes]
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _mosaic_calls(compiled) -> int:
    return compiled.as_text().count(f'custom_call_target="{TPU_CALL_TARGET}"')


def _lightning(q, k, v, decay):
    """Forward and backward of the default lightning kernel (loss = sum(o))."""
    loss = lambda q, k, v: jnp.sum(lightning_attention(q, k, v, decay).astype(jnp.float32))  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def _gmm(x, w, sizes):
    """Forward and backward of the default grouped matmul."""
    loss = lambda x, w: jnp.sum(grouped_matmul(x, w, sizes).astype(jnp.float32))  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


def _lightning_shapes(t, h=64, d=128):
    return [((1, t, h, d), jnp.bfloat16)] * 3 + [((h,), jnp.float32)]


def _gmm_shapes(m, k, n, groups):
    return [((m, k), jnp.bfloat16), ((groups, k, n), jnp.bfloat16), ((groups,), jnp.int32)]


@pytest.mark.parametrize("generation", sorted(TOPOLOGIES))
def test_kernels_compile_per_generation(generation):
    """Small shapes: lightning (forward walk + 3 backward walks), megablox (gmm, d_lhs gmm, tgmm), paged decode."""
    compiled, _ = _compile(_lightning, generation, *_lightning_shapes(256, h=2))
    assert _mosaic_calls(compiled) == 4
    compiled, _ = _compile(_gmm, generation, *_gmm_shapes(512, 256, 384, 4))
    assert _mosaic_calls(compiled) == 3
    compiled, _ = _compile(paged_attention, generation, ((2, 16, 128), jnp.bfloat16),
                           ((2, 8, 16, 128), jnp.bfloat16), ((2, 8, 16, 128), jnp.bfloat16), ((2,), jnp.int32),
                           ((2, 4), jnp.int32))
    assert _mosaic_calls(compiled) == 1


@pytest.mark.parametrize("generation,limit,up,down", [
    ("v5e", 16, (512, 1024, 1024), (512, 1024, 1024)), ("v5p", 16, (512, 1024, 1024), (512, 1024, 1024)),
    ("v6e", 32, (512, 2048, 1024), (512, 1024, 2048))])
def test_megablox_tiles_follow_the_generation_being_compiled_for(generation, limit, up, down):
    """Traced under a mesh of the generation's devices, the tile lookup uses its scoped VMEM (v6e has twice v5e's and
    v5p's) for M1's expert matmuls: up [16384, 6144] x [4, 6144, 9216] and down [16384, 9216] x [4, 9216, 6144]."""
    with jax.set_mesh(Mesh(np.array([_device(generation)]), ("one",))):
        assert platform.tpu_scoped_vmem_bytes() == limit * 2 ** 20
        for (k, n), want in (((6144, 9216), up), ((9216, 6144), down)):
            lookup, rows = backends._megablox_tiling(16384, k, n, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, None)
            assert lookup(16384, k, n) == want and rows == 512
    assert platform.tpu_scoped_vmem_bytes() == 16 * 2 ** 20  # no mesh, no TPU here: the smallest limit


@SLOW
@pytest.mark.parametrize("generation", sorted(TOPOLOGIES))
def test_m1_kernel_shapes_compile(generation):
    """M1's shapes: lightning at 8K tokens per device, the expert matmuls of 4 local experts at 16384 rows."""
    limit = platform.SCOPED_VMEM_BYTES[_device(generation).device_kind]
    cases = {"lightning [1, 8192, 64, 128]": (_lightning, _lightning_shapes(8192), 4),
             "gmm up [16384, 6144] x [4, 6144, 9216]": (_gmm, _gmm_shapes(16384, 6144, 9216, 4), 3),
             "gmm down [16384, 9216] x [4, 9216, 6144]": (_gmm, _gmm_shapes(16384, 9216, 6144, 4), 3)}
    for name, (fn, shapes, calls) in cases.items():
        compiled, seconds = _compile(fn, generation, *shapes)
        assert _mosaic_calls(compiled) == calls, name
        tile = ""
        if name.startswith("gmm"):
            k, n = shapes[1][0][1:]
            tile = tpu_tiles.fit(16384, k, n, 2, 2, limit)
            tile = f" tile {tile}, {tpu_tiles.vmem_bytes(*tile, 2, 2) / 2 ** 20:.0f} MiB of {limit // 2 ** 20} MiB"
        print(f"{generation} {name}: forward + backward compiled in {seconds:.1f} s{tile}, "
              f"{compiled.memory_analysis().temp_size_in_bytes / 2 ** 20:.0f} MiB HBM temporaries")


@SLOW
def test_ring_attention_1m_prefill_memory():
    """M1's softmax attention (64 query heads, 8 KV heads, D = 128, bf16) over 1M tokens on sequence=16: no
    all-gather, and the ring's per-device temporaries stay below what all-gathering K/V holds by itself: K and V
    (2 x 2 GiB) in the forward, and their fp32 gradients (2 x 4 GiB) too in the backward."""
    devices = aot.topology_devices("v5p:2x2x4")
    mesh = make_mesh("sequence=16", devices=devices)
    t, gathered_kv = 2 ** 20, 2 * 2 ** 20 * 8 * 128 * 2
    sharding = NamedSharding(mesh, P(None, "sequence"))
    shapes = [jax.ShapeDtypeStruct((1, t, n, 128), jnp.bfloat16, sharding=sharding) for n in (64, 8, 8)]
    ring = functools.partial(attention_sequence_parallel, attention_mask=Mask, attention=attention)
    loss = lambda q, k, v: jnp.sum(ring(q, k, v, None).astype(jnp.float32))  # noqa: E731
    for name, fn in (("forward", lambda q, k, v: ring(q, k, v, None)),
                     ("forward + backward", jax.grad(loss, argnums=(0, 1, 2)))):
        with jax.set_mesh(mesh):
            report = aot.compile_report(jax.jit(fn).lower(*shapes).compile(), devices[0])
        memory = report["memory"]
        print(f"ring attention 1M tokens, sequence=16, {name}: temporaries {aot.format_bytes(memory['temp_bytes'])}, "
              f"peak {aot.format_bytes(memory['peak_bytes'])}")
        assert report["collectives"]["bytes"]["all-gather"] == 0
        assert memory["temp_bytes"] < gathered_kv * (1 if name == "forward" else 3)
