"""Smoke test of the transformers reference itself (no JAX involved): internal consistency and independent facts.

One hf_reference.py run (a few seconds on 2 cores) feeds every test of this module.
"""
import json
import math
import re

import numpy as np
import pytest

from . import hf_runner as hr

CFG = hr.tiny_hf_config()  # 4 layers [lin, lin, lin, full], H=4, KV=2, d=16, E=4, top-2, block 4
IDS = np.asarray(hr.random_ids(2, 11, CFG["vocab_size"], seed=1))
PAD = 3
PADDED_IDS = np.concatenate([np.zeros((1, PAD), int), IDS[:1, :11 - PAD]], axis=1)
PADDED_IDS = np.concatenate([PADDED_IDS, IDS[1:]], axis=0)
PADDED_MASK = np.ones_like(PADDED_IDS)
PADDED_MASK[0, :PAD] = 0
GEN_IDS = np.stack([IDS[0, :7], np.concatenate([[0, 0], IDS[1, :5]])])
GEN_MASK = np.ones_like(GEN_IDS)
GEN_MASK[1, :2] = 0
ZERO_ROUTER = [{"pattern": r"mlp\.gate\.weight$", "mean": 0.0, "std": 0.0}]


def _request():
    jobs = [
        hr.forward_job("fwd", IDS, labels=IDS, output_router_logits=True, output_hidden_states=True),
        hr.forward_job("uniform", IDS, output_router_logits=True, param_overrides=ZERO_ROUTER),
        hr.forward_job("padded", PADDED_IDS, attention_mask=PADDED_MASK, position_ids="from_mask"),
        hr.decode_job("decode", IDS, prefill=7),
        hr.decode_job("decode_hf_positions", IDS, prefill=7, explicit_positions=False),
        hr.generate_job("gen", GEN_IDS, 4, attention_mask=GEN_MASK),
        hr.save_job(),
        hr.forward_from_checkpoint_job("reload_minimax", "minimax_names", IDS),
        hr.forward_from_checkpoint_job("reload_hf_saved", "hf_saved", IDS),
        hr.forward_from_checkpoint_job("reload_hf_sharded", "hf_sharded", IDS),
    ]
    return hr.make_request(CFG, jobs, seed=0)


@pytest.fixture(scope="module")
def ref(hf_reference_cache):
    return hr.run_reference(_request(), hf_reference_cache)


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_reference_ran_pinned_versions(ref):
    v = ref.manifest["versions"]
    assert v["transformers"] == "5.24.0" and v["torch"].startswith("2.13.0"), v
    assert v["python"].startswith("3.11"), v
    assert ref.manifest["attn_implementation"] == "eager"
    assert ref.hf_config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    logits = ref.array("fwd")
    assert logits.shape == (2, 11, CFG["vocab_size"]) and logits.dtype == np.float32
    assert np.isfinite(logits).all() and 0.5 < np.abs(logits).max() < 50  # not the near-constant default init


def test_prefill_plus_decode_equals_full_forward(ref):
    full, dec = ref.array("fwd"), ref.array("decode")
    assert dec.shape == full.shape
    assert _maxdiff(dec, full) <= 1e-4
    np.testing.assert_array_equal(ref.array("decode", "positions"), np.tile(np.arange(11), (2, 1)))


def test_hf_default_decode_positions_are_wrong(ref):
    """Without explicit position_ids the softmax layer sees position 0 at every decode step."""
    full, bad = ref.array("fwd"), ref.array("decode_hf_positions")
    assert _maxdiff(bad[:, :7], full[:, :7]) <= 1e-5  # the prefill is fine
    assert _maxdiff(bad[:, 7:], full[:, 7:]) > 1e-2  # the decode steps are not (about 1.8 here)


def test_left_padding_matches_unpadded(ref):
    padded, full = ref.array("padded"), ref.array("fwd")
    assert _maxdiff(padded[0, PAD:], full[0, : 11 - PAD]) <= 1e-4
    assert _maxdiff(padded[1], full[1]) <= 1e-5


def test_generate_greedy(ref):
    job = ref.job("gen")
    toks, gen, step = ref.array("gen", "tokens"), ref.array("gen", "generate_tokens"), ref.array("gen", "step_logits")
    assert toks.shape == (2, 4)
    np.testing.assert_array_equal(toks, step.argmax(-1))
    np.testing.assert_array_equal(toks, gen)  # HF generate == manual loop with explicit positions
    assert job["generate_matches_manual"] and job["generate_positions_correct"], job["generate_position_ids"]
    # row 0 is unpadded and its prompt is IDS[0, :7]: the first token is the argmax of the full forward at t=6
    assert _maxdiff(step[0, 0], ref.array("fwd")[0, 6]) <= 1e-4
    assert toks[0, 0] == ref.array("fwd")[0, 6].argmax()


def test_aux_loss_uniform_router_is_top_k(ref):
    assert abs(ref.job("uniform")["aux_loss"] - CFG["num_experts_per_tok"]) <= 1e-6
    assert np.all(ref.array("uniform", "router_logits") == 0)


def test_aux_loss_and_loss_match_numpy(ref):
    job, rl = ref.job("fwd"), ref.array("fwd", "router_logits")
    L, E = CFG["num_hidden_layers"], CFG["num_local_experts"]
    assert rl.shape == (L, IDS.size, E)
    aux = hr.load_balancing_loss_np(rl, CFG["num_experts_per_tok"])
    assert abs(job["aux_loss"] - aux) <= 1e-5
    assert job["aux_loss"] >= CFG["num_experts_per_tok"] - 1e-6  # Switch loss is minimised by uniform routing
    # HF loss = next-token CE (labels shifted inside HF) + router_aux_loss_coef * aux
    lg = ref.array("fwd").astype(np.float64)[:, :-1]
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    tgt = IDS[:, 1:]
    ce = float(np.mean(lse - np.take_along_axis(lg, tgt[..., None], -1)[..., 0]))
    assert abs(job["loss"] - (ce + CFG["router_aux_loss_coef"] * aux)) <= 1e-5


def test_hidden_states_feed_the_head(ref):
    hs, sd = ref.array("fwd", "hidden_states"), ref.state_dict()
    assert hs.shape == (CFG["num_hidden_layers"] + 1, 2, 11, CFG["hidden_size"])
    np.testing.assert_array_equal(hs[0], sd["model.embed_tokens.weight"][IDS])
    assert _maxdiff(hs[-1] @ sd["lm_head.weight"].T, ref.array("fwd")) <= 1e-4


def test_weights_follow_the_requested_init(ref):
    sd = ref.state_dict()
    big = np.concatenate([v.ravel() for k, v in sd.items() if v.ndim >= 2 and not k.endswith("_decay")])
    assert abs(big.std() - 0.2) < 0.01 and abs(big.mean()) < 0.01
    norms = np.concatenate([v for k, v in sd.items() if k.endswith("norm.weight")])
    assert abs(norms.mean() - 1.0) < 0.05 and abs(norms.std() - 0.1) < 0.03


def test_decay_buffers_match_spec_formula(ref):
    """Lightning decay slopes (transformers' form): slope_h = 2^(-8(h+1)/H) * (1 - l/(L-1+1e-5) + 1e-5)."""
    sd, H, L = ref.state_dict(), CFG["num_attention_heads"], CFG["num_hidden_layers"]
    for l, kind in enumerate(CFG["layer_types"]):
        key = f"model.layers.{l}.self_attn.slope_rate"
        if kind == "full_attention":
            assert key not in sd
            continue
        want = 2.0 ** (-8.0 * (np.arange(H) + 1) / H) * (1 - l / (L - 1 + 1e-5) + 1e-5)
        np.testing.assert_allclose(sd[key].reshape(H), want, rtol=1e-6)


# ----------------------------------------------------------------------------- checkpoints
SPEC71 = [
    r"model\.embed_tokens\.weight", r"model\.norm\.weight", r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.(qkv_proj|output_gate|norm|out_proj|q_proj|k_proj|v_proj|o_proj)\.weight",
    r"model\.layers\.\d+\.block_sparse_moe\.gate\.weight",
    r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight",
]
BUFFERS = r"model\.layers\.\d+\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)"


def test_reloaded_checkpoints_give_identical_logits(ref):
    full = ref.array("fwd")
    for job in ("reload_minimax", "reload_hf_saved", "reload_hf_sharded"):
        assert _maxdiff(ref.array(job), full) <= 1e-6, job


def test_minimax_names_checkpoint(ref):
    d = ref.checkpoint_dir("minimax_names")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    mm = hr.load_safetensors_np(d)
    assert set(index["weight_map"]) == set(mm)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in mm.values())
    assert sorted(set(index["weight_map"].values())) == ["model-00000-of-00002.safetensors",
                                                          "model-00001-of-00002.safetensors"]
    bad = [k for k in mm if not any(re.fullmatch(p, k) for p in SPEC71)]
    assert not bad, bad
    E, I, L = CFG["num_local_experts"], CFG["intermediate_size"], CFG["num_hidden_layers"]
    # embed/norm/head + per layer: 2 norms, router, 3 per expert, 4 attention tensors (lightning: qkv, output_gate,
    # norm, out_proj; softmax: q, k, v, o) -- no derived decay buffers
    assert len(mm) == 3 + L * (3 + 3 * E + 4)
    # the split of the fused in-memory expert tensor: rows [0, I) = w1 (gate), [I, 2I) = w3 (up)
    sd = ref.state_dict()
    for l in range(L):
        gu, down = sd[f"model.layers.{l}.mlp.experts.gate_up_proj"], sd[f"model.layers.{l}.mlp.experts.down_proj"]
        for e in range(E):
            p = f"model.layers.{l}.block_sparse_moe.experts.{e}"
            np.testing.assert_array_equal(mm[f"{p}.w1.weight"], gu[e, :I])
            np.testing.assert_array_equal(mm[f"{p}.w3.weight"], gu[e, I:])
            np.testing.assert_array_equal(mm[f"{p}.w2.weight"], down[e])
        np.testing.assert_array_equal(mm[f"model.layers.{l}.block_sparse_moe.gate.weight"],
                                      sd[f"model.layers.{l}.mlp.gate.weight"])
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "minimax_m1" and cfg["postnorm"] is True
    assert cfg["attn_type_list"] == [int(t == "full_attention") for t in CFG["layer_types"]]
    assert cfg["rotary_dim"] == cfg["head_dim"] == CFG["head_dim"]
    assert cfg["rope_theta"] == CFG["rope_parameters"]["rope_theta"]
    for k in ("linear_attention", "full_attention", "mlp"):
        assert math.isclose(cfg[f"layernorm_{k}_alpha"], hr.M1_ALPHA) and cfg[f"layernorm_{k}_beta"] == 1.0


def test_save_pretrained_writes_minimax_names_plus_decay_buffers(ref):
    """What transformers 5.24 save_pretrained writes: MiniMax names (no fused gate_up_proj) + derived buffers."""
    hf = hr.load_safetensors_np(ref.checkpoint_dir("hf_saved") / "model.safetensors")
    mm = hr.load_safetensors_np(ref.checkpoint_dir("minimax_names"))
    extra = set(hf) - set(mm)
    assert set(mm) <= set(hf)
    assert extra and all(re.fullmatch(BUFFERS, k) for k in extra), sorted(extra)
    n_lin = CFG["layer_types"].count("linear_attention")
    assert len(extra) == 4 * n_lin
    assert not any("gate_up_proj" in k or "down_proj" in k or ".mlp." in k for k in hf)
    for k in mm:
        np.testing.assert_array_equal(hf[k], mm[k])
    sharded = ref.checkpoint_dir("hf_sharded")
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(hf) and len(set(idx["weight_map"].values())) > 1
    cfg = json.loads((ref.checkpoint_dir("hf_saved") / "config.json").read_text())
    assert cfg["model_type"] == "minimax" and cfg["layer_types"] == CFG["layer_types"]


def test_results_are_cached(ref, hf_reference_cache):
    again = hr.run_reference(_request(), hf_reference_cache)
    assert again.cached and again.out_dir == ref.out_dir
