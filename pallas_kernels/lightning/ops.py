"""Lightning attention from a backend's chunk walk: padding, the sequence split, and the custom VJP.

A backend supplies ``chunk_scan(q, k, v, s, init, doc, *, layout, reverse, with_output)`` (see ``pallas_triton``). This
module turns it into the full operation:

* ``scan_sequence``: pads ``T``, optionally cuts each sequence into ``groups`` rows walked in parallel (a state-only
  walk per group, a short ``lax.scan`` over the group states, then the output walk from each group's true initial
  state), and undoes the padding.
* ``lightning``: forward plus a ``jax.custom_vjp`` whose backward is three more walks of the same kernel:

      dq         = forward walk  (q=dO, k=v,  v=k,  init=S0^T)
      dv, dS0    = reverse walk  (q=k,  k=q,  v=dO, init=dS_T)
      dk         = reverse walk  (q=v,  k=dO, v=q,  init=dS_T^T)

  since ``dq_i = sum_{j<=i} lam^(i-j) (dO_i . v_j) k_j + lam^(i+1) dO_i S0^T`` and
  ``dv_j = sum_{i>=j} lam^(i-j) (k_j . q_i) dO_i + lam^(T-1-j) k_j dS_T`` (same-document terms only), and the reverse
  walk's final state is ``dS0 = sum_i lam^(i+1) q_i^T dO_i + lam^T dS_T``. The two reverse walks carry the same
  state (transposed): a backend may supply a ``fused_backward`` walk that produces dk, dv and dS0 in one pass (the
  Mosaic GPU kernel does); with a sequence split its state-only walks are the dv walk's.

The decay rates get no gradient (M1's slopes are fixed buffers); ``lightning`` stops it explicitly.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.lightning.config import RowLayout


def _pad_time(x, pad, mode="constant"):
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def _group_initial_states(local, init, doc_rows, s, layout: RowLayout, reverse: bool):
    """Each group's incoming state, and the final state, from the groups' zero-start states.

    local: [B, G, H, Dk, Dv] float32 state each group ends with from a zero start; init: [B, H, Dk, Dv] or None;
    doc_rows: [B, G, L] int32 raw document numbers or None. Returns ([B, G, H, Dk, Dv] incoming states, final state).

    Closed form instead of a scan over groups (a G-step ``lax.scan`` costs G rounds of small launches): with the
    initial state as source 0 and group f as source f+1, target t (group t's start, or t = G: the end) receives
    ``sum_{a <= t} [doc(a) == doc(t)] exp(-s * tokens between a and t) * source_a``, one einsum. Documents are
    numbered monotonically, so equal numbers at both ends mean no boundary in between.
    """
    batch, groups = local.shape[:2]
    n_valid = np.array([min(max(layout.n_valid - g * layout.length, 0), layout.length) for g in range(groups)])
    if reverse:  # walk order
        local, n_valid = local[:, ::-1], n_valid[::-1]
    ends = np.concatenate([[0], np.cumsum(n_valid)])  # source a ends after ends[a] tokens (a = 0: initial state)
    starts = np.concatenate([ends[:-1], ends[-1:]])  # target t starts after starts[t] tokens (t = G: the end)
    count = starts[:, None] - ends[None, :]  # [G+1 targets, G+1 sources]
    causal = np.arange(groups + 1)[None, :] <= np.arange(groups + 1)[:, None]
    weight = jnp.where(causal, jnp.exp(-s[:, None, None] * np.maximum(count, 0).astype(np.float32)), 0.0)  # [H,T,A]
    weight = jnp.broadcast_to(weight, (batch,) + weight.shape)
    if doc_rows is not None:
        first, last = doc_rows[:, :, 0], doc_rows[:, :, -1]  # padding repeats the last valid document
        if reverse:
            first, last = last[:, ::-1], first[:, ::-1]
        source_doc = jnp.concatenate([first[:, :1], last], axis=1)  # [B, G+1]
        target_doc = jnp.concatenate([first, last[:, -1:]], axis=1)
        weight = weight * (target_doc[:, :, None] == source_doc[:, None, :])[:, None].astype(jnp.float32)
    init = jnp.zeros_like(local[:, 0]) if init is None else init.astype(jnp.float32)
    sources = jnp.concatenate([init[:, None], local], axis=1)  # [B, G+1, H, Dk, Dv]
    out = jnp.einsum("bhta,bahkv->bthkv", weight, sources, precision=lax.Precision.HIGHEST)
    incoming, final = out[:, :groups], out[:, groups]
    return (incoming[:, ::-1] if reverse else incoming), final


def scan_sequence(chunk_scan: Callable, q, k, v, s, init, doc, *, chunk: int, groups: int, reverse: bool,
                  output_pass: Callable | None = None, extra: tuple = ()):
    """One full walk over [B, T] sequences. q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; s: [H]; init: [B, H, Dk, Dv] or
    None; doc: [B, T] int32 running document numbers or None.

    ``output_pass`` produces the outputs from the rows: ``output_pass(q, k, v, *extra, s, init, doc, layout=,
    reverse=) -> (outputs, each [R, L, H, *], final state)``, ``extra`` being more [B, T, H, *] inputs cut into rows
    the same way; by default ``chunk_scan``'s walk with ``with_output=True`` (one output, o). Its final state must be
    the walk of ``k, v``'s: a sequence split starts each group's output pass from the incoming state that
    ``chunk_scan``'s state-only walks of ``k, v`` give. With ``groups`` = 1 the pass's final state is returned as it
    comes (a pass may return more there, as ``_Walker.forward_states`` does). Returns (outputs, each [B, T, H, *],
    final state [B, H, Dk, Dv])."""
    batch, length, heads, _ = k.shape
    row_len = -(-length // (groups * chunk)) * chunk
    layout = RowLayout(length=row_len, n_valid=length, groups=groups)
    pad = groups * row_len - length
    rows = batch * groups

    def to_rows(x):  # [B, G*L, ...] -> [B*G, L, ...]
        return x.reshape((rows, row_len) + x.shape[2:])

    q, k, v = (to_rows(_pad_time(x, pad)) for x in (q, k, v))
    extra = tuple(to_rows(_pad_time(x, pad)) for x in extra)
    doc_norm = doc_rows = None
    if doc is not None:
        doc_rows = to_rows(_pad_time(doc, pad, mode="edge"))
        # Walk-order numbering starting at 0 in every row (chunk_math's convention).
        doc_norm = doc_rows - (doc_rows[:, -1:] if reverse else doc_rows[:, :1])
    walk = functools.partial(chunk_scan, layout=layout, reverse=reverse)
    if output_pass is None:
        def output_pass(q, k, v, s, init, doc, *, layout, reverse):
            o, final = chunk_scan(q, k, v, s, init, doc, layout=layout, reverse=reverse, with_output=True)
            return (o,), final
    outputs = functools.partial(output_pass, layout=layout, reverse=reverse)
    if groups == 1:
        outs, final = outputs(q, k, v, *extra, s, init, doc_norm)
    else:
        _, local = walk(None, k, v, s, None, doc_norm, with_output=False)
        split = lambda x: x.reshape((batch, groups) + x.shape[1:])
        incoming, final = _group_initial_states(
            split(local), init, None if doc is None else split(doc_rows), s, layout, reverse)
        outs, _ = outputs(q, k, v, *extra, s, incoming.reshape(local.shape), doc_norm)
        final = final.reshape(batch, heads, *final.shape[2:])
    outs = tuple(o.reshape(batch, groups * row_len, heads, o.shape[-1])[:, :length] for o in outs)
    return outs, final


@dataclasses.dataclass(frozen=True)
class _Walker:
    """Static part of a lightning call (hashable, for ``nondiff_argnums``). ``fused_backward``, ``whole_backward``,
    ``states_forward``: the backend's fused backward walk, its one-launch backward and its forward that saves states
    for that backward, or None (see ``lightning``)."""
    chunk_scan: Callable
    chunk: int
    groups: int
    fused_backward: Callable | None = None
    whole_backward: Callable | None = None
    states_forward: Callable | None = None

    def one_launch(self, doc) -> bool:
        """Whether the backward runs in one launch (``whole``): a hook, no documents, one sequence group."""
        return self.whole_backward is not None and doc is None and self.groups == 1

    def forward_states(self, q, k, v, s, init):
        """The forward with the states that ``whole`` restarts its dq walk from: (o, final state, states) on the
        zero-padded rows (one sequence group, no documents)."""
        def output_pass(q_, k_, v_, s_, init_, doc, *, layout, reverse):
            del doc, reverse  # no documents (``one_launch``), forward
            o, final, states = self.states_forward(q_, k_, v_, s_, init_, layout=layout)
            return (o,), (final, states)

        (o,), (final, states) = scan_sequence(self.chunk_scan, q, k, v, s, init, None, chunk=self.chunk, groups=1,
                                              reverse=False, output_pass=output_pass)
        return o, final, states

    def __call__(self, q, k, v, s, init, doc, reverse):
        (o,), final = scan_sequence(self.chunk_scan, q, k, v, s, init, doc, chunk=self.chunk, groups=self.groups,
                                    reverse=reverse)
        return o, final

    def fused(self, q, k, v, d_o, s, d_final):
        """(dk, dv, dS0) from the fused walk; a sequence split's state-only walks are the dv walk's (k=q, v=dO)."""
        def output_pass(k_, q_, d_o_, v_, s_, init, doc, *, layout, reverse):
            del doc, reverse  # no documents (``_lightning_bwd``), always the reverse walk
            dk, dv, final = self.fused_backward(q_, k_, v_, d_o_, s_, init, layout=layout)
            return (dk, dv), final

        (dk, dv), d_init = scan_sequence(self.chunk_scan, k, q, d_o, s, d_final, None, chunk=self.chunk,
                                         groups=self.groups, reverse=True, output_pass=output_pass, extra=(v,))
        return dk, dv, d_init

    def whole(self, q, k, v, d_o, s, init, d_final, states=None):
        """(dq, dk, dv, dS0) from the one-launch backward, on the zero-padded rows (one sequence group); ``states``:
        the forward's (``forward_states``) or None."""
        def output_pass(q_, k_, v_, d_o_, s_, d_final_, doc, *, layout, reverse):
            del doc, reverse  # no documents (``_lightning_bwd``); the hook walks both ways itself
            dq, dk, dv, d_init = self.whole_backward(q_, k_, v_, d_o_, s_, init, d_final_, layout=layout,
                                                     states=states)
            return (dq, dk, dv), d_init

        (dq, dk, dv), d_init = scan_sequence(self.chunk_scan, q, k, v, s, d_final, None, chunk=self.chunk, groups=1,
                                             reverse=True, output_pass=output_pass, extra=(d_o,))
        return dq, dk, dv, d_init


def _swap(state):
    return None if state is None else jnp.swapaxes(state, -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lightning(walker: _Walker, q, k, v, s, init, doc):
    return walker(q, k, v, s, init, doc, reverse=False)


def _lightning_fwd(walker, q, k, v, s, init, doc):
    if walker.states_forward is not None and walker.one_launch(doc):
        o, final, states = walker.forward_states(q, k, v, s, init)
        return (o, final), (q, k, v, s, init, doc, states)
    return walker(q, k, v, s, init, doc, reverse=False), (q, k, v, s, init, doc, None)


def _lightning_bwd(walker, residuals, cotangents):
    q, k, v, s, init, doc, states = residuals
    d_o, d_final = cotangents
    d_final = d_final.astype(jnp.float32)
    if walker.one_launch(doc):
        dq, dk, dv, d_init = walker.whole(q, k, v, d_o, s, init, d_final, states)
        return dq, dk, dv, None, None if init is None else d_init, None
    dq, _ = walker(d_o, v, k, s, _swap(init), doc, reverse=False)
    if walker.fused_backward is not None and doc is None:
        dk, dv, d_init = walker.fused(q, k, v, d_o, s, d_final)
    else:
        dv, d_init = walker(k, q, d_o, s, d_final, doc, reverse=True)
        dk, _ = walker(v, d_o, q, s, _swap(d_final), doc, reverse=True)
    return dq, dk, dv, None, None if init is None else d_init, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning(chunk_scan: Callable, q, k, v, decay, *, initial_state=None, doc=None, chunk: int, groups: int,
              fused_backward: Callable | None = None, whole_backward: Callable | None = None,
              states_forward: Callable | None = None):
    """Differentiable lightning attention over a backend's ``chunk_scan`` (arguments as in ``scan_sequence``).

    ``fused_backward``: optional backend hook ``fused_backward(q, k, v, d_o, s, init, *, layout) -> (dk, dv, state)``
    on zero-padded rows without documents (``pallas_mosaic_gpu.fused_backward_scan``'s contract): the two reverse
    walks of the backward in one pass. Used when given and ``doc`` is None; otherwise three walks.
    ``whole_backward``: optional hook ``whole_backward(q, k, v, d_o, s, init, d_final, *, layout) -> (dq, dk, dv,
    d_init)`` on zero-padded rows without documents (``pallas_mosaic_gpu.one_launch_backward_scan``): the whole
    backward in one launch. Used when given, ``doc`` is None and the rows are one sequence group (``groups`` = 1);
    otherwise as above. ``states_forward``: optional hook ``states_forward(q, k, v, s, init, *, layout) -> (o, final,
    states)`` (``pallas_mosaic_gpu.forward_with_states``): where the one-launch backward runs, the differentiated
    forward saves these states and passes them to it (``whole_backward(..., states=states)``); the forward alone
    (no gradient) does not.
    Returns (o [B, T, H, Dv] in v's dtype, final state [B, H, Dk, Dv] float32). ``decay`` gets no gradient.
    """
    s = lax.stop_gradient(jnp.asarray(decay, jnp.float32))
    walker = _Walker(chunk_scan=chunk_scan, chunk=chunk, groups=groups, fused_backward=fused_backward,
                     whole_backward=whole_backward, states_forward=states_forward)
    return _lightning(walker, q, k, v, s, initial_state, doc)
