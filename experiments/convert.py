"""HF checkpoint directory (config.json + safetensors, MiniMax or transformers names) -> m1jax parameter directory.

    python -m experiments.convert --hf_dir=/models/MiniMax-M1-80k --out=/ckpt/m1
    python -m experiments.train --config=/ckpt/m1 --init_params=/ckpt/m1/params ...
    python -m experiments.generate --params_dir=/ckpt/m1 --prompt="..."

Streams one parameter at a time (host memory: the largest stacked parameter) into ``<out>.partial`` and renames it to
``<out>`` when complete (``m1jax.weights.convert_hf``). A rerun after a failure resumes the partial output; an
existing ``--out`` is replaced only with ``--overwrite``.
"""
from __future__ import annotations

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags, defined only when this module runs as the program (absl flags are global, and
    other programs that import the library define flags of the same names)."""
    flags.DEFINE_string("hf_dir", None, "HF checkpoint directory.", required=True)
    flags.DEFINE_string("out", None, "Output parameter directory (config.json + params/).", required=True)
    flags.DEFINE_multi_string("set", [], "Execution overrides key=value, e.g. param_dtype=bfloat16 to store bf16.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out (or a partial one from another conversion).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from m1jax.errors import user_errors
    from m1jax.weights import convert_hf

    with user_errors():
        stats = convert_hf(FLAGS.hf_dir, FLAGS.out, FLAGS.set, overwrite=FLAGS.overwrite)
    print(f"wrote {stats['parameters']} parameters ({stats['resumed']} kept from a partial run) to "
          f"{FLAGS.out}/params in {stats['seconds']:.1f}s; largest host buffer "
          f"{stats['peak_buffer_bytes'] / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    define_flags()
    app.run(main)
