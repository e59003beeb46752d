"""`AgentGenerationWorker`: the GRPO generation worker whose rollouts run the agent loop (a config with
`tools:`), and `agent_result_metrics`, the driver's per-step tool metrics. docs/tools.md has the whole flow."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from rl.grpo.config import ModelSection
from rl.grpo.workers import GenerationWorker, PromptJob
from rollout.agent.loop import Agent, AgentConfig
from rollout.agent.loader import load_tools
from rollout.agent.runner import ToolSet
from rollout.types import GenRequest, GenResult, SamplingParams


class AgentGenerationWorker(GenerationWorker):
    """`rl.grpo.workers.GenerationWorker` whose rollouts run the agent loop (drop-in for the GRPO driver).

    Same constructor plus `tools` (YAML specs) and `agent` (AgentConfig fields). `generate` returns
    `GenResult`s as before (token ids with injected tool messages, `sampled_mask` 0 on them,
    `model_logprobs` 0.0 there), with the trajectory's reward fields added to `meta`: `messages`
    (the completion's assistant/tool turns: a `PromptJob` carries no prompt messages, so the driver
    prepends the task row's `messages`), `tool_calls`, `final_text`, plus `agent_counts` and
    `agent_limit`. `rl.grpo.driver` uses it when the config has `tools`, merges those meta fields into each
    sample's reward row and logs `agent_result_metrics`.
    """

    def __init__(self, model_config: dict, model_section: ModelSection, slots: int = 16, sync_every: int = 8,
                 tools: list | None = None, agent: dict | None = None, base_dir: str | None = None):
        super().__init__(model_config, model_section, slots=slots, sync_every=sync_every)
        acfg = AgentConfig(**(agent or {}))
        toolset = ToolSet(load_tools(list(tools or ["calculator"]), base_dir=base_dir),
                          timeout_s=acfg.tool_timeout_s, max_result_chars=acfg.max_result_chars,
                          workers=acfg.tool_workers)
        self.agent = Agent(self.backend, self.tokenizer, toolset, acfg, slots=slots, sync_every=sync_every)
        self.engine = self.agent.engine     # the one that runs: `ping` reports it, an OOM backoff halves it

    def generate(self, jobs: list[PromptJob], params: SamplingParams) -> list[GenResult]:
        if self._crash_next:       # fault injection, as in GenerationWorker
            os._exit(17)
        reqs = [GenRequest(j.prompt_ids, replace(params, seed=j.seed), request_id=j.uid) for j in jobs]
        while True:
            try:
                with torch.no_grad():
                    trajs = self.agent.generate(reqs)
                break
            except torch.cuda.OutOfMemoryError:
                self._oom_backoff()         # as GenerationWorker: halve the slots and retry (same samples)
        out = []
        for t in trajs:
            r = t.result
            r.meta = {**(r.meta or {}), **t.reward_fields(), "agent_counts": dict(t.counts), "agent_limit": t.limit}
            out.append(r)
        return out

    def shutdown_tools(self) -> None:
        self.agent.close()


def agent_result_metrics(results: list[GenResult], prefix: str = "agent/") -> dict[str, float]:
    """`rollout.agent.loop.agent_metrics` from `AgentGenerationWorker` results (their `meta`), plus totals:
    `tool_calls`, `malformed`, `tool_errors`, `timeouts`, `truncated` (this step's sums), and rates:
    `tool_use_rate` (episodes with a well-formed call), `calls_per_episode`, `<count>_per_call`,
    `injected_token_frac`, `limit_hit_rate`."""
    n = max(len(results), 1)
    keys = ("malformed", "tool_errors", "timeouts", "truncated")
    counts = [(r.meta or {}).get("agent_counts", {}) for r in results]
    calls = sum(c.get("calls", 0) for c in counts)
    tokens = sum(len(r.token_ids) for r in results)
    injected = sum(len(r.sampled_mask) - sum(r.sampled_mask) for r in results if r.sampled_mask)
    m = {"tool_calls": calls,
         "tool_use_rate": sum(any(c.get("status") != "malformed" for c in (r.meta or {}).get("tool_calls", []))
                              for r in results) / n,
         "calls_per_episode": calls / n,
         "injected_token_frac": injected / max(tokens, 1),
         "limit_hit_rate": sum((r.meta or {}).get("agent_limit") is not None for r in results) / n}
    for k in keys:
        total = sum(c.get(k, 0) for c in counts)
        m[k] = total
        m[f"{k}_per_call"] = total / max(calls, 1)
    return {prefix + k: float(v) for k, v in m.items()}
