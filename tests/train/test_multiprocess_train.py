"""experiments.train as two processes (4 fake CPU devices each, joined through jax.distributed) against one process
with 8 devices on the same data=4,expert=2 mesh: the same per-step losses; a SIGTERM to one process stops both after
the same step with that step saved by both (each process its own rows' data state); resuming both, or resuming as
one process, continues with the losses of the uninterrupted run."""
import shutil
import signal

import pytest

from m1jax.checkpoint import decode_data_state, saved_steps
from tests.train import launch

ARGS = [*launch.TINY, "--batch=8", "--steps=6", "--save_every=100", "--mesh=data=4,expert=2",
        "--data=synthetic:add"]


def test_two_processes_match_one_and_resume(tmp_path):
    cache = f"--compilation_cache={tmp_path / 'xla_cache'}"
    one = launch.start(tmp_path / "one", *ARGS, cache, devices=8)
    launch.finish([one])
    reference = launch.losses(tmp_path / "one")
    assert [s for s, _, _ in reference] == list(range(1, 7))

    work = tmp_path / "two"
    procs = launch.start_processes(work, *ARGS, cache, "--pause_at_step=3", processes=2, devices=4)
    try:
        for p in procs:
            launch.wait_for(p, "PAUSED at step 3")
        procs[1].send_signal(signal.SIGTERM)  # one process is preempted: both must stop after step 3
    except BaseException:
        for p in procs:
            p.kill()
        raise
    outs = launch.finish(procs)
    assert all("saving step 3" in out for out in outs), outs[0][-2000:]
    assert saved_steps(work / "checkpoints") == [3]
    files = [work / "checkpoints" / "3" / "data" / f"process_{i}.json" for i in range(2)]
    rows = [decode_data_state(f.read_text(), f)["rows"] for f in files]
    assert sorted(rows[0]) == ["0", "1", "2", "3"] and sorted(rows[1]) == ["4", "5", "6", "7"]
    shutil.copytree(work, tmp_path / "mixed")

    launch.finish(launch.start_processes(work, *ARGS, cache, "--resume", processes=2, devices=4))
    # the same checkpoint resumed by one process with 8 devices: it reads both processes' rows
    launch.finish([launch.start(tmp_path / "mixed", *ARGS, cache, "--resume", devices=8)])
    for resumed in (work, tmp_path / "mixed"):
        got = launch.losses(resumed)
        assert [s for s, _, _ in got] == list(range(1, 7))  # steps 1-3, then 4-6 after the resume: none repeated
        for (step, loss, gnorm), (_, want_loss, want_gnorm) in zip(got, reference):
            # cross-process collectives (gloo) may sum in another order than in-process ones: float32 rounding
            assert loss == pytest.approx(want_loss, rel=1e-5), (resumed, step)
            assert gnorm == pytest.approx(want_gnorm, rel=1e-5), (resumed, step)
