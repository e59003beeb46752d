"""The synthetic tool task, its reward, the experiment's config, and one experiment step end to end."""

from pathlib import Path

import torch

from model.typed import load_config
from rewards import load_reward
from rl.grpo.tool_tasks import BigMultiplyTask, ToolExperimentConfig, demonstration, run_experiment, tool_answer_reward
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
    fn = load_reward("rl.grpo.tool_tasks:tool_answer_reward")                    # loadable as a YAML reward spec
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


def test_experiment_config_loads():
    cfg = load_config(ToolExperimentConfig, ROOT / "configs" / "tools_experiment_tiny.yaml")
    assert cfg.tools == ["calculator"] and cfg.group_size >= 2 and cfg.agent["max_tool_calls"] >= 1


def test_experiment_runs_end_to_end_and_updates_the_policy(tmp_path):
    cfg = load_config(ToolExperimentConfig, ROOT / "configs" / "tools_experiment_tiny.yaml",
                      ["warm_steps=3", "steps=2", "prompts_per_step=2", "group_size=4", "slots=8",
                       "max_new_tokens=48", "warm_tool_fraction=1.0", "temperature=1.5",
                       "model_overrides={vocab_size: 384}"])
    recs = run_experiment(cfg, tmp_path, log=lambda s: None)
    assert len(recs) == 2
    for m in recs:
        assert 0.0 <= m["reward_mean"] <= 1.0 and 0.0 <= m["agent/tool_use_rate"] <= 1.0
        assert all(torch.isfinite(torch.tensor(v)) for k, v in m.items() if isinstance(v, float))
        assert m["tokens"] > 0 and "learn/pg_loss" in m and "learn/grad_norm" in m
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "summary.json").exists()


def test_agent_generation_worker_returns_results_with_masks_and_reward_fields():
    from model.config import BitMambaConfig
    from rl.grpo.config import ModelSection
    from rl.grpo.tool_tasks import AgentGenerationWorker
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
