"""Sharded == one device on real accelerators: ``python -m sharding.device_check [--out result.json]``.

On the local devices (e.g. 2 GPUs) runs the tiny-but-not-trivial model's loss and gradients on one device and on
meshes data=N, expert=N (moe_implementation="expert_parallel"), sequence=N and, with 4+ devices, a mixed one, and
prints the loss and the worst per-leaf relative gradient error (||g - g_ref|| / ||g_ref||) for each. fp32 throughout,
matmuls at HIGHEST precision (no TF32), so the numbers measure the sharding, not the arithmetic.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def _rel_errors(got, want):
    errs = []
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        errs.append(float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)))
    return max(errs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    from sharding import testing as H
    from sharding.mesh import make_mesh

    n = jax.device_count()
    cfg = H.tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        intermediate_size=256, num_local_experts=8, rotary_dim=32, vocab_size=1024, block_size=64)
    _, params = H.init(cfg)
    tokens, segments = H.batch(cfg, b=args.batch, t=args.length)
    t0 = time.perf_counter()
    loss_ref, grads_ref = H.loss_and_grads(cfg, params, tokens, segments)
    rows = [dict(mesh="one device", moe="sorted", loss=float(loss_ref), loss_rel_err=0.0, grad_max_rel_err=0.0,
                 seconds=round(time.perf_counter() - t0, 1))]
    runs = [(f"data={n}", "sorted"), (f"expert={n}", "expert_parallel"), (f"sequence={n}", "sorted")]
    if n >= 4:
        runs.append((f"data=-1,expert=2,sequence=2", "expert_parallel"))
    for spec, moe in runs:
        t0 = time.perf_counter()
        loss, grads = H.loss_and_grads(cfg.replace(moe_implementation=moe), params, tokens, segments,
                                       mesh=make_mesh(spec))
        rows.append(dict(mesh=spec, moe=moe, loss=float(loss),
                         loss_rel_err=abs(float(loss) - float(loss_ref)) / abs(float(loss_ref)),
                         grad_max_rel_err=_rel_errors(grads, grads_ref), seconds=round(time.perf_counter() - t0, 1)))
    report = dict(devices=[str(d) for d in jax.devices()], device_kind=jax.devices()[0].device_kind,
                  jax=jax.__version__, batch=args.batch, length=args.length, config=dict(
                      hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, experts=cfg.num_local_experts,
                      heads=cfg.num_attention_heads, head_dim=cfg.head_dim), results=rows)
    for r in rows:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
