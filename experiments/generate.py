"""Generate text (or token ids) from an M1-architecture model and report tokens/s.

    python -m experiments.generate --prompt="1 2 3" --max_new_tokens=16            # tiny preset, random weights
    python -m experiments.generate --hf_checkpoint=/path/to/hf_dir --prompt="Hello" --temperature=1 --top_p=0.95
    python -m experiments.generate --params_dir=/ckpt/params --preset=m1-1b --prompts_file=prompts.txt

Model sources: an HF checkpoint directory (``m1jax.convert.from_hf``; its ``tokenizer.json`` is used through the
``tokenizers`` package when both exist), an orbax parameter directory written by ``m1jax.checkpoint`` with the
architecture from --preset/--set, or a preset with random weights. Without a tokenizer, prompts are
whitespace-separated token ids and the output is token ids.
"""
from __future__ import annotations

import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Model preset (random weights unless --params_dir).")
flags.DEFINE_string("hf_checkpoint", None, "HF checkpoint directory (config.json + safetensors [+ tokenizer.json]).")
flags.DEFINE_string("params_dir", None, "Orbax parameter directory (m1jax.checkpoint.load_params) for --preset.")
flags.DEFINE_multi_string("set", [], "Config override key=value (repeatable), e.g. compute_dtype=bfloat16.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "File with one prompt per line.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Top-p (1 = off).")
flags.DEFINE_list("stop_tokens", [], "Stop token ids.")
flags.DEFINE_integer("truncate_after", 3000, "M1 early truncation: stop after this many confident tokens (0 = off).")
flags.DEFINE_float("truncate_prob", 0.99, "M1 early truncation probability threshold.")
flags.DEFINE_integer("chunk_size", 512, "Prefill chunk size.")
flags.DEFINE_integer("seed", 0, "Seed (weights of a preset, sampling).")


def _load_model():
    from flax import nnx

    from m1jax.config import ModelConfig, apply_overrides
    from m1jax.model import abstract_model, init_model
    if FLAGS.hf_checkpoint:
        from m1jax.convert import from_hf
        cfg, model = from_hf(FLAGS.hf_checkpoint)
        cfg = apply_overrides(cfg, FLAGS.set)
        model = nnx.merge(nnx.graphdef(abstract_model(cfg)), nnx.state(model))
        return cfg, model, FLAGS.hf_checkpoint
    cfg = apply_overrides(ModelConfig.preset(FLAGS.preset), FLAGS.set)
    if FLAGS.params_dir:
        from m1jax.checkpoint import load_params
        abstract = abstract_model(cfg)
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        params = load_params(FLAGS.params_dir, params)
        rest = init_model(cfg, FLAGS.seed)  # non-parameter state (none today) from a fresh model
        return cfg, nnx.merge(graphdef, params, nnx.split(rest, nnx.Param, ...)[2]), FLAGS.params_dir
    return cfg, init_model(cfg, FLAGS.seed), f"preset {FLAGS.preset} (random weights)"


def _tokenizer():
    path = FLAGS.hf_checkpoint and os.path.join(FLAGS.hf_checkpoint, "tokenizer.json")
    if not path or not os.path.exists(path):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print(f"found {path} but the tokenizers package is not installed: prompts and outputs are token ids")
        return None
    return Tokenizer.from_file(path)


def _prompts():
    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        with open(FLAGS.prompts_file) as fh:
            prompts += [line.rstrip("\n") for line in fh if line.strip()]
    if not prompts:
        raise app.UsageError("give --prompt (repeatable) or --prompts_file")
    return prompts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    import numpy as np
    from flax import nnx

    from m1jax import generate as gen

    cfg, model, source = _load_model()
    tokenizer = _tokenizer()
    texts = _prompts()
    prompts = ([tokenizer.encode(t).ids for t in texts] if tokenizer else
               [[int(x) for x in t.split()] for t in texts])
    print(f"model: {source} on {jax.devices()[0].platform}; {len(prompts)} prompts, lengths "
          f"{[len(p) for p in prompts]}")
    split = nnx.split(model)
    sampling = gen.Sampling.make(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    stop = gen.StopRules.make([int(t) for t in FLAGS.stop_tokens], FLAGS.truncate_after, FLAGS.truncate_prob)
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, sampling=sampling, stop=stop, chunk_size=FLAGS.chunk_size,
              key=jax.random.key(FLAGS.seed))
    t0 = time.perf_counter()
    out = jax.block_until_ready(gen.generate(split, prompts, **kw))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()  # again, compiled: the steady-state speed
    out = jax.block_until_ready(gen.generate(split, prompts, **kw))
    seconds = time.perf_counter() - t0
    lengths = np.asarray(out.lengths)
    reasons = {gen.MAX_LENGTH: "max_new_tokens", gen.STOP_TOKEN: "stop token", gen.TRUNCATED: "early truncation"}
    for i, text in enumerate(texts):
        new = np.asarray(out.tokens[i, :lengths[i]]).tolist()
        shown = tokenizer.decode(new) if tokenizer else " ".join(map(str, new))
        print(f"--- prompt {i}: {text!r}\n{shown}\n    ({lengths[i]} tokens, {reasons[int(out.stop_reason[i])]}, "
              f"mean model log-prob {float(np.mean(np.asarray(out.model_logprobs[i, :lengths[i]]))):.3f})")
    total = int(lengths.sum())
    print(f"{total} tokens in {seconds:.3f}s = {total / seconds:.1f} tokens/s (prefill included; first call with "
          f"compilation {first:.1f}s)")


if __name__ == "__main__":
    app.run(main)
