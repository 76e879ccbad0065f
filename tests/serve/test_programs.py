"""The engine's device programs: the pools are updated in place (every pool buffer is aliased to an output and never
copied whole), a serving step makes no implicit host<->device transfer, and a decode call's page table has a width
the paged decode kernel can split; the engine's answers stay those of m1jax.generate."""
import re

import jax
import numpy as np
import pytest

from m1jax.serve import programs
from m1jax.serve.types import SamplingParams
from pallas_kernels.attention.paged import pallas_triton
from tests.serve.conftest import ENGINE, REFERENCE_NEW, generate_greedy, make_engine, random_prompts

GREEDY = SamplingParams(max_tokens=REFERENCE_NEW, temperature=0.0)


def _aliased_parameters(hlo: str) -> set[int]:
    """Entry parameter numbers that ``input_output_alias`` maps to an output (compiled HLO text)."""
    match = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", hlo)
    assert match, "the compiled program aliases no input to an output"
    return {int(p) for p in re.findall(r"\}: \((\d+),", match.group(1))}


def _copies_of_shape(hlo: str, shape: tuple) -> list[str]:
    dims = ",".join(map(str, shape))
    return re.findall(rf"= \w+\[{dims}\]\{{[^}}]*\}} copy\(", hlo)


@pytest.mark.parametrize("program", ["decode", "prefill"])
def test_pools_are_donated_and_updated_in_place(split, program):
    """Every pool leaf (the lightning state pools and the K/V page pools) is an aliased input of the compiled
    program, the aliased bytes cover the pools, and no pool-sized buffer is copied (a copy would cost a read and a
    write of the whole KV cache per step)."""
    device = make_engine(split).device
    pools = jax.tree_util.tree_leaves(device.pools)
    n_params = len(jax.tree_util.tree_leaves(device.params))
    rows, width = (4, 16) if program == "decode" else (1, 16)
    ints = np.zeros(rows, np.int32)
    if program == "decode":
        lowered = programs._decode_jit.lower(device.static, device.params, device.pools, device.feedback, ints,
                                             np.zeros(rows, bool), ints, np.zeros((rows, width), np.int32), ints,
                                             programs.row_settings([], rows, ENGINE.max_stop_tokens), device.repeats,
                                             True)
    else:
        lowered = programs._prefill_jit.lower(device.static, device.params, device.pools, np.zeros((1, 8), np.int32),
                                              ints, np.zeros((1, width), np.int32), ints, ints + 8, device.repeats)
    compiled = lowered.compile()
    hlo = compiled.as_text()
    pool_parameters = set(range(n_params, n_params + len(pools)))  # flattened order: params, then pools, ...
    assert pool_parameters <= _aliased_parameters(hlo)
    assert compiled.memory_analysis().alias_size_in_bytes >= sum(p.nbytes for p in pools)
    for pool in pools:
        assert not _copies_of_shape(hlo, pool.shape), f"a pool of shape {pool.shape} is copied"


def test_serving_makes_no_implicit_transfer(split):
    """Under ``transfer_guard("disallow")`` (implicit host<->device transfers raise: ``np.asarray`` of a device
    array, a NumPy argument to a jitted call) the engine admits, prefills, hits the prefix cache and decodes, and
    its tokens are m1jax.generate's."""
    prompts = random_prompts(7, (13, 25))
    engine = make_engine(split)
    engine.warmup()  # compiles (outside the guard: compilation transfers constants)
    with jax.transfer_guard("disallow"):
        first = engine.submit(prompts[0], GREEDY)
        engine.run_until_idle()
        again = engine.submit(prompts[0], GREEDY)  # a prefix-cache hit: snapshot restore and copy-on-write page
        other = engine.submit(prompts[1], GREEDY)
        engine.run_until_idle()
    first, again, other = (handle.result() for handle in (first, again, other))  # result() drains a stream: once
    assert again.cached_prompt_tokens == 12
    reference = generate_greedy(split, prompts)
    assert list(first.token_ids) == list(again.token_ids) == reference[0][0]
    assert list(other.token_ids) == reference[1][0]


def test_decode_page_table_is_a_width_the_decode_kernel_can_split():
    """128K tokens + a page at 128-token pages is 1025 pages: the decode table used to be 1025 wide, which the Triton
    kernel could only take as one split of one-page blocks. A decode table is now the next multiple of (16 splits x
    1 page per block of at most 128 tokens) = 16 pages, or the next power of two when smaller; prefill keeps the
    exact width."""
    assert programs.decode_table_width(1025, 128) == 1040 and programs.decode_table_width(1024, 128) == 1024
    assert programs.decode_table_width(257, 128) == 272 and programs.decode_table_width(9, 128) == 16
    assert programs.decode_table_width(1025, 16) == 1152  # 8 pages per block of 16 tokens: multiples of 128
    # 64 rows, 2 KV heads, 8 query heads per KV head, 128-token pages (the benchmark's decode step): 1025 pages split
    # only 5 ways (1025 = 5 x 5 x 41), 1040 pages the 8 ways that bring 128 row-heads to 1024 programs.
    assert pallas_triton.plan(64, 2, 8, 1025, 128) == (5, 1)
    assert pallas_triton.plan(64, 2, 8, programs.decode_table_width(1025, 128), 128) == (8, 1)
    for pages in (3, 100, 257, 1025, 4097):  # every width divides into the plan's splits and blocks
        width = programs.decode_table_width(pages, 128)
        splits, per_block = pallas_triton.plan(1, 2, 8, width, 128)
        assert width >= pages and width % (splits * per_block) == 0 and per_block == 1


def test_engine_with_an_odd_context_decodes_with_the_wider_table_and_matches_generate(split):
    """max_context of 9 pages: prefill tables are 9 pages wide, decode tables 16 (entries past a sequence's pages
    point at the scratch page), and the outputs are m1jax.generate's."""
    engine = make_engine(split, max_context=36, min_context_bucket=36)
    assert engine.device.buckets()["widths"] == [9] and engine.device.buckets()["decode_widths"] == [16]
    prompts = random_prompts(8, (20, 27))
    handles = [engine.submit(p, GREEDY) for p in prompts]
    engine.run_until_idle()
    for handle, (tokens, _, _) in zip(handles, generate_greedy(split, prompts)):
        assert list(handle.result().token_ids) == tokens
