"""The grid (m1jax/rl/grid.py, experiments/rl_grid.py): arm names, job order, the scheduler (deadline, best rates,
resume), the worker protocol, results files, carrying a policy in parts, and a CPU dry run of the whole pipeline.
"""
import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from m1jax.rl import analysis, grid
from m1jax.rl.grid import Job

ARMS = ["dapo", "cispo_5", "cispo_1.28", "cispo_masked", "grpo"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_arm_names_with_learning_rates_and_job_specs():
    assert grid.parse_arm("dapo") == ("dapo", None)
    assert grid.parse_arm("cispo_1.28@3e-5") == ("cispo_1.28", 3e-5)
    assert grid.parse_arm("cispo_5@best") == ("cispo_5", "best")
    for bad, match in (("ppo2", "unknown arm"), ("dapo@fast", "not a learning rate"), ("dapo@2", r"\(0, 1\)")):
        with pytest.raises(ValueError, match=match):
            grid.parse_arm(bad)
    jobs = [Job("dapo@0.0001", 8, 0), Job("cispo_1.28", 1, 2)]
    assert grid.format_jobs(jobs) == "dapo@0.0001:8:0,cispo_1.28:1:2"
    assert grid.parse_jobs(grid.format_jobs(jobs).split(",")) == jobs
    with pytest.raises(ValueError, match="arm:mu:seed"):
        grid.parse_jobs(["dapo:8"])

    from m1jax.rl.learner import RLConfig
    from m1jax.rl.step import UpdateConfig
    update, config = UpdateConfig(loss="cispo", eps_is_high=0.3, learning_rate=1e-4), RLConfig(prompts=8)
    u, c = grid.arm_settings(update, config, "cispo_5@3e-5", 8)
    assert (u.loss, u.knobs, u.mu, u.learning_rate) == ("cispo", {"ratio_max": 5.0}, 8, 3e-5)  # eps_is_high dropped
    assert c.dynamic_sampling and c.adv_norm == "group_std" and c.prompts == 8
    u, _ = grid.arm_settings(update, config, "cispo_1.28", 16)
    assert (u.knobs, u.mu, u.learning_rate) == ({"eps_is_high": 0.28}, 16, 1e-4)  # M1's cap 1 + eps
    u, c = grid.arm_settings(update, config, "grpo", 1)
    assert (u.loss, c.adv_norm, c.dynamic_sampling) == ("grpo", "group_std", False)
    with pytest.raises(ValueError, match="resolve"):
        grid.arm_settings(update, config, "dapo@best", 8)


def test_job_order_sweep_first_then_best_rates():
    lrs = [1e-5, 1e-4]
    jobs = grid.grid_jobs(["dapo", "cispo_5@3e-5"], [8, 16, 1], 2, lrs=lrs, sweep_mu=8)
    sweep = ["dapo@1e-05", "dapo@0.0001", "cispo_5@3e-5"]
    assert grid.compiled_arms(["dapo", "cispo_5@3e-5"], lrs) == sweep
    assert jobs == ([Job(a, 8, s) for s in range(2) for a in sweep]
                    + [Job(a, mu, s) for s in range(2) for mu in (16, 1) for a in ("dapo@best", "cispo_5@3e-5")])
    assert grid.grid_jobs(["dapo", "grpo"], [8, 1], 2) == [Job(a, mu, s) for s in range(2) for mu in (8, 1)
                                                           for a in ("dapo", "grpo")]
    with pytest.raises(ValueError, match="sweep mu"):
        grid.grid_jobs(["dapo"], [8], 1, lrs=lrs, sweep_mu=4)


STEPS = 4


def _run(job, final_acc):
    """The records of a finished run whose accuracy rises linearly to final_acc."""
    return [{"arm": job.arm, "mu": job.mu, "seed": job.seed, "step": s, "acc": final_acc * s / STEPS,
             "greedy_acc": 0.0} for s in range(STEPS + 1)]


def test_scheduler_resolves_best_rates_waits_for_the_sweep_and_skips_done_jobs():
    jobs = grid.grid_jobs(["dapo"], [8, 1], 1, lrs=[1e-5, 1e-4], sweep_mu=8)
    done = {Job("dapo@1e-05", 8, 0): _run(Job("dapo@1e-05", 8, 0), 0.3)}
    sched = grid.Scheduler(jobs, deadline_at=1e12, lrs=[1e-5, 1e-4], sweep_mu=8, done=done, log=lambda m: None)
    sched.results.update(done)
    first = sched.next_job(now=0)
    assert first == Job("dapo@0.0001", 8, 0)
    assert sched.next_job(now=0) == "wait"  # dapo@best at mu 1 needs the running sweep run
    assert sched.finish(first, 10.0, _run(first, 0.6), STEPS)
    assert sched.next_job(now=0) == Job("dapo@0.0001", 1, 0)  # 1e-4 has the better AUC
    assert sched.next_job(now=0) is None
    assert sched.skipped == [Job("dapo@1e-05", 8, 0)]
    # A run cut before its last step is not kept, and its duration does not count.
    cut = Job("dapo@0.0001", 1, 0)
    assert not sched.finish(cut, 3.0, _run(cut, 0.5)[:-1], STEPS) and cut not in sched.results
    assert sched.estimate(1) == 10.0  # no mu = 1 job finished: the median of all finished jobs


def test_scheduler_deadline_uses_the_durations_of_finished_jobs():
    jobs = [Job("dapo", 8, s) for s in range(3)] + [Job("dapo", 1, 0)]
    logged = []
    sched = grid.Scheduler(jobs, deadline_at=100.0, log=logged.append, default_estimate=lambda mu: 60.0 if mu == 8
                           else 5.0)
    job = sched.next_job(now=0)
    assert job == Job("dapo", 8, 0)
    sched.finish(job, 50.0, _run(job, 0.5), STEPS)  # mu 8 jobs now take 50 s
    assert sched.next_job(now=55.0) == Job("dapo", 1, 0)  # 55 + 50 > 100: both mu 8 jobs skipped; mu 1 fits (5 s)
    assert sched.skipped == [Job("dapo", 8, 1), Job("dapo", 8, 2)] and "skip dapo:8:1" in logged[0]
    assert sched.next_job(now=55.0) is None


def test_results_are_compact_and_only_complete_runs_are_finished(tmp_path):
    small = grid.compact({"a": 0.123456789, "b": [1.0000001, float("inf")], "c": 3, "d": float("nan")})
    assert {k: v for k, v in small.items() if k != "d"} == {"a": 0.12346, "b": [1.0, float("inf")], "c": 3}
    assert np.isnan(small["d"])
    a, b = Job("dapo", 8, 0), Job("grpo", 8, 0)
    records = _run(a, 0.5)[::-1] + _run(b, 0.4)[:3]
    runs = grid.finished_runs(records, STEPS)
    assert list(runs) == [a] and [r["step"] for r in runs[a]] == list(range(STEPS + 1))
    path = str(tmp_path / "results.jsonl.gz")
    grid.write_results(path, runs)
    assert analysis.load_records(path) == runs[a] and not os.path.exists(path + ".partial")


def test_policy_directory_travels_in_parts(tmp_path):
    src = tmp_path / "pretrained"
    (src / "sub").mkdir(parents=True)
    blob = np.random.default_rng(0).bytes(25_000)
    (src / "sub" / "weights.bin").write_bytes(blob)
    (src / "config.json").write_text('{"a": 1}')
    parts = grid.pack_directory(str(src), str(tmp_path / "pretrained"), part_bytes=10_000)
    assert len(parts) >= 3 and all(os.path.getsize(p) <= 10_000 for p in parts)
    got = grid.unpack_directory(str(tmp_path / "pretrained"), str(tmp_path / "carried"))
    assert got == str(tmp_path / "carried" / "pretrained")
    assert (tmp_path / "carried" / "pretrained" / "sub" / "weights.bin").read_bytes() == blob
    with pytest.raises(FileNotFoundError):
        grid.unpack_directory(str(tmp_path / "nothing"), str(tmp_path / "x"))


FAKE_WORKER = textwrap.dedent("""
    import json, sys
    from m1jax.rl import grid
    path = sys.argv[1]
    def reply(msg):
        print(grid.PROTOCOL + msg, flush=True)
    reply("READY")
    for line in sys.stdin:
        words = line.split()
        if words[0] == "STOP":
            break
        job = grid.parse_jobs([words[1]])[0]
        with open(path, "a") as fh:
            for s in range(5):
                fh.write(json.dumps({"arm": job.arm, "mu": job.mu, "seed": job.seed, "step": s,
                                     "acc": 0.1 * s * (2 if "1e-04" in job.arm or "0.0001" in job.arm else 1)}) + "\\n")
        reply(f"DONE {job} 1.5")
""")


def test_workers_get_one_job_at_a_time_and_the_best_rate_of_finished_sweeps(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    jobs = grid.grid_jobs(["dapo"], [8, 1], 2, lrs=[1e-5, 1e-4], sweep_mu=8)
    sched = grid.Scheduler(jobs, deadline_at=1e12, lrs=[1e-5, 1e-4], sweep_mu=8, log=lambda m: None)
    paths = [str(tmp_path / f"r{i}.jsonl") for i in range(2)]
    lines = []
    codes = grid.run_workers([[sys.executable, str(script), p] for p in paths], sched, result_paths=paths, steps=4,
                             log_paths=[str(tmp_path / f"w{i}.log") for i in range(2)],
                             envs=[dict(os.environ, PYTHONPATH=ROOT)] * 2, log=lines.append)
    assert codes == {0: 0, 1: 0}
    assert sorted(map(str, sched.results)) == sorted(["dapo@1e-05:8:0", "dapo@0.0001:8:0", "dapo@1e-05:8:1",
                                                      "dapo@0.0001:8:1", "dapo@0.0001:1:0", "dapo@0.0001:1:1"])
    assert not sched.pending and not sched.running and sum(" JOB " in line for line in lines) == 6


def test_worker_envs_spread_workers_round_robin_and_share_each_devices_memory():
    envs = grid.worker_envs(5, ["2", "7"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "7", "2", "7", "2"]
    # three workers (+ the main process) on GPU 2, two on GPU 7
    assert [e["XLA_PYTHON_CLIENT_MEM_FRACTION"] for e in envs] == ["0.225", "0.300", "0.225", "0.300", "0.225"]
    shared = grid.worker_envs(3)
    assert all("CUDA_VISIBLE_DEVICES" not in e and e["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225" for e in shared)
    with pytest.raises(ValueError, match="2 worker commands but 1 environments"):
        grid.run_workers([["true"], ["true"]], None, result_paths=[], steps=1, log_paths=[], envs=[{}], log=print)


TINY = ["--task=column_addition", "--min_digits=1", "--max_digits=3", "--forget_prob=0.6", "--layers=2",
        "--period=2", "--hidden=32", "--heads=2", "--head_dim=8", "--experts=2", "--ffn=32", "--sft_steps=60",
        "--sft_batch=32", "--sft_lr=1e-2", "--prompts=2", "--group_size=4", "--rl_steps=2", "--eval_every=1",
        "--eval_problems=8", "--eval_samples=4", "--diag_problems=16", "--mus=8,1", "--lrs=1e-3,3e-3",
        "--sweep_mu=8", "--seeds=2"]


def _grid_main(*flags, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "experiments.rl_grid", *TINY, *flags], capture_output=True,
                          check=False, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_dry_run_of_the_whole_pipeline(tmp_path):
    """Pretraining, diagnostics, every arm at two rates at mu = 8 and at its best rate at mu = 1, two seeds, the
    analysis table; then a second call given the first's results runs only the jobs of a third seed."""
    out, work = tmp_path / "out", tmp_path / "work"
    _grid_main(f"--out={out}", f"--workdir={work}")
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(os.listdir(out)) == ["acc_mu1.png", "acc_mu8.png", "pretrained.part_000", "results.jsonl.gz",
                                       "summary.json", "summary.md"]
    forks = summary["pretrained"]["forks"]
    assert forks["decision"]["tokens"] > 0 and 0 <= summary["pretrained"]["acc"] <= 1
    rows = {(r["arm"], r["mu"]): r for r in summary["table"]}
    assert sorted(rows) == sorted((a, mu) for a in ARMS for mu in (8, 1))
    for (arm, mu), row in rows.items():
        assert row["seeds"] == 2 and row["lr"] in (1e-3, 3e-3) and "ratio" in row, row
        assert ("verdict" in row) == arm.startswith("cispo"), row
        assert ("is_cap_frac" in row) == arm.startswith("cispo") and ("ppo_clip_frac" in row) == (
            arm in ("dapo", "grpo", "cispo_masked")), row
        assert "decision_frac" in row, row  # the task marks decision points (whether kept groups hold any varies)
    # mu = 1 ran each arm at its best rate at mu = 8 only.
    assert {r["arm"] for r in summary["sweep"] if r["mu"] == 1} == {rows[(a, 8)]["run"] for a in ARMS}
    assert summary["claim"]["arm"] == "cispo_5" and summary["claim"]["mu"] == 8
    assert "Claim (cispo_5 vs dapo, mu=8)" in (out / "summary.md").read_text()
    records = analysis.load_records(str(out / "results.jsonl.gz"))
    assert len(grid.finished_runs(records, 2)) == 2 * 2 * len(ARMS) + 2 * len(ARMS)

    out2 = tmp_path / "out2"
    stdout = _grid_main(f"--out={out2}", f"--workdir={work}", f"--init_checkpoint={out / 'pretrained'}",
                        f"--previous={out / 'results.jsonl.gz'}", "--seeds=3", "--nodiagnose", "--arms=dapo,cispo_5")
    assert "18 jobs, 12 done in --previous, 6 to run" in stdout, stdout[-2000:]
    runs = grid.finished_runs(analysis.load_records(str(out2 / "results.jsonl.gz")), 2)
    assert {j for j in runs if j.seed == 2} == {Job("dapo@0.001", 8, 2), Job("dapo@0.003", 8, 2),
                                                Job("cispo_5@0.001", 8, 2), Job("cispo_5@0.003", 8, 2),
                                                Job(rows[("dapo", 8)]["run"], 1, 2), Job(rows[("cispo_5", 8)]["run"], 1, 2)}
    assert all(runs[j] == grid.finished_runs(records, 2)[j] for j in runs if j.seed < 2)  # carried unchanged
