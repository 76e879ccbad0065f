"""The pure-JAX reference implementations and the public api, against the float64 oracle."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import api, lightning_attention, lightning_decode


def _inputs(prob):
    opt = lambda x: None if x is None else jnp.asarray(x)
    return ((jnp.asarray(prob[n]) for n in ("q", "k", "v", "decay")),
            {"initial_state": opt(prob["initial_state"]), "segment_ids": opt(prob["segment_ids"])})


@pytest.mark.parametrize("block_size", [1, 8, 16, 64, 256])
@pytest.mark.parametrize("segments,init", [(False, False), (True, True)])
def test_xla_chunked_matches_oracle_for_any_block(block_size, segments, init, lt):
    prob = lt.random_problem(block_size, 2, 41, 3, 8, 4, segments=segments, init=init)
    (q, k, v, s), kw = _inputs(prob)
    o, final = lightning_attention(q, k, v, s, return_final_state=True, implementation="xla_chunked",
                                   block_size=block_size, **kw)
    want = lt.oracle(prob["q"], prob["k"], prob["v"], prob["decay"], initial_state=prob["initial_state"],
                     segment_ids=prob["segment_ids"])
    assert lt.rel_err(o, want["o"]) < 1e-5 and lt.rel_err(final, want["final"]) < 1e-5


def test_recurrent_matches_oracle(lt):
    prob = lt.random_problem(11, 2, 23, 2, 4, 8, segments=True, init=True)
    (q, k, v, s), kw = _inputs(prob)
    o, final = lightning_attention(q, k, v, s, return_final_state=True, implementation="recurrent", **kw)
    want = lt.oracle(prob["q"], prob["k"], prob["v"], prob["decay"], **{n: prob[n] for n in
                                                                        ("initial_state", "segment_ids")})
    assert lt.rel_err(o, want["o"]) < 1e-5 and lt.rel_err(final, want["final"]) < 1e-5


def test_chunked_prefill_with_initial_state_continues_the_sequence(lt):
    """Prefill in two pieces, handing the final state over, equals one pass (the generation engine's use)."""
    prob = lt.random_problem(13, 1, 30, 2, 8, 8, segments=False, init=False)
    (q, k, v, s), _ = _inputs(prob)
    whole = lightning_attention(q, k, v, s, return_final_state=True)
    first = lightning_attention(q[:, :17], k[:, :17], v[:, :17], s, return_final_state=True)
    second = lightning_attention(q[:, 17:], k[:, 17:], v[:, 17:], s, initial_state=first[1], return_final_state=True)
    np.testing.assert_allclose(jnp.concatenate([first[0], second[0]], 1), whole[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second[1], whole[1], rtol=1e-5, atol=1e-5)


def test_decode_step_matches_oracle_one_token_on(lt):
    prob = lt.random_problem(17, 2, 5, 2, 8, 4, segments=False, init=True)
    (q, k, v, s), kw = _inputs(prob)
    o, state = lightning_decode(q[:, 4], k[:, 4], v[:, 4], s, kw["initial_state"])
    want = lt.oracle(prob["q"][:, 4:], prob["k"][:, 4:], prob["v"][:, 4:], prob["decay"],
                     initial_state=prob["initial_state"])
    assert lt.rel_err(o, want["o"][:, 0]) < 1e-5 and lt.rel_err(state, want["final"]) < 1e-5


def test_default_implementation_per_platform():
    assert api.default_implementation("cpu", 128, 128) == "xla_chunked"
    assert api.default_implementation("cuda", 128, 128) == "pallas_triton"
    assert api.default_implementation("cuda", 96, 128) == "xla_chunked"  # Triton needs power-of-two head dims
    assert api.default_implementation("tpu", 96, 128) == "pallas_tpu"
    assert api.default_implementation("cuda", 128, 128, generation="hopper") == api.GPU_DEFAULT["hopper"]


def test_gpu_default_table_switches_hopper_to_mosaic_where_it_applies(monkeypatch):
    """Switching a generation in GPU_DEFAULT is the one-line change; calls the Mosaic kernel cannot take stay on
    Triton, and other generations and platforms are untouched."""
    monkeypatch.setitem(api.GPU_DEFAULT, "hopper", "pallas_mosaic_gpu")
    pick = lambda target="cuda", dk=128, dv=128, **kw: api.default_implementation(target, dk, dv, **{
        "generation": "hopper", **kw})
    assert pick() == "pallas_mosaic_gpu"
    assert pick(has_segments=True) == "pallas_triton"
    assert pick(dtype=jnp.float32) == "pallas_triton"
    assert pick(dk=32, dv=32) == "pallas_triton"
    assert pick(generation=None) == "pallas_triton"
    assert pick(target="rocm") == "pallas_triton"


def test_gpu_generation_reads_the_traced_for_device():
    import jax
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        assert api.gpu_generation() == "hopper"
    assert api.gpu_generation() is None  # this host: cpu


def test_explicit_mosaic_gpu_refuses_a_gpu_that_is_not_hopper():
    import jax
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA B200", platform="gpu", num_cores=148)
    x = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        with pytest.raises(ValueError, match="Hopper"):
            lightning_attention(x, x, x, jnp.ones(1), implementation="pallas_mosaic_gpu")


def test_explicit_mosaic_gpu_runs_in_interpret_mode_on_cpu(lt):
    prob = lt.random_problem(19, 1, 70, 1, 64, 64, segments=False, init=True)
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)
    q, k, v = (cast(prob[n]) for n in ("q", "k", "v"))
    init = jnp.asarray(prob["initial_state"])
    o, final = lightning_attention(q, k, v, jnp.asarray(prob["decay"]), initial_state=init, return_final_state=True,
                                   implementation="pallas_mosaic_gpu")
    want = lt.oracle(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)), prob["decay"],
                     initial_state=prob["initial_state"])
    assert lt.rel_err(o.astype(jnp.float32), want["o"]) < 1e-2 and lt.rel_err(final, want["final"]) < 1e-2


def test_implementations_equal_the_config_choices():
    from m1jax.config import LIGHTNING_IMPLEMENTATIONS
    assert api.IMPLEMENTATIONS == LIGHTNING_IMPLEMENTATIONS


@pytest.mark.parametrize("bad", ["qk", "v", "decay", "init", "segments", "impl"])
def test_bad_arguments_raise(bad):
    q = k = jnp.zeros((2, 5, 3, 4))
    v, s, init, seg, impl = jnp.zeros((2, 5, 3, 6)), jnp.ones(3), jnp.zeros((2, 3, 4, 6)), jnp.zeros((2, 5)), None
    if bad == "qk":
        k = jnp.zeros((2, 5, 3, 8))
    elif bad == "v":
        v = jnp.zeros((2, 4, 3, 6))
    elif bad == "decay":
        s = jnp.ones(4)
    elif bad == "init":
        init = jnp.zeros((2, 3, 6, 4))
    elif bad == "segments":
        seg = jnp.zeros((2, 4))
    else:
        impl = "cuda_magic"
    with pytest.raises(ValueError):
        lightning_attention(q, k, v, s, initial_state=init, segment_ids=seg, implementation=impl)
