"""Pallas lightning attention (Triton or Mosaic GPU on GPU, Mosaic on TPU) behind one function; ``api`` dispatches
here."""
from __future__ import annotations

import dataclasses
import functools

from pallas_kernels.lightning import ops, pallas_mosaic_gpu, pallas_tpu, pallas_triton, reference
from pallas_kernels.lightning.config import DEFAULT_TARGET_PROGRAMS, KernelConfig, pick_groups

BACKENDS = ("triton", "mosaic_gpu", "tpu")
# Triton: the fastest of experiments/bench_lightning.py's sweep on an H100 (2026-11-26; benchmarks/RESULTS.md):
# 32-wide Dv tiles give 4 programs per (row, head) whose q/k re-reads hit L2, and 3 pipeline stages hide the chunk
# loads. Mosaic GPU (Hopper): the fastest of benchmarks/lightning.py's sweep on an H200 at B1 H64 32K (2026-11-30;
# benchmarks/RESULTS.md, "Mosaic GPU kernel, H200"): 64-token chunks, 64-wide Dv tiles (2 programs per (row, head)
# at Dv = 128, one walker each), 4 TMA stages; the backward's dv and dk walks paired in one program where
# Dk = Dv (``fused_backward``: faster than the two walks on an H200, RESULTS.md "Forward + backward with the forward,
# the paired reverse walks"; ``default_config`` falls back to three walks where it does not apply); the walks with
# outputs with their state chain in a warpgroup of its own and, where Dv holds 2 to 8 tiles, a head's tile programs as
# one cluster loading q and k once, in 3 stages (``split_state``, ``multicast``: 1.11x-1.19x the forward on an H200,
# RESULTS.md "The state chain in its own warpgroup"); with ``split_state`` the paired dv and dk walks are split-walk
# programs of their own (1.3x the two-warpgroup pair on an H200, RESULTS.md "The backward's walks as programs"). TPU:
# 128-token chunks (MXU tiles; segment-id blocks need a multiple of 128), untuned.
DEFAULT_CONFIGS = {"triton": KernelConfig(chunk=64, block_v=32, num_warps=4, num_stages=3),
                   "mosaic_gpu": KernelConfig(chunk=64, block_v=64, num_stages=4, fused_backward=1, split_state=1,
                                              multicast=1),
                   "tpu": KernelConfig(chunk=128, block_v=128)}
# Mosaic GPU where the (row, head) walks leave SMs idle without a sequence split (few heads, long rows): the two Dv
# tiles of a head as two consumer warpgroups of one program, sharing each chunk's q, k loads, in 2 TMA stages. On an
# H200 at B1 H8 1M: 3.38 ms against 4.50 ms for the one-warpgroup default at its 8 groups (benchmarks/RESULTS.md,
# "1M tokens, 8 heads").
MOSAIC_SPLIT_CONFIG = {"consumers": 2, "num_stages": 2, "split_state": 0, "multicast": 0}
# TMA stages of the Mosaic GPU walks where their Dv-tile programs run as a cluster (``multicast``): on an H200 at B1
# H64, 0.592 ms against 0.617 ms with 4 stages at 32K, 2.549 against 2.702 ms at 128K (fewer bytes in flight). The
# paired backward at D = 128 fits only 2 stages either way.
MOSAIC_MULTICAST_STAGES = 3
# Head width at which the Mosaic GPU backward runs in one launch (``fused_backward`` = 2: the dq walk and one program
# per head walking dv and dk from one dS chain), where it was measured: on an H200 at B1 H64 D128, forward + backward
# in 2.042 against 2.248 ms at 32K and 8.184 against 8.926 ms at 128K (60% of the floor on that card, 58-59% on two
# others), 9% less energy a call at 32K (benchmarks/RESULTS.md, "The backward in one launch"). At D = 64 one launch
# measured no faster (0.465 against 0.467 ms at B4 H16 8K, m1-1b's layer; RESULTS, "A second machine"), so other
# widths keep the paired walks.
MOSAIC_WHOLE_BACKWARD_D = 128
# Chunks between the forward states that the differentiated forward saves for the one-launch backward's dq walk to
# restart from (``dq_checkpoints``), where the walks are split. On three H200s at B1 H64 D128 (four calls), forward +
# backward took 0.3-2.9% less time than without at 128K (1.6% on average) and -0.5 to +2.3% at 32K (0.7%), with
# 7% less to 1% more energy a call, for a residual of half an input stream (``D / (64 * M)`` of one) in each lightning
# layer. M = 8 (a quarter stream) measured within 1% of M = 4; M = 16 gained nothing (benchmarks/RESULTS.md,
# "Restarting the dq walk from saved states" and "dq_checkpoints by default").
MOSAIC_DQ_CHECKPOINTS = 4


def default_config(backend: str, dtype, batch: int, heads: int, length: int, dk: int, dv: int) -> KernelConfig:
    """``DEFAULT_CONFIGS[backend]`` fitted to a call of that dtype and shape (``groups`` stays None: ``pick_groups``).

    Mosaic GPU: ``MOSAIC_SPLIT_CONFIG`` where ``pick_groups`` splits the call's rows and Dk and Dv hold two tiles
    each (rows too short to split keep one program per tile: more programs); ``multicast`` (with
    ``MOSAIC_MULTICAST_STAGES``) only where every walk has 2 to 8 Dv tiles; split walks in as many of those stages
    as fit in shared memory (they hold a bf16 state per stage); the paired backward (``fused_backward``)
    only where it applies (Dk = Dv, shared memory), else three walks; at Dk = Dv = ``MOSAIC_WHOLE_BACKWARD_D`` the
    whole backward in one launch (``fused_backward`` = 2), its dq walk restarting from the forward's states every
    ``MOSAIC_DQ_CHECKPOINTS`` chunks where the walks are split (``split_state``).
    """
    config = DEFAULT_CONFIGS[backend]
    if backend != "mosaic_gpu":
        return config
    split = dataclasses.replace(config, **MOSAIC_SPLIT_CONFIG)
    width = pallas_mosaic_gpu.tile_width(split, dv)
    needs_split = pick_groups(batch, heads, length, dv // pallas_mosaic_gpu.tile_width(config, dv), config.chunk,
                              pallas_mosaic_gpu.TARGET_PROGRAMS) > 1
    if needs_split and dk % width == 0 and dv % width == 0:
        config = split
    if config.multicast:  # checked as it would run: with its stages
        clustered = dataclasses.replace(config, num_stages=MOSAIC_MULTICAST_STAGES)
        fits = _raises_nothing(pallas_mosaic_gpu.check_supported, dtype, dk, dv, clustered, False)
        config = clustered if fits else dataclasses.replace(config, multicast=0)
    if config.split_state:  # a split walk keeps a bf16 state per TMA stage: as many stages as fit
        config = next((dataclasses.replace(config, num_stages=stages) for stages in range(config.num_stages, 0, -1)
                       if _raises_nothing(pallas_mosaic_gpu.check_supported, dtype, dk, dv,
                                          dataclasses.replace(config, num_stages=stages), False)), config)
    if not _raises_nothing(pallas_mosaic_gpu.check_fused_supported, dtype, dk, dv, config):
        config = dataclasses.replace(config, fused_backward=0)
    elif dk == dv == MOSAIC_WHOLE_BACKWARD_D:
        config = dataclasses.replace(config, fused_backward=2,
                                     dq_checkpoints=MOSAIC_DQ_CHECKPOINTS if config.split_state else 0)
    return config


def _raises_nothing(check, *args) -> bool:
    try:
        check(*args)
    except ValueError:
        return False
    return True


def lightning_attention_pallas(q, k, v, decay, *, initial_state=None, segment_ids=None, backend: str = "triton",
                               config: KernelConfig | None = None, interpret: bool = False):
    """Lightning attention with the Pallas kernels; arguments and semantics as ``api.lightning_attention``.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; decay: [H]; initial_state: [B, H, Dk, Dv] float32 or None;
    segment_ids: [B, T] or None. Returns (o [B, T, H, Dv] in v's dtype, final state [B, H, Dk, Dv] float32).
    Differentiable in q, k, v and initial_state (custom VJP); ``interpret`` runs the kernels in Pallas interpret mode.
    ``config``: None for the backend's default fitted to the call (``default_config``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown Pallas backend {backend!r}; choose from {BACKENDS}")
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    config = config or default_config(backend, q.dtype, batch, heads, length, dk, dv)
    for option in ("fused_backward", "split_state", "multicast", "dq_checkpoints"):
        if getattr(config, option) and backend != "mosaic_gpu":
            raise ValueError(f"{option} is a Mosaic GPU kernel option; the {backend} backend has one program shape "
                             f"and walks three times")
    fused_backward = whole_backward = states_forward = None
    if backend == "triton":
        for name, dim in (("Dk", dk), ("Dv", dv), ("chunk", config.chunk)):
            if dim & (dim - 1) or dim < 1:
                raise ValueError(f"the Triton kernel needs power-of-two sizes; got {name}={dim}")
        scan = functools.partial(pallas_triton.chunk_scan, config=config, interpret=interpret)
        tiles, target_programs = max(dv // config.block_v, 1), DEFAULT_TARGET_PROGRAMS
    elif backend == "mosaic_gpu":
        pallas_mosaic_gpu.check_supported(q.dtype, dk, dv, config, segment_ids is not None)
        scan = functools.partial(pallas_mosaic_gpu.chunk_scan, config=config, interpret=interpret)
        if config.fused_backward:
            pallas_mosaic_gpu.check_fused_supported(q.dtype, dk, dv, config)
            fused_backward = functools.partial(pallas_mosaic_gpu.fused_backward_scan, config=config,
                                               interpret=interpret)
        if config.fused_backward == 2:
            whole_backward = functools.partial(pallas_mosaic_gpu.one_launch_backward_scan, config=config,
                                               interpret=interpret)
        if config.dq_checkpoints:
            states_forward = functools.partial(pallas_mosaic_gpu.forward_with_states, config=config,
                                               interpret=interpret)
        tiles = max(dv // pallas_mosaic_gpu.tile_width(config, dv), 1)
        target_programs = pallas_mosaic_gpu.TARGET_PROGRAMS
    else:
        scan = functools.partial(pallas_tpu.chunk_scan, config=config, interpret=interpret)
        tiles, target_programs = 1, DEFAULT_TARGET_PROGRAMS
    groups = config.groups or pick_groups(batch, heads, length, tiles, config.chunk, target_programs)
    doc = None if segment_ids is None else reference._document_index(segment_ids, batch, length)
    # One dtype into the kernels (tensor-core dots need equal operand types); o comes back in v's dtype.
    q, k, v_cast = q, k.astype(q.dtype), v.astype(q.dtype)
    o, final = ops.lightning(scan, q, k, v_cast, decay, initial_state=initial_state, doc=doc,
                             chunk=config.chunk, groups=groups, fused_backward=fused_backward,
                             whole_backward=whole_backward, states_forward=states_forward)
    return o.astype(v.dtype), final
