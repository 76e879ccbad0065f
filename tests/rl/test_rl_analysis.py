"""m1jax/rl/analysis.py on synthetic curves whose answers are known by construction."""
import gzip
import json
import math

import numpy as np
import pytest

from m1jax.rl import analysis

STEPS = np.arange(0, 101, 10)


def _ramp(reach_step, low=0.1, high=0.9):
    """A curve rising linearly from `low` at step 0 to `high` at `reach_step`, flat after."""
    return np.clip(low + (high - low) * STEPS / reach_step, low, high)


def _records(arm, mu, curves, step_metrics=None):
    out = []
    for seed, curve in enumerate(curves):
        for step, acc in zip(STEPS, curve):
            out.append({"arm": arm, "mu": mu, "seed": seed, "step": int(step), "acc": float(acc),
                        "greedy_acc": float(acc) / 2})
        for step in range(100):
            out.append({"arm": arm, "mu": mu, "seed": seed, "step": step, "rollout_s": 0.1, **(step_metrics or {})})
    return out


def test_curve_statistics_by_hand():
    steps = np.array([0.0, 10, 20, 30])
    values = np.array([0.2, 0.4, 0.8, 0.7])
    assert analysis.first_reach(steps, values, 0.6) == pytest.approx(15.0)  # halfway between 0.4 and 0.8
    assert analysis.first_reach(steps, values, 0.1) == 0.0
    assert analysis.first_reach(steps, values, 0.9) == math.inf
    assert analysis.final_value(values, 2) == pytest.approx(0.75)
    # trapezoids: (0.3 + 0.6 + 0.75) * 10 / 30
    assert analysis.auc(steps, values) == pytest.approx(0.55)
    assert analysis.split_arm("cispo_1.28@3e-5") == ("cispo_1.28", 3e-5) and analysis.split_arm("dapo") == ("dapo", None)
    assert analysis.interval(np.array([1.0, 2, 3, math.inf]), 0.5) == (1.0, math.inf)


def test_cispo_in_half_the_steps_is_reproduced():
    records = (_records("dapo", 8, [_ramp(100)] * 3)
               + _records("cispo_5", 8, [_ramp(50)] * 3)            # reaches DAPO's final 0.9 at step 50
               + _records("cispo_1.28", 8, [_ramp(80)] * 3)         # at step 80: faster, not 2x
               + _records("cispo_masked", 8, [_ramp(100)] * 3))     # DAPO's own speed
    summary = analysis.analyze(records, window=1, samples=200)
    rows = {r["arm"]: r for r in summary["table"]}
    assert rows["dapo"]["a_D"] == pytest.approx(0.9) and rows["dapo"]["s_D"] == pytest.approx(100)
    assert rows["cispo_5"]["ratio"] == pytest.approx(0.5) and rows["cispo_5"]["ratio_ci"] == pytest.approx((0.5, 0.5))
    assert rows["cispo_5"]["verdict"] == "reproduced"
    # 50% and 90% of DAPO's gain (0.5 and 0.82): DAPO at steps 50 and 90, cispo_5 at 25 and 45.
    assert rows["cispo_5"]["ratio_f50"] == pytest.approx(0.5) and rows["cispo_5"]["ratio_f90"] == pytest.approx(0.5)
    assert rows["cispo_1.28"]["ratio_f90_ci"] == pytest.approx((0.8, 0.8))
    assert rows["cispo_1.28"]["ratio"] == pytest.approx(0.8)
    assert rows["cispo_1.28"]["verdict"] == "faster than DAPO, by less than the claim"
    assert rows["cispo_masked"]["ratio"] == pytest.approx(1.0) and rows["cispo_masked"]["verdict"] == "refuted"
    assert "verdict" not in rows["dapo"]
    assert summary["claim"]["arm"] == "cispo_5" and summary["claim"]["verdict"] == "reproduced"
    assert rows["cispo_5"]["auc"] > rows["dapo"]["auc"] and rows["cispo_5"]["final_greedy_acc"] == pytest.approx(0.45)


def test_seed_noise_widens_the_interval_and_refutes():
    """One CISPO seed is fast, the other two never reach DAPO's level: the point ratio can look good, but resamples
    of the slow seeds never get there, so the interval reaches "never" and the rule says refuted."""
    fast, slow = _ramp(30), _ramp(100, high=0.7)
    records = _records("dapo", 8, [_ramp(100)] * 3) + _records("cispo_5", 8, [fast, slow, slow])
    row = next(r for r in analysis.analyze(records, window=1, samples=500)["table"] if r["arm"] == "cispo_5")
    assert row["ratio_ci"][1] == math.inf and row["verdict"] == "refuted"
    # The seed-mean final accuracy (0.9 + 0.7 + 0.7) / 3 and its spread over seeds.
    assert row["final_acc"] == pytest.approx(2.3 / 3) and row["final_acc_sd"] == pytest.approx(np.std([0.9, 0.7, 0.7]))


def test_each_arm_is_compared_at_its_best_learning_rate():
    records = (_records("dapo@1e-5", 8, [_ramp(100, high=0.5)] * 2) + _records("dapo@1e-4", 8, [_ramp(100)] * 2)
               + _records("cispo_5@1e-5", 8, [_ramp(50)] * 2) + _records("cispo_5@1e-4", 8, [_ramp(80)] * 2)
               + _records("dapo@1e-4", 1, [_ramp(100)] * 2) + _records("cispo_5@1e-4", 1, [_ramp(100)] * 2))
    summary = analysis.analyze(records, window=1, samples=100)
    rows = {(r["arm"], r["mu"]): r for r in summary["table"]}
    assert rows[("dapo", 8)]["run"] == "dapo@1e-4" and rows[("dapo", 8)]["lr"] == 1e-4
    assert rows[("cispo_5", 8)]["run"] == "cispo_5@1e-5" and rows[("cispo_5", 8)]["ref"] == "dapo@1e-4"
    assert rows[("cispo_5", 8)]["ratio"] == pytest.approx(0.5)
    assert rows[("cispo_5", 1)]["ratio"] == pytest.approx(1.0)  # the mu = 1 control: no gap
    best = {(r["arm"], r["mu"]): r["best"] for r in summary["sweep"]}
    assert best == {("dapo@1e-5", 8): False, ("dapo@1e-4", 8): True, ("cispo_5@1e-5", 8): True,
                    ("cispo_5@1e-4", 8): False, ("dapo@1e-4", 1): True, ("cispo_5@1e-4", 1): True}


def test_final_window_smooths_the_reference_and_runs_cut_short_are_dropped():
    noisy = _ramp(60)
    noisy[-3:] = [0.95, 0.85, 0.9]  # DAPO's last three evaluations: final accuracy 0.9 with window 3
    cut = _records("cispo_5", 8, [_ramp(40)])[:5]  # a run with 5 evaluations only: not a complete curve
    records = _records("dapo", 8, [noisy] * 2) + _records("cispo_5", 8, [_ramp(40)] * 2) + [
        dict(r, seed=9) for r in cut]
    row = next(r for r in analysis.analyze(records, window=3, samples=50)["table"] if r["arm"] == "cispo_5")
    assert row["a_D"] == pytest.approx(0.9) and row["seeds"] == 2
    assert row["s"] == pytest.approx(40) and row["s_D"] == pytest.approx(60) and row["ratio"] == pytest.approx(2 / 3)


def test_mechanism_means_by_minibatch_skip_undefined_entries(tmp_path):
    metrics = {"ppo_clip_frac": 0.1, "ppo_clip_frac_decision": 0.4, "grad_share_decision": 0.9,
               "ppo_clip_frac_by_minibatch": [0.0, 0.2], "grad_share_decision_by_minibatch": [0.8, float("nan")]}
    records = _records("dapo", 8, [_ramp(100)] * 2, metrics)
    summary = analysis.analyze(records, window=1, samples=20)
    mech = summary["mechanism"]["dapo/mu8"]
    assert mech["ppo_clip_frac_by_minibatch"] == pytest.approx([0.0, 0.2])
    assert mech["grad_share_decision_by_minibatch"][0] == pytest.approx(0.8)
    assert math.isnan(mech["grad_share_decision_by_minibatch"][1])
    row = summary["table"][0]
    assert row["ppo_clip_frac_decision"] == pytest.approx(0.4) and row["grad_share_decision"] == pytest.approx(0.9)
    path = tmp_path / "r.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
        fh.write('{"arm": "da')  # a line cut by a kill
    assert json.dumps(analysis.load_records(str(path))) == json.dumps(records)  # (NaN != NaN as values)
    text = analysis.write_report(str(tmp_path), summary, records)
    assert "| dapo | 1e-4" not in text and "| dapo |" in text and (tmp_path / "summary.json").exists()
