"""Arithmetic tasks: tokenizer, verifier and the imperfect teacher (m1jax/rl/tasks/arithmetic.py)."""
import numpy as np
import pytest

from m1jax.rl.tasks import (ArithmeticTask, CharTokenizer, Problem, batch_rewards, encode_prompts,
                            teacher_sft_batch)

TOK = CharTokenizer()
ADD = ArithmeticTask(op="+")
MUL = ArithmeticTask(op="*")


def _ids(text, eos=True):
    return TOK.encode(text) + ([TOK.EOS] if eos else [])


def test_tokenizer():
    assert TOK.vocab_size == 16
    assert (TOK.PAD, TOK.BOS, TOK.EOS) == (0, 1, 2)
    assert TOK.encode("09+*=") == [3, 12, 13, 14, 15]
    assert TOK.decode([TOK.BOS] + TOK.encode("12+3=") + [TOK.EOS] + TOK.encode("99")) == "12+3="
    with pytest.raises(ValueError, match="not in the vocabulary"):
        TOK.encode("1-2")


def test_answers_are_reversed_results():
    assert Problem(159, 263, "+").answer == "224"      # 422
    assert Problem(999, 1, "+").answer == "0001"       # 1000
    assert Problem(4524, 4, "*").answer == "69081"     # 18096
    assert Problem(159, 263, "+").prompt == "159+263="


@pytest.mark.parametrize("task", [ADD, MUL])
def test_reward_verifies_completions(task):
    problem = Problem(159, 263, "+") if task.op == "+" else Problem(4524, 4, "*")
    right = problem.answer
    wrong = str((int(right[0]) + 1) % 10) + right[1:]
    assert task.reward(problem, _ids(right), TOK) == 1.0
    assert task.reward(problem, _ids(right) + [TOK.PAD, TOK.PAD], TOK) == 1.0  # padding after EOS is ignored
    assert task.reward(problem, _ids(right) + _ids("7"), TOK) == 1.0            # so is anything after EOS
    assert task.reward(problem, _ids(wrong), TOK) == 0.0
    assert task.reward(problem, _ids(right, eos=False), TOK) == 0.0             # truncated: no EOS
    assert task.reward(problem, _ids(right[::-1]), TOK) == 0.0                  # most-significant first
    assert task.reward(problem, _ids(right + "0"), TOK) == 0.0
    assert task.reward(problem, _ids(""), TOK) == 0.0
    assert task.reward(problem, [TOK.BOS] + _ids(right), TOK) == 0.0
    assert task.reward(problem, _ids(right[:1] + "+" + right[2:]), TOK) == 0.0
    formatted = ArithmeticTask(op=task.op, format_reward=0.1)
    assert formatted.reward(problem, _ids(wrong), TOK) == 0.1                  # well-formed, right length
    assert formatted.reward(problem, _ids(right + "0"), TOK) == 0.0            # wrong length
    assert formatted.reward(problem, _ids("1+2"), TOK) == 0.0                  # not digits


def test_batch_rewards():
    problems = [Problem(12, 34, "+"), Problem(50, 50, "+")]
    completions = np.array([_ids("64") + [0, 0], _ids("0002")])
    np.testing.assert_array_equal(batch_rewards(ADD, problems, completions, TOK), [1.0, 0.0])


def test_teacher_by_hand():
    exact, forgetful = ArithmeticTask(op="+", forget_prob=0.0), ArithmeticTask(op="+", forget_prob=1.0)
    rng = np.random.default_rng(0)
    # 159 + 263: 9+3 = 12 (write 2, carry); 5+6+1 = 12 (forgot: 1); 1+2+1 = 4 (forgot: 3).
    p = Problem(159, 263, "+")
    assert exact.teacher_answer(p, rng) == "224"
    assert forgetful.teacher_answer(p, rng) == "213"
    np.testing.assert_array_equal(ADD.carry_in(p), [False, True, True])
    # 999 + 1 = 1000: columns 10, 9, 9; each later column writes 9 without its carry; the final carry is dropped.
    assert forgetful.teacher_answer(Problem(999, 1, "+"), rng) == "099"
    # 4524 * 4: columns 16, 8, 20, 16 with carries 0, 1, 0, 2, then the final carry 1.
    p = Problem(4524, 4, "*")
    mul_forgetful = ArithmeticTask(op="*", forget_prob=1.0)
    assert mul_forgetful.teacher_answer(p, rng) == "6806"
    np.testing.assert_array_equal(MUL.carry_in(p), [False, True, False, True, True])


@pytest.mark.parametrize("task", [ADD, MUL])
def test_teacher_errors_are_local_forgotten_carries(task):
    """With forget_prob = 1, every carry-in digit is written without its carry and every other digit is exact."""
    forgetful = ArithmeticTask(op=task.op, forget_prob=1.0)
    rng = np.random.default_rng(1)
    for p in task.sample(rng, 200):
        exact, written, carry = p.answer, forgetful.teacher_answer(p, rng), task.carry_in(p)
        a_digits = [int(c) for c in str(p.a)[::-1]]
        for i, d in enumerate(written):
            if carry[i]:
                b_digit = int(str(p.b)[::-1][i]) if task.op == "+" and i < len(str(p.b)) else 0
                column = a_digits[i] + b_digit if task.op == "+" else a_digits[i] * p.b
                assert int(d) == column % 10, (p, written)
            else:
                assert d == exact[i], (p, written)
        assert len(written) == len(exact) - int(len(exact) > len(a_digits) and carry[-1])


@pytest.mark.parametrize("task", [ADD, MUL])
def test_teacher_accuracy_is_one_minus_p_to_the_carries(task):
    """P(teacher exact) = (1 - p)^#carries; checked within 4 standard errors on 3000 problems (fixed seed)."""
    rng = np.random.default_rng(2)
    problems = task.sample(rng, 3000)
    correct = np.array([task.teacher_answer(p, rng) == p.answer for p in problems])
    carries = np.array([task.carry_in(p).sum() for p in problems])
    q = (1.0 - task.forget_prob) ** carries
    se = np.sqrt(np.sum(q * (1 - q))) / len(q)
    assert abs(correct.mean() - q.mean()) < 4 * se, (correct.mean(), q.mean(), se)
    assert 0.02 < q.mean() < 0.5  # mixed enough to give mixed groups of 16 before tuning
    # Per carry position the teacher forgets with probability p (compare positions that exist in both strings).
    forgot = total = 0
    for p in problems[:1000]:
        written, carry = task.teacher_answer(p, rng), task.carry_in(p)
        for i, c in enumerate(carry[:len(p.answer) - 1]):
            if c:
                total += 1
                forgot += written[i] != p.answer[i]
    rate = forgot / total
    p_forget = task.forget_prob
    assert abs(rate - p_forget) < 4 * np.sqrt(p_forget * (1 - p_forget) / total), (rate, total)


def test_sampling_ranges_and_determinism():
    problems = ADD.sample(np.random.default_rng(3), 500)
    assert {len(str(p.a)) for p in problems} == set(range(3, 9))
    assert all(len(str(p.a)) == len(str(p.b)) for p in problems)
    assert ADD.sample(np.random.default_rng(3), 500) == problems
    mul = MUL.sample(np.random.default_rng(4), 500)
    assert {p.b for p in mul} == set(range(2, 10))
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    assert [ADD.teacher_answer(p, r1) for p in problems] == [ADD.teacher_answer(p, r2) for p in problems]


def test_encode_prompts_left_padded():
    problems = [Problem(12, 34, "+"), Problem(1234, 5678, "+")]
    tokens, lengths = encode_prompts(problems, TOK)
    np.testing.assert_array_equal(lengths, [7, 11])
    np.testing.assert_array_equal(tokens[0], [0] * 4 + [TOK.BOS] + TOK.encode("12+34="))
    assert TOK.decode(tokens[1]) == "1234+5678="
    assert encode_prompts(problems, TOK, length=ADD.max_prompt_tokens)[0].shape == (2, ADD.max_prompt_tokens)
    right, _ = encode_prompts(problems, TOK, side="right")
    np.testing.assert_array_equal(right[0], [TOK.BOS] + TOK.encode("12+34=") + [0] * 4)
    with pytest.raises(ValueError, match="does not fit"):
        encode_prompts(problems, TOK, length=8)


@pytest.mark.parametrize("task", [ADD, MUL])
def test_teacher_sft_batch(task):
    tokens, target = teacher_sft_batch(task, TOK, np.random.default_rng(6), 64)
    assert tokens.shape == target.shape == (64, task.max_prompt_tokens + task.max_answer_tokens)
    for row, m in zip(tokens, target):
        assert row[0] == TOK.BOS
        text = TOK.decode(row)
        prompt, answer = text.split("=")
        a, b = prompt.split(task.op)
        targets = row[m]
        assert targets[-1] == TOK.EOS and TOK.decode(targets) == answer
        # The target starts right after '=' and is the teacher's (possibly carry-forgetting) answer.
        assert row[np.argmax(m) - 1] == TOK.encode("=")[0]
        problem = Problem(int(a), int(b), task.op)
        if answer != problem.answer:
            assert task.carry_in(problem).any()
