"""The `digits` task (multi-digit addition/subtraction, least significant digit first) and its checker."""

import pytest

from model.errors import ConfigError
from rewards import load_reward
from rl.grpo.tasks import DigitsTask, digit_credit, exact_digits, make_task, rev


def parse(prompt: str) -> tuple[int, str, int]:
    """'036-3=' -> (630, '-', 3): the prompt's operands read back in the usual order."""
    body = prompt.rstrip("=")
    op = "+" if "+" in body else "-"
    a, b = body.split(op)
    return int(a[::-1]), op, int(b[::-1])


def test_rows_are_correct_and_reversed():
    t = DigitsTask(seed=0, min_digits=1, max_digits=3)
    ops = set()
    for i in range(500):
        r = t.row("train", i)
        a, op, b = parse(r["prompt"])
        ops.add(op)
        assert 0 <= a < 1000 and 0 <= b < 1000
        if op == "-":
            assert a >= b
        ans = a + b if op == "+" else a - b
        assert r["answer"] == rev(ans) == str(ans)[::-1]
        assert r["expression"] == f"{a}{op}{b}={ans}"
        assert not r["prompt"].split(op)[0].endswith("0") or a == 0   # no leading zeros (reversed: trailing)
    assert ops == {"+", "-"}
    assert rev(570) == "075"


def test_deterministic_per_seed_split_index():
    t, same, other = DigitsTask(seed=3), DigitsTask(seed=3), DigitsTask(seed=4)
    assert [t.row("train", i) for i in range(50)] == [same.row("train", i) for i in range(50)]
    assert [t.row("eval", i) for i in range(50)] == t.rows("eval", 0, 50)
    assert [t.row("train", i)["prompt"] for i in range(50)] != [other.row("train", i)["prompt"] for i in range(50)]
    assert t.row("train", 7) != t.row("eval", 7)


def test_eval_problems_never_appear_in_training():
    t = DigitsTask(seed=1, min_digits=1, max_digits=2)     # small space: collisions would show
    train = {t.row("train", i)["expression"] for i in range(4000)}
    held = {t.row("eval", i)["expression"] for i in range(600)}
    assert train and held and not (train & held)
    assert all(t.held_out(*parse(t.row("eval", i)["prompt"])) for i in range(100))
    frac = sum(t.held_out(a, "+", b) for a in range(100) for b in range(100)) / 10_000
    assert 0.07 < frac < 0.13                                # about eval_fraction


def test_digit_counts_cover_the_range_and_eval_digits():
    t = DigitsTask(seed=0, min_digits=2, max_digits=3, eval_digits=(4, 4))
    lens = {len(str(parse(t.row("train", i)["prompt"])[0])) for i in range(300)}
    assert lens == {2, 3}
    for i in range(50):
        a, _, b = parse(t.row("eval", i)["prompt"])
        assert len(str(a)) == 4 and len(str(b)) == 4
    default_eval = DigitsTask(seed=0, min_digits=2, max_digits=3)
    assert {len(str(parse(default_eval.row("eval", i)["prompt"])[0])) for i in range(200)} == {2, 3}


def test_exact_digits_compares_digit_strings():
    assert exact_digits("", "975", answer="975") == 1.0
    assert exact_digits("", " 975<|endoftext|>", answer="975") == 1.0
    assert exact_digits("", "975 and more", answer="975") == 1.0
    assert exact_digits("", "75", answer="075") == 0.0        # the math reward would read 75 == 075
    assert exact_digits("", "0750", answer="075") == 0.0
    assert exact_digits("", "x975", answer="975") == 0.0
    assert exact_digits("", "", answer="0") == 0.0
    fn = load_reward("rl.grpo.tasks:exact_digits")                 # the spec the demo config uses
    assert fn(["1+1="] * 2, ["2", "3"], [{"answer": "2", "id": "a"}, {"answer": "2", "id": "b"}]) == [1.0, 0.0]


def test_digit_credit_is_partial_below_one_and_one_only_when_exact():
    assert digit_credit("", "975", answer="975") == 1.0
    assert digit_credit("", "976", answer="975") == pytest.approx(0.5 * 2 / 3)    # places 1, 2 right
    assert digit_credit("", "075", answer="975") == pytest.approx(0.5 * 2 / 3)
    assert digit_credit("", "9750", answer="975") == pytest.approx(0.5 * 3 / 4)   # an extra digit costs
    assert digit_credit("", "97", answer="975") == pytest.approx(0.5 * 2 / 3)
    assert digit_credit("", "abc", answer="975") == 0.0
    assert max(digit_credit("", c, answer="975") for c in ("97", "9751", "976", "", "0")) < 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(ops="*"), "ops"),
    (dict(min_digits=3, max_digits=2), "min_digits"),
    (dict(max_digits=0), "min_digits"),
    (dict(eval_fraction=1.0), "eval_fraction"),
    (dict(eval_digits=(0, 2)), "eval_digits"),
    (dict(eval_digits=(3,)), "eval_digits"),
    (dict(digitz=3), "digitz"),
])
def test_bad_kwargs_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_task("digits", seed=0, **kwargs)


def test_arithmetic_task_still_available():
    assert make_task("arithmetic", seed=0, max_operand=9).row("train", 0)["prompt"].endswith("=")
    with pytest.raises(ConfigError, match="digits"):
        make_task("nope")
