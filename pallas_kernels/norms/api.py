"""Public entry point for the RMSNorms of the model: ``rms_norm(x, weight, eps=..., gate=None)``.

``implementation=None`` is ``xla`` (``reference.rms_norm``) on every platform: on an H200 XLA's fusions of it run
at 56-78% of the HBM floor forward + backward, and the one-pass Triton kernels did not beat them where it counts
(forward 0.96-1.12x XLA's, forward + backward 0.80-1.06x, slower from D = 4096 up; ``benchmarks/RESULTS.md``, "a
one-pass RMSNorm kernel"). ``pallas_triton`` is there to be asked for (``norm_implementation``): compiled on a GPU,
in Pallas interpret mode when lowered for cpu.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.norms import pallas_triton, reference

IMPLEMENTATIONS = ("pallas_triton", "xla")
_NATIVE_PLATFORMS = {"pallas_triton": platform.GPU}


def default_implementation(target: str) -> str:
    """The implementation ``implementation=None`` uses when lowering for platform ``target``: xla everywhere (see the
    module docstring for the measurement that decided it)."""
    del target
    return "xla"


def _check_inputs(x, weight, gate, eps):
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., D] with D > 0; got shape {x.shape}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be [D]=({x.shape[-1]},); got shape {weight.shape}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {x.shape}; got {gate.shape}")
    for name, a in (("x", x), ("weight", weight), ("gate", gate)):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array; got {a.dtype}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")


@functools.cache
def _implementation(name: str, eps: float, norm_dtype, out_dtype, tiling: pallas_triton.Tiling | None):
    """name -> jitted fn(x [N, D], weight, gate[, interpret]) -> [N, D]; one object per arguments, so the many norms
    of a model (and the per-platform branches, all traced) reuse one trace per shape."""
    if name == "pallas_triton":
        def triton(x, weight, gate, interpret=False):
            return pallas_triton.rms_norm(x, weight, gate, eps, norm_dtype, out_dtype, tiling or pallas_triton.Tiling(),
                                          interpret)
        return jax.jit(triton, static_argnames="interpret")
    if name == "xla":
        # Rematerialised: the backward keeps only the inputs and recomputes the element-wise forward in its fusions.
        # Autodiff of the formula would keep fp32 copies instead (x in fp32 and, gated, four more [N, D] fp32
        # arrays: 20 bytes an element where the inputs are 6), which the forward writes and the backward reads.
        return jax.jit(jax.checkpoint(functools.partial(reference.rms_norm, eps=eps, norm_dtype=norm_dtype,
                                                        out_dtype=out_dtype)))
    raise ValueError(f"unknown rms_norm implementation {name!r}; choose from {IMPLEMENTATIONS}")


def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float, gate: jax.Array | None = None, norm_dtype=None,
             out_dtype=None, implementation: str | None = None, tiling: pallas_triton.Tiling | None = None
             ) -> jax.Array:
    """RMSNorm over the last axis with float32 statistics, times ``weight``, optionally times ``sigmoid(gate)``.

    Args:
      x: [..., D] any floating dtype; the statistics are float32.
      weight: [D] (fp32 masters are fine: multiplied in ``norm_dtype``, the gradient comes back in weight's dtype).
      eps: added to the mean square (> 0).
      gate: [..., D] or None; with a gate the normalised rows are multiplied by ``sigmoid(gate)`` in float32 (the
        lightning attention's output gate).
      norm_dtype: dtype of the normalised rows and their product with the weight (default x's dtype).
      out_dtype: output dtype (default ``norm_dtype``).
      implementation: None (``default_implementation``, see the module docstring) or one of ``IMPLEMENTATIONS``.
      tiling: ``pallas_triton.Tiling`` (pallas_triton only; None = its default).

    Returns [..., D] in out_dtype, ``reference.rms_norm``'s value; differentiable in x, weight and gate.
    """
    _check_inputs(x, weight, gate, eps)
    norm_dtype = jnp.dtype(norm_dtype or x.dtype)
    out_dtype = jnp.dtype(out_dtype or norm_dtype)
    lead, d = x.shape[:-1], x.shape[-1]
    if math.prod(lead) == 0:
        return reference.rms_norm(x, weight, gate, eps=eps, norm_dtype=norm_dtype, out_dtype=out_dtype)
    rows = (x.reshape(-1, d), weight, None if gate is None else gate.reshape(-1, d))
    static = (float(eps), norm_dtype, out_dtype, tiling)
    if implementation is None:
        chosen = {p: default_implementation(p) for p in platform.PLATFORMS}
        out = platform.select({p: _implementation(name, *static) for p, name in chosen.items()}, *rows,
                              fallback=_implementation(chosen["cpu"], *static))
    elif implementation in _NATIVE_PLATFORMS:
        out = platform.kernel(_implementation(implementation, *static), _NATIVE_PLATFORMS[implementation], *rows)
    else:
        out = _implementation(implementation, *static)(*rows)
    return out.reshape(x.shape)
