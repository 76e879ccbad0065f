"""experiments/rl.py's flags -> configs: the flags fill the common fields, ``--set section.key=value`` reaches any
field of every section, and a bad key or value is an error naming it."""
import pytest
from absl import flags

from experiments import rl
from m1jax.config import ConfigError


@pytest.fixture
def parse():
    def run(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["experiments.rl", *argv])
        task = rl.make_task()
        return task, rl.configs_from_flags(task)
    yield run
    flags.FLAGS.unparse_flags()


def test_flags_and_set_reach_every_section(parse):
    task, c = parse("--loss=cispo_masked", "--mu=2", "--ratio_max=3", "--max_digits=3", "--hidden=32", "--rl_steps=7",
                    "--set", "update.old_logp=trainer", "--set", "rollout.temperature=0.5",
                    "--set", "model.num_local_experts=8", "--set", "rl.eval_seed=4", "--set", "sft.weight_decay=0",
                    "--set", "update.eps_high=0.3", "--set", "rollout.max_new_tokens=9")
    assert sorted(c) == ["model", "rl", "rollout", "sft", "update"]
    assert (c["update"].loss, c["update"].mu, c["update"].old_logp, c["update"].eps_high) == (
        "cispo_masked", 2, "trainer", 0.3)
    assert c["update"].ratio_max == 3.0 and c["update"].knobs == {"ratio_max": 3.0, "eps_high": 0.3}
    assert (c["rollout"].temperature, c["rollout"].max_new_tokens, c["rollout"].group_size) == (0.5, 9, 8)
    assert (c["model"].num_local_experts, c["model"].hidden_size, c["model"].vocab_size) == (8, 32, task.vocab_size)
    assert c["model"].max_position_embeddings == task.max_prompt_tokens + task.max_new_tokens
    assert (c["rl"].eval_seed, c["rl"].steps, c["rl"].adv_norm, c["rl"].dynamic_sampling) == (4, 7, None, None)
    assert c["rl"].resolved("dapo").dynamic_sampling and c["rl"].resolved("drgrpo").adv_norm == "mean_only"
    assert c["sft"].weight_decay == 0.0 and task.max_digits == 3


def test_bad_settings_are_named(parse):
    with pytest.raises(ConfigError, match="unknown section 'updates'"):
        parse("--set", "updates.mu=2")
    with pytest.raises(ConfigError, match="old_logp"):
        parse("--set", "update.old_logp=teacher")
    with pytest.raises(ConfigError, match="dapo.*ratio_max"):  # a knob the loss does not take
        parse("--loss=dapo", "--ratio_max=2")
    with pytest.raises(ConfigError, match="RLConfig.prompts"):
        parse("--prompts=0")


def test_task_flag_picks_column_addition(parse):
    from absl import app

    from m1jax.rl.tasks import ArithmeticTask, ColumnAdditionTask
    task, c = parse("--task=column_addition", "--operands=3", "--min_digits=2", "--max_digits=5", "--forget_prob=0.5")
    assert task == ColumnAdditionTask(operands=3, min_digits=2, max_digits=5, forget_prob=0.5)
    assert c["model"].max_position_embeddings == task.max_prompt_tokens + task.max_new_tokens == 1 + 3 * 6 + 7
    assert isinstance(parse()[0], ArithmeticTask)  # the default: the README demo's task
    with pytest.raises(app.UsageError, match="operands must be in 2..9"):
        parse("--task=column_addition", "--operands=12")
