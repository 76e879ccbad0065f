"""Long-context evaluation (RULER-style synthetic tasks, ``m1jax.eval``) through a server or the library.

    python -m experiments.eval --server_url=http://127.0.0.1:8000 --tokenizer_dir=/models/MiniMax-M1-40k \
        --lengths=4k,32k,128k,1m --samples=8
    python -m experiments.eval --server_url=http://127.0.0.1:8000 --vocab_size=256 --lengths=1k   # token-id model
    python -m experiments.eval --preset=tiny --lengths=1k,2k --via=engine                         # no server

Through a server, prompts are sent as text; lengths are counted with --tokenizer_dir's tokenizer (for a model with
a tokenizer), or the prompts are token ids (--vocab_size, for a server of a model without one). In the library
(--via=engine or --via=generate), the model comes from --preset/--seed, --hf_checkpoint or --params_dir as in
``experiments.serve``, and its own tokenizer, if any, writes and counts the prompts. --out writes the scores as JSON.
"""
from __future__ import annotations

import json

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("server_url", None, "OpenAI-compatible server (e.g. http://127.0.0.1:8000).")
    flags.DEFINE_string("served_model_name", None, "Model name to send to the server.")
    flags.DEFINE_integer("concurrency", 4, "Requests in flight to the server.")
    flags.DEFINE_integer("vocab_size", None, "Token-id prompts for a server of a model without a tokenizer.")
    flags.DEFINE_enum("via", "engine", ["engine", "generate"], "Library path when there is no --server_url.")
    flags.DEFINE_string("preset", "tiny", "Model preset (random weights unless --params_dir).")
    flags.DEFINE_integer("seed", 0, "Seed of a preset's random weights and of the task samples.")
    flags.DEFINE_string("hf_checkpoint", None, "HF checkpoint directory.")
    flags.DEFINE_string("params_dir", None, "m1jax parameter directory or training run directory.")
    flags.DEFINE_string("tokenizer_dir", None, "Directory with tokenizer.json (counts and writes text prompts).")
    flags.DEFINE_multi_string("set", [], "Model config override key=value (repeatable).")
    flags.DEFINE_string("engine", "continuous", "Engine of --via=engine: continuous or static (experiments.serve's).")
    flags.DEFINE_multi_string("engine_set", [], "Engine setting key=value (repeatable; --via=generate takes the static "
                              "engine's).")
    flags.DEFINE_list("tasks", ["niah_multikey", "variable_tracking", "frequent_words"], "Tasks.")
    flags.DEFINE_list("lengths", ["1k"], "Prompt lengths in tokens (4096, 4k, 1m).")
    flags.DEFINE_integer("samples", 4, "Samples per task and length.")
    flags.DEFINE_integer("max_new_tokens", None, "Cap on the tokens generated per answer (default: the task's).")
    flags.DEFINE_string("out", None, "Write the results as JSON here.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from m1jax.errors import UserError, user_errors
    from m1jax.eval import runner
    from m1jax.eval.vocab import IdVocabulary, TextVocabulary
    from m1jax.serve.text import TokenIdText, load_tokenizer

    engine = None
    with user_errors((ValueError,)):
        lengths = [runner.parse_length(x) for x in FLAGS.lengths]
        if FLAGS.server_url:
            completer = runner.HttpCompleter(FLAGS.server_url, FLAGS.served_model_name, FLAGS.concurrency)
            text = load_tokenizer(FLAGS.tokenizer_dir) if FLAGS.tokenizer_dir else None
            if FLAGS.tokenizer_dir and text is None:
                raise UserError(f"no tokenizer.json in {FLAGS.tokenizer_dir}")
            if text is None and FLAGS.vocab_size is None:
                raise UserError("give --tokenizer_dir (a model with a tokenizer) or --vocab_size (token-id prompts)")
            vocab = (IdVocabulary(FLAGS.vocab_size) if text is None else
                     TextVocabulary(lambda s: len(text.encode(s))))
        else:
            from m1jax.serve.engines import build_engine, engine_config
            from m1jax.serve.loading import load_served_model
            from m1jax.serve.static import StaticEngineConfig
            # --via=generate batches like the static engine: its settings (max_batch_size, chunk_size, kv_dtype).
            settings = engine_config(FLAGS.engine if FLAGS.via == "engine" else "static", 1 << 62, FLAGS.engine_set)
            source = load_served_model(preset=FLAGS.preset, hf_checkpoint=FLAGS.hf_checkpoint,
                                       params_dir=FLAGS.params_dir, overrides=FLAGS.set, seed=FLAGS.seed,
                                       tokenizer_dir=FLAGS.tokenizer_dir)
            text = source.text
            vocab = (IdVocabulary(source.config.vocab_size) if isinstance(text, TokenIdText) else
                     TextVocabulary(lambda s: len(text.encode(s))))
            if FLAGS.via == "engine":
                engine = build_engine(FLAGS.engine, source.model, FLAGS.engine_set)
                completer = runner.EngineCompleter(engine, text)
            else:
                assert isinstance(settings, StaticEngineConfig)
                completer = runner.GenerateCompleter(source.model, text, settings.max_batch_size,
                                                     settings.chunk_size, settings.kv_dtype)
        try:
            results = runner.evaluate(completer, vocab, FLAGS.tasks, lengths, FLAGS.samples, FLAGS.seed,
                                          FLAGS.max_new_tokens, log=print)
        finally:
            if engine is not None:
                engine.stop()
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
