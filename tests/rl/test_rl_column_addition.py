"""Column addition (m1jax/rl/tasks/column_addition.py): prompts, verifier, teacher and decision points against hand
worked examples and against independent column arithmetic."""
import numpy as np
import pytest

from m1jax.rl.task import decision_masks, encode_prompts
from m1jax.rl.tasks import CharTokenizer, ColumnAdditionTask, ColumnSum

TOK = CharTokenizer()
TASK = ColumnAdditionTask(min_digits=3, max_digits=8)


def _ids(text, eos=True):
    return TOK.encode(text) + ([TOK.EOS] if eos else [])


def test_prompt_is_aligned_columns_and_answer_is_reversed_sum():
    p = ColumnSum((159, 263), width=4)
    assert p.prompt == "9510+3620=" and p.answer == "224" and p.digits == 3
    task = ColumnAdditionTask(min_digits=3, max_digits=4)
    assert task.prompt(p) == [TOK.BOS] + TOK.encode("9510+3620=")
    assert task.max_prompt_tokens == 11 and task.max_new_tokens == 6
    three = ColumnSum((999, 999, 999), width=3)
    assert three.prompt == "999+999+999=" and three.answer == "7992"  # 2997
    tokens, start = encode_prompts(task, [p, ColumnSum((12, 34), width=4)])
    # Every prompt of the task has the same length: no left padding, answer columns at fixed offsets.
    assert tokens.shape == (2, 11) and start.tolist() == [0, 0]


def test_reward_verifies_completions():
    p = ColumnSum((159, 263), width=8)
    assert TASK.reward(p, _ids("224") + [TOK.PAD] * 3) == 1.0
    assert TASK.reward(p, _ids("224") + _ids("9")) == 1.0
    for wrong in (_ids("214"), _ids("224", eos=False), _ids("422"), _ids("2240"), _ids(""), [TOK.BOS] + _ids("224")):
        assert TASK.reward(p, wrong) == 0.0, wrong
    assert ColumnAdditionTask(format_reward=0.1).reward(p, _ids("214")) == 0.1


def _columns(problem):
    """Independent reference: carries by integer arithmetic on prefixes (carry into column j = the sum of the
    operands' lowest j digits, divided by 10^j)."""
    answer = problem.answer
    return np.array([sum(x % 10 ** j for x in problem.operands) // 10 ** j > 0 for j in range(len(answer))])


@pytest.mark.parametrize("operands", [2, 3])
def test_carry_positions_match_integer_arithmetic(operands):
    task = ColumnAdditionTask(operands=operands, min_digits=1, max_digits=6)
    for p in task.sample(np.random.default_rng(operands), 300):
        np.testing.assert_array_equal(task.carry_in(p), _columns(p), err_msg=str(p))


def test_teacher_by_hand():
    forgetful = ColumnAdditionTask(forget_prob=1.0)
    rng = np.random.default_rng(0)
    # 159 + 263: 9+3 = 12 (write 2, carry); 5+6+1 = 12 (forgot: 1); 1+2+1 = 4 (forgot: 3).
    assert forgetful.teacher_answer(ColumnSum((159, 263), 8), rng) == "213"
    # 999 + 999 + 999: columns 27, 27 + 2, 27 + 2, final carry 2: forgetting writes 7, 7, 7 and drops the carry.
    three = ColumnAdditionTask(operands=3, forget_prob=1.0)
    assert three.teacher_answer(ColumnSum((999, 999, 999), 8), rng) == "777"
    assert ColumnAdditionTask(forget_prob=0.0).teacher_answer(ColumnSum((999, 999, 999), 8), rng) == "7992"


def test_teacher_accuracy_is_one_minus_p_to_the_carries():
    rng = np.random.default_rng(2)
    problems = TASK.sample(rng, 3000)
    assert {p.digits for p in problems} == set(range(3, 9))
    correct = np.array([TASK.teacher_answer(p, rng) == p.answer for p in problems])
    q = (1.0 - TASK.forget_prob) ** np.array([TASK.carry_in(p).sum() for p in problems])
    se = np.sqrt(np.sum(q * (1 - q))) / len(q)
    assert abs(correct.mean() - q.mean()) < 4 * se, (correct.mean(), q.mean(), se)
    assert 0.05 < q.mean() < 0.2  # the designed starting accuracy


def test_decision_mask_marks_carry_positions_up_to_the_end():
    p = ColumnSum((159, 263), 8)  # answer 224, carries into positions 1 and 2
    n = TASK.max_new_tokens
    right = np.array(_ids("224") + [TOK.PAD] * (n - 4))
    np.testing.assert_array_equal(TASK.decision_mask(p, right), [0, 1, 1] + [0] * (n - 3))
    early = np.array(_ids("2") + [TOK.PAD] * (n - 2))  # EOS at a fork (marked), the later fork never reached
    np.testing.assert_array_equal(TASK.decision_mask(p, early), [0, 1] + [0] * (n - 2))
    # 999 + 1 = 1000: the final carry digit is a fork; EOS written in its place is the wrong branch, still marked.
    q = ColumnSum((999, 101), 8)  # 1100: columns 10, 9 + 1, 9 + 1, final carry 1
    short = np.array(_ids("001") + [TOK.PAD] * (n - 4))
    np.testing.assert_array_equal(TASK.decision_mask(q, short), [0, 1, 1, 1] + [0] * (n - 4))
    masks = decision_masks(TASK, [p, q], np.stack([right, short]))
    assert masks.shape == (2, n) and masks.sum() == 5
    assert TASK.reference_completion(q) == _ids("0011")


def test_sft_batch_is_the_teacher():
    tokens, target = TASK.sft_batch(np.random.default_rng(6), 64)
    assert tokens.shape == (64, TASK.max_prompt_tokens + TASK.max_answer_tokens)
    for row, m in zip(tokens, target):
        prompt, answer = TOK.decode(row).split("=")
        operands = tuple(int(x[::-1]) for x in prompt.split("+"))
        assert TOK.decode(row[m]) == answer and row[m][-1] == TOK.EOS
        p = ColumnSum(operands, TASK.max_digits)
        if answer != p.answer:
            assert TASK.carry_in(p).any()
