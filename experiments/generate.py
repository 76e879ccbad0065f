"""Generate text (or token ids) from an M1-architecture model and report tokens/s.

    python -m experiments.generate --prompt="1 2 3" --max_new_tokens=16            # tiny preset, random weights
    python -m experiments.generate --checkpoint=/tmp/run --prompt="1 2 3"          # a training or RL run directory
    python -m experiments.generate --checkpoint=/path/to/hf_dir --prompt="Hello" --temperature=1 --top_p=0.95
    python -m experiments.generate --checkpoint=/ckpt/m1 --prompts_file=prompts.txt  # a converted parameter directory

``--checkpoint`` takes anything m1jax writes or reads (``m1jax.weights.load_weights``): an HF checkpoint directory (its
``tokenizer.json`` is used through the ``tokenizers`` package when both exist), a parameter directory from
``experiments.convert``, a training or RL run directory (the stored config says what the model is; the latest
checkpoint's parameters are read), or an RL policy directory. Without it, ``--preset`` with random weights. Without
a tokenizer, prompts are whitespace-separated token ids and the output is token ids.
"""
from __future__ import annotations

import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "HF directory, parameter directory, run directory or policy directory.")
flags.DEFINE_string("hf_checkpoint", None, "Alias of --checkpoint for an HF checkpoint directory.")
flags.DEFINE_string("params_dir", None, "Alias of --checkpoint for a converted parameter directory.")
flags.DEFINE_string("preset", "tiny", "Model preset with random weights (when no checkpoint is given).")
flags.DEFINE_multi_string("set", [], "Execution override key=value (repeatable), e.g. compute_dtype=bfloat16.")
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


def _source() -> str | None:
    given = [f for f in ("checkpoint", "hf_checkpoint", "params_dir") if FLAGS[f].value]
    if len(given) > 1:
        from m1jax.errors import UserError
        raise UserError(f"give one of --checkpoint, --hf_checkpoint, --params_dir; got {', '.join(given)}")
    return FLAGS[given[0]].value if given else None


def _load(source):
    """(cfg, (graphdef, params), description, tokenizer or None)."""
    from flax import nnx

    from m1jax.config import ModelConfig
    from m1jax.model import init_model
    from m1jax.weights import load_weights

    if source is None:
        cfg = ModelConfig.preset(FLAGS.preset).override(FLAGS.set)
        return cfg, nnx.split(init_model(cfg, FLAGS.seed)), f"preset {FLAGS.preset} (random weights)", None
    cfg, graphdef, params = load_weights(source, overrides=FLAGS.set)
    return cfg, (graphdef, params), source, _tokenizer(source)


def _tokenizer(source: str):
    path = os.path.join(source, "tokenizer.json")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path)


def _prompts(tokenizer):
    from m1jax.errors import UserError

    texts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        if not os.path.isfile(FLAGS.prompts_file):
            raise UserError(f"--prompts_file {FLAGS.prompts_file} does not exist")
        with open(FLAGS.prompts_file) as fh:
            texts += [line.rstrip("\n") for line in fh if line.strip()]
    if not texts:
        raise UserError("give --prompt (repeatable) or --prompts_file")
    if tokenizer is not None:
        return texts, [tokenizer.encode(t).ids for t in texts]
    try:
        return texts, [[int(x) for x in t.split()] for t in texts]
    except ValueError:
        raise UserError("without a tokenizer, prompts must be whitespace-separated token ids, e.g. --prompt='1 2 3'") \
            from None


def main(argv):
    from m1jax.errors import UserError, user_errors

    with user_errors(extra=(ValueError,)):  # generate's own checks raise ValueError naming the problem
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {argv[1:]}")
        import jax

        from m1jax import generate as gen

        sampling = gen.Sampling.make(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
        try:
            stop_ids = [int(t) for t in FLAGS.stop_tokens]
        except ValueError:
            raise UserError(f"--stop_tokens must be token ids, got {FLAGS.stop_tokens}") from None
        stop = gen.StopRules.make(stop_ids, FLAGS.truncate_after, FLAGS.truncate_prob)
        cfg, split, source, tokenizer = _load(_source())
        texts, prompts = _prompts(tokenizer)
        gen.check_request(cfg, prompts, FLAGS.max_new_tokens, stop)
        print(f"model: {source} on {jax.devices()[0].platform}; {len(prompts)} prompts, lengths "
              f"{[len(p) for p in prompts]}", flush=True)
        kw = dict(max_new_tokens=FLAGS.max_new_tokens, sampling=sampling, stop=stop, chunk_size=FLAGS.chunk_size,
                  key=jax.random.key(FLAGS.seed))
        _generate_and_print(gen, split, texts, prompts, tokenizer, kw)


def _generate_and_print(gen, split, texts, prompts, tokenizer, kw):
    import jax
    import numpy as np

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
