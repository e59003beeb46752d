"""The math built-in: answer extraction, equivalence tables, adversarial completions."""

import os
import time

import pytest

from rewards import RewardPool, load_reward
from rewards.builtin import mathparse as mp
from rewards.builtin.math_answer import extract_answer, gold_answer, is_equiv

EQUAL = [
    ("0.5", "1/2"), ("0.5", "\\frac{1}{2}"), ("\\frac12", "1/2"), ("\\dfrac{3}{4}", "0.75"),
    ("\\tfrac{6}{8}", "3/4"), ("50%", "0.5"), ("50\\%", "\\frac{1}{2}"), ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}"), ("x+1", "1+x"), ("(x+1)^2", "x^2+2x+1"), ("2x", "x \\cdot 2"),
    ("3", "3.0"), ("1,000", "1000"), ("1,234,567", "1234567"), ("-\\frac{1}{3}", "-1/3"),
    ("\\sqrt[3]{27}", "3"), ("2^{10}", "1024"), ("10^{-3}", "0.001"), ("\\pi/2", "\\frac{\\pi}{2}"),
    ("\\left(1, 2\\right)", "(1,2)"), ("x = 5", "5"), ("5 \\text{ cm}", "5"), ("$42$", "42"),
    ("90^\\circ", "90"), ("3 \\times 4", "12"), ("12 \\div 4", "3"), ("0.333333333", "1/3"),
    ("(A)", "A"), ("\\$1,500", "1500"), ("−7", "-7"), ("2xy", "2yx"), ("\\text{Monday}", "monday"),
    ("12 cm", "12"), ("5 square meters", "5"), ("2 x", "2x"),
]
NOT_EQUAL = [
    ("3", "4"), ("1000000", "1000001"), ("x+1", "x-1"), ("0.5", "0.51"), ("(1,2)", "(2,1)"), ("2\\sqrt{2}", "\\sqrt{7}"),
    ("1,2", "12"), ("x^2", "x"), ("\\frac{1}{2}", "2"), ("-3", "3"), ("(1,2)", "(1,2,3)"),
    ("10**10**10", "10^10"), ("9^9^9^9", "9"), ("A", "B"), ("", "0"), ("cat", "act"), ("2xy", "2x"),
]


@pytest.mark.parametrize("a,b", EQUAL)
def test_equal_pairs(a, b):
    assert is_equiv(a, b)
    assert is_equiv(b, a)


@pytest.mark.parametrize("a,b", NOT_EQUAL)
def test_unequal_pairs(a, b):
    assert not is_equiv(a, b)
    assert not is_equiv(b, a)


def test_percent_modes():
    assert is_equiv("50%", "50", percent="either") and is_equiv("50%", "0.5", percent="either")
    assert is_equiv("50%", "50", percent="strip") and not is_equiv("50%", "0.5", percent="strip")
    assert is_equiv("50%", "0.5", percent="fraction") and not is_equiv("50%", "50", percent="fraction")


def test_relative_tolerance_is_configurable():
    assert is_equiv("3.14159", "\\pi", rel_tol=1e-5)
    assert not is_equiv("3.14", "\\pi", rel_tol=1e-6)


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{\\sqrt{2}}} done", "\\frac{1}{\\sqrt{2}}"),
    ("first \\boxed{1} then \\boxed{ {2} + 1 }", "{2} + 1"),
    ("unbalanced \\boxed{3} and \\boxed{4", "3"),
    ("\\boxed 7 is it", "7"),
    ("work\n#### 1,234\n", "1,234"),
    ("<think>2</think><answer> 17 </answer>", "17"),
    ("<answer>the value \\boxed{9}</answer>", "9"),
    ("we get 3, then -4.5 at the end", "-4.5"),
    ("ratio 3/4", "3/4"),
    ("no digits here", None),
])
def test_extraction(text, expected):
    assert extract_answer(text) == expected


def test_extraction_order_is_configurable():
    text = "<answer>5</answer> but \\boxed{6} and finally 7"
    assert extract_answer(text) == "6"
    assert extract_answer(text, ("answer_tag", "boxed")) == "5"
    assert extract_answer(text, ("last_number",)) == "7"
    assert extract_answer("nothing boxed 3", ("boxed",)) is None


def test_gold_answer_forms():
    assert gold_answer("Natalia sold 48 clips... #### 72") == "72"
    assert gold_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert gold_answer(3.5) == "3.5"


def test_math_reward_scores_and_options():
    fn = load_reward("math")
    assert fn(["p"] * 3, ["\\boxed{0.5}", "\\boxed{3}", "no answer"], [{"answer": "1/2"}] * 3) == [1.0, 0.0, 0.0]
    fn = load_reward("math", correct=2.0, wrong=-1.0, no_answer=-0.5, answer_field="solution")
    assert fn(["p"] * 3, ["\\boxed{2}", "\\boxed{3}", "hmm"], [{"solution": "#### 2"}] * 3) == [2.0, -1.0, -0.5]
    with pytest.raises(KeyError, match="answer"):
        load_reward("math")(["p"], ["\\boxed{1}"], [{"solution": "1"}])


def test_parser_rejects_unknown_input_and_bounds():
    for bad in ["__import__('os')", "os.remove", "x;y", "\\input{/etc/passwd}", "lambda: 0", "a.b"]:
        with pytest.raises(mp.ParseError):
            mp.parse(mp.normalize(bad))
    with pytest.raises(mp.ParseError, match="too deep"):
        mp.parse("(" * 60 + "1" + ")" * 60)
    with pytest.raises(mp.ParseError, match="longer"):
        mp.parse("1+" * 200 + "1")
    for huge in ["10^(10^10)", "9^9^9^9", "2^2^2^2^2^2"]:
        with pytest.raises(mp.TooLarge):
            mp.check_size(mp.parse(huge))
    assert mp.exact(mp.parse("2^100")) == 2 ** 100   # big but bounded powers stay exact
    with pytest.raises(mp.ParseError, match="text"):
        mp.parse("exec(1)")                                  # words are text, never names to look up
    assert mp.symbols(mp.parse("xy(1)")) == {"x", "y"}     # short letter runs are variables


ADVERSARIAL = [
    "\\boxed{__import__('os').remove('SENTINEL')}",
    "\\boxed{open('CREATED', 'w').write('x')}",
    "\\boxed{__import__('os').system('touch CREATED')}",
    "\\boxed{eval(\"__import__('shutil').rmtree('.')\")}",
    "\\boxed{10**10**10}",
    "\\boxed{9^9^9^9}",
    "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    "\\boxed{" + "\\frac{" * 3000 + "}",
    "\\boxed{" + "{" * 20000 + "}" * 20000 + "}",
    "x" * (1 << 20) + " \\boxed{1}",
    "\\boxed{\\udcff\\ud800 1}" + "\udcff\ud800" + b"\xff\xfe\xc3".decode("utf-8", "surrogateescape"),
    "\\boxed{\\begin{pmatrix}1&2\\end{pmatrix}} \\boxed{\\int_0^\\infty e^{-x^2}dx}",
    "\\boxed{\\frac{\\frac{\\frac{1}{0}}{0}}{x^{y^{z^{w^{v}}}}}}",
    "\\boxed{x^{1000000}}",
    "\\boxed{" + "1" * 100000 + "}",
    "1" * 200000,
    "\\boxed{" * 5000,                  # unclosed: a naive scan per \\boxed is quadratic
    "<answer>" * 5000,
]


def test_adversarial_completions_have_no_effect_and_finish(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SENTINEL").write_text("keep me")
    prompts = ["p"] * len(ADVERSARIAL)
    fields = [{"answer": "1"}] * len(ADVERSARIAL)
    t0 = time.monotonic()
    with RewardPool("math", num_workers=1, timeout_s=2) as pool:
        res = pool.score(prompts, ADVERSARIAL, fields)
    assert time.monotonic() - t0 < 20
    assert (tmp_path / "SENTINEL").read_text() == "keep me"
    assert not (tmp_path / "CREATED").exists()
    assert sorted(os.listdir(tmp_path)) == ["SENTINEL"]
    # each call is decided by the parser, well within the limit: no timeouts or crashes
    assert set(res.status) == {"ok"}, list(zip(res.status, res.messages))
    assert max(res.durations) < 1.0
    assert res.rewards[9] == 1.0                        # 1 MB of junk before a correct answer
    # only the last 10k characters are read: item 6 loses its \\boxed{ and falls back to the last number
    assert res.rewards[6] == 1.0
    assert all(r == 0.0 for k, r in enumerate(res.rewards) if k not in (6, 9)), res.rewards


def test_normalization_has_no_regex_blowup():
    t0 = time.monotonic()
    for s in ["1 " + "a" * 20000 + "!", "1" + " ab" * 5000 + "!", "1," * 20000 + "x", "\\text{" * 5000]:
        is_equiv(s, "1")
        mp.normalize(s)
    assert time.monotonic() - t0 < 2.0


def test_adversarial_in_process_is_fast():
    fn = load_reward("math")
    t0 = time.monotonic()
    out = fn(["p"] * len(ADVERSARIAL), ADVERSARIAL, [{"answer": "10^10"}] * len(ADVERSARIAL))
    assert time.monotonic() - t0 < 5
    assert len(out) == len(ADVERSARIAL)


def test_symbolic_comparison_stays_cheap():
    big = "((a+b+c+d)^{12})((a+b+c+d)^{12})((a+b+c+d)^{12})"   # expanding would take ages
    t0 = time.monotonic()
    assert is_equiv(big, "(a+b+c+d)^{36}")
    assert not is_equiv(big, "(a+b+c+d)^{35}")
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(mp.ParseError, match="too many variables"):
        mp.check_size(mp.parse("a+b+c+d+f+g"))
