"""GRPO with tools through the real driver (rl/grpo/driver.py): agent rollouts on the Ray workers, rewards that
see the trajectory, the tool counts in the metrics, and injected tokens out of the loss."""

from pathlib import Path

import pytest
import ray

from model.errors import ConfigError
from rl.grpo import driver as grpo
from rl.grpo.config import load_grpo_config
from rl.train.metrics import read_metrics
from rl.grpo.agent_worker import AgentGenerationWorker
from rl.grpo.config import ModelSection
from rl.grpo.tool_warmstart import ToolWarmStartConfig, save_warm_start
from rl.grpo.workers import GenerationWorker
from rollout.types import GenResult

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "grpo_tools.yaml"

# a reward that reports what it was given: the number of tool calls in its row (asserting the other fields)
PROBE = '''
def probe(prompt, completion, tool_calls=None, messages=None, final_text=None, answer=None, **fields):
    assert isinstance(tool_calls, list) and isinstance(final_text, str), (tool_calls, final_text)
    assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant", messages
    assert sum(m["role"] == "tool" for m in messages) == len(tool_calls)
    return float(len(tool_calls))
'''


def test_reward_fields_merge_the_trajectory_and_prepend_prompt_messages():
    row = {"prompt": "p", "answer": "6", "messages": [{"role": "user", "content": "2*3="}]}
    turns = [{"role": "assistant", "content": "<tool_call>..</tool_call>"}, {"role": "tool", "content": "6"},
             {"role": "assistant", "content": "6"}]
    calls = [{"name": "calculator", "arguments": {"expression": "2*3"}, "result": "6", "status": "ok",
              "truncated": False}]
    r = GenResult("j", 0, [1], [2], "x", [0.0], [0.0], "stop",
                  meta={"messages": turns, "tool_calls": calls, "final_text": "6", "agent_counts": {"calls": 1}})
    f = grpo.reward_fields(row, r)
    assert f["messages"] == row["messages"] + turns and f["tool_calls"] == calls and f["final_text"] == "6"
    assert f["answer"] == "6" and "prompt" not in f and "agent_counts" not in f
    plain = grpo.reward_fields(row, GenResult("j", 0, [1], [2], "x", [0.0], [0.0], "stop"))
    assert plain == {"answer": "6", "messages": row["messages"]}          # no tools: the row as before


def test_tools_select_the_agent_worker():
    cfg = load_grpo_config(CONFIG)
    cls, kw = grpo.worker_class(cfg)
    assert cls is AgentGenerationWorker and kw["tools"] == ["calculator"] and kw["base_dir"] == str(CONFIG.parent)
    assert kw["agent"]["max_tool_calls"] == 2 and kw["agent"]["max_total_tokens"] == 96
    assert grpo.worker_class(load_grpo_config(CONFIG, ["tools=[]"])) == (GenerationWorker, {})


@pytest.mark.slow
def test_grpo_driver_with_tools(tmp_path):
    # a warm start that teaches the call format, so the policy calls the calculator from step 1
    init = save_warm_start(ToolWarmStartConfig(model=ModelSection(preset="tiny", overrides={"vocab_size": 384}),
                                               digits=2, steps=60, batch=16, tool_fraction=1.0), tmp_path / "warm",
                           log=lambda s: None)
    (tmp_path / "probe.py").write_text(PROBE)
    cfg = load_grpo_config(CONFIG, [
        "model.overrides={vocab_size: 384}", "task.kwargs={digits: 2}", "steps=2", "prompts_per_step=4",
        "group_size=4", "sampling.max_new_tokens=64", "agent.max_total_tokens=64", "eval_every=0",
        "checkpoint_every=0", "wandb=false", "workers.engine_slots=16",
        f"output_dir={tmp_path / 'run'}",
        f"rewards=[{{spec: rl.grpo.tasks:tool_answer_reward}}, {{spec: '{tmp_path / 'probe.py'}:probe'}}]"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        driver = grpo.Driver(cfg, init_dir=str(init))
        seen = []
        make_batch = driver.train_batch

        def train_batch(ro):
            b = make_batch(ro)
            seen.append((ro, b))
            return b
        driver.train_batch = train_batch
        try:
            driver.run()
        finally:
            driver.close()
    finally:
        ray.shutdown()

    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        for k in ("agent/tool_calls", "agent/malformed", "agent/tool_errors", "agent/timeouts", "agent/tool_use_rate",
                  "agent/calls_per_episode", "agent/injected_token_frac", "response_sampled_len_mean"):
            assert k in r, k
        assert r["agent/tool_calls"] > 0 and 0 < r["agent/tool_use_rate"] <= 1
        assert r["response_sampled_len_mean"] < r["response_len_mean"]      # injected tokens are not sampled
        # the rewards saw the trajectory: the probe returns len(tool_calls) from its row fields
        assert r["reward/frac_error"] == 0.0
        assert r["reward/probe/mean"] == pytest.approx(r["agent/calls_per_episode"])
    assert len(seen) == 2
    injected_total = 0
    for (ro, batch), rec in zip(seen, recs):
        for res, mask, ok in zip(ro.results, batch.loss_mask, ro.valid):
            assert len(mask) == len(res.token_ids) == len(res.sampled_mask)
            for m, s in zip(mask, res.sampled_mask):
                assert m == (float(s) if ok else 0.0)            # injected tokens (s == 0) have no loss
            injected_total += res.sampled_mask.count(0)
            for c in res.meta["tool_calls"]:
                assert c["status"] in ("ok", "malformed", "error", "bad_arguments", "unknown_tool")
        # the learner trained on exactly the sampled tokens of the valid rows
        if rec["learn/skipped"] == 0.0:
            assert rec["learn/tokens"] == sum(sum(m) for m in batch.loss_mask)
            assert rec["learn/tokens"] < sum(len(r.token_ids) for r, ok in zip(ro.results, ro.valid) if ok)
    assert injected_total > 0
    assert any(r["learn/skipped"] == 0.0 for r in recs)


def test_bad_tool_spec_fails_at_load_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="no_such_tool") as e:
        load_grpo_config(CONFIG, ["tools=[no_such_tool]"])
    assert "grpo_tools.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="missing_tools.py"):
        load_grpo_config(CONFIG, ["tools=[missing_tools.py:search]"])


def test_task_and_reward_import_without_torch():
    # reward pool workers load rl.grpo.tasks:tool_answer_reward, and rl.grpo.tasks builds the task: neither
    # may pull in torch or the experiment's training code
    import subprocess
    import sys

    code = ("import sys; from rl.grpo.tasks import make_task; from rewards import load_reward; "
            "t = make_task('bigmul', digits=3); r = t.row('train', 0); "
            "f = load_reward('rl.grpo.tasks:tool_answer_reward'); "
            "assert f([r['prompt']], [r['answer'] + '<|im_end|>'], [r]) == [1.0]; "
            "assert 'torch' not in sys.modules and 'rl.grpo.tool_warmstart' not in sys.modules, 'heavy import'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
