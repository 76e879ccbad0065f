"""The CISPO reproduction grid (spec/rl-cispo.md section 5): one pretrained policy, every loss arm, mu = 8 and 1, seeds.

    python -m experiments.bench_rl --out=/tmp/bench_rl                      # tiny CPU smoke of the whole pipeline
    python -m experiments.bench_rl --out=$OUT --workdir=/tmp/rl --layers=8 --period=8 --hidden=256 --heads=4 --head_dim=64 \\
        --experts=8 --ffn=256 --compute_dtype=bfloat16 --min_digits=4 --max_digits=4 --sft_steps=2500 \\
        --sft_batch=256 --sft_lr=1e-3 --prompts=32 --group_size=16 --rl_steps=50 --lr=1e-4 --seeds=3 \\
        --eval_problems=256 --deadline_s=300                                  # the H100 run of benchmarks/RL.md

Model, task and RL flags are experiments/rl.py's. Per mu, all arms share one compiled update (``make_rl_update`` with
alternatives, a traced arm index), so the grid costs two update compilations. Jobs run in priority order (all mu = 8
arms for seed 0, then the mu = 1 arms for seed 0, then the next seed) and no job starts after --deadline_s, so a
time-boxed run still yields complete seeds. After every job the analysis is rewritten under --out:
results.jsonl (every step record, tagged arm/mu/seed), summary.json and summary.md (the table), acc_mu<k>.png.
Also measured once: the pretrained policy's diagnostics, the sampler/trainer Pearson correlation with an fp32 and a
bf16 LM head (and with the head scaled up x4, mimicking M1's high-magnitude head activations), and throughput.

The claim statistic (spec 5.5): a_D = DAPO's seed-mean accuracy at the final step S; s_C = the first evaluated step at
which a CISPO arm's seed-mean accuracy reaches a_D; s_C / S <= 0.5 is "CISPO matches DAPO in half the steps".
"""
from __future__ import annotations

import dataclasses
import json
import os
import tarfile
import time

import numpy as np
from absl import app, flags, logging

from experiments import rl

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/m1jax_bench_rl", "Output directory.")
flags.DEFINE_list("arms", ["dapo", "cispo_5", "grpo", "drgrpo", "cispo_1.28", "cispo_2", "cispo_masked"],
                  "Arms at mu > 1 (see ARMS).")
flags.DEFINE_list("mu1_arms", ["dapo", "cispo_5", "grpo", "drgrpo", "cispo_masked"],
                  "Arms at mu = 1 (CISPO's cap cannot bind there: r = 1 up to train/infer mismatch).")
flags.DEFINE_list("mus", ["8", "1"], "Minibatch updates per rollout batch.")
flags.DEFINE_integer("seeds", 1, "Seeds per (arm, mu).")
flags.DEFINE_float("deadline_s", 1e9, "Start no job after this many seconds.")
flags.DEFINE_bool("mismatch", True, "Measure the fp32 vs bf16 head sampler/trainer correlation.")
flags.DEFINE_string("analyze", None, "Only rewrite the analysis from this results.jsonl.")

# name -> (loss, knobs, adv_norm, dynamic sampling). Spec 5.4's arms.
ARMS = {
    "grpo": ("grpo", {}, "group_std", False),
    "dapo": ("dapo", {}, "group_std", True),
    "drgrpo": ("drgrpo", {}, "mean_only", False),
    "cispo_1.28": ("cispo", {"ratio_max": 1.28}, "group_std", True),
    "cispo_2": ("cispo", {"ratio_max": 2.0}, "group_std", True),
    "cispo_5": ("cispo", {"ratio_max": 5.0}, "group_std", True),
    "cispo_masked": ("cispo_masked", {"ratio_max": 5.0}, "group_std", True),
}


def arm_settings(base: rl.RLSettings, arm: str, mu: int) -> rl.RLSettings:
    loss, knobs, adv_norm, ds = ARMS[arm]
    ucfg = dataclasses.replace(base.update, loss=loss, loss_knobs=tuple(knobs.items()), mu=mu)
    return dataclasses.replace(base, update=ucfg, adv_norm=adv_norm, dynamic_sampling=ds)


# ------------------------------------------------------------------------------------------------ diagnostics
def carry_diagnostics(graphdef, params, task, tokenizer, n: int = 256, seed: int = 123) -> dict:
    """Teacher-forced exact answers: mean probability of the correct digit at carry-in (fork) positions and
    elsewhere (spec 5.3's check: about 1 - forget_prob at carries)."""
    import jax.numpy as jnp

    from m1jax.rl.rollout import prompt_batch
    from m1jax.rl.step import response_logprobs
    problems, prompts, start = prompt_batch(task, tokenizer, np.random.default_rng(seed), n)
    answers = np.full((n, task.max_answer_tokens), tokenizer.PAD, np.int32)
    carry = np.zeros(answers.shape, bool)
    mask = np.zeros(answers.shape, bool)
    for i, p in enumerate(problems):
        ids = tokenizer.encode(p.answer) + [tokenizer.EOS]
        answers[i, :len(ids)] = ids
        carry[i, :len(p.answer)] = task.carry_in(p)
        mask[i, :len(ids)] = True
    logp = np.asarray(response_logprobs(graphdef, params, jnp.asarray(np.concatenate([prompts, answers], 1)),
                                        jnp.asarray(start), answers.shape[1]))
    prob = np.exp(logp)
    return {"p_correct_at_carry": float(prob[carry & mask].mean()),
            "p_correct_elsewhere": float(prob[~carry & mask].mean())}


def mismatch(cfg, params, task, tokenizer, settings, head_scales=(1.0, 4.0)) -> list[dict]:
    """Sampler vs trainer token-probability Pearson r with an fp32 and a bf16 LM head (both sides alike), on one
    rollout batch; the head kernel scaled by each of head_scales (larger logits, as M1's high-magnitude head)."""
    import jax
    import jax.numpy as jnp

    from m1jax.model import abstract_model
    from m1jax.rl.rollout import prompt_batch, sample_groups
    from m1jax.rl.step import pearson, response_logprobs
    from m1jax.train import split_model
    logprobs = jax.jit(response_logprobs, static_argnums=(0, 4), static_argnames="fp32_head")
    out = []
    for fp32 in (True, False):
        graphdef, _ = split_model(abstract_model(cfg.replace(lm_head_fp32=fp32)))
        for scale in head_scales:
            scaled = jax.tree_util.tree_map_with_path(
                lambda path, x: x * scale if "lm_head" in jax.tree_util.keystr(path) else x, params)
            problems, prompts, start = prompt_batch(task, tokenizer, np.random.default_rng(7), settings.prompts)
            s = sample_groups(graphdef, scaled, prompts, start, jax.random.key(7), settings.rollout)
            trainer = logprobs(graphdef, scaled, jnp.asarray(s.tokens), jnp.asarray(s.start),
                               s.sampler_logp.shape[1], fp32_head=fp32)
            mask = jnp.asarray(s.response_mask)
            out.append({"head": "fp32" if fp32 else cfg.compute_dtype, "head_scale": scale,
                        "pearson": float(pearson(jnp.exp(jnp.asarray(s.sampler_logp)), jnp.exp(trainer), mask)),
                        "max_abs_logp_diff": float(jnp.max(jnp.abs(trainer - s.sampler_logp) * mask)),
                        "tokens": int(mask.sum())})
    return out


# ------------------------------------------------------------------------------------------------ analysis
def _curves(records):
    """(arm, mu) -> {seed: (steps [E], acc [E])} from the records of finished runs."""
    runs = {}
    for r in records:
        if "acc" in r:
            runs.setdefault((r["arm"], r["mu"]), {}).setdefault(r["seed"], []).append((r["step"], r["acc"]))
    out = {}
    for key, seeds in runs.items():
        full = {s: np.array(v).T for s, v in seeds.items()}
        longest = max(len(v[0]) for v in full.values())
        out[key] = {s: v for s, v in full.items() if len(v[0]) == longest}  # drop a run cut short
    return out


def _first_reach(steps, acc, target):
    hit = np.flatnonzero(acc >= target - 1e-9)
    return float(steps[hit[0]]) if len(hit) else float("inf")


def analyze(records, mismatch_rows=None, extra=None) -> dict:
    """Per (arm, mu): final accuracy, AUC, steps to 50% / 80% of the way from the base accuracy to 1, and for every
    arm the claim statistic s_C / S against DAPO at the same mu (with a bootstrap over seeds)."""
    curves = _curves(records)
    base = [r["acc"] for r in records if r.get("step") == 0 and "acc" in r]
    base_acc = float(np.mean(base)) if base else float("nan")
    rng = np.random.default_rng(0)
    rows = []
    for (arm, mu), seeds in sorted(curves.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        steps = next(iter(seeds.values()))[0]
        accs = np.stack([v[1] for v in seeds.values()])  # [seeds, E]
        mean = accs.mean(0)
        row = {"arm": arm, "mu": mu, "seeds": len(seeds), "final_acc": float(mean[-1]),
               "final_acc_std": float(accs[:, -1].std()), "auc": float(mean.mean()),
               "S": float(steps[-1])}
        for f in (0.5, 0.8):
            row[f"steps_to_{int(f * 100)}pct"] = _first_reach(steps, mean, base_acc + f * (1 - base_acc))
        dapo = curves.get(("dapo", mu))
        if dapo is not None:
            d_accs = np.stack([v[1] for v in dapo.values()])
            a_d = d_accs.mean(0)[-1]
            row["a_D"] = float(a_d)
            row["s_over_S"] = _first_reach(steps, mean, a_d) / steps[-1]
            boot = []
            for _ in range(1000):
                a = accs[rng.integers(len(accs), size=len(accs))].mean(0)
                d = d_accs[rng.integers(len(d_accs), size=len(d_accs))].mean(0)[-1]
                boot.append(_first_reach(steps, a, d) / steps[-1])
            row["s_over_S_p10"], row["s_over_S_p90"] = (float(np.percentile(boot, q, method="nearest"))
                                                         for q in (10, 90))
        rows.append(row)
    mechanism = {}
    for r in records:
        for k in ("ppo_clip_frac_by_minibatch", "is_cap_frac_by_minibatch"):
            if k in r:
                mechanism.setdefault(f"{r['arm']}/mu{r['mu']}/{k}", []).append(r[k])
    mechanism = {k: [float(x) for x in np.nanmean(np.array(v, np.float64), axis=0)] for k, v in mechanism.items()}
    throughput = {}
    for mu in sorted({r["mu"] for r in records if "rollout_s" in r}):
        rs = [r for r in records if r.get("mu") == mu and "rollout_s" in r and r["step"] > 0]
        if rs:
            throughput[f"mu{mu}"] = {
                "rollout_tokens_per_s": float(np.median([r["rollout_tokens"] / r["rollout_s"] for r in rs])),
                "update_tokens_per_s": float(np.median([r["update_tokens"] / r["update_s"] for r in rs])),
                "rollout_s": float(np.median([r["rollout_s"] for r in rs])),
                "update_s": float(np.median([r["update_s"] for r in rs])),
                "score_s": float(np.median([r["score_s"] for r in rs]))}
    return {"base_acc": base_acc, "table": rows, "mechanism": mechanism, "throughput": throughput,
            "mismatch": mismatch_rows or [], **(extra or {})}


def write_outputs(out_dir, summary, records):
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    cols = ["arm", "mu", "seeds", "final_acc", "final_acc_std", "auc", "steps_to_50pct", "steps_to_80pct", "a_D",
            "s_over_S", "s_over_S_p10", "s_over_S_p90"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in summary["table"]:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
    with open(os.path.join(out_dir, "summary.md"), "w") as fh:
        fh.write(f"base accuracy {summary['base_acc']:.3f}\n\n" + "\n".join(lines) + "\n")
    curves = _curves(records)
    for mu in sorted({k[1] for k in curves}):
        plot = {}
        for (arm, m), seeds in sorted(curves.items()):
            if m == mu:
                accs = np.stack([v[1] for v in seeds.values()])
                plot[f"{arm} (n={len(accs)})"] = (next(iter(seeds.values()))[0], accs.mean(0), accs.min(0),
                                                  accs.max(0))
        rl.plot_accuracy(plot, os.path.join(out_dir, f"acc_mu{mu}.png"),
                         f"noisy-carry addition, mu={mu} (seed mean, band = min..max)")
    return "\n".join(lines)


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------------ main
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    os.makedirs(FLAGS.out, exist_ok=True)
    if FLAGS.analyze:
        records = [json.loads(line) for line in open(FLAGS.analyze)]
        old = json.load(open(os.path.join(os.path.dirname(FLAGS.analyze), "summary.json")))
        summary = analyze(records, old.get("mismatch"), {k: old[k] for k in ("pretrained", "device") if k in old})
        print(write_outputs(FLAGS.out, summary, records))
        return
    import jax

    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    log(f"devices: {jax.devices()}")
    task, tokenizer = rl.make_task()
    cfg, graphdef, params = rl.prepare_policy(task, tokenizer, log)  # orbax checkpoint under --workdir
    if not FLAGS.init_checkpoint:  # the policy as one file under --out, to carry to a later call
        with tarfile.open(os.path.join(FLAGS.out, "pretrained.tar"), "w") as tar:
            tar.add(os.path.join(FLAGS.workdir, "pretrained"), arcname="pretrained")
    base = rl.settings_from_flags()
    held_out = rl.eval_set(task, tokenizer, FLAGS.eval_problems, 0)
    extra = {"device": str(jax.devices()[0].device_kind), "config": dataclasses.asdict(cfg),
             "pretrained": carry_diagnostics(graphdef, params, task, tokenizer)}
    extra["pretrained"].update(rl.evaluate(graphdef, params, held_out, task, tokenizer, base.rollout,
                                           FLAGS.eval_samples, jax.random.key(0)))
    log(f"pretrained policy: {extra['pretrained']}")
    mismatch_rows = mismatch(cfg, params, task, tokenizer, base) if FLAGS.mismatch else []
    for row in mismatch_rows:
        log(f"mismatch: {row}")

    jobs = []
    for seed in range(FLAGS.seeds):
        for mu in (int(m) for m in FLAGS.mus):
            jobs += [(arm, mu, seed) for arm in (FLAGS.arms if mu > 1 else FLAGS.mu1_arms)]
    updates = {}
    records = []
    results = open(os.path.join(FLAGS.out, "results.jsonl"), "w")
    for arm, mu, seed in jobs:
        if time.perf_counter() - t0 > FLAGS.deadline_s:
            log(f"deadline: skipping {arm} mu={mu} seed={seed}")
            continue
        arm_names = FLAGS.arms if mu > 1 else FLAGS.mu1_arms
        if mu not in updates:  # every arm of this mu in one compiled program
            from m1jax.rl.step import make_rl_update
            cfgs = [arm_settings(base, a, mu).update for a in arm_names]
            updates[mu] = make_rl_update(graphdef, cfgs[0], alternatives=tuple(cfgs[1:]))
        tag = {"arm": arm, "mu": mu, "seed": seed}

        def keep(record, tag=tag):
            records.append(dict(record, **tag))
            results.write(json.dumps(records[-1]) + "\n")
            results.flush()

        t_run = time.perf_counter()
        rl.run_rl(graphdef, params, arm_settings(base, arm, mu), task, tokenizer, held_out, seed=seed,
                  eval_samples=FLAGS.eval_samples, log=lambda m: None, on_record=keep, update=updates[mu],
                  arm=arm_names.index(arm))
        evals = [r["acc"] for r in records if r.get("arm") == arm and r["mu"] == mu and r["seed"] == seed
                 and "acc" in r]
        log(f"{arm:13s} mu={mu} seed={seed}: acc {evals[0]:.3f} -> {evals[-1]:.3f} "
            f"({time.perf_counter() - t_run:.1f}s)")
        write_outputs(FLAGS.out, analyze(records, mismatch_rows, extra), records)
    results.close()
    summary = analyze(records, mismatch_rows, extra)
    print(write_outputs(FLAGS.out, summary, records))
    print(json.dumps({k: summary[k] for k in ("base_acc", "throughput", "mismatch", "pretrained")}, indent=1))
    log("done")


if __name__ == "__main__":
    app.run(main)
