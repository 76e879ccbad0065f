"""HF checkpoint -> m1jax model: ``from_hf(path)`` and the name mapping behind it (docs/model.md §7).

Two naming dialects are read:
* ``minimax``: MiniMax's on-disk names (``block_sparse_moe.gate``, ``experts.{e}.w1/w2/w3``), the published checkpoint;
* ``transformers``: transformers' MiniMax names (``mlp.gate``, fused ``mlp.experts.gate_up_proj`` [E, 2F, D] holding
  w1 then w3, ``mlp.experts.down_proj`` [E, D, F]).
PyTorch Linear weights are [out, in]; ours are [in, out]. Layer i lives at repeat ``i // period``, position
``i % period`` of the stacked periods. transformers' derived decay buffers are skipped (recomputed from the config).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Iterable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax.config import LIGHTNING, ModelConfig
from m1jax.model import MiniMaxM1
from m1jax.safetensors_io import CheckpointError, open_checkpoint_dir

DERIVED_BUFFERS = re.compile(r"\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: the model-state ``path``, the leading ``index`` inside that parameter (repeat,
    and expert for per-expert tensors), and how to turn the HF array into that slice."""
    path: tuple
    index: tuple
    hf_shape: tuple
    transform: Callable[[np.ndarray], np.ndarray]


def _t(x):  # torch Linear [out, in] -> [in, out]
    return np.swapaxes(x, -1, -2)


def _identity(x):
    return x


def tensor_targets(cfg: ModelConfig, dialect: str) -> dict[str, list[Target]]:
    """Every HF tensor name of a checkpoint in ``dialect`` -> the slices of model parameters it fills."""
    if dialect not in ("minimax", "transformers"):
        raise ValueError(f"dialect must be 'minimax' or 'transformers', got {dialect!r}")
    d, w, f, e = cfg.hidden_size, cfg.attention_width, cfg.intermediate_size, cfg.num_local_experts
    kv = cfg.num_key_value_heads * cfg.head_dim
    v = cfg.vocab_size
    period = cfg.layer_period
    out: dict[str, list[Target]] = {
        "model.embed_tokens.weight": [Target(("embed_tokens", "embedding"), (), (v, d), _identity)],
        "model.norm.weight": [Target(("norm", "weight"), (), (d,), _identity)],
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = [Target(("lm_head", "kernel"), (), (v, d), _t)]
    for i, layer_type in enumerate(cfg.layer_types):
        r, pos = divmod(i, period)
        base = ("periods", "layers", pos)
        pre = f"model.layers.{i}."

        def add(name, sub, shape, transform, extra=()):
            out.setdefault(pre + name, []).append(Target(base + sub, (r,) + extra, shape, transform))

        add("input_layernorm.weight", ("input_layernorm", "weight"), (d,), _identity)
        add("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), (d,), _identity)
        if layer_type == LIGHTNING:
            add("self_attn.qkv_proj.weight", ("self_attn", "qkv_proj"), (3 * w, d), _t)
            add("self_attn.output_gate.weight", ("self_attn", "output_gate"), (w, d), _t)
            add("self_attn.norm.weight", ("self_attn", "norm", "weight"), (w,), _identity)
            add("self_attn.out_proj.weight", ("self_attn", "out_proj"), (d, w), _t)
        else:
            add("self_attn.q_proj.weight", ("self_attn", "q_proj"), (w, d), _t)
            add("self_attn.k_proj.weight", ("self_attn", "k_proj"), (kv, d), _t)
            add("self_attn.v_proj.weight", ("self_attn", "v_proj"), (kv, d), _t)
            add("self_attn.o_proj.weight", ("self_attn", "o_proj"), (d, w), _t)
        moe = ("block_sparse_moe",)
        if dialect == "minimax":
            add("block_sparse_moe.gate.weight", moe + ("gate",), (e, d), _t)
            for x in range(e):
                for wname, shape in (("w1", (f, d)), ("w3", (f, d)), ("w2", (d, f))):
                    add(f"block_sparse_moe.experts.{x}.{wname}.weight", moe + (wname,), shape, _t, (x,))
        else:
            add("mlp.gate.weight", moe + ("gate",), (e, d), _t)
            add("mlp.experts.gate_up_proj", moe + ("w1",), (e, 2 * f, d), lambda a: _t(a[:, :f]))
            add("mlp.experts.gate_up_proj", moe + ("w3",), (e, 2 * f, d), lambda a: _t(a[:, f:]))
            add("mlp.experts.down_proj", moe + ("w2",), (e, d, f), _t)
    return out


def expected_tensors(cfg: ModelConfig, dialect: str = "minimax") -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a checkpoint of ``cfg`` in ``dialect`` holds."""
    return {name: targets[0].hf_shape for name, targets in tensor_targets(cfg, dialect).items()}


def detect_dialect(names: Iterable[str]) -> str:
    names = list(names)
    if any(".mlp.experts.gate_up_proj" in n or ".mlp.gate.weight" in n for n in names):
        return "transformers"
    return "minimax"


def _plan(path: str | os.PathLike, cfg: ModelConfig):
    """Open the checkpoint, check its tensor names against ``cfg`` and group the targets by model parameter.

    Returns (name -> open file, parameter path -> [(HF name, Target)]). Raises CheckpointError naming the tensors on
    missing or unexpected names.
    """
    opened = open_checkpoint_dir(path)
    names = [n for n in opened if not DERIVED_BUFFERS.search(n)]
    dialect = detect_dialect(names)
    targets = tensor_targets(cfg, dialect)
    missing = sorted(set(targets) - set(names))
    unexpected = sorted(set(names) - set(targets))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing for this config ({dialect} names), e.g. "
                              f"{missing[:5]}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensors ({dialect} names), e.g. {unexpected[:5]}")
    by_param: dict[tuple, list[tuple[str, Target]]] = {}
    for name, ts in targets.items():
        for t in ts:
            by_param.setdefault(t.path, []).append((name, t))
    return opened, by_param


def iter_hf_params(path: str | os.PathLike, cfg: ModelConfig, abstract_state) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yield (model-state path, host array) one parameter at a time, in ``abstract_state``'s order.

    Each parameter is assembled from the memory-mapped HF tensors that fill it (transposed, stacked over repeats and
    experts, cast to the parameter's dtype), so peak host memory is the largest parameter, never the model.
    Raises CheckpointError naming the tensor on a missing, unexpected or mis-shaped tensor, or a parameter left
    partly unfilled.
    """
    opened, by_param = _plan(path, cfg)
    for state_path, leaf in nnx.to_flat_state(abstract_state):
        state_path = tuple(state_path)
        name_of = ".".join(map(str, state_path))
        if state_path not in by_param:
            raise CheckpointError(f"no tensor of {path} fills parameter {name_of}")
        buffer = np.empty(leaf.shape, np.dtype(leaf.dtype))
        # Writes per leading slot ([repeat, expert] or [repeat, :] for stacked layers, one cell otherwise): a complete
        # parameter leaves no zero.
        filled = np.zeros(leaf.shape[:2] if state_path[0] == "periods" else (), np.int64)
        for name, target in by_param[state_path]:
            array = opened[name].get(name)
            if tuple(array.shape) != target.hf_shape:
                raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {target.hf_shape}")
            value = target.transform(array)
            slot = buffer[target.index] if target.index else buffer
            if tuple(value.shape) != slot.shape:
                raise CheckpointError(f"tensor {name!r} gives {value.shape} for {name_of}{list(target.index)}, "
                                      f"which is {slot.shape}")
            if target.index:
                buffer[target.index] = value.astype(buffer.dtype)
                filled[target.index[:filled.ndim]] += 1
            else:
                buffer[...] = value.astype(buffer.dtype)
                filled += 1
        if not np.all(filled):
            raise CheckpointError(f"parameter {name_of} was not completely filled by {path}")
        yield state_path, buffer


def from_hf(path: str | os.PathLike, *, verbose: bool = False, **config_overrides) -> tuple[ModelConfig, MiniMaxM1]:
    """Read ``config.json`` and the safetensors of an HF checkpoint directory; return ``(config, model)``.

    Accepts MiniMax's own names and config dialect as well as transformers' ``save_pretrained`` output, a single
    ``model.safetensors`` or a sharded index. ``config_overrides`` set execution fields (compute_dtype, ...).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: no config.json")
    cfg = ModelConfig.from_hf_config(config_path, **config_overrides)
    abstract = nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(params=0)))
    graphdef, abstract_state = nnx.split(abstract)
    values = []
    for state_path, array in iter_hf_params(path, cfg, abstract_state):
        values.append((state_path, jnp.asarray(array)))
        if verbose:
            print(f"  loaded {'.'.join(map(str, state_path))} {list(array.shape)}", flush=True)
    nnx.replace_by_pure_dict(abstract_state, nnx.to_pure_dict(nnx.from_flat_state(values)))
    return cfg, nnx.merge(graphdef, abstract_state)


def export_hf(model: MiniMaxM1, path: str | os.PathLike, *, dialect: str = "minimax", dtype=None,
              max_shard_bytes: int | None = None) -> None:
    """Write ``model`` as an HF checkpoint directory (config.json + safetensors, sharded when ``max_shard_bytes``).

    The inverse of ``from_hf``; files are written atomically.
    """
    from m1jax.safetensors_io import save_file
    import json

    cfg = model.cfg
    os.makedirs(path, exist_ok=True)
    flat = {tuple(p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors = {}
    for name, targets in tensor_targets(cfg, dialect).items():
        parts = []
        for t in targets:
            value = flat[t.path][t.index] if t.index else flat[t.path]
            parts.append(_t(value) if t.transform is not _identity else value)
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)  # fused gate_up_proj: w1 then w3
        # the router stays fp32, as in the published checkpoint (not self_attn.output_gate, which is bf16 there)
        if dtype is not None and not name.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight")):
            array = array.astype(dtype)
        tensors[name] = np.ascontiguousarray(array)
    with open(os.path.join(path, "config.json.tmp"), "w") as fh:
        json.dump(cfg.to_hf_config(dialect), fh, indent=2)
    os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name, array in tensors.items():
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json.tmp"), "w") as fh:
        json.dump(index, fh, indent=2)
    os.replace(os.path.join(path, "model.safetensors.index.json.tmp"),
               os.path.join(path, "model.safetensors.index.json"))
