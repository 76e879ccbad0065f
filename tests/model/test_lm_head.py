"""The LM head's matmul mode, read from the GPU lowering.

XLA:CPU computes the ``bf16_3x`` algorithm as plain fp32, so no numerical test on CPU can tell it from HIGHEST (or
either from the default precision). The StableHLO a CUDA export carries can: every head matmul, in ``lm_logits``, the
model's ``logits``, and the fused cross-entropy's forward and custom backward, must be a ``stablehlo.dot_general``
with the attributes the StableHLO specification gives for the mode:

* ``bf16_3x``: fp32 operands, ``algorithm = <lhs_precision_type = bf16, rhs_precision_type = bf16,
  accumulation_type = f32, ..., num_primitive_operations = 3, ...>`` (XLA's BF16_BF16_F32_X3);
* ``float32``: fp32 operands, ``precision = [HIGHEST, HIGHEST]`` and no algorithm;
* ``fp32=False``: operands in the compute dtype (bf16 here), fp32 result, neither attribute;
* ``bf16_3x_fused`` ("split"): bf16 operands, fp32 result, neither attribute, and the contraction over two adjacent
  axes of each operand, (stack, K), with a stack of 2 or 3 products (2 when one operand is bf16 already, as the
  bf16 hidden states here): the products run as one GEMM per head matmul, not one each.
"""
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from m1jax.layers.embed import lm_logits
from m1jax.losses import linear_cross_entropy
from m1jax.model import MiniMaxM1
from tests.tiny_model import tiny_config

X3 = ("algorithm = <lhs_precision_type = bf16, rhs_precision_type = bf16, accumulation_type = f32, "
      "lhs_component_count = 1, rhs_component_count = 1, num_primitive_operations = 3, "
      "allow_imprecise_accumulation = false>")
HIGHEST = "precision = [HIGHEST, HIGHEST]"
TYPES = re.compile(r": \(tensor<(?:[\dx]*x)?(\w+)>, tensor<(?:[\dx]*x)?(\w+)>\) -> tensor<(?:[\dx]*x)?(\w+)>")
SPLIT_DOT = re.compile(r"contracting_dims = \[(\d+), (\d+)\] x \[(\d+), (\d+)\] : \(tensor<([\dx]+)x\w+>, "
                       r"tensor<([\dx]+)x\w+>\)")

N, D, V, CHUNK = 6, 8, 40, 16  # 2 full vocabulary chunks + a tail of 8: the scan body and the tail both lower


def cuda_dots(fn, *args):
    """Every stablehlo.dot_general line of ``jax.jit(fn)`` exported for CUDA (lowered here, no GPU needed)."""
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    text = jax.export.export(jax.jit(fn), platforms=("cuda",))(*specs).mlir_module()
    return [line for line in text.splitlines() if "stablehlo.dot_general" in line and not line.startswith("#loc")]


def assert_mode(lines, mode, count):
    """``count`` dot_generals, each with the operand types and attributes of ``mode``."""
    assert len(lines) == count, f"expected {count} dot_general, got {len(lines)}:\n" + "\n".join(lines)
    for line in lines:
        types = TYPES.search(line)
        assert types, line
        lhs, rhs, out = types.groups()
        assert out == "f32", line
        if mode == "bf16_3x":
            assert (lhs, rhs) == ("f32", "f32") and X3 in line and "precision =" not in line, line
        elif mode == "split":
            assert (lhs, rhs) == ("bf16", "bf16") and "algorithm" not in line and "precision =" not in line, line
            dims = SPLIT_DOT.search(line)
            assert dims, line
            a0, a1, b0, b1 = (int(x) for x in dims.groups()[:4])
            stacks = {[int(x) for x in shape.split("x")][axis] for shape, axis in zip(dims.groups()[4:], (a0, b0))}
            assert (a1, b1) == (a0 + 1, b0 + 1) and len(stacks) == 1 and stacks <= {2, 3}, line
        elif mode == "float32":
            assert (lhs, rhs) == ("f32", "f32") and HIGHEST in line and "algorithm" not in line, line
        else:
            assert (lhs, rhs) == ("bf16", "bf16") and "algorithm" not in line and "precision =" not in line, line


def _inputs():
    h = jnp.zeros((N, D), jnp.bfloat16)
    w = jnp.zeros((D, V), jnp.float32)
    t = jnp.zeros((N,), jnp.int32)
    return h, w, t


# (fp32, precision, expected mode): without fp32 the precision is not read
CASES = [(True, "bf16_3x", "bf16_3x"), (True, "float32", "float32"), (True, "bf16_3x_fused", "split"),
         (False, "bf16_3x", "bf16"), (False, "float32", "bf16"), (False, "bf16_3x_fused", "bf16")]


@pytest.mark.parametrize("fp32,precision,mode", CASES)
def test_lm_logits_lowering(fp32, precision, mode):
    h, w, _ = _inputs()
    f = lambda h, w: lm_logits(h, w, fp32=fp32, compute_dtype=jnp.bfloat16, precision=precision)
    assert_mode(cuda_dots(f, h, w), mode, 1)


@pytest.mark.parametrize("fp32,precision,mode", CASES)
def test_model_head_lowering(fp32, precision, mode):
    """ModelConfig.lm_head_fp32 / lm_head_precision reach the model's head (the backbone is left out: it has its own
    matmuls and GPU kernels)."""
    cfg = tiny_config(compute_dtype="bfloat16", lm_head_fp32=fp32, lm_head_precision=precision)
    graphdef, state = nnx.split(MiniMaxM1(cfg, rngs=nnx.Rngs(params=0)))
    hidden = jnp.zeros((2, 3, cfg.hidden_size), jnp.bfloat16)
    assert_mode(cuda_dots(lambda s, x: nnx.merge(graphdef, s).logits(x), state, hidden), mode, 1)


@pytest.mark.parametrize("implementation", ["chunked", "full"])
@pytest.mark.parametrize("fp32,precision,mode", CASES)
def test_cross_entropy_forward_and_backward_lowering(fp32, precision, mode, implementation):
    """Forward: chunked = one head matmul in the scan body + one for the tail chunk, full = one. Gradient: the
    chunked custom VJP recomputes the logits and forms dh and dW per chunk (3 each for body and tail) after its
    forward (2); the full form's autodiff adds dh and dW to its one forward matmul."""
    h, w, t = _inputs()
    kw = dict(chunk_size=CHUNK, fp32=fp32, fp32_precision=precision, implementation=implementation)
    forward = lambda h, w: linear_cross_entropy(h, w, t, **kw)
    grad = jax.grad(lambda h, w: linear_cross_entropy(h, w, t, **kw).sum(), argnums=(0, 1))
    chunked = implementation == "chunked"
    assert_mode(cuda_dots(forward, h, w), mode, 2 if chunked else 1)
    if not chunked and mode == "bf16":
        # autodiff of a bf16 x bf16 -> f32 einsum transposes with an fp32 cotangent; only the count is ours to check
        assert len(cuda_dots(grad, h, w)) == 3
        return
    assert_mode(cuda_dots(grad, h, w), mode, 8 if chunked else 3)
