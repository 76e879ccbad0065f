"""The CISPO-vs-DAPO grid (docs/rl.md, benchmarks/RL.md): one starting policy, loss arms x learning rates x mu x seeds.

    python -m experiments.rl_grid --out=/tmp/grid --task=column_addition ...    # pretrain, diagnose, run the grid
    python -m experiments.rl_grid --out=/tmp/grid2 --init_checkpoint=/tmp/grid/pretrained --previous=/tmp/grid/results.jsonl.gz ...
    python -m experiments.rl_grid --analyze=/tmp/grid2/results.jsonl.gz --out=/tmp/report

Model, task and RL flags are experiments/rl.py's (``--set section.key=value`` included). The scheduling, results
and resume rules are ``m1jax.rl.grid``'s; the analysis (best rate per arm, steps to DAPO's final accuracy, the
ratio with bootstrap intervals, the verdict, the mechanism metrics) is ``m1jax.rl.analysis``'s. Stages:

1. The policy: ``--init_checkpoint`` (a policy directory, or the prefix of the parts written by an earlier call),
   else pretrained now; a policy pretrained now is also written to --out as pretrained.part_* (15 MB parts).
2. ``--diagnose``: the policy's accuracy and fork statistics (``m1jax.rl.diagnostics``); ``--mismatch``: the
   sampler/trainer head mismatch; ``--probe_steps``: solo throughput per mu.
3. The grid: with ``--lrs`` every arm runs at every rate at ``--sweep_mu`` first, then at each other mu with its best
   rate there; jobs finished in ``--previous`` results are skipped. No job starts unless it is expected to end before
   ``--deadline_s``; runs stop at ``--stop_s`` (cut runs are dropped; workers still alive 15 s later are
   terminated); with ``--workers`` > 1 the jobs go one at a time to that many worker processes sharing the device.
4. Under --out: results.jsonl.gz (every record of every finished run, the previous ones included), summary.json
   (the analysis, the diagnostics), summary.md, acc_mu<k>.png; rewritten at most once a minute while the grid runs.
   Worker logs and partial results stay under --workdir/grid.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from experiments import rl

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/m1jax_rl_grid", "Output directory (keep it to a few files: see the module doc).")
flags.DEFINE_list("arms", ["dapo", "cispo_5", "cispo_1.28", "cispo_masked", "grpo"],
                  "Arms (m1jax.rl.grid.ARMS), each optionally @lr (that rate only).")
flags.DEFINE_list("mus", ["8", "16", "1"], "Minibatch updates per rollout batch.")
flags.DEFINE_list("lrs", [], "Learning-rate sweep: every arm at each rate at --sweep_mu, at its best rate at the "
                  "other mus (empty: every arm at --lr).")
flags.DEFINE_integer("sweep_mu", 8, "The mu of the learning-rate sweep (and of the claim).")
flags.DEFINE_integer("seeds", 1, "Seeds per (arm, rate, mu).")
flags.DEFINE_list("jobs", None, "Run only these jobs of the grid, arm:mu:seed (arm as the grid names it: dapo@1e-4, "
                  "dapo@best).")
flags.DEFINE_list("previous", [], "Results files of earlier calls: their finished jobs are skipped and their records "
                  "carried into this call's results.")
flags.DEFINE_float("deadline_s", 1e9, "Start no job expected to end after this many seconds from the start "
                   "(0: policy, diagnostics and probe only).")
flags.DEFINE_float("stop_s", None, "Runs still going this many seconds after the start stop (and are dropped), so "
                   "the outputs are written in time (default: deadline_s).")
flags.DEFINE_integer("workers", 1, "Worker processes sharing the device (1: run the jobs in this process).")
flags.DEFINE_string("compile_cache", "auto", "Persistent JAX compilation cache directory; 'auto': <workdir>/jax_cache "
                    "when --workers > 1; '': off.")
flags.DEFINE_bool("diagnose", True, "Measure the policy's accuracy and fork statistics first.")
flags.DEFINE_integer("diag_problems", 512, "Held-out problems of the diagnostics.")
flags.DEFINE_list("start_acc_range", None, "lo,hi: run no job unless the diagnosed sampled accuracy of the policy is "
                  "in [lo, hi] (a pretraining that failed, or a task too easy, costs no grid time).")
flags.DEFINE_bool("mismatch", False, "Measure the fp32 vs compute-dtype head sampler/trainer mismatch.")
flags.DEFINE_integer("probe_steps", 0, "RL steps of a solo throughput probe per mu (0: none).")
flags.DEFINE_string("primary", "cispo_5", "The CISPO arm whose ratio at --sweep_mu decides the claim.")
flags.DEFINE_list("analyze", None, "Only analyse these results files into --out.")
flags.DEFINE_integer("worker_id", None, "Internal: this process is worker i of a --workers run.")
flags.DEFINE_float("t0_epoch", None, "Internal: the main process's start (time.time()).")

REPORT_EVERY_S = 60.0


def _mus() -> list[int]:
    try:
        mus = [int(m) for m in FLAGS.mus]
        lrs = [float(x) for x in FLAGS.lrs]
    except ValueError:
        raise app.UsageError(f"--mus must be integers and --lrs numbers, got {FLAGS.mus}, {FLAGS.lrs}") from None
    if any(m < 1 for m in mus) or FLAGS.seeds < 1 or FLAGS.workers < 1 or FLAGS.probe_steps < 0:
        raise app.UsageError("--mus, --seeds and --workers must be >= 1, --probe_steps >= 0")
    if lrs and FLAGS.sweep_mu not in mus:
        raise app.UsageError(f"--sweep_mu={FLAGS.sweep_mu} is not one of --mus {mus}")
    return mus, lrs


def _grid(mus, lrs):
    """(jobs, compiled run names) of the flags; app.UsageError for bad names."""
    from m1jax.rl import grid
    try:
        for arm in FLAGS.arms:
            grid.parse_arm(arm)
        if len(set(FLAGS.arms)) != len(FLAGS.arms):
            raise ValueError(f"--arms lists an arm twice: {FLAGS.arms}")
        jobs = grid.grid_jobs(FLAGS.arms, mus, FLAGS.seeds, lrs=lrs, sweep_mu=FLAGS.sweep_mu)
        if FLAGS.jobs is not None:
            wanted = grid.parse_jobs(FLAGS.jobs)
            if not set(wanted) <= set(jobs):
                raise ValueError(f"--jobs {sorted(map(str, set(wanted) - set(jobs)))} are not in the grid")
            jobs = [j for j in jobs if j in set(wanted)]
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    return jobs, grid.compiled_arms(FLAGS.arms, lrs)


def _setup_jax(log):
    """Memory and compilation-cache settings, before the first computation."""
    from m1jax.rl import grid
    if FLAGS.workers > 1 and FLAGS.worker_id is None:  # several processes share the device: no preallocation
        os.environ.update(grid.worker_envs(FLAGS.workers)[0])
    import jax
    cache = FLAGS.compile_cache
    if cache == "auto":
        cache = os.path.join(FLAGS.workdir, "jax_cache") if FLAGS.workers > 1 or FLAGS.worker_id is not None else ""
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        log(f"compilation cache: {cache}")
    return jax


def _gpu_ids(jax) -> list[str]:
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES names them (empty on other platforms or one GPU): the
    workers are spread over them."""
    devices = jax.local_devices()
    if devices[0].platform != "gpu" or len(devices) < 2:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[:len(devices)] if visible else [str(d.local_hardware_id) for d in devices]


def _policy(task, base, log):
    """(cfg, graphdef, params, policy directory): --init_checkpoint (a directory or a parts prefix), else pretrained
    now under --workdir and packed into --out."""
    from m1jax.rl import grid
    from m1jax.rl.experiment import PRETRAINED, starting_policy
    from m1jax.rl.policy import load_policy
    source = FLAGS.init_checkpoint
    if source and not os.path.isdir(source):
        source = grid.unpack_directory(source, os.path.join(FLAGS.workdir, "carried"))
        log(f"unpacked the policy parts into {source}")
    if source:
        cfg, graphdef, params = starting_policy(FLAGS.workdir, task, base["model"], base["sft"],
                                                init_checkpoint=source, log=log)
        return cfg, graphdef, params, source
    starting_policy(FLAGS.workdir, task, base["model"], base["sft"], log=log)
    source = os.path.join(FLAGS.workdir, PRETRAINED)
    parts = grid.pack_directory(source, os.path.join(FLAGS.out, "pretrained"))
    log(f"packed the policy into {len(parts)} parts: {parts}")
    # Continue from the saved copy, as the workers do: restored arrays compile to the same programs as theirs.
    cfg, graphdef, params = load_policy(source, **base["model"].execution.to_dict())
    return cfg, graphdef, params, source


def _analyze(records, extra=None):
    from m1jax.rl import analysis
    summary = analysis.analyze(records, main_mu=FLAGS.sweep_mu, primary=FLAGS.primary)
    return analysis.write_report(FLAGS.out, summary, records, extra)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    t0_epoch = FLAGS.t0_epoch or time.time()
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    os.makedirs(FLAGS.out, exist_ok=True)
    if FLAGS.analyze:
        from m1jax.rl.analysis import load_records
        print(_analyze(load_records(FLAGS.analyze)))
        return
    mus, lrs = _mus()
    jobs, compiled_names = _grid(mus, lrs)
    jax = _setup_jax(log)
    from m1jax.config import ConfigError
    from m1jax.rl import grid
    task = rl.make_task()
    try:
        base = rl.configs_from_flags(task)
    except ConfigError as err:
        raise app.UsageError(str(err)) from None
    stop_at = t0_epoch + (FLAGS.deadline_s if FLAGS.stop_s is None else FLAGS.stop_s)
    cfg, graphdef, params, source = _policy(task, base, log)
    policy = (task, graphdef, params)
    compiled = lambda mu: compiled_names  # noqa: E731  (every arm x rate, at every mu)
    steps = base["rl"].steps
    results_dir = os.path.join(FLAGS.workdir, "grid")
    os.makedirs(results_dir, exist_ok=True)
    if FLAGS.worker_id is not None:
        with open(os.path.join(results_dir, f"results_{FLAGS.worker_id}.jsonl"), "a") as results:
            grid.worker_loop(policy, base, compiled=compiled, results=results, stop_at=stop_at)
        return

    extra = {"device": str(jax.devices()[0].device_kind), "config": cfg.to_dict(), "task": dataclasses.asdict(task),
             "flags": {k: FLAGS[k].value for k in ("arms", "mus", "lrs", "sweep_mu", "seeds", "rl_steps", "prompts",
                                                     "group_size", "eval_every", "eval_problems", "eval_samples")}}
    if FLAGS.diagnose:
        from m1jax.rl.diagnostics import policy_diagnostics
        t = time.perf_counter()
        extra["pretrained"] = policy_diagnostics(graphdef, params, task, problems=FLAGS.diag_problems,
                                                 samples=base["rl"].eval_samples, rollout=base["rollout"])
        log(f"pretrained policy ({time.perf_counter() - t:.1f}s): {json.dumps(extra['pretrained'])}")
        if FLAGS.start_acc_range:
            lo, hi = (float(x) for x in FLAGS.start_acc_range)
            if not lo <= extra["pretrained"]["acc"] <= hi:
                log(f"the policy's sampled accuracy {extra['pretrained']['acc']:.3f} is outside --start_acc_range "
                    f"[{lo}, {hi}]: no job runs")
                jobs = []
    if FLAGS.mismatch:
        from m1jax.model import abstract_model
        from m1jax.rl.diagnostics import head_mismatch
        from m1jax.train import split_model
        problems = task.sample(np.random.default_rng(7), base["rl"].prompts)
        extra["mismatch"] = head_mismatch(
            lambda fp32: split_model(abstract_model(cfg.replace(lm_head_fp32=fp32)))[0], params, task, problems,
            base["rollout"], jax.random.key(7), heads=(("fp32", True), (cfg.compute_dtype, False)))
        for row in extra["mismatch"]:
            log(f"mismatch: {row}")
    if FLAGS.probe_steps:
        extra["throughput_solo"] = grid.solo_probe(policy, base, mus, FLAGS.probe_steps, compiled=compiled,
                                                   arm=compiled_names[0], log=log)

    from m1jax.rl.analysis import load_records
    done = grid.finished_runs(load_records(FLAGS.previous), steps) if FLAGS.previous else {}
    scheduler = grid.Scheduler(jobs, deadline_at=t0_epoch + FLAGS.deadline_s, lrs=lrs, sweep_mu=FLAGS.sweep_mu,
                               done=done, default_estimate=grid.job_seconds(extra.get("throughput_solo"), steps,
                                                                            base["rl"].eval_every), log=log)
    scheduler.results.update(done)
    log(f"{len(jobs)} jobs, {len(jobs) - len(scheduler.pending)} done in --previous, {len(scheduler.pending)} to run")
    last_report = [time.time()]

    def report(force=False):
        if scheduler.results and (force or time.time() - last_report[0] > REPORT_EVERY_S):
            last_report[0] = time.time()
            grid.write_results(os.path.join(FLAGS.out, "results.jsonl.gz"), scheduler.results)
            records = [r for recs in scheduler.results.values() for r in recs]
            return _analyze(records, {**extra, "scheduler": {"skipped": [str(j) for j in scheduler.skipped],
                                                             "pending": [str(j) for j in scheduler.pending]}})
        return None

    if scheduler.pending:
        if FLAGS.workers == 1:
            with open(os.path.join(results_dir, "results_main.jsonl"), "w") as results:
                grid.run_in_process(policy, base, scheduler, compiled=compiled, steps=steps, results=results,
                                    stop_at=stop_at, log=log, after_job=report)
        else:
            gpus = _gpu_ids(jax)
            if gpus:
                log(f"{FLAGS.workers} workers spread over GPUs {gpus}")
            paths = [os.path.join(results_dir, f"results_{i}.jsonl") for i in range(FLAGS.workers)]
            for path in paths:
                open(path, "w").close()
            commands = [[sys.executable, "-m", "experiments.rl_grid", *sys.argv[1:], f"--worker_id={i}",
                         f"--init_checkpoint={source}", f"--t0_epoch={t0_epoch!r}", "--nodiagnose", "--nomismatch",
                         "--probe_steps=0", f"--compile_cache={FLAGS.compile_cache}"] for i in range(FLAGS.workers)]
            codes = grid.run_workers(commands, scheduler, result_paths=paths, steps=steps,
                                     log_paths=[os.path.join(results_dir, f"worker_{i}.log") for i in range(len(paths))],
                                     envs=[dict(os.environ, **e) for e in grid.worker_envs(FLAGS.workers, gpus)],
                                     log=log,
                                     kill_at=stop_at + 15, after_job=report)
            extra["worker_exit_codes"] = codes
    text = report(force=True)
    if text is None:  # no run at all: the diagnostics only
        with open(os.path.join(FLAGS.out, "summary.json"), "w") as fh:
            json.dump(extra, fh, indent=1)
    else:
        print(text)
    log(f"done: {len(scheduler.results)} runs finished ({len(done)} from --previous), "
        f"{len(scheduler.skipped) - len(done)} skipped, {len(scheduler.pending)} not started")


if __name__ == "__main__":
    app.run(main)
