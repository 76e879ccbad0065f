"""experiments/rl_grid.py: the job partition, arm@lr names, the analysis, the merge of worker results, and a
two-worker end-to-end run on a tiny model whose merged records equal a one-process run of the same job.
"""
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import rl_grid as br

ARMS = ["dapo", "cispo_5", "grpo", "drgrpo", "cispo_1.28", "cispo_2", "cispo_masked"]
MU1 = ["dapo", "cispo_5", "grpo", "drgrpo", "cispo_masked"]


def test_partition_keeps_priority_order_and_covers_every_job_once():
    jobs = br.grid_jobs(ARMS, MU1, [8, 1], 3)
    assert len(jobs) == 36 and jobs[:8] == [(a, 8, 0) for a in ARMS] + [("dapo", 1, 0)]
    rank = {job: i for i, job in enumerate(jobs)}
    for n in (1, 2, 5, 8, 40):
        for cost in (None, lambda job: 3.0 if job[1] == 8 else 1.0):
            parts = br.partition_jobs(jobs, n, cost)
            assert len(parts) == n
            assert sorted(j for p in parts for j in p) == sorted(jobs)  # every job exactly once
            for p in parts:
                assert [rank[j] for j in p] == sorted(rank[j] for j in p)  # each worker in priority order
            if cost is None:
                assert parts == [jobs[i::n] for i in range(n)]  # equal costs: round-robin
            else:
                load = [sum(cost(j) for j in p) for p in parts]
                assert max(load) - min(load) <= 3.0 or n > len(jobs), load  # balanced to within one job
    with pytest.raises(ValueError, match="at least one worker"):
        br.partition_jobs(jobs, 0)


def test_arm_names_with_learning_rates_and_job_specs():
    assert br.parse_arm("dapo") == ("dapo", None)
    assert br.parse_arm("cispo_1.28@3e-5") == ("cispo_1.28", 3e-5)
    for bad, match in (("ppo2", "unknown arm"), ("dapo@fast", "not a learning rate"), ("dapo@2", r"\(0, 1\)")):
        with pytest.raises(ValueError, match=match):
            br.parse_arm(bad)
    jobs = [("dapo@1e-4", 8, 0), ("cispo_1.28", 1, 2)]
    assert br.format_jobs(jobs) == "dapo@1e-4:8:0,cispo_1.28:1:2"
    assert br.parse_jobs(br.format_jobs(jobs).split(",")) == jobs
    with pytest.raises(ValueError, match="arm:mu:seed"):
        br.parse_jobs(["dapo:8"])

    from m1jax.rl.learner import RLConfig
    from m1jax.rl.step import UpdateConfig
    update, config = UpdateConfig(loss="cispo", eps_is_high=0.3, learning_rate=1e-4), RLConfig(prompts=8)
    u, c = br.arm_settings(update, config, "cispo_2@3e-5", 8)
    assert (u.loss, u.knobs, u.mu, u.learning_rate) == ("cispo", {"ratio_max": 2.0}, 8, 3e-5)  # eps_is_high dropped
    assert c.dynamic_sampling and c.adv_norm == "group_std" and c.prompts == 8
    u, c = br.arm_settings(update, config, "drgrpo", 1)
    assert (u.loss, u.knobs, u.learning_rate, c.adv_norm, c.dynamic_sampling) == ("drgrpo", {}, 1e-4, "mean_only",
                                                                                  False)


def _run(arm, mu, seed, accs, greedy=None, every=5):
    """Eval records of one finished run: acc at steps 0, every, 2 * every, ..."""
    greedy = accs if greedy is None else greedy
    return [{"arm": arm, "mu": mu, "seed": seed, "step": i * every, "acc": a, "greedy_acc": g,
             "acc_carry": a / 2, "greedy_acc_carry": g / 2} for i, (a, g) in enumerate(zip(accs, greedy))]


def test_analysis_compares_each_arm_with_dapo_at_its_learning_rate(tmp_path):
    records = (_run("dapo", 8, 0, [0.2, 0.3, 0.5]) + _run("dapo", 8, 1, [0.2, 0.4, 0.5])
               + _run("dapo@1e-5", 8, 0, [0.2, 0.25, 0.3], greedy=[0.0, 0.5, 1.0])
               + _run("cispo_5@1e-5", 8, 0, [0.2, 0.3, 0.35]) + _run("cispo_5", 8, 0, [0.2, 0.6, 0.7])
               + _run("cispo_5", 8, 1, [0.2, 0.4, 0.5]))
    summary = br.analyze(records)
    rows = {r["arm"]: r for r in summary["table"]}
    assert summary["base_acc"] == pytest.approx(0.2)
    # cispo_5@1e-5 reaches dapo@1e-5's final 0.3 at step 5 of 10; plain cispo_5 (mean 0.5 at step 5) reaches plain
    # dapo's 0.5 there too.
    assert (rows["cispo_5@1e-5"]["ref"], rows["cispo_5@1e-5"]["a_D"], rows["cispo_5@1e-5"]["s_over_S"]) == (
        "dapo@1e-5", pytest.approx(0.3), 0.5)
    assert (rows["cispo_5"]["ref"], rows["cispo_5"]["a_D"], rows["cispo_5"]["s_over_S"]) == ("dapo", 0.5, 0.5)
    assert rows["dapo"]["s_over_S"] == 1.0 and rows["cispo_5"]["seeds"] == 2
    assert rows["cispo_5"]["final_acc"] == pytest.approx(0.6)
    assert rows["dapo@1e-5"]["final_greedy_acc"] == 1.0 and rows["dapo@1e-5"]["final_greedy_acc_carry"] == 0.5
    assert rows["cispo_5"]["steps_to_50pct"] == 10.0  # base 0.2: 50% of the way to 1 is 0.6, the mean at step 10
    br.write_outputs(str(tmp_path), summary, records)
    table = (tmp_path / "summary.md").read_text()
    assert "final_greedy_acc" in table and "| dapo@1e-5 | 8 | 1 | 0.300 | 0.000 | 1.000 | 0.150 | 0.500 |" in table


def test_merge_keeps_complete_runs_of_surviving_workers(tmp_path):
    jobs = [("dapo", 2, 0), ("cispo_5", 2, 0), ("dapo", 1, 0), ("cispo_5", 1, 0)]
    done = _run("dapo", 2, 0, [0.1, 0.2, 0.3])
    cut = _run("dapo", 1, 0, [0.1, 0.2])  # a worker stopped mid-run
    with open(tmp_path / "results_0.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in done[::-1] + cut)
        fh.write('{"arm": "dapo", "mu"')  # killed mid-write
    # worker 1 (cispo_5 jobs) crashed before writing anything
    records, report = br.merge_results(str(tmp_path), 2, jobs, steps=10)
    assert records == done
    assert report == {"finished": ["dapo:2:0"], "incomplete": ["dapo:1:0"], "missing": ["cispo_5:2:0", "cispo_5:1:0"]}


def test_no_job_starts_after_the_deadline():
    lines, out = [], io.StringIO()
    records = br.run_jobs(None, None, [("dapo", 8, 0), ("grpo", 1, 1)], deadline_at=time.time() - 1,
                          results=out, log=lines.append)
    assert records == [] and out.getvalue() == ""
    assert lines == ["SKIP dapo mu=8 seed=0 (deadline; expected 0s)", "SKIP grpo mu=1 seed=1 (deadline; expected 0s)"]


TINY = ["--layers=2", "--period=2", "--hidden=32", "--heads=2", "--head_dim=8", "--experts=2", "--ffn=32",
        "--min_digits=1", "--max_digits=1", "--sft_steps=300", "--sft_batch=64", "--sft_lr=1e-2", "--prompts=2",
        "--group_size=4", "--rl_steps=2", "--eval_every=2", "--eval_problems=8", "--eval_samples=4", "--lr=3e-3",
        "--arms=dapo,cispo_5@1e-3", "--mu1_arms=dapo", "--mus=2,1", "--seeds=1", "--nomismatch"]


def _jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _bench(*flags, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "experiments.rl_grid", *TINY, *flags], capture_output=True, check=False,
                          text=True, timeout=timeout, env=env, cwd=os.path.dirname(os.path.dirname(br.__file__)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_rl")
    stdout = _bench(f"--out={root / 'out2'}", f"--workdir={root / 'work'}", "--workers=2", "--probe_steps=2")
    return root, stdout


def test_two_workers_merge_every_job_into_the_summary(two_worker_run):
    root, stdout = two_worker_run
    out = root / "out2"
    records = _jsonl(out / "results.jsonl")
    runs = {(r["arm"], r["mu"], r["seed"]): [] for r in records}
    for r in records:
        runs[(r["arm"], r["mu"], r["seed"])].append(r["step"])
    assert runs == {("dapo", 2, 0): [0, 1, 2], ("cispo_5@1e-3", 2, 0): [0, 1, 2], ("dapo", 1, 0): [0, 1, 2]}
    assert stdout.count(" JOB ") == 3 and "worker 1: pid" in stdout  # one progress line per job, from the workers
    summary = json.loads((out / "summary.json").read_text())
    assert sorted((r["arm"], r["mu"]) for r in summary["table"]) == [("cispo_5@1e-3", 2), ("dapo", 1), ("dapo", 2)]
    assert summary["workers_report"]["failed_workers"] == {} and len(summary["workers_report"]["finished"]) == 3
    assert summary["throughput_grid"]["concurrent"] and summary["throughput_grid"]["workers"] == 2
    for mu in ("mu2", "mu1"):  # the solo probe ran dapo (cispo_5 is not in the grid) at both mu, before the workers
        probe = summary["throughput_solo"][mu]
        assert probe["arm"] == "dapo" and probe["rollout_tokens_per_s"] > 0 and probe["update_tokens_per_s"] > 0
    # the pretrained policy fits the 1-digit teacher: it writes the carry digit with probability well below 1
    pre = summary["pretrained"]
    assert 0.1 < pre["p_correct_at_carry"] < 0.8 < pre["p_correct_elsewhere"], pre
    assert pre["greedy_acc_carry"] <= pre["greedy_acc"] and pre["acc"] > 0.1, pre
    evals = [r for r in records if "acc" in r]
    assert all({"acc", "greedy_acc", "acc_carry", "greedy_acc_carry", "eval_s"} <= set(r) for r in evals)
    assert all(os.path.exists(out / f) for f in ("pretrained.tar", "worker_0.log", "worker_1.log", "summary.md"))


def test_one_process_run_of_a_job_matches_its_worker_run(two_worker_run):
    root, _ = two_worker_run
    job = "cispo_5@1e-3:2:0"
    _bench(f"--out={root / 'out1'}", f"--workdir={root / 'work1'}", "--workers=1", "--probe_steps=0",
           f"--jobs={job}", f"--init_checkpoint={root / 'work' / 'pretrained'}")
    one = _jsonl(root / "out1" / "results.jsonl")
    two = [r for r in _jsonl(root / "out2" / "results.jsonl") if r["arm"] == "cispo_5@1e-3"]
    timing = ("rollout_s", "score_s", "update_s", "eval_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in one] == \
        [{k: v for k, v in r.items() if k not in timing} for r in two]
    assert one[0]["acc"] > 0 and np.isfinite(one[1]["loss"]) and one[1]["kept_groups"] >= 1, one
