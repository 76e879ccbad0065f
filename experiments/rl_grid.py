"""The CISPO reproduction grid (docs/rl.md): one pretrained policy, every loss arm, mu = 8 and 1, seeds.

    python -m experiments.rl_grid --out=/tmp/bench_rl                      # tiny CPU smoke of the whole pipeline
    python -m experiments.rl_grid --out=/tmp/bench_rl --workers=2          # the same jobs in 2 worker processes

Model, task and RL flags are experiments/rl.py's (``--set section.key=value`` included); each job is one run of the
library's learner (m1jax.rl.learner). The H100 reproduction is two device calls:

    # 1. pretrain (no job: --deadline_s=0), diagnostics, fp32/bf16-head mismatch, solo probe; checkpoint in 15 MB parts
    python -m experiments.rl_grid --out=$OUT --workdir=/tmp/rl $MODEL $TASK $RL --sft_steps=2500 --sft_batch=256 \
        --sft_lr=1e-3 --deadline_s=0 --workers=1 && split -b 15m $OUT/pretrained.tar $OUT/pretrained.tar.part_ \
        && rm $OUT/pretrained.tar
    # 2. the grid from that checkpoint (cat pretrained.tar.part_* > p.tar; tar -xf p.tar -C /tmp/rl)
    python -m experiments.rl_grid --out=$OUT --workdir=/tmp/rl --init_checkpoint=/tmp/rl/pretrained $MODEL $TASK $RL \
        --nomismatch --workers=8 --deadline_s=400 --hard_deadline_s=520
    MODEL="--layers=8 --period=8 --hidden=256 --heads=4 --head_dim=64 --experts=8 --ffn=256 --compute_dtype=bfloat16"
    TASK="--min_digits=4 --max_digits=4"
    RL="--prompts=64 --group_size=16 --mus=8,1 --seeds=3 --rl_steps=200 --lr=1e-4 --eval_every=10
        --eval_problems=512 --eval_samples=16"

Stages (all in this process unless --workers > 1):
1. The policy: pretrained now (saved under --workdir/pretrained and as --out/pretrained.tar) or --init_checkpoint.
2. Measured once: the pretrained policy's diagnostics, the sampler/trainer Pearson correlation with an fp32 and a
   bf16 LM head (and with the head scaled up x4, mimicking M1's high-magnitude head activations).
3. A solo throughput probe (--probe_steps RL steps of cispo_5 at each mu, not grid results): rollout and update
   tokens/s with nothing else running (``throughput_solo`` in summary.json), and one estimate of a job's duration.
4. The grid: jobs (arm, mu, seed) in priority order: all mu = 8 arms for seed 0, then the mu = 1 arms for seed 0,
   then the next seed, so a time-boxed run still yields complete seeds. No job starts after --deadline_s (from this
   process's start), nor one that its worker's previous jobs of that mu say would end after it.
   With --workers N the jobs are split over N child processes (``partition_jobs``: each child's list in priority
   order, balanced by estimated cost); each child writes results_<i>.jsonl and worker_<i>.log under --out, this
   process prints one line per finished job, then merges the complete runs into results.jsonl. A child that crashes
   loses only its own unfinished jobs. A ~15M-parameter model cannot fill an H100 (one run is bound by host work
   and kernel-launch latency), so independent runs side by side are how the grid fits one device call. The children
   share a persistent compilation cache that stage 3 has filled, so they do not compile the update again.
   Per mu, all arms share one compiled update (the learner's ``alternatives``: a traced arm index).
5. The analysis under --out: results.jsonl (every step record, tagged arm/mu/seed), summary.json and summary.md (the
   table), acc_mu<k>.png. With one worker it is rewritten after every job.

Arms: the names of ARMS, optionally with a learning rate: ``dapo@3e-5`` is dapo at lr 3e-5 (else --lr), its own row
in the table (the lr tuning on GRPO/DAPO and the per-arm lr sweep). All learning rates of one mu still share one
compiled update.

The claim statistic: a_D = DAPO's seed-mean accuracy at the final step S; s_C = the first evaluated step at
which an arm's seed-mean accuracy reaches a_D; s_C / S <= 0.5 is "CISPO matches DAPO in half the steps". The DAPO
reference of ``arm@lr`` is ``dapo@lr`` (same mu) when the grid has it, else plain ``dapo``.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tarfile
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
from absl import app, flags, logging

from experiments import rl

if TYPE_CHECKING:  # the jax-importing modules load lazily, after _setup_jax has set the memory options
    from m1jax.rl.learner import RLConfig
    from m1jax.rl.step import UpdateConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/m1jax_bench_rl", "Output directory.")
flags.DEFINE_list("arms", ["dapo", "cispo_5", "grpo", "drgrpo", "cispo_1.28", "cispo_2", "cispo_masked"],
                  "Arms at mu > 1: names of ARMS, each optionally @lr (e.g. dapo@3e-5).")
flags.DEFINE_list("mu1_arms", ["dapo", "cispo_5", "grpo", "drgrpo", "cispo_masked"],
                  "Arms at mu = 1 (CISPO's cap cannot bind there: r = 1 up to train/infer mismatch).")
flags.DEFINE_list("mus", ["8", "1"], "Minibatch updates per rollout batch.")
flags.DEFINE_integer("seeds", 1, "Seeds per (arm, mu).")
flags.DEFINE_float("deadline_s", 1e9, "Start no job after this many seconds (from the start of the main process), "
                   "nor one expected to end after it. 0: pretrain, diagnostics, probe, no job.")
flags.DEFINE_float("hard_deadline_s", None, "--workers > 1: stop workers still running after this many seconds "
                   "(their finished jobs are kept), so the analysis is written in time.")
flags.DEFINE_bool("mismatch", True, "Measure the fp32 vs bf16 head sampler/trainer correlation.")
flags.DEFINE_integer("probe_steps", 6, "RL steps of the solo throughput probe per mu (0: no probe).")
flags.DEFINE_integer("workers", 1, "Worker processes for the grid (1: run it in this process).")
flags.DEFINE_string("compile_cache", "auto", "Persistent JAX compilation cache directory shared by the workers; "
                    "'auto': <workdir>/jax_cache when --workers > 1; '': off.")
flags.DEFINE_string("analyze", None, "Only rewrite the analysis from this results.jsonl.")
# Set by the main process for its workers.
flags.DEFINE_list("jobs", None, "Internal (workers): run only these jobs, arm:mu:seed.")
flags.DEFINE_integer("worker_id", None, "Internal: this process is worker i of a --workers run.")
flags.DEFINE_float("t0_epoch", None, "Internal: the main process's start (time.time()), the deadline's origin.")

# name -> (loss, knobs, adv_norm, dynamic sampling): the reproduction's arms (docs/rl.md).
ARMS = {
    "grpo": ("grpo", {}, "group_std", False),
    "dapo": ("dapo", {}, "group_std", True),
    "drgrpo": ("drgrpo", {}, "mean_only", False),
    "cispo_1.28": ("cispo", {"ratio_max": 1.28}, "group_std", True),
    "cispo_2": ("cispo", {"ratio_max": 2.0}, "group_std", True),
    "cispo_5": ("cispo", {"ratio_max": 5.0}, "group_std", True),
    "cispo_masked": ("cispo_masked", {"ratio_max": 5.0}, "group_std", True),
}
PROBE_ARM = "cispo_5"
JOB_LINE, SKIP_LINE = "JOB ", "SKIP "  # a worker's progress lines that the main process echoes


# ------------------------------------------------------------------------------------------------ arms and jobs
def parse_arm(name: str) -> tuple[str, float | None]:
    """'dapo@3e-5' -> ('dapo', 3e-5); 'dapo' -> ('dapo', None). ValueError for an unknown arm or a bad rate."""
    base, sep, lr = name.partition("@")
    if base not in ARMS:
        raise ValueError(f"unknown arm {name!r}: expected one of {sorted(ARMS)}, optionally @lr (e.g. dapo@3e-5)")
    if ":" in name:
        raise ValueError(f"arm {name!r}: ':' separates the fields of a job")
    if not sep:
        return base, None
    try:
        rate = float(lr)
    except ValueError:
        raise ValueError(f"arm {name!r}: {lr!r} after '@' is not a learning rate") from None
    if not 0 < rate < 1:
        raise ValueError(f"arm {name!r}: learning rate {rate} must be in (0, 1)")
    return base, rate


def arm_settings(update: UpdateConfig, config: RLConfig, arm: str, mu: int) -> tuple[UpdateConfig, RLConfig]:
    """The update and loop configs of ``arm`` at ``mu``, from the base configs of the flags."""
    name, lr = parse_arm(arm)
    loss, knobs, adv_norm, ds = ARMS[name]
    update = update.with_loss(loss, **knobs).replace(mu=mu, learning_rate=update.learning_rate if lr is None else lr)
    return update, config.replace(adv_norm=adv_norm, dynamic_sampling=ds)


def grid_jobs(arms, mu1_arms, mus, seeds: int) -> list[tuple[str, int, int]]:
    """(arm, mu, seed) in priority order: per seed, each mu in the given order, its arms in the given order."""
    jobs = []
    for seed in range(seeds):
        for mu in mus:
            jobs += [(arm, mu, seed) for arm in (arms if mu > 1 else mu1_arms)]
    return jobs


def partition_jobs(jobs, n: int, cost=None) -> list[list]:
    """Split the priority-ordered `jobs` over n workers.

    List scheduling: each job in turn goes to the worker with the least estimated work so far (ties: lowest index),
    so every worker's list keeps the priority order, and as the workers run side by side, the jobs finish roughly in
    priority order (complete seeds first). With equal costs this is round-robin. cost: job -> estimated seconds
    (default 1 for every job).
    """
    if n < 1:
        raise ValueError(f"need at least one worker, got {n}")
    parts, load = [[] for _ in range(n)], [0.0] * n
    for job in jobs:
        i = min(range(n), key=lambda k: (load[k], k))
        parts[i].append(job)
        load[i] += 1.0 if cost is None else float(cost(job))
    return parts


def format_jobs(jobs) -> str:
    return ",".join(f"{arm}:{mu}:{seed}" for arm, mu, seed in jobs)


def parse_jobs(specs) -> list[tuple[str, int, int]]:
    """['dapo@3e-5:8:0', ...] -> [('dapo@3e-5', 8, 0), ...]."""
    out = []
    for spec in specs:
        arm, mu, seed = spec.rsplit(":", 2) if spec.count(":") >= 2 else (spec, None, None)
        if mu is None or not mu.isdigit() or not seed.isdigit():
            raise ValueError(f"bad job {spec!r}: expected arm:mu:seed")
        parse_arm(arm)
        out.append((arm, int(mu), int(seed)))
    return out


def arms_for(mu: int) -> list[str]:
    """The arms of one mu, in the order that fixes their index in the shared compiled update."""
    return list(FLAGS.arms if mu > 1 else FLAGS.mu1_arms)


def _check_flags() -> list[int]:
    """Validate the grid flags; returns mus as ints."""
    try:
        mus = [int(m) for m in FLAGS.mus]
    except ValueError:
        raise app.UsageError(f"--mus must be integers, got {FLAGS.mus}") from None
    try:
        for arm in list(FLAGS.arms) + list(FLAGS.mu1_arms):
            parse_arm(arm)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    for flag in ("arms", "mu1_arms"):
        names = list(getattr(FLAGS, flag))
        if len(set(names)) != len(names):
            raise app.UsageError(f"--{flag} lists an arm twice: {names}")
    if any(m < 1 for m in mus) or FLAGS.seeds < 1 or FLAGS.workers < 1 or FLAGS.probe_steps < 0:
        raise app.UsageError("--mus, --seeds and --workers must be >= 1, --probe_steps >= 0")
    return mus


# ------------------------------------------------------------------------------------------------ diagnostics
def carry_diagnostics(graphdef, params, task, n: int = 256, seed: int = 123) -> dict:
    """Teacher-forced exact answers: mean probability of the correct digit at carry-in (fork) positions and
    elsewhere (the pretraining check: about 1 - forget_prob at carries)."""
    import jax.numpy as jnp

    from m1jax.rl.step import response_logprobs
    from m1jax.rl.task import encode_prompts
    from m1jax.rl.tasks import CharTokenizer
    tokenizer = CharTokenizer()
    problems = task.sample(np.random.default_rng(seed), n)
    prompts, start = encode_prompts(task, problems)
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


def mismatch(cfg, params, task, base: dict, head_scales=(1.0, 4.0)) -> list[dict]:
    """Sampler vs trainer token-probability Pearson r with an fp32 and a bf16 LM head (both sides alike), on one
    rollout batch; the head kernel scaled by each of head_scales (larger logits, as M1's high-magnitude head)."""
    import jax
    import jax.numpy as jnp

    from m1jax.model import abstract_model
    from m1jax.rl.rollout import repeat_rows, sample
    from m1jax.rl.step import pearson, response_logprobs
    from m1jax.rl.task import encode_prompts
    from m1jax.train import split_model
    rcfg = base["rollout"]
    prompts, start = repeat_rows(*encode_prompts(task, task.sample(np.random.default_rng(7), base["rl"].prompts)),
                                 rcfg.group_size)
    logprobs = jax.jit(response_logprobs, static_argnums=(0, 4), static_argnames="fp32_head")
    out = []
    for fp32 in (True, False):
        graphdef, _ = split_model(abstract_model(cfg.replace(lm_head_fp32=fp32)))
        for scale in head_scales:
            scaled = jax.tree_util.tree_map_with_path(
                lambda path, x, scale=scale: x * scale if "lm_head" in jax.tree_util.keystr(path) else x, params)
            s = sample(graphdef, scaled, prompts, start, jax.random.key(7), rcfg, pad_id=task.pad_id,
                       stop_ids=task.stop_ids, max_new_tokens=task.max_new_tokens)
            trainer = logprobs(graphdef, scaled, s.tokens, s.start, s.responses.shape[1], fp32_head=fp32)
            mask = s.response_mask
            out.append({"head": "fp32" if fp32 else cfg.compute_dtype, "head_scale": scale,
                        "pearson": float(pearson(jnp.exp(s.sampler_logp), jnp.exp(trainer), mask)),
                        "max_abs_logp_diff": float(jnp.max(jnp.abs(trainer - s.sampler_logp) * mask)),
                        "tokens": int(mask.sum())})
    return out


# ------------------------------------------------------------------------------------------------ running jobs
def run_job(policy, base: dict, arm: str, mu: int, seed: int, *, steps: int | None = None,
            eval_every: int | None = None, on_record=None) -> list[dict]:
    """One RL run of `arm` at `mu` from the pretrained policy: a learner whose update program holds every arm of
    this mu (``arms_for``), run at the arm's index. policy: (task, graphdef, params); base: the flags' configs.
    Returns its records (each tagged arm/mu/seed)."""
    from m1jax.rl.learner import Learner
    task, graphdef, params = policy
    updates = [arm_settings(base["update"], base["rl"], a, mu)[0] for a in arms_for(mu)]
    _, config = arm_settings(base["update"], base["rl"], arm, mu)
    config = config.replace(seed=seed, steps=config.steps if steps is None else steps,
                            eval_every=config.eval_every if eval_every is None else eval_every)
    learner = Learner(graphdef, task, config=config, update=updates[0], alternatives=updates[1:],
                      rollout=base["rollout"])
    tag = {"arm": arm, "mu": mu, "seed": seed}
    records = []

    def keep(record):
        records.append(dict(record, **tag))
        if on_record is not None:
            on_record(records[-1])

    learner.run(learner.init_state(params), arm=arms_for(mu).index(arm), on_record=keep, log=lambda m: None)
    return records


def run_jobs(policy, base, jobs, *, deadline_at: float, results, log, after_job=None) -> list:
    """Run `jobs` in order, appending every record to the open file `results` (JSON lines). A job is skipped once
    time.time() > deadline_at, or when this process's previous jobs of its mu (of any mu if none) took longer than
    the time left. Prints JOB_LINE / SKIP_LINE progress lines through `log`. Returns all records."""
    records, took = [], {}
    for arm, mu, seed in jobs:
        estimate = took.get(mu, max(took.values(), default=0.0))
        if time.time() + estimate > deadline_at:
            log(f"{SKIP_LINE}{arm} mu={mu} seed={seed} (deadline; expected {estimate:.0f}s)")
            continue

        def keep(record):
            results.write(json.dumps(record) + "\n")
            results.flush()

        t_run = time.perf_counter()
        job = run_job(policy, base, arm, mu, seed, on_record=keep)
        took[mu] = max(took.get(mu, 0.0), time.perf_counter() - t_run)
        records += job
        evals = [r for r in job if "acc" in r]
        log(f"{JOB_LINE}{arm:13s} mu={mu} seed={seed}: acc {evals[0]['acc']:.3f} -> {evals[-1]['acc']:.3f}, "
            f"greedy {evals[0]['greedy_acc']:.3f} -> {evals[-1]['greedy_acc']:.3f} "
            f"({time.perf_counter() - t_run:.1f}s)")
        if after_job is not None:
            after_job(records)
    return records


def solo_probe(policy, base, mus, steps: int, log) -> dict:
    """Throughput with nothing else running: `steps` RL steps of PROBE_ARM (else the mu's first arm) at each mu,
    evaluated at the first and last step. Step 0 includes the compilations (first_step_s, first_eval_s); the
    medians are over the later steps. Also fills the persistent compilation cache for the workers."""
    out = {}
    for mu in mus:
        arm = PROBE_ARM if PROBE_ARM in arms_for(mu) else arms_for(mu)[0]
        t = time.perf_counter()
        records = run_job(policy, base, arm, mu, seed=10_000, steps=steps, eval_every=steps)
        wall = time.perf_counter() - t
        timed = [r for r in records if "rollout_s" in r]
        later = timed[1:] or timed

        def med(k, later=later):
            return float(np.median([r[k] for r in later]))
        evals = [r["eval_s"] for r in records if "eval_s" in r]
        out[f"mu{mu}"] = {
            "arm": arm, "steps": steps,
            "rollout_tokens_per_s": float(np.median([r["rollout_tokens"] / r["rollout_s"] for r in later])),
            "update_tokens_per_s": float(np.median([r["update_tokens"] / r["update_s"] for r in later])),
            "rollout_s": med("rollout_s"), "score_s": med("score_s"), "update_s": med("update_s"),
            "step_s": float(np.median([r["rollout_s"] + r["score_s"] + r["update_s"] for r in later])),
            "eval_s": float(evals[-1]), "first_step_s": timed[0]["rollout_s"] + timed[0]["score_s"]
            + timed[0]["update_s"], "first_eval_s": float(evals[0]), "wall_s": wall}
        log(f"solo probe mu={mu}: {out[f'mu{mu}']}")
    return out


def job_seconds(probe: dict, config: RLConfig):
    """job -> its solo duration (s) from the probe: steps x step_s + evaluations x eval_s (None without a probe)."""
    if not probe:
        return None
    evals = config.steps // config.eval_every + 1 + (config.steps % config.eval_every > 0)

    def cost(job):
        p = probe.get(f"mu{job[1]}") or next(iter(probe.values()))
        return config.steps * p["step_s"] + evals * p["eval_s"]
    return cost


# ------------------------------------------------------------------------------------------------ workers
def worker_command(worker_id: int, jobs, init_checkpoint: str, t0_epoch: float) -> list[str]:
    """The child's command line: this process's flags, then the overrides (absl keeps the last value)."""
    return [sys.executable, "-m", "experiments.rl_grid", *sys.argv[1:], f"--jobs={format_jobs(jobs)}",
            f"--worker_id={worker_id}", f"--init_checkpoint={init_checkpoint}", f"--t0_epoch={t0_epoch!r}",
            "--workers=1", "--probe_steps=0", "--nomismatch", f"--compile_cache={FLAGS.compile_cache}"]


def worker_env(n: int) -> dict:
    """Each of the n children (and this process) may grow to about 0.9 / (n + 1) of the GPU's memory, on demand."""
    return dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1",
                XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / (n + 1):.3f}")


def launch_workers(parts, init_checkpoint: str, t0_epoch: float, log) -> dict:
    """Run one child per non-empty part; echo their JOB/SKIP lines; stop them at --hard_deadline_s.
    Returns {worker id: exit code (negative: killed by that signal)}."""
    lines: queue.Queue = queue.Queue()
    procs = {}
    env = worker_env(len(parts))
    for i, jobs in enumerate(parts):
        if not jobs:
            continue
        logfile = open(os.path.join(FLAGS.out, f"worker_{i}.log"), "w")  # noqa: SIM115 (closed by _pump)
        proc = subprocess.Popen(worker_command(i, jobs, init_checkpoint, t0_epoch), env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        threading.Thread(target=_pump, args=(i, proc.stdout, logfile, lines), daemon=True).start()
        procs[i] = proc
        log(f"worker {i}: pid {proc.pid}, {len(jobs)} jobs: {format_jobs(jobs)}")
    stopped = False
    while any(p.poll() is None for p in procs.values()) or not lines.empty():
        try:
            i, line = lines.get(timeout=0.5)
            log(f"w{i} {line}")
        except queue.Empty:
            pass
        late = FLAGS.hard_deadline_s is not None and time.time() - t0_epoch > FLAGS.hard_deadline_s
        if late and not stopped:
            stopped = True
            for i, p in procs.items():
                if p.poll() is None:
                    log(f"hard deadline: stopping worker {i} (pid {p.pid})")
                    p.terminate()
    for p in procs.values():
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return {i: p.returncode for i, p in procs.items()}


def _pump(worker_id, stream, logfile, lines):
    """Copy a child's output to its log file; queue its progress lines."""
    with logfile:
        for line in stream:
            logfile.write(line)
            logfile.flush()
            for marker in (JOB_LINE, SKIP_LINE):
                if marker in line:
                    lines.put((worker_id, line[line.index(marker):].rstrip()))


def merge_results(out_dir: str, n_workers: int, jobs, steps: int) -> tuple[list[dict], dict]:
    """Read results_<i>.jsonl of n_workers workers; keep the complete runs (with a record at step `steps`), in job
    priority order, then by step. Returns (records, {"finished": [...], "incomplete": [...], "missing": [...]})
    with jobs as arm:mu:seed. A worker's unreadable trailing line (killed mid-write) is ignored."""
    runs = {}
    for i in range(n_workers):
        path = os.path.join(out_dir, f"results_{i}.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                runs.setdefault((r["arm"], r["mu"], r["seed"]), []).append(r)
    records, report = [], {"finished": [], "incomplete": [], "missing": []}
    for job in jobs:
        run = runs.get(tuple(job))
        name = format_jobs([job])
        if run is None:
            report["missing"].append(name)
        elif not any(r["step"] == steps for r in run):
            report["incomplete"].append(name)
        else:
            report["finished"].append(name)
            records += sorted(run, key=lambda r: r["step"])
    return records, report


# ------------------------------------------------------------------------------------------------ analysis
EVAL_KEYS = ("acc", "greedy_acc", "acc_carry", "greedy_acc_carry")


def _curves(records, key: str = "acc"):
    """(arm, mu) -> {seed: (steps [E], values [E])} of eval metric `key` from the records of finished runs."""
    runs = {}
    for r in records:
        if key in r:
            runs.setdefault((r["arm"], r["mu"]), {}).setdefault(r["seed"], []).append((r["step"], r[key]))
    out = {}
    for k, seeds in runs.items():
        full = {s: np.array(v, np.float64).T for s, v in seeds.items()}
        longest = max(len(v[0]) for v in full.values())
        out[k] = {s: v for s, v in full.items() if len(v[0]) == longest}  # drop a run cut short
    return out


def _first_reach(steps, acc, target):
    hit = np.flatnonzero(acc >= target - 1e-9)
    return float(steps[hit[0]]) if len(hit) else float("inf")


def reference_arm(arm: str, mu: int, available) -> str | None:
    """The DAPO run that `arm` at `mu` is compared with: dapo@<same lr> if in `available` ((arm, mu) pairs), else
    plain dapo, else None."""
    _, lr = parse_arm(arm)
    if lr is not None:
        for name, m in available:
            if m == mu and parse_arm(name) == ("dapo", lr):
                return name
    return "dapo" if ("dapo", mu) in available else None


def analyze(records, mismatch_rows=None, extra=None, workers: int = 1) -> dict:
    """Per (arm, mu): final sampled / greedy / carry-problem accuracy, AUC, steps to 50% / 80% of the way from the
    base accuracy to 1, and the claim statistic s_C / S against the DAPO reference (``reference_arm``) with a
    bootstrap over seeds. Also the mechanism diagnostics by minibatch index and the grid's throughput (concurrent
    when workers > 1)."""
    curves = {k: _curves(records, k) for k in EVAL_KEYS}
    acc = curves["acc"]
    base = [r["acc"] for r in records if r.get("step") == 0 and "acc" in r]
    base_acc = float(np.mean(base)) if base else float("nan")
    rng = np.random.default_rng(0)
    rows = []
    for (arm, mu), seeds in sorted(acc.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        steps = next(iter(seeds.values()))[0]
        accs = np.stack([v[1] for v in seeds.values()])  # [seeds, E]
        mean = accs.mean(0)
        row = {"arm": arm, "mu": mu, "seeds": len(seeds), "final_acc": float(mean[-1]),
               "final_acc_std": float(accs[:, -1].std()), "auc": float(mean.mean()), "S": float(steps[-1])}
        for k in EVAL_KEYS[1:]:
            finals = [v[1][-1] for s, v in curves[k].get((arm, mu), {}).items() if s in seeds]
            row[f"final_{k}"] = float(np.mean(finals)) if finals else float("nan")
        for f in (0.5, 0.8):
            row[f"steps_to_{int(f * 100)}pct"] = _first_reach(steps, mean, base_acc + f * (1 - base_acc))
        ref = reference_arm(arm, mu, acc.keys())
        if ref is not None:
            d_accs = np.stack([v[1] for v in acc[(ref, mu)].values()])
            a_d = d_accs.mean(0)[-1]
            row.update(ref=ref, a_D=float(a_d), s_over_S=_first_reach(steps, mean, a_d) / steps[-1])
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
    grid = {"workers": workers, "concurrent": workers > 1,
            "note": f"per-run medians while {workers} runs shared the device" if workers > 1 else "one run at a time",
            **throughput}
    return {"base_acc": base_acc, "table": rows, "mechanism": mechanism, "throughput_grid": grid,
            "mismatch": mismatch_rows or [], **(extra or {})}


TABLE_COLS = ["arm", "mu", "seeds", "final_acc", "final_acc_std", "final_greedy_acc", "final_acc_carry",
              "final_greedy_acc_carry", "auc", "steps_to_50pct", "steps_to_80pct", "ref", "a_D", "s_over_S",
              "s_over_S_p10", "s_over_S_p90"]


def write_outputs(out_dir, summary, records):
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    lines = ["| " + " | ".join(TABLE_COLS) + " |", "|" + "---|" * len(TABLE_COLS)]
    for row in summary["table"]:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in TABLE_COLS) + " |")
    head = [f"base accuracy {summary['base_acc']:.3f}"]
    for label, key in (("solo", "throughput_solo"), ("grid", "throughput_grid")):
        for mu, t in sorted((summary.get(key) or {}).items()):
            if isinstance(t, dict):
                head.append(f"throughput ({label}, {mu}): rollout {t['rollout_tokens_per_s']:.0f} tokens/s, update "
                            f"{t['update_tokens_per_s']:.0f} tokens/s")
    with open(os.path.join(out_dir, "summary.md"), "w") as fh:
        fh.write("\n\n".join(head) + "\n\n" + "\n".join(lines) + "\n")
    acc = _curves(records)
    for mu in sorted({k[1] for k in acc}):
        plot = {}
        for (arm, m), seeds in sorted(acc.items()):
            if m == mu:
                accs = np.stack([v[1] for v in seeds.values()])
                plot[f"{arm} (n={len(accs)})"] = (next(iter(seeds.values()))[0], accs.mean(0), accs.min(0),
                                                  accs.max(0))
        from m1jax.rl.plots import plot_accuracy
        plot_accuracy(plot, os.path.join(out_dir, f"acc_mu{mu}.png"),
                      f"noisy-carry addition, mu={mu} (seed mean, band = min..max)")
    return "\n".join(lines)


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------------ main
def _compile_cache_dir() -> str | None:
    if FLAGS.compile_cache == "auto":
        return os.path.join(FLAGS.workdir, "jax_cache") if FLAGS.workers > 1 or FLAGS.worker_id is not None else None
    return FLAGS.compile_cache or None


def _setup_jax(log):
    """Memory and compilation-cache settings, before the first computation."""
    if FLAGS.workers > 1:  # this process shares the device with its workers: no preallocation
        for k, v in worker_env(FLAGS.workers).items():
            if k.startswith("XLA_PYTHON_CLIENT"):
                os.environ[k] = v
    import jax
    cache = _compile_cache_dir()
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        log(f"compilation cache: {cache}")
    return jax


def _task_and_configs():
    """The task and the config sections of experiments/rl.py's flags (--set included)."""
    from m1jax.config import ConfigError
    task = rl.make_task()
    try:
        return task, rl.configs_from_flags(task)
    except ConfigError as err:
        raise app.UsageError(str(err)) from None


def _policy(task, base: dict, log):
    """(cfg, graphdef, params): --init_checkpoint, else pretrained now and saved under --workdir."""
    from m1jax.rl.experiment import starting_policy
    return starting_policy(FLAGS.workdir, task, base["model"], base["sft"], init_checkpoint=FLAGS.init_checkpoint,
                           log=log)


def worker_main(jobs, t0_epoch: float):
    """A child of a --workers run: load the policy, run `jobs`, write results_<worker_id>.jsonl. No analysis."""
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)
    _setup_jax(log)
    task, base = _task_and_configs()
    _, graphdef, params = _policy(task, base, log)
    with open(os.path.join(FLAGS.out, f"results_{FLAGS.worker_id}.jsonl"), "w") as results:
        run_jobs((task, graphdef, params), base, jobs, deadline_at=t0_epoch + FLAGS.deadline_s, results=results,
                 log=log)
    log("worker done")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    mus = _check_flags()
    os.makedirs(FLAGS.out, exist_ok=True)
    all_jobs = grid_jobs(FLAGS.arms, FLAGS.mu1_arms, mus, FLAGS.seeds)
    if FLAGS.jobs is not None:
        try:
            jobs = parse_jobs(FLAGS.jobs)
        except ValueError as err:
            raise app.UsageError(str(err)) from None
        if not set(jobs) <= set(all_jobs):
            raise app.UsageError(f"--jobs {sorted(set(jobs) - set(all_jobs))} are not in the grid of --arms, "
                                 f"--mu1_arms, --mus, --seeds")
    else:
        jobs = all_jobs
    if FLAGS.worker_id is not None:
        if FLAGS.jobs is None or FLAGS.t0_epoch is None:
            raise app.UsageError("--worker_id is internal: it needs --jobs and --t0_epoch")
        return worker_main(jobs, FLAGS.t0_epoch)
    if FLAGS.analyze:
        with open(FLAGS.analyze) as fh:
            records = [json.loads(line) for line in fh]
        with open(os.path.join(os.path.dirname(FLAGS.analyze), "summary.json")) as fh:
            old = json.load(fh)
        keep = ("pretrained", "device", "config", "throughput_solo", "workers_report")
        summary = analyze(records, old.get("mismatch"), {k: old[k] for k in keep if k in old},
                          workers=old.get("throughput_grid", {}).get("workers", 1))
        print(write_outputs(FLAGS.out, summary, records))
        return

    t0_epoch, t0 = time.time(), time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)
    jax = _setup_jax(log)
    from m1jax.rl.experiment import PRETRAINED
    from m1jax.rl.learner import Learner
    from m1jax.rl.policy import load_policy
    log(f"devices: {jax.devices()}")
    task, base = _task_and_configs()
    cfg, graphdef, params = _policy(task, base, log)  # orbax checkpoint under --workdir
    checkpoint = FLAGS.init_checkpoint or os.path.join(FLAGS.workdir, PRETRAINED)
    if not FLAGS.init_checkpoint:  # the policy as one file under --out, to carry to a later call
        with tarfile.open(os.path.join(FLAGS.out, "pretrained.tar"), "w") as tar:
            tar.add(checkpoint, arcname="pretrained")
        # Continue from the saved copy, as the workers do: the same values either way, but arrays restored from the
        # checkpoint compile to the same programs as the workers' (the persistent cache then serves them), and one
        # run of a job gives the same records in this process as in a worker.
        cfg, graphdef, params = load_policy(checkpoint, **base["model"].execution.to_dict())
    policy = (task, graphdef, params)
    extra = {"device": str(jax.devices()[0].device_kind), "config": cfg.to_dict(),
             "pretrained": carry_diagnostics(graphdef, params, task)}
    evaluator = Learner(graphdef, task, config=base["rl"], update=base["update"], rollout=base["rollout"])
    extra["pretrained"].update(evaluator.evaluate(params, jax.random.key(0)))
    log(f"pretrained policy: {extra['pretrained']}")
    mismatch_rows = mismatch(cfg, params, task, base) if FLAGS.mismatch else []
    for row in mismatch_rows:
        log(f"mismatch: {row}")
    if FLAGS.probe_steps:
        extra["throughput_solo"] = solo_probe(policy, base, mus, FLAGS.probe_steps, log)
    cost = job_seconds(extra.get("throughput_solo"), base["rl"])
    if cost is not None:
        total = sum(cost(j) for j in jobs)
        extra["projected_solo_s"] = {"per_job": {f"mu{m}": cost(("", m, 0)) for m in mus}, "all_jobs": total}
        log(f"projected solo time: {total:.0f}s for {len(jobs)} jobs ({total / FLAGS.workers:.0f}s / "
            f"{FLAGS.workers} workers if running side by side cost nothing)")
    deadline_at = t0_epoch + FLAGS.deadline_s
    if FLAGS.workers == 1:
        with open(os.path.join(FLAGS.out, "results.jsonl"), "w") as results:
            records = run_jobs(policy, base, jobs, deadline_at=deadline_at, results=results, log=log,
                               after_job=lambda recs: write_outputs(FLAGS.out, analyze(recs, mismatch_rows, extra),
                                                                    recs))
    elif time.time() > deadline_at:
        log(f"deadline: no job starts ({len(jobs)} skipped)")
        records = []
    else:
        parts = partition_jobs(jobs, FLAGS.workers, cost)
        codes = launch_workers(parts, checkpoint, t0_epoch, log)
        records, report = merge_results(FLAGS.out, FLAGS.workers, jobs, base["rl"].steps)
        report["exit_codes"] = codes
        report["failed_workers"] = {i: c for i, c in codes.items() if c != 0}
        extra["workers_report"] = report
        for i, c in report["failed_workers"].items():
            log(f"WORKER {i} FAILED (exit code {c}): see {os.path.join(FLAGS.out, f'worker_{i}.log')}")
        log(f"merged {len(report['finished'])} finished runs; incomplete {report['incomplete']}, "
            f"not run {report['missing']}")
        with open(os.path.join(FLAGS.out, "results.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    summary = analyze(records, mismatch_rows, extra, workers=FLAGS.workers)
    print(write_outputs(FLAGS.out, summary, records))
    print(json.dumps({k: summary.get(k) for k in ("base_acc", "throughput_solo", "throughput_grid", "mismatch",
                                                   "pretrained")}, indent=1))
    log("done")
    if extra.get("workers_report", {}).get("failed_workers"):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
