"""Generation evals (rl/eval/gen.py): pass@k with the unbiased estimator, and `bitmamba eval --gen`."""

import json
import math
from pathlib import Path

import pytest
import torch

from model.config import BitMambaConfig
from model.errors import ConfigError, DataError
from model.lm import BitMambaLM
from rewards import RewardPool
from rl.eval.gen import evaluate_generation, load_prompt_rows, pass_at_k_summary
from rollout.backends import make_backend
from rollout.engine import Engine
from rollout.tokenizer import build_tiny_tokenizer
from rollout.types import GenResult, SamplingParams

FIX = Path(__file__).parent / "fixtures" / "eval"


def by_hand(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) written out as a product (no math.comb)."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(k):
        prod *= (n - c - i) / (n - i)
    return 1.0 - prod


def test_pass_at_k_summary_hand_computed():
    s = pass_at_k_summary([0, 1, 2, 4], 4, [1, 2, 4])
    assert s["pass@1"] == pytest.approx((0 + 0.25 + 0.5 + 1) / 4)
    assert s["pass@2"] == pytest.approx((0 + 0.5 + 5 / 6 + 1) / 4)
    assert s["pass@4"] == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="pass@5"):
        pass_at_k_summary([1], 4, [5])


class FakeEngine:
    """Returns fixed completions: row r, sample j contains "a" iff j < correct[r]; shuffled order."""

    def __init__(self, correct):
        self.correct = correct

    def generate(self, requests):
        out = []
        for req in requests:
            for j in range(req.params.n):
                text = "yes a" if j < self.correct[req.request_id] else "no"
                out.append(GenResult(req.request_id, j, req.prompt_ids, [1, 2], text, [0.0, 0.0], [0.0, 0.0],
                                     "length"))
        return out[::-1]


class ByteTok:
    eos_token_id = None

    def encode(self, s, add_special_tokens=False):
        return list(s.encode())

    def decode(self, ids):
        return bytes(ids).decode()


def test_evaluate_generation_pass_at_k_matches_estimator_on_known_counts():
    correct = [0, 1, 3, 5, 2]
    rows = [{"prompt": f"p{i}", "answer": "a"} for i in range(len(correct))]
    with RewardPool(str(FIX / "toy_reward.py") + ":contains", num_workers=0) as pool:
        m = evaluate_generation(FakeEngine(correct), ByteTok(), rows, pool, n_samples=5, k_values=[1, 2, 4],
                                return_samples=True)
    for k in (1, 2, 4):
        assert m[f"pass@{k}"] == pytest.approx(sum(by_hand(5, c, k) for c in correct) / len(correct))
    assert [s["correct"] for s in m["samples"]] == correct
    assert m["correct_rate"] == pytest.approx(sum(correct) / 25)
    assert m["reward_mean"] == pytest.approx(sum(correct) / 25)
    assert m["n_prompts"] == 5 and m["n_samples"] == 5


def test_evaluate_generation_with_the_engine_and_a_token_reward():
    tok = build_tiny_tokenizer(384)
    torch.manual_seed(0)
    cfg = BitMambaConfig.from_dict(dict(BitMambaConfig.preset("tiny-bitmamba2").to_dict(), vocab_size=384))
    model = BitMambaLM(cfg).eval()
    engine = Engine(make_backend(model, kind="torch"), tokenizer=tok, slots=8)
    rows = load_prompt_rows(FIX / "gen_prompts.jsonl")
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    with RewardPool(str(FIX / "toy_reward.py") + ":contains", num_workers=0) as pool:
        m = evaluate_generation(engine, tok, rows, pool, n_samples=4, k_values=[1, 4], params=params,
                                return_samples=True)
        again = evaluate_generation(engine, tok, rows, pool, n_samples=4, k_values=[1, 4], params=params,
                                    return_samples=True)
    counts = [sum("a" in c for c in s["completions"]) for s in m["samples"]]
    assert 0 < sum(counts) < 12          # the toy reward separates samples with this seed
    assert [s["correct"] for s in m["samples"]] == counts
    for k in (1, 4):
        assert m[f"pass@{k}"] == pytest.approx(sum(by_hand(4, c, k) for c in counts) / len(counts))
    assert [s["completions"] for s in again["samples"]] == [s["completions"] for s in m["samples"]]  # seeded


def test_load_prompt_rows_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "x"}\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_prompt_rows(p)
    p.write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompt_rows(p)


def test_cli_gen_eval_writes_pass_at_k(tmp_path, capsys):
    from rl.eval.run import main

    tok = build_tiny_tokenizer(384)
    torch.manual_seed(0)
    cfg = BitMambaConfig.from_dict(dict(BitMambaConfig.preset("tiny-bitmamba2").to_dict(), vocab_size=384))
    BitMambaLM(cfg).save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "gen.json"
    rc = main([str(tmp_path / "ckpt"), "--gen", str(FIX / "gen_prompts.jsonl"), "--reward",
               str(FIX / "toy_reward.py") + ":contains", "--samples", "4", "--k", "1,4", "--max-new-tokens", "4",
               "--reward-workers", "0", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_prompts"] == 3 and res["n_samples"] == 4
    assert 0.0 <= res["pass@1"] <= res["pass@4"] <= 1.0
    assert math.isclose(res["pass@1"], res["correct_rate"], abs_tol=1e-9)   # pass@1 = mean correct rate
    assert "pass@4" in capsys.readouterr().out


def test_cli_gen_rejects_k_above_samples(tmp_path):
    from model.errors import BitMambaError
    from rl.eval.run import main

    with pytest.raises(BitMambaError, match="--k"):
        main([str(tmp_path), "--gen", str(FIX / "gen_prompts.jsonl"), "--reward", "length", "--samples", "2",
              "--k", "4"])
