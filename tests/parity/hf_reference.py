#!/usr/bin/env python3
"""Independent reference: transformers' ``MiniMaxForCausalLM`` (PyTorch, CPU, fp32) on a requested tiny config.

Run with the *Python 3.11 parity interpreter* (torch CPU wheels exist only for 3.11 here); it imports neither jax nor
m1jax. The Python 3.12 side talks to it through files only (see ``hf_runner.py``)::

    python3.11 tests/parity/hf_reference.py REQUEST.json OUT_DIR

Request (JSON)
--------------
::

    {
      "config": {...},                 # MiniMaxConfig kwargs (transformers dialect). Always give layer_types,
                                       # power-of-two heads, block_size, rope_parameters, the *_alpha/beta_factor.
                                       # null: no model is built (only forward_pretrained jobs then)
      "seed": 0,                       # everything below is deterministic from this
      "init": {"weight_std": 0.2, "norm_mean": 1.0, "norm_std": 0.1,
               "overrides": [{"pattern": REGEX, "mean": m, "std": s}, ...]},   # all optional
      "attn_implementation": "eager",  # optional ("eager" | "sdpa")
      "experts_implementation": "eager",  # optional ("eager" | "grouped_mm"; they agree bit-exactly on CPU)
      "dump_state_dict": true,         # optional: write state_dict.npz (in-memory names, buffers included)
      "jobs": [JOB, ...]
    }

Weights: after construction every parameter (sorted by in-memory name) is redrawn with
``numpy.random.default_rng(seed)``: >=2-D parameters ~ N(0, weight_std^2), 1-D (norm weights) ~ norm_mean +
norm_std*N(0,1) (the default init std 0.02 gives near-constant logits). An override whose regex
``re.search``-es the in-memory name replaces mean/std for that parameter (draws are still made, so the other
parameters do not change). The derived lightning decay buffers are left as transformers computes them.

Jobs (each has a unique "name" and a "kind"; arrays are written as ``OUT/<name>.<key>.npy``):

- ``forward``: ``input_ids`` [B,T]; optional ``attention_mask`` [B,T] (1 = token, 0 = left padding);
  optional ``position_ids`` [B,T] or the string ``"from_mask"`` (cumsum(mask)-1, clipped at 0, what ``generate``
  uses); default: none passed (HF then uses arange(T)). Optional ``labels`` [B,T] (HF shifts them; -100 ignored),
  ``output_router_logits`` (bool), ``output_hidden_states`` (bool), ``param_overrides`` (same form as
  init.overrides; applied for this job only, the model is restored afterwards).
  Writes ``logits`` [B,T,V] f32; with router logits also ``router_logits`` [L, B*T, E] f32 and the scalar
  ``aux_loss`` (the model's own ``load_balancing_loss_func``, *without* the coefficient); with labels the scalar
  ``loss`` (CE, plus router_aux_loss_coef*aux_loss when router logits are on, exactly as HF adds it); with hidden
  states ``hidden_states`` [L+1,B,T,D] (HF's recorded tuple: entry 0 = embeddings, entry i = output of layer i-1 for
  i < L, entry L = the final norm's output, i.e. what lm_head sees).
  Logits at padded positions are whatever HF computes there: compare only where the mask is 1.
- ``decode``: ``input_ids`` [B, P+N] and ``prefill`` P: one prefill forward over the first P tokens, then N
  single-token forwards through ``MiniMaxCache``. Positions are always passed explicitly (prefill: arange or
  from_mask if ``attention_mask`` [B,P+N] is given; step i: last position + 1), because transformers otherwise derives
  them from the layer-0 cache length, which is 0 when layer 0 is a lightning layer. Set
  ``explicit_positions: false`` to reproduce that bug. Writes ``logits`` [B, P+N, V] (rows < P from the prefill,
  rows >= P from the single-token steps) and ``positions`` [B, P+N] (what was passed).
- ``generate``: greedy decoding of ``max_new_tokens`` after ``input_ids`` [B,P] (optional left-padding
  ``attention_mask``). Runs both HF ``generate(do_sample=False)`` and a manual greedy loop with explicit
  positions. Finding for 5.24.0: ``generate`` does pass correct ``position_ids`` for this model (built from the
  attention mask by ``_prepare_position_ids_for_generation`` and advanced by one per step), so the two agree; the
  positions ``generate`` fed to the model are recorded in the manifest. Writes ``tokens`` [B,N] (manual loop, the
  one to trust), ``generate_tokens`` [B,N] (HF generate), ``step_logits`` [B,N,V] (manual loop logits that chose
  each token) and manifest fields ``generate_matches_manual`` and ``generate_position_ids``.
- ``save``: writes three checkpoint directories under OUT:
    * ``hf_saved/``: ``save_pretrained`` (one ``model.safetensors`` + transformers-dialect ``config.json``);
    * ``hf_sharded/``: ``save_pretrained(max_shard_size=...)`` (default "200KB"): shards +
      ``model.safetensors.index.json``;
    * ``minimax_names/``: the in-memory tensors renamed here (independently of transformers' conversion code) to
      MiniMax's on-disk names (those of the published checkpoint's index), ``gate_up_proj`` split into per-expert
      w1/w3, ``down_proj`` into w2, derived decay buffers dropped, ``minimax_shards`` files named like the official
      checkpoint (``model-00000-of-00002.safetensors``, 0-based) + ``model.safetensors.index.json`` with
      ``metadata.total_size``, and a MiniMax-dialect ``config.json`` (``attn_type_list`` 0/1,
      ``layernorm_*_alpha/beta``, ``rotary_dim`` = head_dim because transformers rotates the whole head,
      ``postnorm: true``, ``rope_theta``, model_type ``minimax_m1``). ``minimax_dtype`` "bfloat16" stores everything in
      bf16 except the router (fp32), like the published checkpoint; default float32.
- ``forward_from_checkpoint``: like ``forward`` but on a fresh model loaded from ``checkpoint`` (one of
  ``hf_saved``, ``hf_sharded``: via ``from_pretrained``; ``minimax_names``: read here with safetensors and renamed
  back by this file's inverse mapping, then ``load_state_dict(strict=True)`` with the buffers recomputed by
  transformers). Needs an earlier ``save`` job in the same request.
- ``forward_pretrained``: like ``forward`` on ``MiniMaxForCausalLM.from_pretrained(checkpoint)``, ``checkpoint`` an
  absolute path to a directory written elsewhere (e.g. by m1jax's exporter), loaded with ``dtype`` "float32" (default;
  bf16 files are upcast exactly), "float64" (a rounding-free forward on the same weights) or "bfloat16". Records
  ``loading_info`` (transformers' missing / unexpected / mismatched keys: it silently initialises missing weights, so
  callers must check it) and ``param_dtypes``. ``checkpoint_digest`` (any string, e.g. a hash of the files) only
  keys the cache.

What transformers 5.24.0 ``save_pretrained`` writes for this model (found empirically, see job ``save``)
--------------------------------------------------------------------------------------------------------
In memory the MoE is ``model.layers.{i}.mlp.gate.weight`` [E,D], ``mlp.experts.gate_up_proj`` [E,2I,D] (rows
0..I-1 = w1/gate, I..2I-1 = w3/up) and ``mlp.experts.down_proj`` [E,D,I]. ``save_pretrained`` reverses the load-time
"minimax -> mixtral" conversion, so the file holds MiniMax's own names:
``model.layers.{i}.block_sparse_moe.gate.weight``
and per-expert ``block_sparse_moe.experts.{e}.w1.weight`` [I,D], ``.w3.weight`` [I,D], ``.w2.weight`` [D,I] (no fused
gate_up_proj). It ALSO writes the four derived, block-size-dependent lightning buffers per linear layer:
``self_attn.slope_rate`` [H,1,1], ``self_attn.query_decay`` [H,bs,1], ``self_attn.key_decay`` [H,bs,1],
``self_attn.diagonal_decay`` [1,H,bs,bs] (absent from the official checkpoint; a converter must skip them). Rotary
``inv_freq`` buffers are not persistent and are not written. The safetensors metadata is ``{"format": "pt"}``; the
config.json is the transformers dialect (model_type "minimax", layer_types, *_factor names, rope_parameters,
block_size). The manifest's ``save`` entry lists every tensor name/shape actually written, so this stays checked.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

T_START = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True, warn_only=True)

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import MiniMaxConfig, MiniMaxForCausalLM  # noqa: E402

T_IMPORT = time.time() - T_START

DERIVED_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


# ----------------------------------------------------------------------------------------------- model set-up
def build_config(cfg_dict: dict) -> MiniMaxConfig:
    cfg = dict(cfg_dict)
    if "layer_types" not in cfg:
        # transformers' default alternates full/linear from layer 0, which is not M1's pattern
        raise ValueError("request config must give layer_types explicitly")
    heads = int(cfg["num_attention_heads"])
    if heads & (heads - 1):
        raise ValueError(f"num_attention_heads={heads} is not a power of two (only then do transformers' slopes "
                         "equal ALiBi's)")
    return MiniMaxConfig(**cfg)


def draw_weights(model, seed: int, init: dict, overrides: list | None = None) -> None:
    """Deterministic redraw of every parameter (sorted by name) from numpy's default_rng(seed)."""
    rng = np.random.default_rng(seed)
    w_std = float(init.get("weight_std", 0.2))
    n_mean = float(init.get("norm_mean", 1.0))
    n_std = float(init.get("norm_std", 0.1))
    ovs = list(init.get("overrides", [])) + list(overrides or [])
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            z = rng.standard_normal(tuple(p.shape))
            mean, std = (0.0, w_std) if p.ndim >= 2 else (n_mean, n_std)
            for ov in ovs:
                if re.search(ov["pattern"], name):
                    mean, std = float(ov.get("mean", mean)), float(ov.get("std", std))
            p.copy_(torch.from_numpy((mean + std * z).astype(np.float32)))


def make_model(req: dict) -> MiniMaxForCausalLM:
    cfg = build_config(req["config"])
    torch.manual_seed(int(req.get("seed", 0)))
    model = MiniMaxForCausalLM._from_config(
        cfg, attn_implementation=req.get("attn_implementation", "eager"), dtype=torch.float32
    )
    model.set_experts_implementation(req.get("experts_implementation", "eager"))
    model.eval()
    draw_weights(model, int(req.get("seed", 0)), req.get("init", {}))
    return model


def _t(x, dtype=torch.long):
    return None if x is None else torch.as_tensor(np.asarray(x), dtype=dtype)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def _positions(job, ids, mask):
    pos = job.get("position_ids")
    if isinstance(pos, str):
        if pos != "from_mask":
            raise ValueError(f"position_ids string must be 'from_mask', got {pos!r}")
        if mask is None:
            mask = torch.ones_like(ids)
        return positions_from_mask(mask)
    return _t(pos)


# ----------------------------------------------------------------------------------------------- jobs
class Writer:
    def __init__(self, out_dir: str):
        self.out = out_dir

    def arr(self, job: str, key: str, value, files: dict) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()  # numpy has no bf16
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        fname = f"{job}.{key}.npy"
        np.save(os.path.join(self.out, fname), value)
        files[key] = fname


def job_forward(model, job, w: Writer, entry: dict) -> None:
    ids = _t(job["input_ids"])
    mask = _t(job.get("attention_mask"))
    pos = _positions(job, ids, mask)
    labels = _t(job.get("labels"))
    orl = bool(job.get("output_router_logits", False))
    ohs = bool(job.get("output_hidden_states", False))
    saved = None
    if job.get("param_overrides"):
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        draw_weights(model, int(job.get("seed", entry["_seed"])), entry["_init"], job["param_overrides"])
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels,
                        output_router_logits=orl, output_hidden_states=ohs, use_cache=False)
    finally:
        if saved is not None:
            model.load_state_dict(saved)
    files = entry["files"]
    w.arr(job["name"], "logits", out.logits, files)
    if orl:
        w.arr(job["name"], "router_logits", torch.stack([r.float() for r in out.router_logits]), files)
        entry["aux_loss"] = float(out.aux_loss)
    if labels is not None:
        entry["loss"] = float(out.loss)
    if ohs:
        w.arr(job["name"], "hidden_states", torch.stack(list(out.hidden_states)), files)


def job_decode(model, job, w: Writer, entry: dict) -> None:
    ids = _t(job["input_ids"])
    B, T = ids.shape
    P = int(job["prefill"])
    if not 0 < P <= T:
        raise ValueError(f"decode: prefill {P} not in 1..{T}")
    mask = _t(job.get("attention_mask"))
    explicit = bool(job.get("explicit_positions", True))
    full_mask = mask if mask is not None else torch.ones_like(ids)
    pos_all = positions_from_mask(full_mask)
    # positions of the decode steps continue from the last prefill position (generated tokens are never padding)
    for t in range(P, T):
        pos_all[:, t] = pos_all[:, t - 1] + 1
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids[:, :P], attention_mask=full_mask[:, :P] if mask is not None else None,
                    position_ids=pos_all[:, :P] if explicit else None, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
        for t in range(P, T):
            out = model(input_ids=ids[:, t:t + 1],
                        attention_mask=full_mask[:, :t + 1] if mask is not None else None,
                        position_ids=pos_all[:, t:t + 1] if explicit else None, cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits)
    files = entry["files"]
    w.arr(job["name"], "logits", torch.cat(logits, dim=1), files)
    w.arr(job["name"], "positions", pos_all, files)
    entry["explicit_positions"] = explicit


def job_generate(model, job, w: Writer, entry: dict) -> None:
    ids = _t(job["input_ids"])
    B, P = ids.shape
    N = int(job["max_new_tokens"])
    mask = _t(job.get("attention_mask"))
    full_mask = mask if mask is not None else torch.ones_like(ids)
    # (1) HF generate, recording the position_ids it feeds to the model
    seen = []

    def hook(_mod, _args, kwargs):
        p = kwargs.get("position_ids")
        seen.append(None if p is None else p.tolist())

    h = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=full_mask, max_new_tokens=N, min_new_tokens=N,
                                 do_sample=False, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    finally:
        h.remove()
    gen_new = gen[:, P:]
    # (2) manual greedy loop, explicit positions
    pos = positions_from_mask(full_mask)
    toks, step_logits = [], []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=full_mask if mask is not None else None,
                    position_ids=pos, use_cache=True)
        cache, last_pos, am = out.cache, pos[:, -1:], full_mask
        for i in range(N):
            lg = out.logits[:, -1]
            nxt = lg.argmax(-1)
            toks.append(nxt)
            step_logits.append(lg)
            if i == N - 1:
                break
            last_pos = last_pos + 1
            am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype)], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=am if mask is not None else None,
                        position_ids=last_pos, cache=cache, use_cache=True)
            cache = out.cache
    tokens = torch.stack(toks, 1)
    files = entry["files"]
    w.arr(job["name"], "tokens", tokens, files)
    w.arr(job["name"], "generate_tokens", gen_new, files)
    w.arr(job["name"], "step_logits", torch.stack(step_logits, 1), files)
    entry["generate_matches_manual"] = bool(torch.equal(tokens, gen_new))
    entry["generate_position_ids"] = seen
    # did generate pass the positions the manual loop used?
    expected = [pos.tolist()] + [[[int(pos[b, -1]) + 1 + i] for b in range(B)] for i in range(N - 1)]
    entry["generate_positions_correct"] = seen[: len(expected)] == expected


# ------------------------------------------------------------------------------- MiniMax on-disk names
_EXPERTS_RE = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def to_minimax_names(state_dict: dict, intermediate_size: int) -> dict:
    """In-memory (transformers) names -> MiniMax on-disk names; derived buffers dropped."""
    out = {}
    for name, t in state_dict.items():
        if name.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            continue
        m = _EXPERTS_RE.match(name)
        if m:
            prefix, kind = m.groups()
            for e in range(t.shape[0]):
                base = f"{prefix}.block_sparse_moe.experts.{e}"
                if kind == "gate_up_proj":
                    out[f"{base}.w1.weight"] = t[e, :intermediate_size].clone()
                    out[f"{base}.w3.weight"] = t[e, intermediate_size:].clone()
                else:
                    out[f"{base}.w2.weight"] = t[e].clone()
            continue
        out[name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")] = t.clone()
    return out


def from_minimax_names(tensors: dict, num_experts: int) -> dict:
    """Inverse of to_minimax_names (without the buffers): MiniMax names -> transformers in-memory names."""
    out, experts = {}, {}
    pat = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
    for name, t in tensors.items():
        m = pat.match(name)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
            continue
        out[name.replace(".block_sparse_moe.gate.weight", ".mlp.gate.weight")] = t
    for prefix, d in experts.items():
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([d[(e, "w1")], d[(e, "w3")]], 0) for e in range(num_experts)])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([d[(e, "w2")] for e in range(num_experts)])
    return out


def minimax_dialect_config(cfg: MiniMaxConfig) -> dict:
    d = cfg.to_dict()
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    return {
        "architectures": ["MiniMaxM1ForCausalLM"],
        "attention_dropout": d.get("attention_dropout", 0.0),
        "attn_type_list": [1 if t == "full_attention" else 0 for t in d["layer_types"]],
        "bos_token_id": d.get("bos_token_id"),
        "eos_token_id": d.get("eos_token_id"),
        "head_dim": head_dim,
        "hidden_act": d["hidden_act"],
        "hidden_size": d["hidden_size"],
        "initializer_range": d.get("initializer_range", 0.02),
        "intermediate_size": d["intermediate_size"],
        "layernorm_full_attention_alpha": d["full_attn_alpha_factor"],
        "layernorm_full_attention_beta": d["full_attn_beta_factor"],
        "layernorm_linear_attention_alpha": d["linear_attn_alpha_factor"],
        "layernorm_linear_attention_beta": d["linear_attn_beta_factor"],
        "layernorm_mlp_alpha": d["mlp_alpha_factor"],
        "layernorm_mlp_beta": d["mlp_beta_factor"],
        "max_position_embeddings": d["max_position_embeddings"],
        "model_type": "minimax_m1",
        "num_attention_heads": d["num_attention_heads"],
        "num_experts_per_tok": d["num_experts_per_tok"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_key_value_heads": d["num_key_value_heads"],
        "num_local_experts": d["num_local_experts"],
        "output_router_logits": False,
        "postnorm": True,
        "rms_norm_eps": d["rms_norm_eps"],
        "rope_theta": d["rope_parameters"]["rope_theta"],
        # transformers rotates the whole head (ignores rotary_dim); this checkpoint is exact for rotary_dim=head_dim
        "rotary_dim": head_dim,
        "router_aux_loss_coef": d.get("router_aux_loss_coef", 0.001),
        "router_jitter_noise": d.get("router_jitter_noise", 0.0),
        "shared_intermediate_size": 0,
        "shared_moe_mode": "sigmoid",
        "sliding_window": None,
        "tie_word_embeddings": d.get("tie_word_embeddings", False),
        "transformers_version": "4.45.2",
        "use_cache": True,
        "vocab_size": d["vocab_size"],
    }


def _list_safetensors(dirname: str) -> dict:
    names = {}
    for fn in sorted(os.listdir(dirname)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(dirname, fn), "pt") as f:
                for k in f.keys():
                    names[k] = [list(f.get_slice(k).get_shape()), fn]
    return names


def job_save(model, job, w: Writer, entry: dict) -> None:
    out = w.out
    hf_saved = os.path.join(out, "hf_saved")
    hf_sharded = os.path.join(out, "hf_sharded")
    mm_dir = os.path.join(out, "minimax_names")
    model.save_pretrained(hf_saved)
    model.save_pretrained(hf_sharded, max_shard_size=job.get("max_shard_size", "200KB"))
    os.makedirs(mm_dir, exist_ok=True)
    cfg = model.config
    tensors = to_minimax_names(model.state_dict(), cfg.intermediate_size)
    if job.get("minimax_dtype", "float32") == "bfloat16":
        tensors = {k: (v if k.endswith("block_sparse_moe.gate.weight") else v.to(torch.bfloat16))
                   for k, v in tensors.items()}
    n = int(job.get("minimax_shards", 2))
    # official order: embedding first, then layer by layer, then norm / lm_head
    def order(k):
        m = re.match(r"model\.layers\.(\d+)\.", k)
        return (0, -1, k) if k.startswith("model.embed") else ((1, int(m.group(1)), k) if m else (2, 0, k))
    keys = sorted(tensors, key=order)
    chunks = [keys[i * len(keys) // n:(i + 1) * len(keys) // n] for i in range(n)]
    weight_map, total = {}, 0
    for i, chunk in enumerate(chunks):
        fn = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in chunk}, os.path.join(mm_dir, fn), metadata={"format": "pt"})
        for k in chunk:
            weight_map[k] = fn
            total += tensors[k].numel() * tensors[k].element_size()
    with open(os.path.join(mm_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(mm_dir, "config.json"), "w") as f:
        json.dump(minimax_dialect_config(cfg), f, indent=2)
    entry["dirs"] = {"hf_saved": "hf_saved", "hf_sharded": "hf_sharded", "minimax_names": "minimax_names"}
    entry["hf_saved_tensors"] = _list_safetensors(hf_saved)
    entry["hf_sharded_files"] = sorted(os.listdir(hf_sharded))
    entry["minimax_names_tensors"] = _list_safetensors(mm_dir)


def job_forward_from_checkpoint(model, job, w: Writer, entry: dict) -> None:
    which = job["checkpoint"]
    ckpt = os.path.join(w.out, which)
    if not os.path.isdir(ckpt):
        raise ValueError(f"forward_from_checkpoint: {ckpt} missing (run a 'save' job first)")
    impl = model.config._attn_implementation
    if which in ("hf_saved", "hf_sharded"):
        fresh = MiniMaxForCausalLM.from_pretrained(ckpt, attn_implementation=impl, dtype=torch.float32)
    elif which == "minimax_names":
        with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for fn in files:
            with safe_open(os.path.join(ckpt, fn), "pt") as f:
                for k in f.keys():
                    tensors[k] = f.get_tensor(k).to(torch.float32)
        fresh = MiniMaxForCausalLM._from_config(model.config, attn_implementation=impl, dtype=torch.float32)
        sd = from_minimax_names(tensors, model.config.num_local_experts)
        # the derived buffers come from the freshly built model (recomputed by transformers)
        for k, v in fresh.state_dict().items():
            if k.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
                sd[k] = v
        fresh.load_state_dict(sd, strict=True)
    else:
        raise ValueError(f"unknown checkpoint {which!r}")
    fresh.set_experts_implementation(model.config._experts_implementation or "eager")
    fresh.eval()
    sub = dict(job)
    sub.pop("param_overrides", None)
    job_forward(fresh, sub, w, entry)


def job_forward_pretrained(model, job, w: Writer, entry: dict) -> None:
    dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
    dtype = dtypes[job.get("dtype", "float32")]
    fresh, info = MiniMaxForCausalLM.from_pretrained(job["checkpoint"], attn_implementation="eager", dtype=dtype,
                                                     output_loading_info=True)
    fresh.set_experts_implementation("eager")
    fresh.eval()
    entry["loading_info"] = {k: sorted(map(str, v)) for k, v in info.items() if isinstance(v, (list, set, tuple))}
    entry["param_dtypes"] = sorted({str(p.dtype) for p in fresh.parameters()})
    sub = {k: v for k, v in job.items() if k != "param_overrides"}
    job_forward(fresh, sub, w, entry)


JOBS = {
    "forward": job_forward,
    "decode": job_decode,
    "generate": job_generate,
    "save": job_save,
    "forward_from_checkpoint": job_forward_from_checkpoint,
    "forward_pretrained": job_forward_pretrained,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        print("usage: hf_reference.py REQUEST.json OUT_DIR", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        req = json.load(f)
    out_dir = argv[2]
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    model = make_model(req) if req.get("config") is not None else None
    t_build = time.time() - t0
    w = Writer(out_dir)
    manifest = {
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "hf_config": model.config.to_dict() if model is not None else None,
        "attn_implementation": model.config._attn_implementation if model is not None else None,
        "experts_implementation": model.config._experts_implementation if model is not None else None,
        "jobs": {},
        "timings": {"import_s": round(T_IMPORT, 3), "build_s": round(t_build, 3)},
    }
    if model is not None and req.get("dump_state_dict", True):
        np.savez(os.path.join(out_dir, "state_dict.npz"),
                 **{k: v.detach().numpy() for k, v in model.state_dict().items()})
        manifest["state_dict"] = "state_dict.npz"
    names = set()
    for job in req.get("jobs", []):
        name, kind = job["name"], job["kind"]
        if name in names or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ValueError(f"job name {name!r} is duplicated or not [A-Za-z0-9_-]+")
        names.add(name)
        if kind not in JOBS:
            raise ValueError(f"unknown job kind {kind!r}; known: {sorted(JOBS)}")
        if model is None and kind != "forward_pretrained":
            raise ValueError(f"job {name!r} ({kind}) needs the request's config (it is null)")
        entry = {"kind": kind, "files": {}, "_seed": int(req.get("seed", 0)), "_init": req.get("init", {})}
        tj = time.time()
        JOBS[kind](model, job, w, entry)
        entry.pop("_seed")
        entry.pop("_init")
        entry["seconds"] = round(time.time() - tj, 3)
        manifest["jobs"][name] = entry
    manifest["timings"]["total_s"] = round(time.time() - T_START, 3)
    tmp = os.path.join(out_dir, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "manifest.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
