"""``python -m tests.train.slow_saves <experiments.train flags>``: the trainer with a drill in every checkpoint save.

Each process's part of a save announces itself on stdout (``SAVE IN FLIGHT <step directory>``, the orbax temporary
directory the step is written into) and then waits ``SLOW_SAVE_SECONDS`` (environment, default 1) before the step
can be finalised, so a test can signal or kill the trainer while a save is certainly incomplete.
"""
import asyncio
import os
import sys

import orbax.checkpoint as ocp
from absl import app

from experiments import train
from m1jax import checkpoint

SECONDS = float(os.environ.get("SLOW_SAVE_SECONDS", "1"))
_save = checkpoint.ProcessJsonHandler.async_save


async def _announced_slow_save(self, directory, item=None, args=None):
    async def announce_and_wait():
        # One write for the whole line: print writes the text and its newline separately, and the training loop's
        # progress line, written from the main thread in between, then ran into this one.
        sys.stdout.write(f"SAVE IN FLIGHT {directory.parent}\n")
        sys.stdout.flush()
        await asyncio.sleep(SECONDS)

    futures = await _save(self, directory, item, args)
    return [ocp.future.CommitFutureAwaitingContractedSignals(announce_and_wait(), name="slow_save_drill"), *futures]


checkpoint.ProcessJsonHandler.async_save = _announced_slow_save

if __name__ == "__main__":
    app.run(train.main)
