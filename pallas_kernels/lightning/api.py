"""Public entry point for lightning attention: ``lightning_attention`` (prefill/training) and ``lightning_decode``.

``implementation=None`` decides per platform the program is lowered for (``pallas_kernels.platform``): tpu: the
Mosaic kernel (pallas_tpu); cuda/rocm: the kernel ``GPU_DEFAULT`` names for the GPU generation traced for (the Mosaic
GPU kernel on Hopper, Triton elsewhere) when it handles the call (see ``default_implementation``); otherwise (cpu,
other dims) the XLA chunked scan. An explicit Pallas backend runs compiled on its platform and in Pallas interpret
mode when lowered for cpu. ``pallas_mosaic_gpu`` (TMA + wgmma) needs a Hopper GPU (when traced for a GPU),
bf16/fp16 inputs, Dk and Dv multiples of 64 and no segment ids; asked for explicitly with anything else it raises a
ValueError.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.lightning import reference

IMPLEMENTATIONS = ("xla_chunked", "recurrent", "pallas_triton", "pallas_mosaic_gpu", "pallas_tpu")
_PALLAS_BACKENDS = {"pallas_triton": "triton", "pallas_mosaic_gpu": "mosaic_gpu", "pallas_tpu": "tpu"}
# Where each kernel runs compiled.
_NATIVE_PLATFORMS = {"pallas_triton": platform.GPU, "pallas_mosaic_gpu": ("cuda",), "pallas_tpu": ("tpu",)}
# implementation=None on cuda, by GPU generation (``gpu_generation``); generations not listed get "pallas_triton".
# Switch a generation here only after benchmarks/lightning.py has shown the kernel faster on it (the Mosaic GPU
# kernel is written for Hopper; calls it cannot handle still go to Triton, see ``default_implementation``). Hopper:
# on an H200 the Mosaic kernel's forward took 0.65 / 2.78 / 4.34 ms at B1 H64 32K / 128K / B1 H8 1M against Triton's
# 1.05 / 4.31 / 6.04, and its backward walks 2.20 ms at 32K against 3.37 (benchmarks/RESULTS.md).
GPU_DEFAULT = {"hopper": "pallas_mosaic_gpu"}
# jax.Device.device_kind substrings -> generation.
_GPU_GENERATIONS = {"H100": "hopper", "H200": "hopper", "H800": "hopper", "H20": "hopper", "GH200": "hopper"}


def _check_inputs(q, k, v, decay, initial_state, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, Dk]; got {q.shape} and {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, Dv] matching q's [B, T, H]={q.shape[:3]}; got {v.shape}")
    batch, _, heads, dk = q.shape
    if decay.shape != (heads,):
        raise ValueError(f"decay must be [H]=({heads},) per-head rates; got {decay.shape}")
    if initial_state is not None and initial_state.shape != (batch, heads, dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, Dk, Dv]={(batch, heads, dk, v.shape[-1])}; "
                         f"got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be [B, T]={q.shape[:2]}; got {segment_ids.shape}")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _traced_gpu_kind() -> str | None:
    """device_kind of the GPU being traced for: the current mesh's device (a compile for a GPU topology from any
    host), else this host's first device; None when that is not a GPU."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is None:
        device = jax.devices()[0]
    return device.device_kind if device.platform in ("gpu", "cuda") else None


def gpu_generation() -> str | None:
    """The generation ("hopper", ...) of the GPU being traced for (``_GPU_GENERATIONS``); None when unknown."""
    kind = _traced_gpu_kind()
    return None if kind is None else next((gen for key, gen in _GPU_GENERATIONS.items() if key in kind), None)


def _mosaic_gpu_handles(dtype, dk: int, dv: int, has_segments: bool) -> bool:
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and dk % 64 == 0
            and dv % 64 == 0 and not has_segments)


def default_implementation(target: str, dk: int, dv: int, *, dtype=jnp.bfloat16, has_segments: bool = False,
                           generation: str | None = None) -> str:
    """The implementation ``implementation=None`` uses when lowering for platform ``target`` (see the module
    docstring): on cuda ``GPU_DEFAULT[generation]`` when that kernel handles the call, else the Triton kernel, which
    needs power-of-two head dims."""
    if target == "tpu":
        return "pallas_tpu"
    if (target == "cuda" and GPU_DEFAULT.get(generation) == "pallas_mosaic_gpu"
            and _mosaic_gpu_handles(dtype, dk, dv, has_segments)):
        return "pallas_mosaic_gpu"
    if target in platform.GPU and _is_power_of_two(dk) and _is_power_of_two(dv):
        return "pallas_triton"
    return "xla_chunked"


@functools.cache
def _implementation(name: str, block_size: int):
    """name -> jitted fn(q, k, v, decay, initial_state, segment_ids[, interpret]) -> (o, final state). One object per
    arguments, so that the layers of a model (and the per-platform branches, all traced) reuse one trace per shape."""
    if name in _PALLAS_BACKENDS:
        # Imported here so the pure-JAX paths never import Pallas.
        from pallas_kernels.lightning import pallas  # noqa: PLC0415

        def kernel(q, k, v, decay, initial_state, segment_ids, interpret=False):
            return pallas.lightning_attention_pallas(q, k, v, decay, initial_state=initial_state,
                                                     segment_ids=segment_ids, backend=_PALLAS_BACKENDS[name],
                                                     interpret=interpret)
        return jax.jit(kernel, static_argnames="interpret")
    if name == "xla_chunked":
        return jax.jit(functools.partial(_chunked, block_size=block_size))
    if name == "recurrent":
        return jax.jit(_recurrent)
    raise ValueError(f"unknown lightning implementation {name!r}; choose from {IMPLEMENTATIONS}")


def _chunked(q, k, v, decay, initial_state, segment_ids, *, block_size):
    return reference.lightning_attention_chunked(q, k, v, decay, initial_state=initial_state,
                                                 segment_ids=segment_ids, block_size=block_size)


def _recurrent(q, k, v, decay, initial_state, segment_ids):
    return reference.lightning_attention_recurrent(q, k, v, decay, initial_state=initial_state,
                                                   segment_ids=segment_ids)


def lightning_attention(q: jax.Array, k: jax.Array, v: jax.Array, decay: jax.Array, *,
                        initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                        return_final_state: bool = False, implementation: str | None = None,
                        block_size: int = 256):
    """Causal decayed linear attention ``o_t = sum_{j<=t} exp(-s (t-j)) (q_t . k_j) v_j``.

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv] (bf16 or fp32; accumulation and state are fp32).
      decay: [H] float32 rates s (per-step factor exp(-s)).
      initial_state: optional [B, H, Dk, Dv] float32 state before token 0.
      segment_ids: optional [B, T] ints; the state resets wherever the id changes (packed documents).
      return_final_state: also return the [B, H, Dk, Dv] float32 state after the last token.
      implementation: None (per target platform, see the module docstring), or one of ``IMPLEMENTATIONS``.
      block_size: block length of the XLA chunked scan (results do not depend on it); the Pallas kernels use their
        tuned ``pallas.DEFAULT_CONFIGS``.

    Returns:
      o [B, T, H, Dv] in v's dtype, and the final state when ``return_final_state``.
    """
    _check_inputs(q, k, v, decay, initial_state, segment_ids)
    traced_gpu = _traced_gpu_kind()
    if implementation == "pallas_mosaic_gpu" and traced_gpu is not None and gpu_generation() != "hopper":
        raise ValueError(f"pallas_mosaic_gpu needs a Hopper GPU (wgmma); tracing for {traced_gpu!r}")
    args = (q, k, v, jnp.asarray(decay, jnp.float32), initial_state, segment_ids)
    if implementation is None:
        generation = gpu_generation()
        chosen = {p: default_implementation(p, q.shape[-1], v.shape[-1], dtype=q.dtype,
                                            has_segments=segment_ids is not None, generation=generation)
                  for p in platform.PLATFORMS}
        o, state = platform.select({p: _implementation(name, block_size) for p, name in chosen.items()}, *args,
                                   fallback=_implementation(chosen["cpu"], block_size))
    elif implementation == "pallas_mosaic_gpu" and traced_gpu is not None:
        # Tracing for a GPU: the compiled kernel alone. Its interpret mode runs through ordered callbacks, and a
        # platform_dependent branch holding them cannot be lowered for the GPU (mismatched effect tokens).
        o, state = _implementation(implementation, block_size)(*args, interpret=False)
    elif implementation in _PALLAS_BACKENDS:
        o, state = platform.kernel(_implementation(implementation, block_size), _NATIVE_PLATFORMS[implementation],
                                   *args)
    else:
        o, state = _implementation(implementation, block_size)(*args)
    return (o, state) if return_final_state else o


def lightning_decode(q, k, v, decay, state):
    """Single-token update for generation: q, k [B, H, Dk], v [B, H, Dv], state [B, H, Dk, Dv] fp32 -> (o, state)."""
    return reference.lightning_decode_step(q, k, v, jnp.asarray(decay, jnp.float32), state)
