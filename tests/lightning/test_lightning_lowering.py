"""The real (non-interpret) lowerings of the lightning kernels, checked on CPU with ``jax.export``.

Interpret mode does not enforce Triton's power-of-two / no-scratch rules or Mosaic TPU's (8, 128) block tiling; the
export runs the Pallas lowering for the target. Forward and backward (custom VJP), with an initial state and segment
ids, a sequence split, and a length that is not a multiple of the chunk. ``implementation=None`` lowers the kernel of
the platform exported for (not the host's), and the same jitted function run here (cpu) is the XLA scan.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.compat import TPU_CALL_TARGET, TRITON_CALL_TARGET
from pallas_kernels.lightning import lightning_attention, pallas
from pallas_kernels.lightning.config import KernelConfig

B, T, H, D = 1, 200, 2, 128
# Per walk: the state-only pass and the output pass (groups > 1); forward + dq + dk + dv walks.
EXPECTED_CALLS = 8


def _fwd_and_grad(backend: str, config: KernelConfig):
    def f(q, k, v, s, init, seg):
        def loss(q, k, v, init):
            o, final = pallas.lightning_attention_pallas(q, k, v, s, initial_state=init, segment_ids=seg,
                                                         backend=backend, config=config)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, init)
    return jax.jit(f)


def _args():
    sds = jax.ShapeDtypeStruct
    x = sds((B, T, H, D), jnp.bfloat16)
    return x, x, x, sds((H,), jnp.float32), sds((B, H, D, D), jnp.float32), sds((B, T), jnp.int32)


@pytest.mark.parametrize("backend,config", [("triton", KernelConfig(chunk=64, block_v=64, groups=2)),
                                            ("triton", KernelConfig(chunk=64, block_v=128, groups=1))])
def test_triton_lowering_exports_for_cuda(backend, config):
    calls = _export_text(_fwd_and_grad(backend, config), "cuda").count(TRITON_CALL_TARGET)
    assert calls == (EXPECTED_CALLS if config.groups > 1 else EXPECTED_CALLS // 2)


def _export_text(fn, target_platform, args=None) -> str:
    args = _args() if args is None else args
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)]
    if target_platform != "cuda":
        return export.export(fn, platforms=(target_platform,), disabled_checks=checks)(*args).mlir_module()
    # Triton's lowering asks for the GPU model; an abstract one stands in.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        return export.export(fn, platforms=(target_platform,), disabled_checks=checks)(*args).mlir_module()


def _default(forward_only: bool):
    """implementation=None: loss = sum(o * w) + sum(final state), jitted; forward, or value and gradients."""
    def loss(q, k, v, s, init, seg):
        o, final = lightning_attention(q, k, v, s, initial_state=init, segment_ids=seg, return_final_state=True)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(final)
    return jax.jit(loss if forward_only else jax.value_and_grad(loss, argnums=(0, 1, 2, 4)))


@pytest.mark.parametrize("target_platform,target", [("cuda", TRITON_CALL_TARGET), ("tpu", TPU_CALL_TARGET)])
def test_default_lowers_the_kernel_of_the_target_platform(target_platform, target):
    forward = _export_text(_default(forward_only=True), target_platform).count(target)
    both = _export_text(_default(forward_only=False), target_platform).count(target)
    assert forward >= 1 and both > forward  # the forward kernels, then the backward's too


def test_default_jitted_function_runs_the_xla_scan_on_cpu(lt):
    prob = lt.random_problem(5, 1, 40, 2, 16, 16, segments=True, init=True)
    q, k, v, s, init = (jnp.asarray(prob[n]) for n in ("q", "k", "v", "decay", "initial_state"))
    seg = jnp.asarray(prob["segment_ids"])
    w = np.cos(np.arange(q.size, dtype=np.float32)).reshape(q.shape)
    want = lt.oracle(prob["q"], prob["k"], prob["v"], prob["decay"], initial_state=prob["initial_state"],
                     segment_ids=prob["segment_ids"], d_o=w, d_final=np.ones_like(prob["initial_state"]))
    value, (dq, dk, dv, d_init) = _default(forward_only=False)(q, k, v, s, init, seg)
    assert abs(float(value) - (np.sum(want["o"] * w) + np.sum(want["final"]))) < 1e-4 * np.sum(np.abs(want["o"]))
    for got, name in ((dq, "dq"), (dk, "dk"), (dv, "dv"), (d_init, "d_init")):
        assert lt.rel_err(got, want[name]) < 1e-4, name


# Custom-call target of Mosaic GPU kernels (jax 0.11.2).
MOSAIC_GPU_CALL_TARGET = "mosaic_gpu_v2"


def _mosaic_grad_export(config, args) -> str:
    """The cuda export (StableHLO text) of the value and gradients of a Mosaic GPU lightning call at ``config``."""
    def f(q, k, v, s, init):
        def loss(q, k, v, init):
            o, final = pallas.lightning_attention_pallas(q, k, v, s, initial_state=init, backend="mosaic_gpu",
                                                         config=config)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, init)
    return export.export(jax.jit(f), platforms=("cuda",))(*args).mlir_module()


@pytest.mark.parametrize("config", [KernelConfig(chunk=64, block_v=64, num_stages=2, groups=2),
                                    KernelConfig(chunk=128, block_v=64, num_stages=2, groups=1),
                                    KernelConfig(chunk=64, block_v=32, num_stages=3, groups=1),
                                    KernelConfig(chunk=64, block_v=64, num_stages=2, groups=2, consumers=2),
                                    KernelConfig(chunk=64, block_v=64, num_stages=3, groups=1, consumers=1)])
def test_mosaic_gpu_lowering_exports_for_cuda(config):
    """The full Mosaic GPU lowering (layouts, TMA, wgmma, shared-memory budget) runs on the export; no segment ids."""
    text = _mosaic_grad_export(config, _args()[:5])
    assert text.count(MOSAIC_GPU_CALL_TARGET) == (EXPECTED_CALLS if config.groups > 1 else EXPECTED_CALLS // 2)


@pytest.mark.parametrize("dim,config,calls", [
    # forward + dq walks, then the dv and dk walks paired in one program (4 stages asked for, 2 fit at D = 128)
    (128, KernelConfig(chunk=64, block_v=64, num_stages=4, groups=1, fused_backward=1), 3),
    # a split doubles each walk: a state-only pass, then the output (or paired) pass
    (128, KernelConfig(chunk=64, block_v=64, num_stages=2, groups=2, fused_backward=1), 6),
    # m1-1b's heads: one 64-wide tile, 4 stages fit
    (64, KernelConfig(chunk=64, block_v=64, num_stages=4, groups=1, fused_backward=1), 3),
    (64, KernelConfig(chunk=64, block_v=32, num_stages=3, groups=1, fused_backward=1), 3),
    # the walks with their state chain in a warpgroup of its own: the default (forward and dq walk as a cluster of a
    # head's 2 tiles, the dv and dk walks as 128-wide programs of their own), over a split, m1-1b's heads (64-wide
    # walk programs, 4 stages), and with the three backward walks (the dk and dv walks split too, in reverse)
    (128, KernelConfig(chunk=64, block_v=64, num_stages=3, groups=1, fused_backward=1, split_state=1, multicast=1), 3),
    (128, KernelConfig(chunk=64, block_v=32, num_stages=2, groups=2, fused_backward=1, split_state=1, multicast=1), 6),
    (64, KernelConfig(chunk=64, block_v=64, num_stages=4, groups=1, fused_backward=1, split_state=1), 3),
    # D = 192: three 64-wide tiles per walk program, unclustered (each walk's streams in their own roles' slots)
    (192, KernelConfig(chunk=64, block_v=64, num_stages=2, groups=1, fused_backward=1, split_state=1), 3),
    (64, KernelConfig(chunk=64, block_v=64, num_stages=4, groups=1, fused_backward=0, split_state=1), 4),
    # the whole backward in one launch (the default at D = 128): the forward, then one backward launch; a split
    # takes the paired walks
    (128, KernelConfig(chunk=64, block_v=64, num_stages=3, groups=1, fused_backward=2, split_state=1, multicast=1), 2),
    (64, KernelConfig(chunk=64, block_v=64, num_stages=4, groups=1, fused_backward=2, split_state=1), 2),
    (128, KernelConfig(chunk=64, block_v=64, num_stages=3, groups=2, fused_backward=2, split_state=1, multicast=1), 6),
    # the one launch's dq walk restarting from the forward's states every 2 chunks (the forward saves them; the two
    # programs of a head as one cluster whose producers meet at every segment)
    (128, KernelConfig(chunk=64, block_v=64, num_stages=3, groups=1, fused_backward=2, split_state=1, multicast=1,
                       dq_checkpoints=2), 2),
])
def test_mosaic_gpu_fused_backward_exports_for_cuda(dim, config, calls):
    """The paired reverse walks' and the split walks' lowering for sm_90a (TMA, wgmma, two walkers on four streams,
    the state handed between warpgroups, walks as programs, clusters, the SMEM budget)."""
    sds = jax.ShapeDtypeStruct
    x = sds((B, T, H, dim), jnp.bfloat16)
    text = _mosaic_grad_export(config, (x, x, x, sds((H,), jnp.float32), sds((B, H, dim, dim), jnp.float32)))
    assert text.count(MOSAIC_GPU_CALL_TARGET) == calls
    one_launch = config.fused_backward == 2 and config.groups == 1
    paired = bool(config.fused_backward) and not one_launch
    assert ("lightning_mgpu_backward_one_launch" in text) == one_launch
    restart = one_launch and bool(config.dq_checkpoints)
    assert ("lightning_mgpu_backward_one_launch_restart" in text) == restart
    assert ("lightning_mgpu_rev_pair" in text) == paired
    split_name = "lightning_mgpu_fwd_split" + ("_multicast" if config.multicast else "")
    assert (split_name in text) == bool(config.split_state)
    assert (split_name + "_states" in text) == restart  # the forward that saves them
    assert ("lightning_mgpu_rev_split" in text) == bool(config.split_state and not config.fused_backward)
    assert ("lightning_mgpu_rev_pair_split" in text) == bool(config.split_state and paired)
    # D = 128: the dv and dk walk programs of a head are one cluster, loading q and dO once
    assert ("lightning_mgpu_rev_pair_split_multicast" in text) == bool(
        config.split_state and paired and config.multicast)


def test_benchmark_times_the_forward_with_the_backward():
    """The benchmarks' forward + backward (``benchmarks.timing.jit_timed``) runs our forward kernel too (fla's always
    runs its own): with only the gradients returned, jit drops the forward (its outputs unused), and the timing was the
    backward's."""
    from benchmarks.timing import jit_timed
    sds = jax.ShapeDtypeStruct
    x = sds((B, T, H, 128), jnp.bfloat16)
    config = KernelConfig(chunk=64, block_v=64, num_stages=2, groups=1)
    fn = jit_timed(lambda q, k, v: pallas.lightning_attention_pallas(q, k, v, jnp.ones(H), backend="mosaic_gpu",
                                                                     config=config), True, output=lambda out: out[0])
    text = export.export(fn, platforms=("cuda",))(x, x, x, x).mlir_module()
    assert text.count(MOSAIC_GPU_CALL_TARGET) == 4  # the forward, then dq, dv and dk


def test_switching_hopper_to_mosaic_lowers_the_mosaic_kernel_for_an_h200(monkeypatch):
    """The one-line GPU_DEFAULT switch, end to end: implementation=None exported for cuda on an (abstract) H200 runs
    the Mosaic kernel without segment ids and keeps the Triton kernel for packed documents."""
    from pallas_kernels.lightning import api
    monkeypatch.setitem(api.GPU_DEFAULT, "hopper", "pallas_mosaic_gpu")
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)]

    def lowered(with_segments: bool) -> str:
        def f(q, k, v, s, init, seg):
            return lightning_attention(q, k, v, s, initial_state=init, segment_ids=seg if with_segments else None)
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
            return export.export(jax.jit(f), platforms=("cuda",), disabled_checks=checks)(*_args()).mlir_module()

    plain, packed = lowered(False), lowered(True)
    assert plain.count(MOSAIC_GPU_CALL_TARGET) == 1 and TRITON_CALL_TARGET not in plain
    assert MOSAIC_GPU_CALL_TARGET not in packed and packed.count(TRITON_CALL_TARGET) >= 1


def test_explicit_mosaic_implementation_lowers_for_an_h200_with_its_gradients():
    """implementation="pallas_mosaic_gpu" (a model's ``lightning_implementation``) exported for cuda, forward and
    backward: the kernel, not its interpret mode (whose ordered callbacks a platform branch cannot carry)."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132)

    def loss(q, k, v, s, init):
        o = lightning_attention(q, k, v, s, initial_state=init, implementation="pallas_mosaic_gpu")
        return jnp.sum(o.astype(jnp.float32))

    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        text = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
                             platforms=("cuda",))(*_args()[:5]).mlir_module()
    # At D = 128 the default runs the whole backward in one launch, its dq walk restarting from the states that the
    # forward saves (dq_checkpoints), so jax.grad keeps the forward kernel (without them it would drop it: the
    # backward reads q, k, v, not o).
    assert text.count(MOSAIC_GPU_CALL_TARGET) == 2
    for kernel in ("lightning_mgpu_fwd_split_multicast_states", "lightning_mgpu_backward_one_launch_restart"):
        assert kernel in text


def test_tpu_lowering_exports_for_tpu():
    exported = export.export(_fwd_and_grad("tpu", KernelConfig(chunk=128, groups=2)), platforms=("tpu",))(*_args())
    assert exported.mlir_module().count(TPU_CALL_TARGET) == EXPECTED_CALLS


def test_tpu_lowering_rejects_misaligned_blocks():
    """The export catches what interpret mode cannot: segment ids need a chunk that is a multiple of 128 on TPU."""
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        export.export(_fwd_and_grad("tpu", KernelConfig(chunk=64, groups=1)), platforms=("tpu",))(*_args())
