"""The Trainer in-process: evaluation hooks run on the steps ``eval_every`` names with the state of that step, and
the built-in held-out loss equals the full-logits loss of the final parameters on the held-out batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax import data as D
from m1jax.checkpoint import saved_steps
from m1jax.metrics import read_metrics
from m1jax.train import Trainer, resolve_configs
from m1jax.train.loop import EVAL_SEED_OFFSET


def test_hooks_and_held_out_loss(tmp_path):
    sections = resolve_configs(tmp_path, resume=False, overrides=[
        "num_hidden_layers=2", "hidden_size=32", "intermediate_size=32", "vocab_size=32", "run.steps=4",
        "train.total_steps=4", "run.batch=8", "run.eval_every=2", "run.eval_data=synthetic:mul",
        "run.eval_batches=1", "run.seed=3"])
    seen = []

    def probe(state):
        seen.append(int(state.step))
        return {"step": int(state.step)}

    lines = []
    trainer = Trainer(sections["model"], sections["train"], sections["run"], tmp_path, evaluators={"probe": probe},
                      log=lines.append)
    state = trainer.fit()
    assert seen == [2, 4]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert ("probe/step" in r) == (r["step"] % 2 == 0) and r.get("probe/step", r["step"]) == r["step"]
        assert ("eval/loss" in r) == (r["step"] % 2 == 0)
    assert any("eval/loss" in line for line in lines)
    assert saved_steps(tmp_path / "checkpoints") == [4]

    # the held-out batch: the eval data's first batch, seeded apart from the training stream
    held_out = next(D.BatchLoader(D.make_source("synthetic:mul", trainer.seq_len, 3 + EVAL_SEED_OFFSET), 8))
    model = nnx.merge(trainer.graphdef, jax.device_get(state.params))
    logits = model(jnp.asarray(held_out["inputs"]), jnp.asarray(held_out["positions"]),
                   jnp.asarray(held_out["segment_ids"])).logits
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    nll = -np.take_along_axis(logp, held_out["targets"][..., None], -1)[..., 0]
    want = (nll * held_out["loss_mask"]).sum() / held_out["loss_mask"].sum()
    assert records[-1]["eval/loss"] == pytest.approx(want, rel=1e-5)
