"""Serve a model over the OpenAI HTTP API (``m1jax.serve.server``).

    python -m experiments.serve --preset=tiny --seed=0 --port=8000                # random weights, token-id text
    python -m experiments.serve --hf_checkpoint=/models/MiniMax-M1-40k --port=8000
    python -m experiments.serve --params_dir=/ckpt/m1 --tokenizer_dir=/models/MiniMax-M1-40k
    python -m experiments.serve --params_dir=/runs/exp1 --engine_set=max_batch=16

Model sources (``m1jax.serve.loading``): an HF checkpoint directory, a parameter directory or training run directory
(their config.json names the architecture; a bare parameter directory takes --preset's), or --preset with random
weights from --seed. The tokenizer and chat template come from --tokenizer_dir or the weights' directory; without
one, prompts and completions are token ids. Then::

    curl localhost:8000/v1/completions -d '{"prompt": "1 2 3", "max_tokens": 8, "temperature": 0}'
"""
from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags, defined only when this module runs as the program (absl flags are global)."""
    flags.DEFINE_string("preset", "tiny", "Model preset (random weights unless --params_dir).")
    flags.DEFINE_integer("seed", 0, "Seed of a preset's random weights.")
    flags.DEFINE_string("hf_checkpoint", None, "HF checkpoint directory (config.json + safetensors).")
    flags.DEFINE_string("params_dir", None, "m1jax parameter directory or training run directory.")
    flags.DEFINE_string("tokenizer_dir", None, "Directory with tokenizer.json (+ tokenizer_config.json).")
    flags.DEFINE_multi_string("set", [], "Model config override key=value (repeatable).")
    flags.DEFINE_string("engine", "continuous",
                        "Engine: continuous (continuous batching, paged hybrid cache, prefix cache) or static (batches "
                      "through m1jax.generate, the baseline).")
    flags.DEFINE_multi_string("engine_set", [], "Engine setting key=value (repeatable), e.g. max_batch=16 (continuous:"
                              " m1jax.serve.config.EngineConfig; static: m1jax.serve.static.StaticEngineConfig).")
    flags.DEFINE_string("served_model_name", None, "Model name of the API (default: the checkpoint's or preset's).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_string("log_level", "info", "uvicorn log level.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from m1jax.errors import user_errors
    from m1jax.serve.loading import load_served_model
    from m1jax.serve.server import ServedModel, create_app, run
    from m1jax.serve.engines import build_engine, engine_config

    with user_errors():
        engine_config(FLAGS.engine, 1 << 62, FLAGS.engine_set)  # a bad setting fails before the model loads
        source = load_served_model(preset=FLAGS.preset, hf_checkpoint=FLAGS.hf_checkpoint,
                                   params_dir=FLAGS.params_dir, overrides=FLAGS.set, seed=FLAGS.seed,
                                   tokenizer_dir=FLAGS.tokenizer_dir)
        engine = build_engine(FLAGS.engine, source.model, FLAGS.engine_set)
    served = ServedModel(FLAGS.served_model_name or source.name, source.config.vocab_size,
                         source.config.max_position_embeddings, source.text)
    print(f"serving {source.description} as {served.name!r} on http://{FLAGS.host}:{FLAGS.port}/v1 "
          f"({'tokenizer' if served.has_tokenizer else 'no tokenizer: token-id text'})", flush=True)
    run(create_app(engine, served), FLAGS.host, FLAGS.port, FLAGS.log_level)


if __name__ == "__main__":
    define_flags()
    app.run(main)
