"""The synthetic tool task, its reward, the tool-use warm start (config, demonstrations, CLI), the agent worker."""

from pathlib import Path

import torch

from model.typed import load_config
from rewards import load_reward
from model.lm import BitMambaLM
from rl.cli import main as bitmamba
from rl.grpo.tasks import BigMultiplyTask, tool_answer_reward
from rl.grpo.tool_warmstart import ToolWarmStartConfig, demonstration
from rollout.agent.loop import ToolMessageFormat
from rollout.tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_task_rows_are_deterministic_and_splits_disjoint():
    t = BigMultiplyTask(seed=0, digits=4)
    r = t.row("train", 5)
    assert r == BigMultiplyTask(seed=0, digits=4).row("train", 5)
    a, b = map(int, r["question"].split("*"))
    assert 1000 <= a <= 9999 and 1000 <= b <= 9999 and r["answer"] == str(a * b)
    assert r["prompt"] == f"<|im_start|>user\n{a}*{b}=<|im_end|>\n<|im_start|>assistant\n"
    assert r["tools"][0]["function"]["name"] == "calculator"
    train = {t.row("train", i)["question"] for i in range(300)}
    ev = {t.row("eval", i)["question"] for i in range(300)}
    assert not train & ev


def test_reward_reads_only_the_final_turn():
    ans = "418444"
    tool_turn = ('<tool_call>{"name": "calculator", "arguments": {"expression": "418444"}}</tool_call>'
                 "<|im_end|>\n<|im_start|>tool\n<tool_response>418444</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert tool_answer_reward("p", tool_turn + "418444<|im_end|>", ans) == 1.0
    assert tool_answer_reward("p", tool_turn + "418445<|im_end|>", ans) == 0.0
    assert tool_answer_reward("p", tool_turn, ans) == 0.0                  # the tool's number is not an answer
    assert tool_answer_reward("p", '<tool_call>{"arguments": {"expression": "418444"}}</tool_call>', ans) == 0.0
    assert tool_answer_reward("p", "418444<|im_end|>", ans) == 1.0         # a direct answer counts too
    # with the agent's final_text field (what the reward sees through the trajectory)
    assert tool_answer_reward("p", tool_turn + "x", ans, final_text="It is 418444.") == 1.0
    assert tool_answer_reward("p", "", ans, final_text='<tool_call>{"name": "c", "arguments": {"e": "418444"}}'
                                                       "</tool_call>") == 0.0
    fn = load_reward("rl.grpo.tasks:tool_answer_reward")                    # loadable as a YAML reward spec
    assert fn(["p", "p"], ["x", "y"], [{"answer": ans, "final_text": "418444"}, {"answer": ans, "final_text": "1"}]) \
        == [1.0, 0.0]


def test_demonstrations_train_only_sampled_tokens():
    tok = build_tiny_tokenizer(384)
    fmt = ToolMessageFormat(tok)
    row = BigMultiplyTask(digits=3).row("train", 0)
    ids, mask = demonstration(tok, fmt, row, use_tool=True)
    p = tok.encode(row["prompt"], add_special_tokens=False)
    inj = fmt.ids(row["answer"])
    n_call = len(ids) - len(p) - len(inj) - len(tok.encode(row["answer"] + "<|im_end|>", add_special_tokens=False))
    assert mask == [0] * len(p) + [1] * n_call + [0] * len(inj) + [1] * (len(ids) - len(p) - n_call - len(inj))
    assert ids[len(p) + n_call:len(p) + n_call + len(inj)] == inj


def test_warmstart_config_file_holds_the_defaults():
    cfg = load_config(ToolWarmStartConfig, ROOT / "configs" / "tool_warmstart_tiny.yaml")
    assert cfg == ToolWarmStartConfig()
    assert 0.0 < cfg.tool_fraction < 1.0 and cfg.model.overrides["vocab_size"] == 384


def test_warmstart_cli_saves_a_model_directory_and_refuses_to_mix(tmp_path, capsys):
    out = tmp_path / "warm"
    args = ["tool-warmstart", "--config", str(ROOT / "configs" / "tool_warmstart_tiny.yaml"), "--output-dir", str(out),
            "steps=3", "batch=4", "digits=2", "tool_fraction=1.0",
            "model.overrides={vocab_size: 384}"]
    assert bitmamba(args) == 0
    model = BitMambaLM.from_pretrained(out)
    assert model.config.vocab_size == 384 and (out / "tokenizer.json").is_file()
    assert "warm start 3/3: loss" in capsys.readouterr().err
    assert bitmamba(args) == 2                                  # a second run never writes over the first
    assert "--overwrite" in capsys.readouterr().err
    assert bitmamba(args + ["--overwrite"]) == 0


def test_warm_start_lowers_the_demonstration_loss():
    torch.manual_seed(0)
    cfg = ToolWarmStartConfig(steps=1, batch=8, digits=2, tool_fraction=1.0)
    from rl.grpo.config import build_model, build_tokenizer
    from rl.grpo.tool_warmstart import warm_start
    from rl.train.data import collate_sft

    model, tok = build_model(cfg.model), build_tokenizer(cfg.model)
    fmt = ToolMessageFormat(tok)
    rows = BigMultiplyTask(seed=1, digits=2).rows("train", 0, 8)
    mb = collate_sft([demonstration(tok, fmt, r, True) for r in rows], pad=tok.pad_token_id)
    ids, labels = mb.input_ids, mb.labels
    with torch.no_grad():
        before = model(ids, labels=labels).loss.item()
    warm_start(ToolWarmStartConfig(steps=30, batch=8, digits=2, tool_fraction=1.0), model, tok, log=lambda s: None)
    with torch.no_grad():
        after = model(ids, labels=labels).loss.item()
    assert after < 0.7 * before, (before, after)


def test_agent_generation_worker_returns_results_with_masks_and_reward_fields():
    from model.config import BitMambaConfig
    from rl.grpo.config import ModelSection
    from rl.grpo.agent_worker import AgentGenerationWorker
    from rl.grpo.workers import PromptJob
    from rollout.types import SamplingParams

    tok = build_tiny_tokenizer(384)
    mcfg = BitMambaConfig.preset("tiny", vocab_size=384).to_dict()
    w = AgentGenerationWorker(mcfg, ModelSection(preset="tiny", overrides={"vocab_size": 384}, backend="torch"),
                              slots=4, tools=["calculator"], agent={"max_tool_calls": 2})
    try:
        fmt = ToolMessageFormat(tok)
        # make the worker's engine see a scripted call: this random model would never emit one, so the
        # first completion tokens are forced through the backend's logits (same trick as test_agent_loop)
        row = BigMultiplyTask(digits=3).row("train", 1)
        p = tok.encode(row["prompt"], add_special_tokens=False)
        call = tok.encode('<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'
                          % row["question"], add_special_tokens=False)
        script = call + fmt.ids(row["answer"]) + tok.encode(row["answer"] + "<|im_end|>", add_special_tokens=False)
        inner_step, inner_prefill, inner_extend = w.backend.step, w.backend.prefill, w.backend.extend
        P = len(p)

        def force(lg, pos):
            lg = torch.full_like(lg, -40.0)
            for r, q in enumerate(pos.tolist()):
                k = q - P
                lg[r, script[k] if 0 <= k < len(script) else tok.eos_token_id] = 40.0
            return lg
        w.backend.step = lambda t: force(inner_step(t), w.backend.state.pos[:len(t)])
        w.backend.prefill = lambda ids: (lambda lg, st: (force(lg[None], st.pos)[0], st))(*inner_prefill(ids))
        w.backend.extend = lambda rows, ids: force(inner_extend(rows, ids), w.backend.state.pos[torch.as_tensor(rows)])
        res = w.generate([PromptJob("j0", p, seed=1)], SamplingParams(max_new_tokens=80, n=2,
                                                                       eos_token_id=tok.eos_token_id))
    finally:
        w.shutdown_tools()
    assert [r.request_id for r in res] == ["j0", "j0"]
    for r in res:
        assert r.token_ids == script and r.sampled_mask.count(0) == len(fmt.ids(row["answer"]))
        assert r.meta["final_text"] == row["answer"] and r.meta["tool_calls"][0]["status"] == "ok"
        assert r.meta["agent_counts"]["calls"] == 1
        assert tool_answer_reward(row["prompt"], r.text, row["answer"], final_text=r.meta["final_text"]) == 1.0
