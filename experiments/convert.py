"""HF checkpoint directory (config.json + safetensors, MiniMax or transformers names) -> orbax parameter checkpoint.

    python -m experiments.convert --hf_dir=/models/MiniMax-M1-80k --out=/ckpt/m1-orbax
    python -m experiments.train --config=/ckpt/m1-orbax/config.json --init_params=/ckpt/m1-orbax/params ...

Streaming: parameters are built one at a time. For each model parameter (a stacked ``[repeats, (experts,) ...]``
array) the HF tensors that fill it are read from their memory-mapped shards, transposed into a host buffer, and the
buffer is written as its own orbax checkpoint ``<out>/params/<name>`` before the next parameter starts; peak host
memory is about the largest stacked parameter, never the model. ``m1jax.checkpoint.load_params`` reads the result
onto any mesh (each device reads only its shard). ``<out>/config.json`` is the MiniMax-dialect config.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags, defined only when this module runs as the program: importing ``convert`` (tests, other
    tools) must not claim flag names such as --out that other experiments define too (absl flags are global)."""
    flags.DEFINE_string("hf_dir", None, "HF checkpoint directory.")
    flags.DEFINE_string("out", None, "Output directory (config.json + params/).")
    flags.DEFINE_multi_string("set", [], "Execution overrides key=value, e.g. param_dtype=bfloat16 to store bf16.")


def convert(hf_dir: str, out: str, overrides=(), log=print) -> dict:
    """Convert ``hf_dir`` into ``out``; returns {"parameters": n, "peak_buffer_bytes": b, "seconds": s}."""
    from flax import nnx

    from m1jax.checkpoint import save_params_leaf
    from m1jax.config import ModelConfig, apply_overrides
    from m1jax.convert import iter_hf_params
    from m1jax.model import MiniMaxM1
    from m1jax.safetensors_io import CheckpointError

    t0 = time.perf_counter()
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{hf_dir}: no config.json")
    cfg = apply_overrides(ModelConfig.from_hf_config(config_path), list(overrides))
    abstract = nnx.state(nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)
    params_dir = os.path.join(os.path.abspath(out), "params")
    os.makedirs(params_dir, exist_ok=True)
    peak = count = 0
    for path, buffer in iter_hf_params(hf_dir, cfg, abstract):  # one parameter in host memory at a time
        name = ".".join(map(str, path))
        peak, count = max(peak, buffer.nbytes), count + 1
        save_params_leaf(params_dir, name + ".value", buffer)
        log(f"  {name} {list(buffer.shape)} {buffer.dtype}")
        del buffer
    with open(os.path.join(out, "config.json.tmp"), "w") as fh:
        json.dump(cfg.to_hf_config("minimax"), fh, indent=1)
    os.replace(os.path.join(out, "config.json.tmp"), os.path.join(out, "config.json"))
    return {"parameters": count, "peak_buffer_bytes": peak, "seconds": time.perf_counter() - t0}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.hf_dir or not FLAGS.out:
        raise app.UsageError("--hf_dir and --out are required")
    logging.set_verbosity(logging.WARNING)
    stats = convert(FLAGS.hf_dir, FLAGS.out, FLAGS.set)
    print(f"wrote {stats['parameters']} parameters to {FLAGS.out}/params in {stats['seconds']:.1f}s; largest "
          f"host buffer {stats['peak_buffer_bytes'] / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    define_flags()
    app.run(main)
