"""Build (or load) an M1-architecture model, run a forward pass, print parameter counts, timings and the loss.

    python -m experiments.forward                      # the embedded tiny preset on CPU
    python -m experiments.forward --preset=m1-100m --length=512
    python -m experiments.forward --hf_checkpoint=/path/to/hf_dir
    python -m experiments.forward --set compute_dtype=bfloat16 --set moe_implementation=dense
"""
from __future__ import annotations

import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Model preset: tiny, m1-100m, m1-1b, m1 (456B; abstract only).")
flags.DEFINE_string("hf_checkpoint", None, "HF checkpoint directory (config.json + safetensors) to load instead.")
flags.DEFINE_multi_string("set", [], "Config override key=value (repeatable).")
flags.DEFINE_integer("batch", 2, "Batch size.")
flags.DEFINE_integer("length", 64, "Sequence length.")
flags.DEFINE_integer("seed", 0, "Seed for parameters and tokens.")
flags.DEFINE_bool("abstract", False, "Only lower and compile with abstract parameters (no memory): for presets "
                  "too large for this machine, e.g. --preset=m1. Prints compile time and XLA's memory analysis.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from m1jax.config import ModelConfig, apply_overrides
    from m1jax.convert import from_hf
    from m1jax.model import init_model, param_count

    if FLAGS.hf_checkpoint:
        cfg, model = from_hf(FLAGS.hf_checkpoint, verbose=True)
        cfg = apply_overrides(cfg, FLAGS.set)
        model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg))), nnx.state(model))
        source = FLAGS.hf_checkpoint
    else:
        cfg = apply_overrides(ModelConfig.preset(FLAGS.preset), FLAGS.set)
        counts = cfg.param_counts()
        if FLAGS.abstract or counts["total"] > 20e9:
            _compile_abstract(cfg)
            return
        t0 = time.perf_counter()
        model = init_model(cfg, FLAGS.seed)
        print(f"initialised preset {FLAGS.preset} in {time.perf_counter() - t0:.2f}s")
        source = f"preset {FLAGS.preset}"
    counts = cfg.param_counts()
    print(f"model: {source} on {jax.devices()[0].platform}; {cfg.num_hidden_layers} layers "
          f"({cfg.layer_types.count('lightning')} lightning, {cfg.layer_types.count('softmax')} softmax), "
          f"period {cfg.layer_period}")
    print(f"parameters: total {counts['total']:,} (instantiated {param_count(model):,}), active per token "
          f"{counts['active']:,} excluding embeddings and head")

    rng = np.random.default_rng(FLAGS.seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (FLAGS.batch, FLAGS.length)), jnp.int32)
    graphdef, state = nnx.split(model)

    loss_fn = jax.jit(_loss_fn(graphdef))

    t0 = time.perf_counter()
    compiled = loss_fn.lower(state, tokens).compile()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss, aux = jax.block_until_ready(compiled(state, tokens))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        jax.block_until_ready(compiled(state, tokens))
    t_step = (time.perf_counter() - t0) / reps
    print(f"forward [batch {FLAGS.batch} x length {FLAGS.length}]: compile {t_compile:.2f}s, first run "
          f"{t_first * 1e3:.1f} ms, steady {t_step * 1e3:.1f} ms")
    print(f"loss (next-token cross-entropy on random tokens): {float(loss):.4f} "
          f"(uniform would be ln V = {np.log(cfg.vocab_size):.4f}); router aux loss {float(aux):.4f}")


def _loss_fn(graphdef):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def loss_fn(state, tokens):
        out = nnx.merge(graphdef, state)(tokens[:, :-1])
        logp = jax.nn.log_softmax(out.logits, axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
        return nll, out.aux_loss
    return loss_fn


def _compile_abstract(cfg):
    """Lower and compile the forward with ShapeDtypeStruct parameters: compile time without allocating weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m1jax.model import abstract_model

    counts = cfg.param_counts()
    print(f"preset {FLAGS.preset}: {counts['total']:,} parameters, {counts['active']:,} active per token "
          f"(excluding embeddings and head); abstract compile only")
    graphdef, state = nnx.split(abstract_model(cfg))
    tokens = jax.ShapeDtypeStruct((FLAGS.batch, FLAGS.length), jnp.int32)
    t0 = time.perf_counter()
    lowered = jax.jit(_loss_fn(graphdef)).lower(state, tokens)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    print(f"{cfg.num_hidden_layers} layers scanned as {cfg.num_hidden_layers // cfg.layer_period} x "
          f"{cfg.layer_period}-layer period: lower {t_lower:.2f}s, compile {t_compile:.2f}s "
          f"on {jax.devices()[0].platform}")
    mem = compiled.memory_analysis()
    if mem is not None:
        print(f"memory analysis: arguments {mem.argument_size_in_bytes / 2**30:.1f} GiB, temporaries "
              f"{mem.temp_size_in_bytes / 2**30:.2f} GiB, outputs {mem.output_size_in_bytes / 2**20:.2f} MiB")


if __name__ == "__main__":
    app.run(main)
