"""m1jax's exporter and bf16 checkpoints against transformers' MiniMaxForCausalLM (PyTorch, CPU).

* ``export_hf(dialect="transformers")`` of a random m1jax model, loaded by transformers' own ``from_pretrained``, gives
  m1jax's logits (m1jax's loader reading the export back would agree with any self-consistent naming mistake, e.g.
  w1 and w3 swapped inside ``gate_up_proj``; transformers would not).
* bf16 checkpoints, the published format: a bf16 file is read by both sides into fp32 weights (bf16 -> fp32 is
  exact), so on the same bf16 weights the two fp32 forwards must agree to the same bar as fp32 checkpoints.
  Both directions: m1jax's bf16 export read by ``from_pretrained``, and the reference's bf16 MiniMax-named checkpoint
  (router kept fp32, like the published one) read by ``m1jax.convert.from_hf``.

transformers ignores ``rotary_dim`` (it rotates the whole head), so the configs use rotary_dim = head_dim.
"""
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.convert import export_hf, from_hf
from m1jax.model import init_model

from . import hf_runner as hr

# max |logit difference| in fp32 (the issue's bar). Both fp32 forwards are within ~1e-5 of transformers' float64
# forward on these weights (also checked below), so 1e-4 leaves 10x for summation order and is far below any
# mapping error (those move logits by O(1)).
TOL = 1e-4
# One M1 period (7 lightning + 1 softmax), GQA 2:1, 8 experts, block 8 under a length-13 input (2 blocks, one partial).
# Deliberately narrow: the 64-wide 8-layer tiny preset at weight std 0.2 amplifies fp32 rounding to ~5e-4 on both
# sides (measured against float64), which would make the 1e-4 bar test conditioning instead of the exporter.
CFG = ModelConfig.tiny(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, rotary_dim=8,
                       intermediate_size=24, num_local_experts=8, block_size=8, vocab_size=96, initializer_range=0.2)
IDS = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 13))
DERIVED = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")  # recomputed by transformers from the config


def _random_model(seed=5):
    """m1jax's init (std 0.2 matrices, unit norm gains) with every parameter scaled by 1 + 0.1 N(0, 1), so norm gains
    differ per channel and per layer (a swapped or mis-indexed gain changes the logits)."""
    model = init_model(CFG, seed=seed)
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p * (1 + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype)), state))
    return model


def _header_dtypes(directory):
    """tensor name -> safetensors dtype code, read straight from the file headers (8-byte length + JSON)."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return out


def _check_loaded_cleanly(result, job):
    """transformers initialises missing weights at random with only a warning: every weight must have come from the
    file (only the derived lightning buffers may be missing), nothing may be left over or mis-shaped."""
    info = result.job(job)["loading_info"]
    assert all(k.rsplit(".", 1)[-1] in DERIVED for k in info["missing_keys"]), info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.fixture(scope="module")
def exported(tmp_path_factory, hf_reference_cache):
    model = _random_model()
    root = tmp_path_factory.mktemp("export")
    dirs = {"fp32": root / "fp32", "fp32_sharded": root / "fp32_sharded", "bf16": root / "bf16"}
    export_hf(model, dirs["fp32"], dialect="transformers")
    export_hf(model, dirs["fp32_sharded"], dialect="transformers", max_shard_bytes=40_000)
    export_hf(model, dirs["bf16"], dialect="transformers", dtype=jnp.bfloat16)
    jobs = [hr.pretrained_job(name, d, IDS) for name, d in dirs.items()]
    jobs.append(hr.pretrained_job("fp64", dirs["fp32"], IDS, dtype="float64"))
    result = hr.run_reference(hr.make_request(None, jobs), hf_reference_cache)
    return model, dirs, result


@pytest.mark.parametrize("which", ["fp32", "fp32_sharded"])
def test_export_loads_in_transformers_with_our_logits(exported, which):
    model, dirs, result = exported
    _check_loaded_cleanly(result, which)
    assert result.job(which)["param_dtypes"] == ["torch.float32"]
    if which == "fp32_sharded":
        assert (dirs[which] / "model.safetensors.index.json").exists()
    ours = np.asarray(model(jnp.asarray(IDS)).logits)
    np.testing.assert_allclose(ours, result.array(which), rtol=0, atol=TOL)
    np.testing.assert_allclose(ours, result.array("fp64"), rtol=0, atol=TOL)  # and the float64 forward


def test_bf16_export_loads_in_transformers_with_our_logits(exported):
    model, dirs, result = exported
    _check_loaded_cleanly(result, "bf16")
    dtypes = _header_dtypes(dirs["bf16"])
    routers = {k for k in dtypes if k.endswith(".mlp.gate.weight")}
    assert len(routers) == CFG.num_hidden_layers and {dtypes[k] for k in routers} == {"F32"}  # the router stays fp32
    assert {v for k, v in dtypes.items() if k not in routers} == {"BF16"}
    _, loaded = from_hf(dirs["bf16"])  # m1jax on the bf16 weights (upcast to fp32 masters)
    ours = np.asarray(loaded(jnp.asarray(IDS)).logits)
    np.testing.assert_allclose(ours, result.array("bf16"), rtol=0, atol=TOL)
    # the comparison really was on rounded weights: bf16 moves these logits by far more than the bar
    assert np.max(np.abs(ours - np.asarray(model(jnp.asarray(IDS)).logits))) > 30 * TOL


@pytest.fixture(scope="module")
def published_bf16(hf_reference_cache):
    """The reference's MiniMax-named checkpoint stored like the published one (bf16, router fp32) and transformers'
    logits on exactly those weights."""
    cfg = hr.tiny_hf_config(num_layers=8, num_heads=8, num_kv_heads=2, head_dim=8, hidden_size=32,
                            intermediate_size=24, num_experts=8, block_size=8, vocab_size=96)
    jobs = [hr.forward_job("fp32_weights", IDS), hr.save_job(minimax_dtype="bfloat16"),
            hr.forward_from_checkpoint_job("bf16_weights", "minimax_names", IDS)]
    return hr.run_reference(hr.make_request(cfg, jobs, seed=3), hf_reference_cache)


def test_bf16_minimax_checkpoint_loads_in_m1jax_with_transformers_logits(published_bf16):
    result = published_bf16
    ckpt = result.checkpoint_dir("minimax_names")
    dtypes = _header_dtypes(ckpt)
    assert {v for k, v in dtypes.items() if not k.endswith("block_sparse_moe.gate.weight")} == {"BF16"}
    cfg, model = from_hf(ckpt)
    assert cfg.rotary_dim == cfg.head_dim and cfg.param_dtype == "float32"
    ours = np.asarray(model(jnp.asarray(IDS)).logits)
    want = result.array("bf16_weights")
    np.testing.assert_allclose(ours, want, rtol=0, atol=TOL)
    assert np.max(np.abs(want - result.array("fp32_weights"))) > 30 * TOL  # bf16 rounding mattered here
