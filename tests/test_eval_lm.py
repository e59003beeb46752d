"""The lm-eval adapter (rl/eval/lm.py) against direct computations with the model, offline.

Direct computation = one full forward over context + continuation, log_softmax, gather.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from lm_eval.api.instance import Instance  # the optional extra `eval` (pyproject)

from model.config import BitMambaConfig
from model.lm import BitMambaLM
from rl.eval.run import load_task_file, result_rows, run_lm_eval
from rl.eval.lm import BitMambaEvalLM, LogLikelihoodScorer
from rollout.reference import naive_generate
from rollout.tokenizer import build_tiny_tokenizer
from rollout.types import SamplingParams

FIX = Path(__file__).parent / "fixtures" / "eval"
V = 384


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(V)


def _model(preset: str, seed: int = 0) -> BitMambaLM:
    torch.manual_seed(seed)
    cfg = BitMambaConfig.from_dict(dict(BitMambaConfig.preset(preset).to_dict(), vocab_size=V))
    return BitMambaLM(cfg).eval()


@torch.no_grad()
def direct_ll(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0, :-1]     # [T-1, V] predicts ids[1:]
    tgt = ids[0, 1:]
    sl = slice(len(ctx) - 1, None)
    lp = logp.gather(-1, tgt[:, None])[:, 0][sl]
    return float(lp.sum()), bool((logp.argmax(-1)[sl] == tgt[sl]).all())


def _mc_requests():
    rows = [json.loads(line) for line in (FIX / "mc.jsonl").read_text().splitlines()]
    reqs = []
    for d in rows:
        ctx = f"Question: {d['question']}\nAnswer:"
        for j, c in enumerate(d["choices"]):
            reqs.append(Instance("loglikelihood", d, (ctx, " " + c), j))
    return rows, reqs


def _random_pairs(n_ctx: int, n_cont: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n_ctx):
        ctx = torch.randint(12, V, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n_cont):
            cont = torch.randint(12, V, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            pairs.append((ctx, cont))
    return pairs


@pytest.mark.parametrize("preset", ["tiny-bitmamba2", "tiny-hybrid"])
def test_loglikelihood_matches_direct_forward(tok, preset):
    model = _model(preset)
    lm = BitMambaEvalLM(model=model, tokenizer=tok, device="cpu", batch_size=3)
    _, reqs = _mc_requests()
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    assert len(got) == len(reqs)
    for req, (lp, greedy) in zip(reqs, got):
        ctx, cont = req.args
        ctx_ids = tok.encode(ctx)
        cont_ids = tok.encode(ctx + cont)[len(ctx_ids):]
        want_lp, want_greedy = direct_ll(model, ctx_ids, cont_ids)
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert greedy == want_greedy
    # each distinct context prefilled once: 8 questions, 4 choices each
    assert lm.scorer.stats["prefills"] == 8


def test_is_greedy_true_for_the_argmax_continuation(tok):
    model = _model("tiny-bitmamba2")
    ctx = tok.encode("Question: What do bees make?")
    with torch.no_grad():
        t1 = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
        t2 = int(model(torch.tensor([ctx + [t1]])).logits[0, -1].argmax())
    sc = LogLikelihoodScorer(model, batch_size=2)
    (lp, greedy), (_, not_greedy) = sc.loglikelihood([(ctx, [t1, t2]), (ctx, [t1, (t2 + 1) % V])])
    assert greedy and not not_greedy
    assert lp == pytest.approx(direct_ll(model, ctx, [t1, t2])[0], abs=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "tiny-bitmamba2", "tiny-hybrid"])
@pytest.mark.parametrize("batch_size,max_length", [(4, 2048), (3, 7), (5, 4)])
def test_prefix_reuse_equals_no_reuse(preset, batch_size, max_length):
    """Left-padded batched prefills, windows cutting through padding, state copies: same numbers."""
    model = _model(preset)
    pairs = _random_pairs(7, 3)
    reuse = LogLikelihoodScorer(model, batch_size=batch_size, max_length=max_length)
    plain = LogLikelihoodScorer(model, batch_size=batch_size, max_length=max_length)
    a = reuse.loglikelihood(pairs, reuse_prefix=True)
    b = plain.loglikelihood(pairs, reuse_prefix=False)
    for (la, ga), (lb, gb), (ctx, cont) in zip(a, b, pairs):
        assert la == pytest.approx(lb, abs=1e-4)
        assert ga == gb
    assert reuse.stats["prefills"] == 7
    assert reuse.stats["forward_tokens"] < plain.stats["forward_tokens"]


def test_padding_ending_exactly_at_a_window_boundary():
    """A context whose left padding fills whole prefill windows: its state must start clean."""
    model = _model("tiny-bitmamba2")
    pairs = [(list(range(20, 32)), [40, 41, 42]), (list(range(50, 54)), [60, 61]), (list(range(70, 78)), [80])]
    sc = LogLikelihoodScorer(model, batch_size=3, max_length=4)   # pads 0, 8, 4: multiples of 4
    for (lp, _), (ctx, cont) in zip(sc.loglikelihood(pairs), pairs):
        assert lp == pytest.approx(direct_ll(model, ctx, cont)[0], abs=1e-4)


def test_loglikelihood_rolling_carries_state_across_windows(tok):
    model = _model("tiny-bitmamba2")
    lm = BitMambaEvalLM(model=model, tokenizer=tok, device="cpu", batch_size=2, max_length=8)
    docs = [json.loads(line)["text"] for line in (FIX / "docs.jsonl").read_text().splitlines()]
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    got = lm.loglikelihood_rolling(reqs)
    for d, lp in zip(docs, got):
        ids = [tok.eos_token_id] + tok.encode(d)
        assert len(ids) > 3 * 8     # several windows
        with torch.no_grad():
            want = float(model.token_logprobs(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])).sum())
        assert lp == pytest.approx(want, abs=1e-3, rel=1e-5)


def test_generate_until_matches_naive_greedy_and_cuts_at_stop(tok):
    model = _model("tiny-bitmamba2")
    lm = BitMambaEvalLM(model=model, tokenizer=tok, device="cpu", batch_size=2, backend="torch")
    ctxs = ["Question: What is 12 + 35?\nAnswer:", "The answer is", "def add(a, b):"]
    kw = {"until": ["e"], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (c, dict(kw)), i) for i, c in enumerate(ctxs)])
    for c, text in zip(ctxs, got):
        ref = naive_generate(model, tok.encode(c), SamplingParams(max_new_tokens=12, temperature=0.0,
                                                                  stop_strings=["e"], eos_token_id=tok.eos_token_id),
                             tokenizer=tok)
        want = tok.decode(ref.token_ids).split("e")[0].replace(tok.eos_token, "")
        assert text == want
        assert "e" not in text


def test_simple_evaluate_on_local_tasks_matches_direct(tok):
    """lm-eval end to end on local JSON tasks: acc equals the argmax of direct log-likelihoods;
    word perplexity equals exp(-sum ll / words) from direct full forwards."""
    model = _model("tiny-bitmamba2", seed=3)
    lm = BitMambaEvalLM(model=model, tokenizer=tok, device="cpu", batch_size=4)
    tasks = [load_task_file(FIX / "mc_task.yaml"), load_task_file(FIX / "ppl_task.yaml")]
    res = run_lm_eval(lm, tasks, include_defaults=False)
    acc = res["results"]["bitmamba_local_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    rows, _ = _mc_requests()
    hits = 0
    for d in rows:
        ctx = tok.encode(f"Question: {d['question']}\nAnswer:")
        lls = [direct_ll(model, ctx, tok.encode(f"Question: {d['question']}\nAnswer: {c}")[len(ctx):])[0]
               for c in d["choices"]]
        hits += int(max(range(len(lls)), key=lls.__getitem__) == d["label"])
    assert acc == pytest.approx(hits / len(rows))

    docs = [json.loads(line)["text"] for line in (FIX / "docs.jsonl").read_text().splitlines()]
    total_ll, words = 0.0, 0
    for d in docs:
        ids = [tok.eos_token_id] + tok.encode(d)
        with torch.no_grad():
            total_ll += float(model.token_logprobs(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])).sum())
        words += len(re.split(r"\s+", d))   # lm-eval's word count
    ppl = res["results"]["bitmamba_local_ppl"]["word_perplexity,none"]
    assert ppl == pytest.approx(math.exp(-total_ll / words), rel=1e-4)

    table = {(r["task"], r["metric"]): r for r in result_rows(res)}
    assert table[("bitmamba_local_mc", "acc")]["value"] == pytest.approx(100 * acc)


def test_registered_as_bitmamba_and_builds_from_a_directory(tok, tmp_path):
    from lm_eval.api.registry import get_model

    model = _model("tiny-bitmamba2")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    cls = get_model("bitmamba")
    assert cls is BitMambaEvalLM
    lm = cls.create_from_arg_string(f"pretrained={tmp_path / 'ckpt'},batch_size=2,max_length=64",
                                    {"device": "cpu"})
    ctx, cont = tok.encode("Question: What do bees make?"), tok.encode(" honey")
    (lp, _), = lm.scorer.loglikelihood([(ctx, cont)])
    assert lp == pytest.approx(direct_ll(model, ctx, cont)[0], abs=1e-4)
    assert lm.scorer.batch_size == 2 and lm.max_length == 64


def test_cli_task_file_prints_table_and_writes_json(tok, tmp_path, capsys):
    from rl.eval.run import main

    model = _model("tiny-bitmamba2")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "res.json"
    rc = main([str(tmp_path / "ckpt"), "--task-file", str(FIX / "mc_task.yaml"), "--limit", "4",
               "--batch-size", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    acc = {r["metric"]: r["value"] for r in res["rows"] if r["task"] == "bitmamba_local_mc"}["acc"]
    assert 0.0 <= acc <= 100.0
    assert res["n_samples"]["bitmamba_local_mc"]["effective"] == 4
    assert res["adapter_stats"]["prefills"] == 4
    printed = capsys.readouterr().out
    assert "bitmamba_local_mc" in printed and "BitMamba-2 1b" in printed


def test_task_file_errors(tmp_path):
    from model.errors import ConfigError

    bad = tmp_path / "t.yaml"
    bad.write_text("task: x\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: missing.jsonl\n")
    with pytest.raises(ConfigError, match="missing.jsonl"):
        load_task_file(bad)
    cfg = load_task_file(FIX / "mc_task.yaml")
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == FIX / "mc.jsonl"


def test_cli_unknown_task_is_a_user_error(tok, tmp_path):
    from model.errors import BitMambaError
    from rl.eval.run import main

    _model("tiny-bitmamba2").save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(BitMambaError, match="no_such_task"):
        main([str(tmp_path / "ckpt"), "--tasks", "no_such_task", "--device", "cpu"])
