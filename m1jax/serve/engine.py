"""The continuous-batching engine: requests join and leave between steps, the paged hybrid cache, chunked prefill
under a token budget, and the hybrid prefix cache (docs/serving.md).

One step (``_step``, on the engine thread):
1. admit waiting requests in arrival order while a slot is free and their pages can be allocated: look up the
   longest cached prefix (at most prompt - 1 tokens: the last prompt token is always computed, for its logits),
   share its full pages, copy its partly filled last page, restore its lightning snapshot into the slot, and
   allocate every other page the request can ever need (so a running request never waits for memory);
2. decode: every request that has a sampled token feeds it and samples the next, all in one call. With
   ``EngineConfig.overlap`` the call is dispatched before the previous step's results are read back: a row that
   continues feeds the token the previous step sampled for it on the device, and the host reads step N (streams
   its tokens, finishes requests) while the device runs step N + 1 (see ``_decode``);
3. prefill: with the step's remaining token budget, prompt chunks of the requests still prefilling, oldest first.
   A chunk ends at the next multiple of ``chunk_size`` or of ``snapshot_interval`` or at the prompt's end, so its
   boundaries depend only on positions: a request that starts from a cached prefix computes the same chunks, with
   the same programs and inputs, as one that computed the prefix itself. At every multiple of ``snapshot_interval``
   the request's lightning states and pages become a prefix-cache node.
A request finishes on a stop token, M1's truncation or ``max_tokens``; finishing or cancelling frees its slot and
pages (pages the prefix cache also holds stay until evicted).
"""
from __future__ import annotations

import collections

import numpy as np
from flax import nnx

from m1jax.generate import graphdef_config
from m1jax.serve.config import EngineConfig
from m1jax.serve.loop import FINISH_BY_STOP_REASON, EngineLoop
from m1jax.serve.pages import PagePool
from m1jax.serve.prefix_cache import PrefixCache
from m1jax.serve.programs import DevicePrograms, row_settings, uses_filters
from m1jax.serve.requests import Request


class ContinuousEngine(EngineLoop):
    """``ContinuousEngine(model_or_split, config)``: a model or its ``nnx.split`` (graphdef, state). ``start()`` runs
    it on its own thread; tests and benchmarks may drive it with ``step()`` / ``run_until_idle()`` instead."""

    def __init__(self, model_or_split, config: EngineConfig = EngineConfig()):
        graphdef, params = nnx.split(model_or_split) if isinstance(model_or_split, nnx.Module) else model_or_split
        model_cfg = graphdef_config(graphdef, params)
        if config.max_context > model_cfg.max_position_embeddings:
            raise ValueError(f"EngineConfig.max_context={config.max_context} exceeds the model's "
                             f"max_position_embeddings={model_cfg.max_position_embeddings}")
        super().__init__(model_cfg, max_context=config.max_context, max_stop_tokens=config.max_stop_tokens,
                         seed=config.seed)
        self.config = config
        self.split = (graphdef, params)  # the model served (as StaticEngine has it)
        self.device = DevicePrograms(graphdef, params, model_cfg, config)
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[str, Request] = {}
        self._reset_bookkeeping()

    def _recover(self) -> None:
        """Fresh pools after a failed step (the step may have consumed the donated pools), and empty bookkeeping."""
        self.device.reset_pools()
        self._reset_bookkeeping()

    def _reset_bookkeeping(self) -> None:
        config = self.config
        self.pages = PagePool(config.total_pages)
        self.prefix_cache = PrefixCache(config.snapshot_interval, config.prefix_cache_bytes, self.device.page_bytes,
                                        self.device.snapshot_bytes, self.pages)
        self._free_slots = list(range(config.max_batch, 0, -1))  # slot 0 is scratch
        self._in_flight = None  # (requests, device Sampled) of a decode step dispatched and not read back yet

    def warmup(self) -> None:
        """Compile every bucketed program now (serving then compiles nothing)."""
        with self._state_lock:
            self.device.warmup()

    def _check_capacity(self, prompt, params) -> None:
        pages = -(-(prompt.size + params.max_tokens - 1) // self.config.page_size)
        if pages > self.pages.num_pages - 1:
            raise ValueError(f"a request of {prompt.size} prompt tokens + max_tokens {params.max_tokens} needs "
                             f"{pages} KV pages; the engine has {self.pages.num_pages - 1}")

    # ------------------------------------------------------------------------------------------------ bookkeeping
    def _queued(self) -> int:
        return len(self._waiting)

    def _running(self) -> int:
        return len(self._active)

    def stats(self) -> dict:
        return {**super().stats(), "free_slots": len(self._free_slots), "free_pages": self.pages.num_free,
                "prefix_cache_bytes": self.prefix_cache.bytes, "prefix_cache_nodes": self.prefix_cache.num_nodes,
                "prefix_cache_evictions": self.prefix_cache.evictions}

    def _release(self, request: Request) -> None:
        if request in self._waiting:
            self._waiting.remove(request)
        if self._active.pop(request.request_id, None) is not None:
            self.pages.decref(request.pages)
            self._free_slots.append(request.slot)
            request.pages, request.slot, request.node = [], -1, None

    # ------------------------------------------------------------------------------------------------ the step
    def _step(self, new: list[Request]) -> bool:
        self._waiting.extend(new)
        admitted = self._admit()
        # A request whose tokens in flight reach max_tokens is done whatever they are: it gets no further step.
        decoding = [r for r in self._active.values()
                    if r.next_token is not None and len(r.tokens) + r.pending < r.params.max_tokens]
        previous = self._in_flight
        self._in_flight = self._decode(decoding) if decoding else None
        if not self.config.overlap:
            previous, self._in_flight = self._in_flight, None
        if previous is not None:
            self._read(*previous)
        budget = self.config.token_budget - len(decoding)
        prefilled = False
        for request in [r for r in self._active.values() if r.prefilling]:
            while request.prefilling and request.request_id in self._active:
                end = self._chunk_end(request)
                if end - request.length > budget:
                    break
                budget -= end - request.length
                self._prefill_chunk(request, end)
                prefilled = True
        return bool(admitted or decoding or previous or prefilled)

    def _chunk_end(self, request: Request) -> int:
        """End of the next prompt chunk: the next multiple of chunk_size or snapshot_interval, or the prompt end."""
        c = self.config
        pos = request.length
        return min((pos // c.chunk_size + 1) * c.chunk_size, (pos // c.snapshot_interval + 1) * c.snapshot_interval,
                   request.prompt.size)

    def _admit(self) -> bool:
        admitted = False
        while self._waiting and self._free_slots:
            if not self._start_sequence(self._waiting[0]):
                break  # arrival order: later requests wait behind one that does not fit yet
            request = self._waiting.popleft()
            self._active[request.request_id] = request
            admitted = True
        return admitted

    def _start_sequence(self, request: Request) -> bool:
        """Slot, pages and cached prefix for a waiting request; False (nothing held) if its pages do not fit."""
        ps = self.config.page_size
        cache = self.prefix_cache
        node = cache.lookup(request.prompt, request.prompt.size - 1) if cache.enabled else cache.root
        cached, snapshot, node_pages = node.length, node.snapshot, node.pages
        shared = list(node_pages[:cached // ps])
        partial = node_pages[cached // ps] if cached % ps else None  # copied, not shared: this request writes it
        held = shared + ([partial] if partial is not None else [])
        self.pages.incref(held)  # before evicting: the prefix must survive its own eviction
        need = -(-request.max_cached_tokens // ps) - len(shared)
        if self.pages.num_free < need:
            cache.evict_for_pages(need)
        if self.pages.num_free < need:
            self.pages.decref(held)
            return False
        fresh = self.pages.allocate(need)
        if partial is not None:
            self.device.copy_page(partial, fresh[0])
            self.pages.decref([partial])
        # An int32 array, fixed from here on: every device call of the request takes it as it is.
        request.pages = np.asarray(shared + fresh, np.int32)
        request.slot = self._free_slots.pop()
        if cached:
            self.device.restore(request.slot, snapshot)
        request.length = cached
        request.node = node if cache.enabled and node.alive else None
        request.handle.cached_prompt_tokens = cached
        self.counters["prompt_tokens"] += int(request.prompt.size)
        self.counters["cached_prompt_tokens"] += cached
        return True

    def _prefill_chunk(self, request: Request, end: int) -> None:
        start = request.length
        logits = self.device.prefill(request.prompt[start:end], request.slot, request.pages, start)
        request.length = end
        self.counters["prefilled_tokens"] += end - start
        n = self.config.snapshot_interval
        if end % n == 0 and request.node is not None and request.node.alive:
            node = self.prefix_cache.insert(request.node, request.prompt[end - n:end],
                                            request.pages[:-(-end // self.config.page_size)],
                                            lambda: self.device.snapshot(request.slot))
            request.node = node if node.alive else None
        if not request.prefilling:
            request.node = None
            sampled = self.device.sample(logits, row_settings([request], 1, self.config.max_stop_tokens),
                                         uses_filters([request]))
            self._record(request, sampled, 0)

    def _decode(self, requests: list[Request]) -> tuple:
        """Dispatch one decode step for ``requests`` (not waited for) -> what ``_read`` takes.

        A request with a step in flight feeds the token that step samples, on the device; the others feed
        ``next_token``. The host knows the step's inputs without its predecessor's results: a request's pages are
        fixed at admission, its length and counter advance by one per step. A request that the step in flight
        finishes (stop token, truncation) still runs in this step and its row is discarded: it writes position
        ``length``, inside its own pages (a request past max_tokens gets no step), and its slot, which a next owner
        restores or starts from zero after this step (device calls run in order: the pools go through every one).
        """
        rows = self.device.row_bucket(len(requests))
        sampled = self.device.decode([r.next_token for r in requests], [r.pending > 0 for r in requests],
                                     [r.slot for r in requests], [r.pages for r in requests],
                                     [r.length for r in requests],
                                     row_settings(requests, rows, self.config.max_stop_tokens), uses_filters(requests))
        for request in requests:
            request.length += 1
            request.pending += 1
        return requests, sampled

    def _read(self, requests: list[Request], sampled) -> None:
        """Read a decode step back and record its rows (a request finished or cancelled since: row discarded)."""
        sampled = self.device.fetch(sampled)
        for i, request in enumerate(requests):
            if self._active.get(request.request_id) is request:
                request.pending -= 1
                self._record(request, sampled, i)

    def _record(self, request: Request, sampled, row: int) -> None:
        """Stream row ``row`` of a sampling step's outputs and finish the request if it is done."""
        token = int(sampled.tokens[row])
        request.run = int(sampled.run[row])
        finish = None
        if sampled.done[row]:
            finish = FINISH_BY_STOP_REASON[int(sampled.stop_reason[row])]
        elif len(request.tokens) + 1 >= request.params.max_tokens:
            finish = "length"
        request.next_token = None if finish else token
        if finish:
            self._release(request)
        self._emit(request, token, float(sampled.model_logprobs[row]), finish)
