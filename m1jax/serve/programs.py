"""The continuous engine's device side: the paged pools and the jitted programs that run on them.

Programs (each jitted once per bucketed shape; ``TRACE_COUNTS`` counts traces, so tests can see that a steady
state compiles nothing):
* ``prefill``: one prompt chunk [1, L] (L a chunk bucket, right-padded) -> next-token logits after its last real
  token; writes the chunk's keys and values into the sequence's pages and its lightning state into its slot.
* ``decode``: one token for each of R rows (R a row bucket; padding rows use scratch slot 0 and page 0), then per-row
  sampling and stop rules (``m1jax.generate``'s functions with per-row settings and keys). A row feeds either a
  token from the host or the token (and truncation run) that the previous step sampled for its slot, kept on the
  device (``feedback``): so the engine can dispatch step N + 1 before it reads step N back (``EngineConfig.overlap``).
* ``sample``: the first token of a request from its last prefill logits (the same sampling code).
``decode`` and ``sample`` compile a filtering and a non-filtering variant (a static bool: does any row use top-k or
top-p); the host knows every row's settings, so the program has no device-side branch.
* ``snapshot`` / ``restore``: a slot's lightning states out to the prefix cache and back into a slot.
* ``copy_page``: copy-on-write of a partly filled shared page, in every softmax layer.
The page-table width of a call is a context bucket (a power of two of pages; a decode call's widest one a multiple the
paged decode kernels can split: ``decode_table_width``), so short sequences do not gather pages for the longest
context. The pools are donated to every program that writes them: XLA updates them in place
(``tests/serve/test_programs.py`` checks the aliasing).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax.cache import PagedCache
from m1jax.config import ModelConfig
from m1jax.generate import Sampling, StopRules, sample_tokens, update_stop_state
from m1jax.serve.config import EngineConfig
from pallas_kernels.attention.paged import pallas_triton as paged_triton

TRACE_COUNTS: collections.Counter = collections.Counter()


def power_of_two_bucket(n: int, low: int, high: int) -> int:
    """The smallest power of two >= n, clipped to [low, high] (n <= high)."""
    return min(high, max(low, 1 << max(n - 1, 0).bit_length()))


def decode_table_width(pages: int, page_size: int) -> int:
    """The page-table width a decode call uses for up to ``pages`` pages: the next power of two, or the next multiple
    of (most context splits x most pages per compute block of the Triton paged kernel) when that is smaller.

    The kernel cuts a row's table into context splits and compute blocks that must divide it. A width like 1025
    pages (128K tokens + one page) has no divisor up to 16 but 1 and 5: the kernel ran one split of one-page blocks
    (128 programs at 64 rows x 2 KV heads, fewer than an H200's SMs). Entries past a row's pages point at scratch
    page 0; the kernels read only the filled pages, so the extra width costs nothing there (prefill, which gathers
    the whole table, keeps the exact width).
    """
    per_block = max(1, min(paged_triton.MAX_PAGES_PER_BLOCK, paged_triton.MAX_BLOCK_TOKENS // page_size))
    multiple = paged_triton.MAX_SPLITS * per_block
    return min(1 << max(pages - 1, 0).bit_length(), -(-pages // multiple) * multiple)


@dataclasses.dataclass(frozen=True, eq=False)
class StaticModel:
    """The model's graphdef as a jit static argument, hashed once: jit hashes its static arguments on every call,
    and hashing an nnx graphdef walks the whole module graph (about 0.4 ms per call for m1-1b). Equal graphdefs
    still share compiled programs (``__eq__`` compares them)."""
    graphdef: Any
    _hash: int = dataclasses.field(default=0, repr=False)

    @classmethod
    def of(cls, graphdef) -> "StaticModel":
        return cls(graphdef, hash(graphdef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticModel) and (self.graphdef is other.graphdef or self.graphdef == other.graphdef)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSettings:
    """Per-row sampling and stop settings of a call ([R] arrays; stop tokens [R, S]).

    seeds: each request's seed; counters: tokens it generated before this one (the key of a row's draw is
    fold_in(key(seed), counter), so a request's samples do not depend on what it is batched with); run: its current
    run of confident tokens (M1's truncation).
    """
    sampling: Sampling
    stop: StopRules
    seeds: jax.Array
    counters: jax.Array
    run: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampled:
    """Per-row outputs of a sampling step: tokens [R] int32, model_logprobs [R] (raw model, temperature 1), done
    [R] bool (stop token or truncation), run [R] int32, stop_reason [R] int32 (``m1jax.generate``'s codes)."""
    tokens: jax.Array
    model_logprobs: jax.Array
    done: jax.Array
    run: jax.Array
    stop_reason: jax.Array


def sample_rows(logits: jax.Array, rows: RowSettings, filtering: bool) -> Sampled:
    """logits [R, V] f32 -> one token per row with its own settings and key, and the stop rules applied.
    ``filtering``: whether any row uses top-k or top-p (static)."""
    keys = jax.vmap(lambda seed, counter: jax.random.fold_in(jax.random.key(seed), counter))(rows.seeds,
                                                                                            rows.counters)
    tokens, _, model_logp, _ = sample_tokens(keys, logits, rows.sampling, filtering)
    zeros = jnp.zeros_like(rows.run)
    done, run, reason = update_stop_state(rows.stop, tokens, model_logp, jnp.zeros(zeros.shape, bool), rows.run, zeros)
    return Sampled(tokens, model_logp, done, run, reason)


def _prefill(static, params, pools, tokens, slots, page_table, lengths, num_new, repeats):
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(static.graphdef, params)
    cache = PagedCache(pools, slots, page_table, lengths, num_new, repeats)
    out = model.backbone(tokens, cache=cache)
    last = jnp.take_along_axis(out.hidden, (num_new - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    return model.logits(last), out.cache.layers


def _decode(static, params, pools, feedback, tokens, fed_back, slots, page_table, lengths, rows, repeats, filtering):
    """Rows with ``fed_back`` [R] bool feed ``feedback["tokens"][slot]`` and continue the truncation run
    ``feedback["run"][slot]`` (what the previous step sampled for the slot) instead of ``tokens`` and ``rows.run``;
    every row's sampled token and run go back to ``feedback`` at its slot (padding rows: scratch slot 0)."""
    TRACE_COUNTS["decode"] += 1
    tokens = jnp.where(fed_back, feedback["tokens"][slots], tokens)
    rows = dataclasses.replace(rows, run=jnp.where(fed_back, feedback["run"][slots], rows.run))
    model = nnx.merge(static.graphdef, params)
    cache = PagedCache(pools, slots, page_table, lengths, jnp.ones_like(lengths), repeats)
    out = model.backbone(tokens[:, None], cache=cache)
    sampled = sample_rows(model.logits(out.hidden[:, 0]), rows, filtering)
    feedback = {"tokens": feedback["tokens"].at[slots].set(sampled.tokens),
                "run": feedback["run"].at[slots].set(sampled.run)}
    return sampled, out.cache.layers, feedback


def _sample(logits, rows, filtering):
    TRACE_COUNTS["sample"] += 1
    return sample_rows(logits, rows, filtering)


def _snapshot(pools, slot):
    TRACE_COUNTS["snapshot"] += 1
    return tuple(e["state"][:, slot] for e in pools if "state" in e)


def _restore(pools, slot, snapshot):
    TRACE_COUNTS["restore"] += 1
    states = iter(snapshot)
    return tuple({"state": e["state"].at[:, slot].set(next(states))} if "state" in e else e for e in pools)


def _copy_page(pools, src, dst, repeats):
    TRACE_COUNTS["copy_page"] += 1
    per_layer = next(e["k"].shape[1] for e in pools if "k" in e) // repeats
    offsets = jnp.arange(repeats, dtype=jnp.int32) * per_layer
    return tuple({name: a.at[:, offsets + dst].set(a[:, offsets + src]) for name, a in e.items()} if "k" in e
                 else e for e in pools)


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 8), donate_argnums=2)
_decode_jit = jax.jit(_decode, static_argnums=(0, 10, 11), donate_argnums=(2, 3))
_sample_jit = jax.jit(_sample, static_argnums=2)
_snapshot_jit = jax.jit(_snapshot)
_restore_jit = jax.jit(_restore, donate_argnums=0)
_copy_page_jit = jax.jit(_copy_page, static_argnums=3, donate_argnums=0)


class DevicePrograms:
    """The model's parameters, the pools, and the programs above with the engine's buckets applied.

    Host arrays in; ``sample`` returns ``Sampled`` as NumPy arrays (which waits for it), ``decode`` returns it on the
    device without waiting (``fetch`` brings it over). Slot 0 and page 0 are scratch; sequences use slots
    1..max_batch and pages 1...
    """

    def __init__(self, graphdef, params, model_cfg: ModelConfig, config: EngineConfig):
        self.graphdef, self.params = graphdef, params
        self.static = StaticModel.of(graphdef)
        self.model_cfg, self.config = model_cfg, config
        self.repeats = model_cfg.num_hidden_layers // model_cfg.layer_period
        self.kv_dtype = config.kv_dtype or model_cfg.compute_dtype
        self.pools = self.feedback = None
        self.reset_pools()

    def reset_pools(self) -> None:
        """Fresh pools and feedback (a decode step's sampled token and run per slot: [max_batch + 1] int32 each)."""
        self.pools = None  # the old pools go before the new ones are allocated
        self.pools = PagedCache.init_pools(self.model_cfg, num_slots=self.config.max_batch + 1,
                                           num_pages=self.config.total_pages, page_size=self.config.page_size,
                                           kv_dtype=self.kv_dtype)
        slots = self.config.max_batch + 1
        self.feedback = {"tokens": jnp.zeros(slots, jnp.int32), "run": jnp.zeros(slots, jnp.int32)}

    # ---- sizes
    @property
    def page_bytes(self) -> int:
        """One page of every softmax layer, K and V."""
        return sum(e["k"].nbytes + e["v"].nbytes for e in self.pools if "k" in e) // self.config.total_pages

    @property
    def snapshot_bytes(self) -> int:
        """One sequence's lightning states (every lightning layer)."""
        return sum(e["state"].nbytes for e in self.pools if "state" in e) // (self.config.max_batch + 1)

    # ---- buckets
    def row_bucket(self, rows: int) -> int:
        return power_of_two_bucket(rows, self.config.min_decode_rows, self.config.max_batch)

    def chunk_bucket(self, tokens: int) -> int:
        return power_of_two_bucket(tokens, min(self.config.min_chunk, self.config.chunk_size), self.config.chunk_size)

    def table_width(self, tokens: int, decode: bool = False) -> int:
        """Page-table width for sequences of up to ``tokens`` tokens (context bucket): a power of two of pages, at
        least ``min_context_bucket`` tokens, at most ``pages_per_sequence``; for a decode call, each made a width
        the paged kernel splits well (``decode_table_width``)."""
        c = self.config
        pages = -(-tokens // c.page_size)
        low = min(-(-c.min_context_bucket // c.page_size), c.pages_per_sequence)
        width = power_of_two_bucket(pages, low, c.pages_per_sequence)
        return decode_table_width(width, c.page_size) if decode else width

    def buckets(self) -> dict[str, list[int]]:
        """Every row bucket, chunk bucket and page-table width a call can have."""
        c = self.config
        return {"rows": sorted({self.row_bucket(n) for n in range(1, c.max_batch + 1)}),
                "chunks": sorted({self.chunk_bucket(n) for n in range(1, c.chunk_size + 1)}),
                "widths": sorted({self.table_width(n) for n in range(1, c.max_context + 1, c.page_size)}),
                "decode_widths": sorted({self.table_width(n, decode=True)
                                         for n in range(1, c.max_context + 1, c.page_size)})}

    def warmup(self) -> None:
        """Compile every program for every bucket and both sampling variants (on scratch slot 0 and page 0, which no
        sequence uses), so that serving afterwards compiles nothing."""
        b = self.buckets()
        s = self.config.max_stop_tokens
        for width in b["widths"]:
            for length in b["chunks"]:
                zeros = np.zeros((1, length), np.int32)
                logits, self.pools = _prefill_jit(self.static, self.params, self.pools, zeros,
                                                  np.zeros(1, np.int32), np.zeros((1, width), np.int32),
                                                  np.zeros(1, np.int32), np.asarray([length], np.int32),
                                                  self.repeats)
        for width in b["decode_widths"]:
            for rows in b["rows"]:
                for filtering in (False, True):
                    zeros = np.zeros(rows, np.int32)
                    self._decode_padded(zeros, np.zeros(rows, bool), zeros, np.zeros((rows, width), np.int32), zeros,
                                        row_settings([], rows, s), filtering)
        for filtering in (False, True):
            self.sample(logits, row_settings([], 1, s), filtering)
        self.restore(0, self.snapshot(0))
        self.copy_page(0, 0)
        jax.block_until_ready(self.pools)

    def _table(self, page_lists, rows: int, width: int) -> np.ndarray:
        """[rows, width] int32 page table (rows past the lists and entries past a row's pages: scratch page 0);
        page lists are int32 arrays or lists."""
        table = np.zeros((rows, width), np.int32)
        for i, pages in enumerate(page_lists):
            n = min(len(pages), width)
            table[i, :n] = pages[:n]
        return table

    # ---- programs
    # Host inputs go over in one explicit ``jax.device_put`` per call and results come back in one ``jax.device_get``
    # (the one wait of a step): a step makes no implicit transfer (tests/serve/test_programs.py runs the engine
    # under ``jax.transfer_guard("disallow")``), so a stray sync in the serving loop shows up as an error.
    def prefill(self, tokens: np.ndarray, slot: int, pages, start: int) -> jax.Array:
        """Prompt tokens [n] at positions start .. start + n - 1 of the sequence in ``slot`` with page table
        ``pages`` -> next-token logits [1, V] (device)."""
        n = tokens.size
        padded = np.zeros((1, self.chunk_bucket(n)), np.int32)
        padded[0, :n] = tokens
        table = self._table([pages], 1, self.table_width(start + n))
        inputs = jax.device_put((padded, np.asarray([slot], np.int32), table, np.asarray([start], np.int32),
                                 np.asarray([n], np.int32)))
        logits, self.pools = _prefill_jit(self.static, self.params, self.pools, *inputs, self.repeats)
        return logits

    def decode(self, tokens, fed_back, slots, page_lists, lengths, rows: RowSettings, filtering: bool) -> Sampled:
        """Feed one token per row (the sequences' lengths before it) and sample the next: dispatched, not waited
        for (the result stays on the device: ``fetch``). A row with ``fed_back`` feeds what the last decode step
        sampled for its slot (its entry of ``tokens`` is ignored). Arrays are padded here to the row bucket (``rows``
        must already be padded: see ``row_settings``); ``filtering``: whether any row uses top-k or top-p."""
        r = self.row_bucket(len(tokens))
        pad = r - len(tokens)
        table = self._table(page_lists, r, self.table_width(max(lengths) + 1, decode=True))
        return self._decode_padded(np.pad(np.asarray(tokens, np.int32), (0, pad)),
                                   np.pad(np.asarray(fed_back, bool), (0, pad)),
                                   np.pad(np.asarray(slots, np.int32), (0, pad)), table,
                                   np.pad(np.asarray(lengths, np.int32), (0, pad)), rows, filtering)

    def _decode_padded(self, tokens, fed_back, slots, table, lengths, rows: RowSettings, filtering: bool) -> Sampled:
        inputs = jax.device_put((tokens, fed_back, slots, table, lengths, rows))
        sampled, self.pools, self.feedback = _decode_jit(self.static, self.params, self.pools, self.feedback,
                                                         *inputs, self.repeats, bool(filtering))
        return sampled

    @staticmethod
    def fetch(sampled: Sampled) -> Sampled:
        """A decode step's result as NumPy arrays (waits for that step, not for steps dispatched after it)."""
        return jax.device_get(sampled)

    def sample(self, logits: jax.Array, rows: RowSettings, filtering: bool) -> Sampled:
        return jax.device_get(_sample_jit(logits, jax.device_put(rows), bool(filtering)))

    def snapshot(self, slot: int) -> tuple:
        return _snapshot_jit(self.pools, jax.device_put(np.int32(slot)))

    def restore(self, slot: int, snapshot: tuple) -> None:
        self.pools = _restore_jit(self.pools, jax.device_put(np.int32(slot)), snapshot)

    def copy_page(self, src: int, dst: int) -> None:
        self.pools = _copy_page_jit(self.pools, *jax.device_put((np.int32(src), np.int32(dst))), self.repeats)


def row_settings(requests, rows: int, max_stop_tokens: int) -> RowSettings:
    """The settings of ``requests`` (``m1jax.serve.requests.Request``) padded to ``rows`` rows with greedy,
    never-stopping rows. A request's counter counts its tokens sampled in steps still in flight too."""
    temperature = np.zeros(rows, np.float32)
    top_k = np.zeros(rows, np.int32)
    top_p = np.ones(rows, np.float32)
    stops = np.full((rows, max_stop_tokens), -1, np.int32)
    truncate_after = np.zeros(rows, np.int32)
    truncate_prob = np.ones(rows, np.float32)
    seeds = np.zeros(rows, np.uint32)
    counters = np.zeros(rows, np.int32)
    run = np.zeros(rows, np.int32)
    for i, r in enumerate(requests):
        p = r.params
        temperature[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
        stops[i, :len(p.stop_token_ids)] = p.stop_token_ids
        truncate_after[i], truncate_prob[i] = p.truncate_after, p.truncate_prob
        seeds[i], counters[i], run[i] = r.seed, len(r.tokens) + r.pending, r.run
    return RowSettings(Sampling(temperature, top_k, top_p), StopRules(stops, truncate_after, truncate_prob), seeds,
                       counters, run)


def uses_filters(requests) -> bool:
    """Whether any of ``requests`` uses top-k or top-p: the sampling variant its decode or sample call runs."""
    return any(r.params.top_k > 0 or r.params.top_p < 1 for r in requests)
