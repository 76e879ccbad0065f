"""Static knobs of the Pallas lightning kernels and the row layout they walk."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch parameters (all static).

    chunk: tokens per chunk (power of two; 64 suits H100 tensor-core tiles, TPU wants a multiple of 128).
    block_v: Dv tile per program (Triton) or per walking warpgroup (Mosaic GPU); smaller tiles mean more programs but
        re-read q and k.
    groups: sequence groups walked in parallel (1 = one walk per row; None = pick from the shape, see ``pick_groups``).
    num_warps, num_stages: Triton launch parameters (num_stages: also the Mosaic GPU kernel's TMA slots).
    consumers: Mosaic GPU only. 0: one warpgroup per program walks one ``block_v`` tile and issues its own loads.
        1 or 2: warp specialization, a producer warpgroup issues the TMA loads and each of ``consumers`` warpgroups
        walks its own ``block_v`` tile of the same (row, head), sharing the q/k loads (a program covers
        ``consumers * block_v`` columns of Dv).
    fused_backward: Mosaic GPU only. 0: the backward's dv and dk come from two reverse walks of the forward kernel.
        1: from one launch (``pallas_mosaic_gpu.fused_backward_scan``; Dk = Dv; as many of ``num_stages`` TMA stages
        as fit in shared memory): with ``split_state``, the two reverse walks as split-walk programs of their own, up
        to 128 columns wide; without, as two consumer warpgroups of one program on the same TMA-loaded chunks of q,
        k, v and dO. 2: the whole backward in one launch (``pallas_mosaic_gpu.one_launch_backward_scan``; Dk = Dv <=
        128, chunk 64): per (row, head) a dq walk program and a program that walks dv and dk from one dS chain; a
        sequence split (``groups`` > 1) takes 1's walks.
    split_state: Mosaic GPU walks with outputs (the forward, the dq walk, the dk and dv walks), ``consumers`` = 0.
        1: three warpgroups per program (``pallas_mosaic_gpu._split_kernel``): one carries the state, the chunk
        recurrence's only loop-carried chain, and hands each chunk's state to one that makes the outputs; the third
        issues the TMA loads. 0: one warpgroup walks the whole chunk chain.
    multicast: with ``split_state``: 1 runs the Dv-tile programs of a (row, head) as one thread-block cluster; each
        loads its share of every chunk's q and k rows into all of them (TMA multicast), so q and k cross L2 once per
        (row, head) instead of once per tile. The backward's dv and dk walk programs (one tile each) likewise load q
        and dO once.
    dq_checkpoints: with ``fused_backward`` = 2, chunks between the forward states that the forward saves (in bf16)
        for the backward (0: none; ``pallas.default_config`` sets ``pallas.MOSAIC_DQ_CHECKPOINTS`` wherever it picks
        the one-launch backward with split walks). The one-launch backward's dq walk then restarts from them, one
        segment of this many chunks at a time, in the reverse order of the dv and dk walks, and its program runs in
        step with theirs (one cluster per head), so the chunks of k, v and dO it reads were just read by the other
        program and come from L2, not HBM. Without them the dq walk runs forward in time from the start and reads k,
        v and dO again.
    """
    chunk: int = 64
    block_v: int = 32
    groups: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    consumers: int = 0
    fused_backward: int = 0
    split_state: int = 0
    multicast: int = 0
    dq_checkpoints: int = 0


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """A sequence of ``n_valid`` tokens cut into ``groups`` rows of ``length`` tokens each (zero-padded at the end).

    Row ``r`` of the kernel's batch is group ``r % groups`` of batch element ``r // groups``.
    """
    length: int
    n_valid: int
    groups: int = 1

    def row_valid(self, row):
        """Valid tokens in kernel row ``row`` (a traced int scalar inside kernels)."""
        group = row % self.groups if self.groups > 1 else 0
        return jnp.clip(self.n_valid - group * self.length, 0, self.length)


# Programs a sequence split aims for by default: a few per H100 SM (the Triton and TPU walks).
DEFAULT_TARGET_PROGRAMS = 512


def pick_groups(batch: int, heads: int, length: int, tiles: int, chunk: int,
                target_programs: int = DEFAULT_TARGET_PROGRAMS,
                min_chunks_per_group: int = 64) -> int:
    """Sequence groups so that batch * heads * tiles * groups reaches ``target_programs`` (a few per H100 SM).

    Splitting costs one extra read of k and v (the state-only pass), so only split when the walk would otherwise
    leave SMs idle, and keep each group long enough that its walk amortises the launch. Among the counts from that
    target down to half of it, the largest that cuts ``length`` into whole chunks per group wins: a count that does
    not pads every row, and the pad copies q, k and v (on an H200 at B1 H8 1M, 9 groups took 12.4 ms where 8 took
    4.5 ms; ``benchmarks/RESULTS.md``).
    """
    programs = batch * heads * tiles
    if programs >= target_programs // 2:
        return 1
    groups = -(-target_programs // programs)
    max_groups = max(1, length // (chunk * min_chunks_per_group))
    groups = int(max(1, min(groups, max_groups)))
    return next((g for g in range(groups, (groups - 1) // 2, -1) if length % (g * chunk) == 0), groups)
