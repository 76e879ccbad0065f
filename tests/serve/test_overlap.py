"""The overlapped (pipelined) decode: step N + 1 is dispatched before step N is read back, its tokens fed on the
device. Every token equals the synchronous engine's and m1jax.generate's, with rows finishing at different steps,
stop tokens and truncation seen one step late, a cancellation while a step is in flight, and slots and pages reused
right after a discarded row wrote into them; the decode program has no device-side branch."""
import jax
import numpy as np
import pytest

from m1jax import generate as gen
from m1jax.serve import programs
from m1jax.serve.types import SamplingParams
from tests.serve.conftest import ENGINE, REFERENCE_NEW, TOL, generate_greedy, make_engine, random_prompts

GREEDY = SamplingParams(max_tokens=REFERENCE_NEW, temperature=0.0)


def _count_discarded_rows(engine) -> dict:
    """Wrap ``engine._read`` to count, per request id, the rows read back after the request had finished."""
    discarded = {}
    read = engine._read

    def counting(requests, sampled):
        for r in requests:
            if engine._active.get(r.request_id) is not r:
                discarded[r.request_id] = discarded.get(r.request_id, 0) + 1
        return read(requests, sampled)

    engine._read = counting
    return discarded


def _mixed_run(split, overlap: bool):
    """Seven requests on 4 slots (later ones take freed slots and pages): greedy to max_tokens, sampled with and
    without top-k / top-p, short max_tokens, a stop token mid-way, truncation, one cancelled at step 5 and one
    arriving at step 3. -> (results by name, the victim's tokens when cancelled, discarded rows, the engine)."""
    prompts = random_prompts(20, (5, 12, 7, 9, 14, 10, 30))
    reference = generate_greedy(split, [prompts[3]])[0][0]
    stop = reference[2] if reference[2] not in reference[:2] else reference[3]
    requests = {
        "victim": (prompts[5], GREEDY),
        "greedy": (prompts[0], GREEDY),
        "filtered": (prompts[1], SamplingParams(max_tokens=6, temperature=0.9, top_k=20, top_p=0.9, seed=11)),
        "short": (prompts[2], SamplingParams(max_tokens=3, temperature=1.0, seed=5)),
        "stop": (prompts[3], GREEDY.replace(stop_token_ids=(stop,))),
        "truncated": (prompts[4], GREEDY.replace(truncate_after=3, truncate_prob=0.0)),
    }
    engine = make_engine(split, overlap=overlap)
    discarded = _count_discarded_rows(engine)
    handles = {name: engine.submit(prompt, params) for name, (prompt, params) in requests.items()}
    victim = None
    for step in range(6):
        if step == 3:
            handles["late"] = engine.submit(prompts[6], GREEDY)
        if step == 5:
            request = engine._active[handles["victim"].request_id]
            assert request.pending == (1 if overlap else 0)  # cancelled while its next step is in flight
            victim = list(request.tokens)
            engine.cancel(handles["victim"].request_id)
        engine.step()
    engine.run_until_idle()
    return {name: h.result() for name, h in handles.items()}, victim, discarded, engine


def test_overlapped_engine_equals_the_synchronous_engine_token_for_token(split):
    overlapped, victim, discarded, engine = _mixed_run(split, overlap=True)
    synchronous, sync_victim, sync_discarded, _ = _mixed_run(split, overlap=False)
    for name, result in overlapped.items():
        if name == "victim":
            continue
        want = synchronous[name]
        assert result.token_ids == want.token_ids and result.finish_reason == want.finish_reason, name
        np.testing.assert_allclose(result.logprobs, want.logprobs, rtol=0, atol=TOL)
    assert overlapped["stop"].finish_reason == "stop" and overlapped["truncated"].finish_reason == "truncated"
    assert len(overlapped["truncated"].token_ids) == 3 and len(overlapped["short"].token_ids) == 3
    # The cancelled request streamed a prefix of the synchronous run's tokens: one step fewer had been read back.
    assert overlapped["victim"].finish_reason == "cancelled" and len(victim) == len(sync_victim) - 1
    assert victim == sync_victim[:len(victim)]
    # Rows of finished requests ran one more step on the overlapped engine (stop, truncation, cancellation) and
    # never on the synchronous one; a request at max_tokens got no further step.
    assert sync_discarded == {}
    assert {overlapped[n].request_id for n in ("stop", "truncated", "victim")} <= set(discarded)
    assert overlapped["greedy"].request_id not in discarded and max(discarded.values()) == 1
    greedy = generate_greedy(split, random_prompts(20, (5, 12, 7, 9, 14, 10, 30))[0:1])[0][0]
    assert list(overlapped["greedy"].token_ids) == greedy
    assert engine.stats()["free_slots"] == 4 and engine.stats()["running"] == 0
    assert engine.stats()["free_pages"] == engine.pages.num_pages - 1 - engine.prefix_cache.num_pages


def test_slot_and_pages_reused_after_a_discarded_row_and_cached_prefix_intact(split):
    """A (18-token prompt, cached at 6/12/18 tokens; the 18-token node's last page is partly A's decode) stops on
    its fourth token; the overlapped engine has already dispatched the step that feeds that token (position 21, in
    A's sixth page, past every cached prefix) when it reads the stop. B, submitted then, takes A's slot and its freed
    pages (freed pages are handed out last-freed first) while that step is still unread, and equals m1jax.generate;
    C, which shares A's 18-token prefix (copy-on-write of the page next to A's decode), equals m1jax.generate too."""
    a, b = random_prompts(22, (18, 13))
    c = a + random_prompts(21, (3,))[0]
    reference = generate_greedy(split, [a, b, c])
    stop = reference[0][0][3]
    assert stop not in reference[0][0][:3]
    engine = make_engine(split, num_pages=16)
    discarded = _count_discarded_rows(engine)
    first = engine.submit(a, GREEDY.replace(stop_token_ids=(stop,)))
    engine.step()
    request = engine._active[first.request_id]
    slot, freed = request.slot, set(request.pages[-(-18 // 4):].tolist())  # past the cached prefixes' pages
    while first.request_id in engine._active:
        engine.step()
    assert engine._in_flight is not None and request in engine._in_flight[0]  # its discarded step is unread
    second = engine.submit(b, GREEDY)
    engine.step()
    admitted = engine._active[second.request_id]
    assert admitted.slot == slot and freed <= set(admitted.pages.tolist())
    engine.run_until_idle()
    result = first.result()
    assert result.finish_reason == "stop" and list(result.token_ids) == reference[0][0][:4]
    assert discarded == {first.request_id: 1}  # the row that fed the stop token ran and was discarded
    assert list(second.result().token_ids) == reference[1][0]
    third = engine.submit(c, GREEDY)
    engine.run_until_idle()
    third = third.result()
    assert third.cached_prompt_tokens == 18 and list(third.token_ids) == reference[2][0]


@pytest.mark.parametrize("overlap", [True, False])
def test_warmup_compiles_both_sampling_variants_and_serving_compiles_nothing(split, overlap):
    engine = make_engine(split, min_decode_rows=1, overlap=overlap)
    before = dict(programs.TRACE_COUNTS)
    engine.warmup()
    buckets = engine.device.buckets()
    traced = programs.TRACE_COUNTS["decode"] - before.get("decode", 0)
    assert traced <= 2 * len(buckets["rows"]) * len(buckets["decode_widths"])  # less if an earlier test compiled
    before = dict(programs.TRACE_COUNTS)
    prompts = random_prompts(23, (6, 17, 11))
    handles = [engine.submit(prompts[0], GREEDY), engine.submit(prompts[1], SamplingParams(top_k=3, seed=1))]
    engine.step()
    handles.append(engine.submit(prompts[2], SamplingParams(top_p=0.5, max_tokens=5, seed=2)))
    engine.run_until_idle()
    assert all(h.result().finish_reason == "length" for h in handles)
    assert dict(programs.TRACE_COUNTS) == before


def test_decode_program_has_no_conditional(split):
    """Neither sampling variant of the compiled decode step holds a conditional (its predicate would be read back
    on the host mid-program on a GPU)."""
    device = make_engine(split).device
    rows, width = ENGINE.min_decode_rows, 16
    ints = np.zeros(rows, np.int32)
    for filtering in (False, True):
        hlo = programs._decode_jit.lower(device.static, device.params, device.pools, device.feedback, ints,
                                         np.zeros(rows, bool), ints, np.zeros((rows, width), np.int32), ints,
                                         programs.row_settings([], rows, ENGINE.max_stop_tokens), device.repeats,
                                         filtering).compile().as_text()
        assert " conditional(" not in hlo
    # the device-decided filter (``active=None``) compiles to one: the check above would see it
    sampling = programs.row_settings([], rows, ENGINE.max_stop_tokens).sampling
    logits = jax.numpy.zeros((rows, 8), jax.numpy.float32)
    assert " conditional(" in jax.jit(gen.filter_logits).lower(logits, sampling).compile().as_text()
