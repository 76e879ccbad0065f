"""Analysis of a CISPO-vs-baselines grid: does CISPO reach DAPO's accuracy in fewer RL steps?

Input: the learner's records (``Learner.run``), each tagged with ``arm`` (a name such as ``cispo_5``, optionally with
its learning rate: ``cispo_5@3e-5``), ``mu`` and ``seed`` (``m1jax.rl.grid``). Evaluation records carry ``acc``
(sampled accuracy on the held-out problems), ``greedy_acc`` and the task's subsets; step records carry the update's
mechanism metrics (clip fractions overall and at decision points, the decision points' gradient share).

The statistics, per mu, for every base arm at its best learning rate (the rate with the highest AUC of its
seed-mean accuracy curve; every arm is compared at its own best rate):

* final accuracy: the mean of the last ``window`` evaluations of the seed-mean curve (smoothing the evaluation
  noise of a single point);
* AUC: the area under the seed-mean curve divided by the steps it spans (the mean accuracy over the run);
* s_arm: the first step at which the arm's seed-mean curve reaches a_D, DAPO's final accuracy (linear interpolation
  between evaluations; inf if never). s_D <= S always, since one of DAPO's last ``window`` evaluations is at least
  their mean;
* the claim statistic ratio = s_arm / s_D ("CISPO matches DAPO's performance with 50% of the steps": ratio 0.5);
* bootstrap intervals over seeds: the seeds of the arm and of DAPO are resampled independently (with replacement),
  and a_D, s_arm, s_D and the ratio recomputed on each resample.

The decision rule for the claim (``verdict``): **reproduced** if the ratio at the main mu is <= 0.6 and its
interval excludes 1 (lies below it); **refuted** if the interval includes or exceeds 1; in between (interval below
1, ratio above 0.6) CISPO is faster than DAPO but by less than the claim. With few seeds the interval is coarse
(3 seeds give 10 distinct resamples per arm), which the rule counts against the claim.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Iterable, Sequence

import numpy as np

from m1jax.metrics import read_jsonl

REFERENCE = "dapo"
CLAIM_THRESHOLD = 0.6
MECHANISM_KEYS = ("ppo_clip_frac", "is_cap_frac", "trust_region_frac", "ppo_clip_frac_decision",
                  "is_cap_frac_decision", "trust_region_frac_decision", "grad_share_decision", "decision_frac")


def split_arm(name: str) -> tuple[str, float | None]:
    """'cispo_5@3e-5' -> ('cispo_5', 3e-5); 'dapo' -> ('dapo', None)."""
    base, sep, lr = name.partition("@")
    return base, (float(lr) if sep else None)


# ------------------------------------------------------------------------------------------------ records
def load_records(paths: str | Sequence[str]) -> list[dict]:
    """Records of JSON-lines files (``.gz`` read compressed); a truncated last line (a run killed mid-write) is
    skipped."""
    return [record for path in ([paths] if isinstance(paths, str) else paths) for record in read_jsonl(path)]


@dataclasses.dataclass(frozen=True)
class Curves:
    """The evaluations of one (arm, mu): steps [E] and values [seeds, E] (one row per seed, in ``seeds`` order)."""
    steps: np.ndarray
    values: np.ndarray
    seeds: tuple

    def mean(self, rows=None) -> np.ndarray:
        return (self.values if rows is None else self.values[rows]).mean(axis=0)


def eval_curves(records: Iterable[dict], key: str = "acc") -> dict[tuple[str, int], Curves]:
    """(arm, mu) -> Curves of the evaluation metric ``key``. Runs with fewer evaluations than the longest run of
    their (arm, mu) (cut short) are left out."""
    runs: dict = {}
    for r in records:
        if key in r and r[key] is not None:
            runs.setdefault((r["arm"], r["mu"]), {}).setdefault(r["seed"], {})[r["step"]] = r[key]
    out = {}
    for k, seeds in runs.items():
        longest = max(len(v) for v in seeds.values())
        kept = sorted(s for s, v in seeds.items() if len(v) == longest)
        steps = np.array(sorted(seeds[kept[0]]), np.float64)
        kept = [s for s in kept if sorted(seeds[s]) == steps.tolist()]
        out[k] = Curves(steps, np.array([[seeds[s][t] for t in steps] for s in kept], np.float64), tuple(kept))
    return out


# ------------------------------------------------------------------------------------------------ curve statistics
def final_value(values: np.ndarray, window: int) -> float:
    """Mean of the last ``window`` entries of a curve [E]."""
    return float(np.mean(values[-max(1, window):]))


def first_reach(steps: np.ndarray, values: np.ndarray, target: float) -> float:
    """The first step at which the curve reaches ``target``, linearly interpolated between the evaluation before
    and the one at or above it; steps[0] if it starts there; inf if never."""
    hit = np.flatnonzero(values >= target - 1e-12)
    if not len(hit):
        return math.inf
    i = int(hit[0])
    if i == 0:
        return float(steps[0])
    v0, v1 = values[i - 1], values[i]
    return float(steps[i - 1] + (steps[i] - steps[i - 1]) * (target - v0) / (v1 - v0))


def auc(steps: np.ndarray, values: np.ndarray) -> float:
    """Trapezoid area under the curve / the steps it spans: its mean level (the value itself for one point)."""
    if len(steps) < 2:
        return float(values[0])
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def claim_statistics(arm: Curves, ref: Curves, window: int, arm_rows=None, ref_rows=None,
                     fraction: float = 1.0) -> dict[str, float]:
    """a_D (the reference's final accuracy), s_arm and s_D (the steps to reach the target: a_D itself, or with
    fraction f < 1 the level f of the way from the reference's start to a_D) and their ratio, for the given seed
    rows (default: all)."""
    if not np.array_equal(arm.steps, ref.steps):
        raise ValueError("the arm and the reference were evaluated at different steps")
    ref_mean, arm_mean = ref.mean(ref_rows), arm.mean(arm_rows)
    a_d = final_value(ref_mean, window)
    target = ref_mean[0] + fraction * (a_d - ref_mean[0])
    s_arm, s_d = first_reach(arm.steps, arm_mean, target), first_reach(ref.steps, ref_mean, target)
    ratio = s_arm / s_d if s_d > 0 else math.nan  # s_D = 0: the reference never rose above its start
    return {"a_D": a_d, "s": s_arm, "s_D": s_d, "ratio": ratio}


def bootstrap(arm: Curves, ref: Curves, window: int, *, samples: int = 2000, seed: int = 0,
              fraction: float = 1.0) -> dict[str, np.ndarray]:
    """``claim_statistics`` on ``samples`` resamples of the seeds (arm and reference independently, with
    replacement): {name: [samples]}."""
    rng = np.random.default_rng(seed)
    na, nr = len(arm.seeds), len(ref.seeds)
    rows = [claim_statistics(arm, ref, window, rng.integers(na, size=na), rng.integers(nr, size=nr), fraction)
            for _ in range(samples)]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (inf allowed: "never"); the outer order statistics, so that an
    interval never interpolates between a step and "never"."""
    samples = np.asarray(samples, np.float64)
    samples = samples[~np.isnan(samples)]
    if not samples.size:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(samples, tail, method="lower")),
            float(np.percentile(samples, 100 - tail, method="higher")))


def verdict(ratio: float, high: float, threshold: float = CLAIM_THRESHOLD) -> str:
    """The decision rule (module docstring) from the ratio s_CISPO / s_DAPO and its interval's upper end."""
    if math.isnan(ratio) or math.isnan(high):
        return "undecided (no reference progress)"
    if high >= 1:
        return "refuted"
    return "reproduced" if ratio <= threshold else "faster than DAPO, by less than the claim"


# ------------------------------------------------------------------------------------------------ the grid
def best_rates(curves: dict[tuple[str, int], Curves]) -> dict[tuple[str, int], str]:
    """(base arm, mu) -> the arm name (with its rate) whose seed-mean curve has the highest AUC."""
    best: dict = {}
    for (arm, mu), c in curves.items():
        key, score = (split_arm(arm)[0], mu), auc(c.steps, c.mean())
        if key not in best or score > best[key][1]:
            best[key] = (arm, score)
    return {k: v[0] for k, v in best.items()}


def mechanism(records: Iterable[dict]) -> dict[tuple[str, int], dict]:
    """(arm, mu) -> mean of each mechanism metric over all step records (seeds and steps; NaN entries skipped),
    and ``<metric>_by_minibatch``: the mean per minibatch index."""
    acc: dict = {}
    for r in records:
        if "rollout_s" not in r:
            continue
        slot = acc.setdefault((r["arm"], r["mu"]), {})
        for k in MECHANISM_KEYS:
            if k in r and r[k] is not None:
                slot.setdefault(k, []).append(r[k])
            if k + "_by_minibatch" in r:
                slot.setdefault(k + "_by_minibatch", []).append(r[k + "_by_minibatch"])
    out = {}
    for key, slot in acc.items():
        row = {}
        for k, v in slot.items():
            v = np.array(v, np.float64)
            with warnings.catch_warnings():  # an all-NaN column is an undefined metric, not an error
                warnings.simplefilter("ignore", RuntimeWarning)
                m = np.nanmean(v, axis=0)
            if np.isnan(m).all():  # a metric this arm's loss does not produce
                continue
            row[k] = [float(x) for x in m] if k.endswith("_by_minibatch") else float(m)
        out[key] = row
    return out


def analyze(records: Sequence[dict], *, main_mu: int = 8, reference: str = REFERENCE,
            primary: str = "cispo_5", window: int = 3, samples: int = 2000, level: float = 0.95,
            seed: int = 0, fractions: Sequence[float] = (0.5, 0.9)) -> dict:
    """The grid's summary (module docstring): {"table": one row per (base arm, mu) at its best rate, "sweep": every
    (arm, mu) with its seeds, AUC and final accuracy, "claim": the decision for ``primary`` at ``main_mu``, plus the
    verdict of every CISPO-family arm at every mu, "mechanism": per (arm, mu), "base_acc"}.

    ``fractions``: the same ratio for the targets f of the way from DAPO's start to a_D (``ratio_f50``,
    ``ratio_f90`` and their intervals). When DAPO has plateaued long before its last step, reaching a_D itself is
    decided by the noise of the plateau (the first reproduction's failure); the ratios at 50% and 90% of DAPO's
    gain still measure speed. They are reported beside the claim statistic, which stays the decision rule's."""
    curves = eval_curves(records)
    best = best_rates(curves)
    mech = mechanism(records)
    greedy = eval_curves(records, "greedy_acc")
    base = [r["acc"] for r in records if r.get("step") == 0 and r.get("acc") is not None]
    sweep = []
    for (arm, mu), c in sorted(curves.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        mean = c.mean()
        sweep.append({"arm": arm, "mu": mu, "seeds": len(c.seeds), "auc": auc(c.steps, mean),
                      "final_acc": final_value(mean, window), "best": best[(split_arm(arm)[0], mu)] == arm})
    table = []
    for (name, mu), arm in sorted(best.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        c = curves[(arm, mu)]
        mean = c.mean()
        finals = np.array([final_value(v, window) for v in c.values])
        row = {"arm": name, "lr": split_arm(arm)[1], "run": arm, "mu": mu, "seeds": len(c.seeds),
               "S": float(c.steps[-1]), "final_acc": final_value(mean, window), "final_acc_sd": float(finals.std()),
               "auc": auc(c.steps, mean)}
        if (arm, mu) in greedy:
            row["final_greedy_acc"] = final_value(greedy[(arm, mu)].mean(), window)
        ref_arm = best.get((reference, mu))
        if ref_arm is not None and np.array_equal(curves[(ref_arm, mu)].steps, c.steps):
            ref = curves[(ref_arm, mu)]
            point = claim_statistics(c, ref, window)
            boot = bootstrap(c, ref, window, samples=samples, seed=seed)
            row.update(ref=ref_arm, a_D=point["a_D"], s=point["s"], s_D=point["s_D"], ratio=point["ratio"])
            row["s_ci"], row["s_D_ci"], row["ratio_ci"] = (interval(boot[k], level) for k in ("s", "s_D", "ratio"))
            if name.startswith("cispo"):
                row["verdict"] = verdict(point["ratio"], row["ratio_ci"][1])
            for f in fractions:
                key = f"ratio_f{int(round(f * 100))}"
                row[key] = claim_statistics(c, ref, window, fraction=f)["ratio"]
                row[key + "_ci"] = interval(bootstrap(c, ref, window, samples=samples, seed=seed, fraction=f)["ratio"],
                                            level)
        row.update({k: v for k, v in mech.get((arm, mu), {}).items() if not k.endswith("_by_minibatch")})
        table.append(row)
    claim = next((dict(r) for r in table if r["arm"] == primary and r["mu"] == main_mu and "verdict" in r), None)
    return {"base_acc": float(np.mean(base)) if base else math.nan, "window": window, "level": level,
            "reference": reference, "main_mu": main_mu, "primary": primary, "claim": claim, "table": table,
            "sweep": sweep, "mechanism": {f"{arm}/mu{mu}": v for (arm, mu), v in sorted(mech.items())}}


# ------------------------------------------------------------------------------------------------ report
TABLE_COLUMNS = (("arm", "arm"), ("lr", "best lr"), ("mu", "mu"), ("seeds", "seeds"), ("final_acc", "final acc"),
                 ("final_acc_sd", "sd"), ("auc", "AUC"), ("s", "steps to a_D"), ("s_ci", "CI"),
                 ("ratio", "s / s_DAPO"), ("ratio_ci", "CI"), ("verdict", "verdict"), ("ratio_f90", "ratio at 90%"),
                 ("ratio_f90_ci", "CI"), ("ratio_f50", "ratio at 50%"), ("ratio_f50_ci", "CI"),
                 ("ppo_clip_frac", "PPO-clipped"), ("ppo_clip_frac_decision", "at decisions"),
                 ("trust_region_frac", "outside DAPO's region"), ("trust_region_frac_decision", "at decisions"),
                 ("is_cap_frac", "IS-capped"), ("grad_share_decision", "grad share of decisions"))


def markdown(summary: dict) -> str:
    """The summary as markdown: the claim, the table at the best rates, the learning-rate sweep."""
    lines = [f"base accuracy {summary['base_acc']:.3f}; final = mean of the last {summary['window']} evaluations; "
             f"{int(summary['level'] * 100)}% bootstrap intervals over seeds", ""]
    claim = summary.get("claim")
    if claim:
        lines += [f"**Claim ({claim['arm']} vs {summary['reference']}, mu={claim['mu']}): {claim['verdict']}** - "
                  f"ratio {_fmt(claim['ratio'])} ({_fmt(claim['ratio_ci'])}), a_D {claim['a_D']:.3f}", ""]
    lines += ["| " + " | ".join(label for _, label in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row.get(k, "")) for k, _ in TABLE_COLUMNS) + " |" for row in summary["table"]]
    lines += ["", "| run | mu | seeds | AUC | final acc | best |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['mu']} | {r['seeds']} | {r['auc']:.3f} | {r['final_acc']:.3f} | "
              f"{'*' if r['best'] else ''} |" for r in summary["sweep"]]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, summary: dict, records: Sequence[dict], extra: dict | None = None) -> str:
    """summary.json (with ``extra``), summary.md and acc_mu<k>.png (seed means at the best rates, min..max band)
    under ``out_dir``. Returns the markdown."""
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump({**summary, **(extra or {})}, fh, indent=1)
    text = markdown(summary)
    with open(os.path.join(out_dir, "summary.md"), "w") as fh:
        fh.write(text)
    from m1jax.rl.plots import plot_accuracy
    curves = eval_curves(records)
    for mu in sorted({row["mu"] for row in summary["table"]}):
        plot = {f"{row['run']} (n={row['seeds']})": (curves[(row["run"], mu)].steps,
                                                      curves[(row["run"], mu)].mean(),
                                                      curves[(row["run"], mu)].values.min(0),
                                                      curves[(row["run"], mu)].values.max(0))
                for row in summary["table"] if row["mu"] == mu}
        plot_accuracy(plot, os.path.join(out_dir, f"acc_mu{mu}.png"),
                      f"held-out accuracy, mu={mu}, best lr per arm (seed mean, band = min..max)")
    return text


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)):
        return "..".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return "never" if v == math.inf else ("" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1e-2 and v else
                                              f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
    return "" if v is None else str(v)
