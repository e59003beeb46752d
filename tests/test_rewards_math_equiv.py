"""The math reward against labelled public cases, wrong-answer classes and right-answer forms.

Fixtures: tests/fixtures/math_equiv/ (public.jsonl, rules.jsonl: labelled cases with their source;
wrong.jsonl: wrong answers a lenient grader accepts). The full comparison with Math-Verify alone is
bench/rewards_math_agreement.py.
"""

import json
import time
from pathlib import Path

import pytest

from rewards.builtin import math_verify_backend as mvb
from rewards.builtin.math_answer import MathReward, judge
from rewards.builtin.math_extract import extract_answer

FIX = Path(__file__).parent / "fixtures" / "math_equiv"


def load(name):
    return [json.loads(line) for line in (FIX / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reward():
    return MathReward()


@pytest.mark.parametrize("row", load("wrong.jsonl"), ids=lambda r: f"{r['id']}-{r['class'][:20]}")
def test_wrong_answer_classes_score_zero(reward, row):
    assert reward("", row["completion"], answer=row["gold"]) == 0.0, reward.explain(row["completion"], answer=row["gold"])


RIGHT = [   # (reference, completion): forms a right answer takes, each scored 0 by a strict reader
    ("-2, 1", "The integers are \\boxed{-2} and \\boxed{1}."),                   # several boxes
    ("(2, 2), (6, 2)", "$$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$$"),
    ("14916", "so N is 14{,}940 first. Final Answer: The final answer is $14{,}916$. I hope it is correct."),
    ("120", "The volume of $ABCDEFGH$ is 120."),                                   # unboxed prose
    ("5", "\\boxed{x = 5}"), ("(3,2)", "\\boxed{(p,q) = (3,2)}"),                 # named left-hand side
    ("$(p,q)=(3,2)$", "\\boxed{(3, 2)}"),
    ("\\{1, 2, 3\\}", "\\boxed{3, 1, 2}"), ("\\pm 2021", "\\boxed{-2021, 2021}"),  # sets, \pm
    ("19, 46, and 82", "\\boxed{19, 46, \\text{ and } 82}"),
    ("1000", "\\boxed{1{,}000}"), ("1000", "\\boxed{1 000}"), ("14916", "\\boxed{14,\\!916}"),
    ("1/3", "\\boxed{\\cfrac{1}{3}}"), ("1/3", "\\boxed{\\tfrac{1}{3}}"),
    ("125", "\\boxed{125\\textnormal{ miles}}"),
    ("x \\leq 5", "\\boxed{5 \\geq x}"), ("x < 1", "\\boxed{-x > -1}"),        # relations
    ("[-1, 2) \\cup (3, \\infty)", "\\boxed{[-1,2) \\cup (3,\\infty)}"),          # intervals
    ("\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}", "\\boxed{\\left[\\begin{array}{cc}1 & 2 \\\\ 3 & 4\\end{array}\\right]}"),
    ("\\tan^2 y + 1", "\\boxed{\\sec^2 y}"),                                     # identities
    ("(1234,567)", "\\boxed{(1234, 567)}"),                                       # tuple, not thousands
    ("\\frac{31}{4}", "\\boxed{7 3/4}"), ("5000000", "\\boxed{5 \\text{ million}}"),
    ("1.22", "\\boxed{1,22}"), ("0.0833333333", "\\boxed{\\frac{1}{12}}"),
]


@pytest.mark.parametrize("gold,completion", RIGHT)
def test_right_answer_forms_score_one(reward, gold, completion):
    assert reward("", completion, answer=gold) == 1.0, reward.explain(completion, answer=gold)


def test_agreement_with_public_labels_ci_subset(reward):
    """Every third labelled case (the full set: bench/rewards_math_agreement.py)."""
    rows = (load("public.jsonl") + load("rules.jsonl"))[::3]
    agree = [(reward("", r["completion"], answer=r["gold"]) == 1.0) == r["expected"] for r in rows]
    assert len(rows) > 100
    assert sum(agree) / len(rows) >= 0.95, [r["id"] for r, a in zip(rows, agree) if not a]


@pytest.mark.slow
def test_agreement_with_public_labels_full(reward):
    rows = load("public.jsonl") + load("rules.jsonl")
    agree = sum((reward("", r["completion"], answer=r["gold"]) == 1.0) == r["expected"] for r in rows)
    assert agree / len(rows) >= 0.95


def test_one_digit_changed_is_wrong(reward):
    for gold, comp in [("1000000", "\\boxed{1000001}"), ("16386.20", "\\boxed{16386.21}"),
                       ("\\frac{14}{3}", "\\boxed{\\frac{14}{4}}"), ("(6,31,-1)", "\\boxed{(6,31,-2)}"),
                       ("x^{13}", "\\boxed{x^{14}}"), ("[0,1)", "\\boxed{[0,2)}"), ("\\pm 2021", "\\boxed{-2021, 2022}")]:
        assert reward("", comp, answer=gold) == 0.0, (gold, comp)


def test_root_of_a_large_power_stays_cheap():
    """sqrt[8] of a 48th power of a 4-term sum used to spend the whole timeout in sympy.expand."""
    x = "(a+b+c+d)"
    for pred, gold, equal in [(f"\\sqrt[8]{{({x}^{{12}})^4}}", f"{x}^6", True),
                              (f"\\sqrt[8]{{({x}^{{12}})^4}}", f"{x}^5", False)]:
        judge.cache_clear()
        t0 = time.process_time()
        assert judge(pred, gold).equal is equal
        assert time.process_time() - t0 < 1.0


def test_verifier_gate_and_cpu_limit():
    assert mvb.gate("\\frac{1}{2}") is None
    for bad in ["__import__('os')", "open(\"f\")", "x" * 400, "a`b", "1#2"]:
        assert mvb.gate(bad) is not None
    with pytest.raises(mvb.VerifierTimeout):
        with mvb.cpu_limit(0.05):
            while True:
                pass
    assert judge("x^2", "x*x").equal   # the limit is gone again: later calls are unaffected


def test_math_verify_never_uses_its_python_expression_parser(monkeypatch, reward):
    """Math-Verify's ExprExtractionConfig runs sympy.parse_expr (it evaluates code): never reached."""
    import math_verify.parser as mvp

    def refuse(*a, **k):
        raise AssertionError("parse_expr reached")

    monkeypatch.setattr(mvp, "parse_expr", refuse)
    judge.cache_clear()
    mvb._parse.cache_clear()
    for gold, comp in [("\\{1,2\\}", "\\boxed{2, 1}"), ("x \\leq 5", "\\boxed{5 \\geq x}"),
                       ("\\tan^2 y + 1", "\\boxed{\\sec^2 y}"), ("3", "\\boxed{__import__('os').getcwd()}")]:
        reward("", comp, answer=gold)


def test_explain_says_what_was_read_and_why(reward):
    e = reward.explain("so \\boxed{y = 5}", answer="x = 5")
    assert e["answer"] == "y = 5" and e["method"] == "boxed" and not e["equal"] and "names differ" in e["reason"]
    e = reward.explain("The final answer is $\\frac{1}{2}$.", answer="0.5")
    assert e["method"] == "prose" and e["equal"] and e["reason"].startswith("parser")
    e = reward.explain("no idea", answer="3")
    assert e["answer"] is None and "no answer" in e["reason"]


def test_builtin_verifier_option_works_without_math_verify():
    fn = MathReward(verifier="builtin")
    assert fn("", "\\boxed{0.5}", answer="1/2") == 1.0
    assert fn("", "\\boxed{\\sec^2 y}", answer="\\tan^2 y + 1") == 0.0   # needs Math-Verify
    with pytest.raises(ValueError, match="verifier"):
        MathReward(verifier="sympy")


def test_extraction_reads_a_number_standing_alone():
    assert extract_answer("AZYUK2A") is None
    assert extract_answer("see problem_7b") is None
    assert extract_answer("the area is 12cm") == "12"


def test_reward_check_explains_each_math_case(tmp_path, capsys):
    from rewards.check import main

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p", "answer": "x = 5", "completion": "so \\boxed{y = 5}"},
        {"prompt": "p", "answer": "-2, 1", "completion": "The integers are \\boxed{-2} and \\boxed{1}."}]) + "\n")
    out = tmp_path / "scored.jsonl"
    assert main(["math", "--data", str(data), "--workers", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sample 0: math read 'y = 5' (boxed) vs reference 'x = 5': not equal: rule: names differ" in text
    assert "sample 1: math read '-2, 1' (boxed)" in text and ": equal:" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["math"]["answer"] == "y = 5" and rows[1]["math"]["equal"] is True
