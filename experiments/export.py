"""Export any m1jax checkpoint as an HF checkpoint directory (config.json + safetensors) that transformers loads.

    python -m experiments.export --checkpoint=/tmp/run --out=/tmp/run_hf --dialect=transformers
    python -m experiments.export --checkpoint=/ckpt/m1 --out=/ckpt/m1_hf --dtype=bfloat16 --max_shard_gb=5

``--checkpoint``: a training or RL run directory (its latest checkpoint), an RL policy directory, or a converted
parameter directory (``m1jax.weights.export_to_hf``). ``--dialect=minimax`` writes MiniMax's own names and config,
``transformers`` the names and config of transformers' ``MiniMaxForCausalLM``.
"""
from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Run, policy or parameter directory.", required=True)
flags.DEFINE_string("out", None, "Output HF checkpoint directory.", required=True)
flags.DEFINE_enum("dialect", "minimax", ["minimax", "transformers"], "Tensor names and config dialect.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Stored dtype (default: as the parameters are).")
flags.DEFINE_float("max_shard_gb", None, "Split the safetensors into shards of at most this size.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")


def main(argv):
    from m1jax.errors import UserError, user_errors

    with user_errors():
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {argv[1:]}")
        from m1jax.weights import export_to_hf

        shard = None if FLAGS.max_shard_gb is None else int(FLAGS.max_shard_gb * 2 ** 30)
        cfg = export_to_hf(FLAGS.checkpoint, FLAGS.out, dialect=FLAGS.dialect, dtype=FLAGS.dtype,
                           max_shard_bytes=shard, overwrite=FLAGS.overwrite)
        print(f"wrote {FLAGS.out}: {cfg.param_counts()['total']:,} parameters, {FLAGS.dialect} names")


if __name__ == "__main__":
    app.run(main)
