"""``python -m experiments.forward``, run as the README runs it, checked against numbers found independently of it.

The 456B preset lowers and compiles the full forward on abstract parameters (no weights are allocated); what it prints
must carry the published parameter counts and a memory analysis, which only a compiled executable has, whose argument
bytes are the fp32 weights of exactly that many parameters. Timing is printed but not asserted.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

M1_TOTAL = 456_089_655_296   # MiniMax-M1's published total parameter count
M1_ACTIVE = 45_944_920_064   # "45.9B activated per token", without the embedding and the LM head


def _run(*flags, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "experiments.forward", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _count(text):
    return int(text.replace(",", ""))


def test_m1_abstract_compile_prints_published_counts():
    out = _run("--preset=m1", "--batch=1", "--length=512")
    m = re.search(r"preset m1: ([\d,]+) parameters, ([\d,]+) active per token", out)
    assert m, out
    assert (_count(m.group(1)), _count(m.group(2))) == (M1_TOTAL, M1_ACTIVE)
    m = re.search(r"(\d+) layers scanned as (\d+) x (\d+)-layer period: lower [\d.]+s, compile [\d.]+s", out)
    assert m and tuple(map(int, m.groups())) == (80, 10, 8), out  # M1: 80 layers, one softmax layer in every 8
    m = re.search(r"memory analysis: arguments ([\d.]+) GiB", out)
    assert m, out  # printed from the compiled executable's memory analysis: the compile happened
    # the arguments are the fp32 parameters (4 bytes each) and 512 int32 tokens; printed to 0.1 GiB
    assert abs(float(m.group(1)) - (M1_TOTAL * 4 + 512 * 4) / 2 ** 30) <= 0.05 + 1e-9, out


def test_tiny_forward_counts_and_loss():
    """The default tiny preset runs for real: the counts it prints match a count by hand from its shapes and the loss
    on random tokens at initialisation is near ln V."""
    out = _run("--batch=2", "--length=32")
    v, d, layers, kv_width, f, e, k = 256, 64, 8, 2 * 16, 64, 4, 2  # ModelConfig.tiny(): 4 heads x 16, 2 KV heads
    lightning = 3 * d * d + d * d + d + d * d   # qkv, output gate, group norm gain, out proj (width = 4 x 16 = d)
    softmax = d * d + 2 * d * kv_width + d * d  # q, k, v, o
    norms_router = 2 * d + d * e                # two RMSNorm gains and the router, every layer
    total = 2 * v * d + d + layers * (norms_router + e * 3 * d * f) + 7 * lightning + softmax
    active = d + layers * (norms_router + k * 3 * d * f) + 7 * lightning + softmax
    m = re.search(r"parameters: total ([\d,]+) \(instantiated ([\d,]+)\), active per token ([\d,]+)", out)
    assert m, out
    assert (_count(m.group(1)), _count(m.group(2)), _count(m.group(3))) == (total, total, active)
    m = re.search(r"loss \(next-token cross-entropy on random tokens\): ([\d.]+)", out)
    assert m, out
    # logits of std ~0.1 at initialisation: the expected CE is ln V + Var(logits)/2 + O(var^2), within 0.1 of ln V
    assert abs(float(m.group(1)) - math.log(v)) < 0.1, out
