"""A grid of RL runs from one starting policy: loss arms x learning rates x mu x seeds, in priority order, under a
deadline, in this process or in worker processes that share one device, resumable across processes.

Why here and not in the experiment's main: the scheduling (which job next, which learning rate is best so far,
whether a job still fits before the deadline), the results files and the resume rules are logic that tests exercise
without a command line; ``experiments.rl_grid`` only parses flags and builds the configs and worker commands.

* **Arms** (``ARMS``): a loss recipe (loss, knobs, advantage norm, dynamic sampling). A run's arm name may carry
  its learning rate, ``dapo@3e-5``; ``dapo@best`` is a job whose rate is chosen when it starts: the rate with the
  best AUC among the finished runs of that arm at the sweep mu (``m1jax.rl.analysis.best_rates``).
* **Jobs** (arm, mu, seed) in priority order (``grid_jobs``): the learning-rate sweep at the sweep mu seed by seed,
  then the other mus at each arm's best rate, seed by seed: a time-boxed grid yields complete seeds of the main
  comparison first.
* **One compiled update per mu**: every arm x rate of the grid is an alternative of one update program (the learner's
  ``alternatives``; ``compiled_arms``), so a worker compiles once per mu whatever it runs.
* **Scheduling** (``Scheduler``): a job starts only if its estimated duration (the median of the finished jobs of its
  mu, else ``default_estimate``) ends before the deadline; a job whose best rate is not known yet waits while the
  sweep runs that decide it. With several workers the main process hands out one job at a time over each worker's
  stdin (``run_workers``), so the workers stay balanced and the best rates are read from the latest results.
* **Stopping**: a run polls ``stop_at`` before each RL step and returns early when it passes (the learner's
  ``stop_requested``); an incomplete run is discarded. Worker processes still running at ``stop_at`` + a grace
  period are terminated.
* **Results**: every record of every run, one JSON line each (rounded to ``DIGITS`` significant digits), tagged
  arm/mu/seed; ``finished_runs`` keeps the complete ones (a record at the last step). A later process given those
  records (``done``) skips their jobs, so a grid resumes across device calls.
"""
from __future__ import annotations

import glob
import gzip
import json
import math
import os
import queue
import shutil
import subprocess
import tarfile
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from m1jax.rl import analysis

# name -> (loss, knobs, adv_norm, dynamic sampling): the reproduction's arms (docs/rl.md).
ARMS = {
    "grpo": ("grpo", {}, "group_std", False),
    "dapo": ("dapo", {}, "group_std", True),
    "drgrpo": ("drgrpo", {}, "mean_only", False),
    "cispo_1.28": ("cispo", {"eps_is_high": 0.28}, "group_std", True),  # M1's cap 1 + eps (DAPO's eps_high)
    "cispo_2": ("cispo", {"ratio_max": 2.0}, "group_std", True),
    "cispo_5": ("cispo", {"ratio_max": 5.0}, "group_std", True),         # ScaleRL's cap
    "cispo_masked": ("cispo_masked", {"ratio_max": 5.0}, "group_std", True),
}
BEST = "best"
DIGITS = 5  # significant digits kept in the results files
PROTOCOL = "@@grid "  # prefix of the lines a worker and the main process exchange


class Job(NamedTuple):
    arm: str
    mu: int
    seed: int

    def __str__(self) -> str:
        return f"{self.arm}:{self.mu}:{self.seed}"


# ------------------------------------------------------------------------------------------------ arms and jobs
def parse_arm(name: str) -> tuple[str, float | str | None]:
    """'dapo@3e-5' -> ('dapo', 3e-5); 'dapo@best' -> ('dapo', 'best'); 'dapo' -> ('dapo', None). ValueError for an
    unknown arm or a bad rate."""
    base, sep, lr = name.partition("@")
    if base not in ARMS:
        raise ValueError(f"unknown arm {name!r}: expected one of {sorted(ARMS)}, optionally @lr (e.g. dapo@3e-5)")
    if ":" in name or "," in name:
        raise ValueError(f"arm {name!r}: ':' and ',' separate jobs and their fields")
    if not sep:
        return base, None
    if lr == BEST:
        return base, BEST
    try:
        rate = float(lr)
    except ValueError:
        raise ValueError(f"arm {name!r}: {lr!r} after '@' is not a learning rate (or 'best')") from None
    if not 0 < rate < 1:
        raise ValueError(f"arm {name!r}: learning rate {rate} must be in (0, 1)")
    return base, rate


def arm_name(base: str, lr: float | None) -> str:
    return base if lr is None else f"{base}@{lr:g}"


def arm_settings(update, config, arm: str, mu: int):
    """(UpdateConfig, RLConfig) of ``arm`` (with its rate, else ``update``'s) at ``mu``, from the base configs."""
    name, lr = parse_arm(arm)
    if lr == BEST:
        raise ValueError(f"arm {arm!r}: resolve '@best' to a rate first (Scheduler)")
    loss, knobs, adv_norm, ds = ARMS[name]
    update = update.with_loss(loss, **knobs).replace(mu=mu, learning_rate=update.learning_rate if lr is None else lr)
    return update, config.replace(adv_norm=adv_norm, dynamic_sampling=ds)


def compiled_arms(arms: Sequence[str], lrs: Sequence[float]) -> list[str]:
    """Every run name of the grid at one mu, in the order that fixes its index in the shared update program: each
    arm at each rate of ``lrs`` (arms that name their own rate, or no lrs: the arm as given)."""
    out = []
    for arm in arms:
        base, lr = parse_arm(arm)
        out += [arm_name(base, r) for r in lrs] if lr is None and lrs else [arm]
    return list(dict.fromkeys(out))


def grid_jobs(arms: Sequence[str], mus: Sequence[int], seeds: int, *, lrs: Sequence[float] = (),
              sweep_mu: int | None = None) -> list[Job]:
    """Jobs in priority order. Without ``lrs``: per seed, each mu in the given order, its arms in the given order.
    With ``lrs``: first the sweep (every arm at every rate at ``sweep_mu``, seed by seed), then the other mus with
    each arm at its best rate (``arm@best``), seed by seed."""
    if not lrs:
        return [Job(arm, mu, seed) for seed in range(seeds) for mu in mus for arm in arms]
    if sweep_mu not in mus:
        raise ValueError(f"the sweep mu {sweep_mu} is not one of the grid's mus {list(mus)}")
    sweep = [Job(arm, sweep_mu, seed) for seed in range(seeds) for arm in compiled_arms(arms, lrs)]
    rest = [Job(arm if parse_arm(arm)[1] is not None else f"{arm}@{BEST}", mu, seed)
            for seed in range(seeds) for mu in mus if mu != sweep_mu for arm in arms]
    return sweep + rest


def format_jobs(jobs) -> str:
    return ",".join(str(Job(*j)) for j in jobs)


def parse_jobs(specs: Sequence[str]) -> list[Job]:
    """['dapo@3e-5:8:0', ...] -> [Job('dapo@3e-5', 8, 0), ...]."""
    out = []
    for spec in specs:
        parts = spec.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(f"bad job {spec!r}: expected arm:mu:seed")
        parse_arm(parts[0])
        out.append(Job(parts[0], int(parts[1]), int(parts[2])))
    return out


# ------------------------------------------------------------------------------------------------ results
def compact(value: Any, digits: int = DIGITS) -> Any:
    """A record with its floats rounded to ``digits`` significant digits (lists and dicts inside too)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: compact(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [compact(v, digits) for v in value]
    return value


def finished_runs(records: Sequence[dict], steps: int) -> dict[Job, list[dict]]:
    """Job -> its records sorted by step, for the complete runs only (a record at step ``steps``). A run that
    appears twice (two sources) keeps the first source's records."""
    runs: dict = {}
    for r in records:
        runs.setdefault(Job(r["arm"], r["mu"], r["seed"]), []).append(r)
    out = {}
    for job, recs in runs.items():
        by_step = {}
        for r in recs:
            by_step.setdefault(r["step"], r)
        if steps in by_step:
            out[job] = [by_step[s] for s in sorted(by_step)]
    return out


def write_results(path: str, runs: dict[Job, list[dict]]) -> None:
    """The records of ``runs`` as gzipped JSON lines (written beside and renamed: a reader never sees half)."""
    tmp = path + ".partial"
    with gzip.open(tmp, "wt") as fh:
        for recs in runs.values():
            fh.writelines(json.dumps(r) + "\n" for r in recs)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ scheduling
class Scheduler:
    """Hands out jobs in priority order under a deadline (module docstring). Not thread-safe: one caller.

    jobs: priority-ordered; done: jobs already finished (skipped); lrs / sweep_mu: where '@best' rates come from;
    default_estimate: seconds assumed for a job before any of its mu has finished (None: start it).
    """

    def __init__(self, jobs: Sequence[Job], *, deadline_at: float, lrs: Sequence[float] = (),
                 sweep_mu: int | None = None, done: Sequence[Job] = (), default_estimate: Callable | None = None,
                 log=print):
        self.deadline_at, self.lrs, self.sweep_mu = deadline_at, tuple(lrs), sweep_mu
        self.default_estimate, self.log = default_estimate, log
        self.results: dict[Job, list[dict]] = {}
        self.running: dict[Job, Job] = {}  # job as dispatched (rate resolved) -> job as listed
        self.durations: dict[int, list[float]] = {}
        done = set(done)
        is_done = [j in done or self._used_rate(j, done) is not None for j in jobs]
        self.pending = [j for j, d in zip(jobs, is_done) if not d]
        self.skipped: list[Job] = [j for j, d in zip(jobs, is_done) if d]

    def _used_rate(self, job: Job, runs, any_seed: bool = False) -> str | None:
        """For an '@best' job: the run name of its arm at one of the sweep rates among ``runs`` at its mu (and
        seed, unless any_seed), else None."""
        base, lr = parse_arm(job.arm)
        if lr != BEST:
            return None
        candidates = {arm_name(base, r) for r in self.lrs}
        return next((j.arm for j in runs if j.arm in candidates and j.mu == job.mu
                     and (any_seed or j.seed == job.seed)), None)

    def estimate(self, mu: int) -> float | None:
        """A job's expected seconds: the median of the finished jobs of its mu, else ``default_estimate``, else the
        median of all finished jobs, else None (unknown)."""
        if self.durations.get(mu):
            return float(np.median(self.durations[mu]))
        if self.default_estimate is not None:
            return self.default_estimate(mu)
        known = [d for ds in self.durations.values() for d in ds]
        return float(np.median(known)) if known else None

    def resolve(self, job: Job) -> Job | str:
        """The job with '@best' replaced by a rate: the one its arm already ran at at this mu (all seeds of one
        (arm, mu) share a rate), else the best among the finished sweep runs; "wait" while sweep runs that decide
        it are pending or running; "none" if no sweep run of its arm finished."""
        base, lr = parse_arm(job.arm)
        if lr != BEST:
            return job
        used = self._used_rate(job, list(self.results) + list(self.running), any_seed=True)
        if used is not None:
            return Job(used, job.mu, job.seed)
        candidates = [arm_name(base, r) for r in self.lrs]
        undecided = [j for j in self.pending + list(self.running.values())
                     if j.mu == self.sweep_mu and j.arm in candidates]
        if undecided:
            return "wait"
        finished = [r for j, recs in self.results.items() if j.mu == self.sweep_mu and j.arm in candidates
                    for r in recs]
        best = analysis.best_rates(analysis.eval_curves(finished)).get((base, self.sweep_mu))
        return Job(best, job.mu, job.seed) if best is not None else "none"

    def next_job(self, now: float | None = None) -> Job | str | None:
        """The next job to start, "wait" (jobs remain whose rate depends on running sweeps), or None (nothing more
        will start: all done, or what remains does not fit before the deadline)."""
        now = time.time() if now is None else now
        waiting = False
        for job in list(self.pending):
            estimate = self.estimate(job.mu) or 0.0
            if now + estimate > self.deadline_at:
                self.pending.remove(job)
                self.skipped.append(job)
                self.log(f"skip {job}: expected {estimate:.0f}s, {self.deadline_at - now:.0f}s left")
                continue
            resolved = self.resolve(job)
            if resolved == "wait":
                waiting = True
                continue
            self.pending.remove(job)
            if resolved == "none":
                self.skipped.append(job)
                self.log(f"skip {job}: no finished sweep run to take its rate from")
                continue
            if resolved in self.running or resolved in self.results:
                self.skipped.append(job)  # the best rate's run of this seed and mu exists already
                continue
            self.running[resolved] = job
            return resolved
        return "wait" if waiting else None

    def finish(self, job: Job, seconds: float, records: Sequence[dict], steps: int) -> bool:
        """Record a dispatched job's end; True if its run is complete (kept)."""
        self.running.pop(job, None)
        run = finished_runs(records, steps).get(job)
        if run is None:
            return False
        self.durations.setdefault(job.mu, []).append(seconds)
        self.results[job] = run
        return True


# ------------------------------------------------------------------------------------------------ running jobs
def run_job(policy, base: dict, job: Job, *, compiled: Sequence[str], steps: int | None = None,
            eval_every: int | None = None, on_record=None, stop_at: float | None = None) -> list[dict]:
    """One RL run: a learner whose update program holds every run name of ``compiled`` at this mu, run at the
    job's index. policy: (task, graphdef, params); base: the configs {"update", "rl", "rollout"}. Stops before a
    step once time.time() > stop_at. Returns its records (tagged arm/mu/seed, rounded: ``compact``)."""
    from m1jax.rl.learner import Learner
    task, graphdef, params = policy
    updates = [arm_settings(base["update"], base["rl"], a, job.mu)[0] for a in compiled]
    _, config = arm_settings(base["update"], base["rl"], job.arm, job.mu)
    config = config.replace(seed=job.seed, steps=config.steps if steps is None else steps,
                            eval_every=config.eval_every if eval_every is None else eval_every)
    learner = Learner(graphdef, task, config=config, update=updates[0], alternatives=updates[1:],
                      rollout=base["rollout"])
    records = []

    def keep(record):
        records.append(compact(dict(record, arm=job.arm, mu=job.mu, seed=job.seed)))
        if on_record is not None:
            on_record(records[-1])

    learner.run(learner.init_state(params), arm=list(compiled).index(job.arm), on_record=keep, log=lambda m: None,
                stop_requested=None if stop_at is None else lambda: time.time() > stop_at)
    return records


def job_line(job: Job, records: Sequence[dict], seconds: float) -> str:
    """A one-line summary of a finished run (accuracy at the first and last evaluation)."""
    evals = [r for r in records if "acc" in r]
    if not evals:
        return f"{job} ({seconds:.1f}s, no evaluation)"
    first, last = evals[0], evals[-1]
    greedy = (f", greedy {first['greedy_acc']:.3f} -> {last['greedy_acc']:.3f}" if "greedy_acc" in last else "")
    return f"{job}: acc {first['acc']:.3f} -> {last['acc']:.3f}{greedy} ({seconds:.1f}s)"


def run_in_process(policy, base: dict, scheduler: Scheduler, *, compiled: Callable[[int], Sequence[str]],
                   steps: int, results, stop_at: float | None, log, after_job=None) -> None:
    """Run the scheduler's jobs one after the other here; every record goes to the open file ``results``."""
    while True:
        job = scheduler.next_job()
        if job is None or job == "wait":  # alone, nothing runs that could decide a waiting job
            return
        t = time.perf_counter()
        records = run_job(policy, base, job, compiled=compiled(job.mu), stop_at=stop_at,
                          on_record=lambda r: (results.write(json.dumps(r) + "\n"), results.flush()))
        seconds = time.perf_counter() - t
        complete = scheduler.finish(job, seconds, records, steps)
        log(("JOB " if complete else "CUT ") + job_line(job, records, seconds))
        if after_job is not None:
            after_job()


def worker_loop(policy, base: dict, *, compiled: Callable[[int], Sequence[str]], results, stop_at: float | None,
                commands=None, reply=None) -> None:
    """A worker process: announce READY, then run each job named by a "RUN arm:mu:seed" line on ``commands``
    (default stdin) and answer "DONE arm:mu:seed seconds", until "STOP" or the end of input."""
    import sys
    commands = sys.stdin if commands is None else commands
    reply = reply or (lambda msg: print(PROTOCOL + msg, flush=True))
    reply("READY")
    for line in commands:
        words = line.split()
        if not words or words[0] == "STOP":
            return
        job = parse_jobs([words[1]])[0]
        t = time.perf_counter()
        run_job(policy, base, job, compiled=compiled(job.mu), stop_at=stop_at,
                on_record=lambda r: (results.write(json.dumps(r) + "\n"), results.flush()))
        reply(f"DONE {job} {time.perf_counter() - t:.2f}")


def worker_envs(workers: int, devices: Sequence[str] = ()) -> list[dict]:
    """Environment overrides of each worker: the workers are spread round-robin over ``devices`` (GPU ids, as
    CUDA_VISIBLE_DEVICES names them; empty: all share the default device), and each may grow on demand to about
    0.9 / (k + 1) of its device's memory, k being the workers on that device (the main process takes the + 1)."""
    def share(i):
        return sum(1 for j in range(workers) if not devices or j % len(devices) == i % len(devices))
    envs = []
    for i in range(workers):
        env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1",
               "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / (share(i) + 1):.3f}"}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = str(devices[i % len(devices)])
        envs.append(env)
    return envs


def run_workers(commands: Sequence[Sequence[str]], scheduler: Scheduler, *, result_paths: Sequence[str],
                steps: int, log_paths: Sequence[str], envs: Sequence[dict], log, kill_at: float | None = None,
                after_job=None) -> dict[int, int]:
    """Start one worker per command, commands[i] in environment envs[i], and feed them the scheduler's jobs one at a
    time (module docstring). Each worker appends its records to result_paths[i] and its output to log_paths[i].
    Workers alive at ``kill_at`` are terminated. Returns {worker: exit code (negative: the signal that ended it)}."""
    if len(envs) != len(commands):
        raise ValueError(f"{len(commands)} worker commands but {len(envs)} environments")
    lines: queue.Queue = queue.Queue()
    procs, assigned = {}, {}
    for i, cmd in enumerate(commands):
        proc = subprocess.Popen(list(cmd), env=envs[i], text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, bufsize=1)
        threading.Thread(target=_pump, args=(i, proc.stdout, log_paths[i], lines), daemon=True).start()
        procs[i] = proc
        log(f"worker {i}: pid {proc.pid}")
    idle: list[int] = []
    offsets = [0] * len(commands)
    killed = False

    def send(i, text):
        try:
            procs[i].stdin.write(text + "\n")
            procs[i].stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def dispatch():
        while idle:
            job = scheduler.next_job()
            if job == "wait":
                return
            i = idle.pop(0)
            if job is None:
                send(i, "STOP")
                continue
            assigned[i] = job
            send(i, f"RUN {job}")
            log(f"w{i} start {job}")

    while any(p.poll() is None for p in procs.values()) or not lines.empty():
        try:
            i, words = lines.get(timeout=0.5)
        except queue.Empty:
            words = None
        if words:
            if words[0] == "DONE" and i in assigned:
                job = assigned.pop(i)
                records, offsets[i] = _read_new(result_paths[i], offsets[i])
                complete = scheduler.finish(job, float(words[2]), records, steps)
                log(f"w{i} " + ("JOB " if complete else "CUT ") + job_line(job, records, float(words[2])))
                if after_job is not None:
                    after_job()
            if words[0] in ("READY", "DONE"):
                idle.append(i)
        for j, p in procs.items():  # a worker that died mid-job: its job is over, incomplete
            if p.poll() is not None and j in assigned and lines.empty():
                job = assigned.pop(j)
                scheduler.finish(job, 0.0, [], steps)
                log(f"w{j} died (exit {p.returncode}) during {job}")
        dispatch()
        if kill_at is not None and time.time() > kill_at and not killed:
            killed = True
            for j, p in procs.items():
                if p.poll() is None:
                    log(f"stop time: terminating worker {j} (pid {p.pid})")
                    p.terminate()
    for p in procs.values():
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return {i: p.returncode for i, p in procs.items()}


def _read_new(path: str, offset: int) -> tuple[list[dict], int]:
    """Records appended to ``path`` since byte ``offset`` (whole lines only), and the new offset."""
    if not os.path.exists(path):
        return [], offset
    with open(path) as fh:
        fh.seek(offset)
        text = fh.read()
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)


def _pump(worker: int, stream, log_path: str, lines: queue.Queue) -> None:
    """Copy a worker's output to its log; queue its protocol lines (split into words)."""
    with open(log_path, "a") as log:
        for line in stream:
            log.write(line)
            log.flush()
            if line.startswith(PROTOCOL):
                lines.put((worker, line[len(PROTOCOL):].split()))


# ------------------------------------------------------------------------------------------------ probe
def solo_probe(policy, base, mus: Sequence[int], steps: int, *, compiled: Callable[[int], Sequence[str]], arm: str,
               log) -> dict:
    """Throughput with nothing else running: ``steps`` RL steps of ``arm`` at each mu, evaluated at the first and
    last step. Step 0 includes the compilations (first_step_s, first_eval_s); the medians are over the later steps.
    Also fills the persistent compilation cache, if one is set."""
    out = {}
    for mu in mus:
        t = time.perf_counter()
        records = run_job(policy, base, Job(arm, mu, 10_000), compiled=compiled(mu), steps=steps, eval_every=steps)
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


def job_seconds(probe: dict | None, steps: int, eval_every: int):
    """mu -> a job's solo duration (s) from the probe: steps x step_s + evaluations x eval_s (None without)."""
    if not probe:
        return None
    evals = steps // eval_every + 1 + (steps % eval_every > 0)

    def cost(mu):
        p = probe.get(f"mu{mu}") or next(iter(probe.values()))
        return steps * p["step_s"] + evals * p["eval_s"]
    return cost


# ------------------------------------------------------------------------------------------------ carrying a policy
def pack_directory(directory: str, prefix: str, part_bytes: int = 15 << 20) -> list[str]:
    """``directory`` as a tar split into parts of at most ``part_bytes``: prefix.part_000, ... (to carry a policy
    between device calls whose files must stay small). Returns the part paths."""
    tar_path = prefix + ".partial"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(directory, arcname=os.path.basename(os.path.normpath(directory)))
    for old in glob.glob(prefix + ".part_*"):
        os.remove(old)
    parts = []
    with open(tar_path, "rb") as src:
        while chunk := src.read(part_bytes):
            parts.append(f"{prefix}.part_{len(parts):03d}")
            with open(parts[-1], "wb") as dst:
                dst.write(chunk)
    os.remove(tar_path)
    return parts


def unpack_directory(prefix: str, destination: str) -> str:
    """The directory packed by ``pack_directory(directory, prefix)``, extracted under ``destination``. Returns its
    path."""
    parts = sorted(glob.glob(prefix + ".part_*"))
    if not parts:
        raise FileNotFoundError(f"no parts {prefix}.part_*")
    os.makedirs(destination, exist_ok=True)
    tar_path = os.path.join(destination, "unpack.tar")
    with open(tar_path, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst)
    with tarfile.open(tar_path) as tar:
        names = {m.name.split("/")[0] for m in tar.getmembers()}
        tar.extractall(destination, filter="data")
    os.remove(tar_path)
    (name,) = names
    return os.path.join(destination, name)
