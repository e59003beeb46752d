"""A synthetic task that needs a tool, its reward, and a CPU experiment showing tool use being learned.

    task = BigMultiplyTask(seed=0, digits=4)
    task.row("train", 3)   # {"prompt": "<|im_start|>user\\n4821*9917=<|im_end|>\\n<|im_start|>assistant\\n",
                           #  "answer": "47809857", "question": "4821*9917", "tools": [...], "messages": [...]}

Products of two `digits`-digit numbers: a tiny model cannot compute them, but it can copy the
expression into a calculator call and copy the result back, so the reward (exact final answer) is
reachable only through the tool. The task and the reward live in `rl.grpo.tasks` (light: reward workers import
them without torch) and are re-exported here.

    python -m rl.grpo.tool_tasks --config configs/tools_experiment_tiny.yaml --out runs/tool_demo

runs the experiment: a short supervised warm start on a mixture of tool-using and direct-answer
demonstrations (on purpose too short and mostly direct, so the tool-use rate starts low), then a
self-contained GRPO loop on agent rollouts built from the library pieces (`rollout.agent.loop.Agent`
for the episodes, `rollout.agent.loop.batch_fields` -> `rl.grpo.learner.TrainBatch` / `collate` for the
batch, `rl.grpo.algo.group_advantages` / `policy_loss` for the update: injected tool tokens are masked
out of the loss and the ratios). It does not go through `rl.grpo.driver`'s Ray driver; for that, see
`configs/grpo_tools.yaml` (`tools:` in a GRPO config runs `AgentGenerationWorker` below). The metrics (reward, tool-use rate, malformed calls per step) go
to `OUT/metrics.jsonl` and `OUT/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from model.config import BitMambaConfig
from model.lm import BitMambaLM
from model.typed import load_config
from rl.grpo import algo
from rl.grpo.learner import TrainBatch, collate
from rl.grpo.config import ModelSection
from rl.grpo.tasks import (IM_END, IM_START, BigMultiplyTask, chat_prompt, final_answer_text,  # noqa: F401
                               tool_answer_reward)
from rl.grpo.workers import GenerationWorker, PromptJob
from rollout.agent.loop import Agent, AgentConfig, ToolMessageFormat, agent_metrics, batch_fields
from rollout.backends import make_backend
from rollout.tokenizer import build_tiny_tokenizer
from rollout.agent.tools import ToolSet, load_tools
from rollout.types import GenRequest, GenResult, SamplingParams


# --------------------------------------------------------------------------------------------------
# A generation worker for the Ray driver


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


# --------------------------------------------------------------------------------------------------
# The experiment's config


@dataclass
class ToolExperimentConfig:
    """configs/tools_experiment_tiny.yaml."""

    preset: str = "tiny"
    model_overrides: dict = field(default_factory=lambda: {"vocab_size": 384, "d_model": 128, "n_layers": 4,
                                                           "d_state": 32, "headdim": 32})
    tokenizer_vocab: int = 384
    digits: int = 3
    tools: list = field(default_factory=lambda: ["calculator"])
    agent: dict = field(default_factory=dict)             # AgentConfig fields
    warm_steps: int = 600
    warm_batch: int = 32
    warm_lr: float = 3e-3
    warm_tool_fraction: float = 0.3                       # share of tool-using demonstrations
    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    lr: float = 1e-3
    clip_low: float = 0.2
    clip_high: float = 0.28
    tis_cap: float = 2.0
    slots: int = 64
    seed: int = 0


def demonstration(tok, fmt: ToolMessageFormat, row: dict, use_tool: bool) -> tuple[list[int], list[int]]:
    """(prompt + completion ids, loss mask) of one demonstration, built with the agent's exact format:
    sampled parts get loss, the injected tool message does not."""
    p = tok.encode(row["prompt"], add_special_tokens=False)
    ids, mask = list(p), [0] * len(p)

    def add(piece: list[int], m: int) -> None:
        ids.extend(piece)
        mask.extend([m] * len(piece))
    if use_tool:
        call = json.dumps({"name": "calculator", "arguments": {"expression": row["question"]}})
        add(tok.encode(f"<tool_call>{call}</tool_call>", add_special_tokens=False), 1)
        add(fmt.ids(row["answer"]), 0)
    add(tok.encode(f"{row['answer']}{IM_END}", add_special_tokens=False), 1)
    return ids, mask


def warm_start(cfg: ToolExperimentConfig, model: BitMambaLM, tok, task: BigMultiplyTask, log) -> None:
    fmt = ToolMessageFormat(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warm_lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    model.train()
    for step in range(cfg.warm_steps):
        rows = task_rows(task, "train", 10_000_000 + step * cfg.warm_batch, cfg.warm_batch)  # never seen by RL
        ex = [demonstration(tok, fmt, r, rng.random() < cfg.warm_tool_fraction) for r in rows]
        L = max(len(i) for i, _ in ex)
        ids = torch.full((len(ex), L), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(ex), L), -100, dtype=torch.long)
        for r, (i, m) in enumerate(ex):
            ids[r, :len(i)] = torch.tensor(i)
            labels[r, :len(i) - 1] = torch.tensor([t if mm else -100 for t, mm in zip(i[1:], m[1:])])
        out = model(ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 20 == 0 or step + 1 == cfg.warm_steps:
            log(f"warm start {step + 1}/{cfg.warm_steps}: loss {out.loss.item():.3f}")
    model.eval()


def save_warm_start(cfg: ToolExperimentConfig, dst: str | Path, log=print) -> Path:
    """Only the warm start, saved as a `from_pretrained` directory (model + tokenizer): the `--init` of
    a GRPO run with tools (configs/grpo_tools.yaml has the same architecture)."""
    torch.manual_seed(cfg.seed)
    tok = build_tiny_tokenizer(cfg.tokenizer_vocab)
    model = BitMambaLM(BitMambaConfig.preset(cfg.preset, **cfg.model_overrides))
    warm_start(cfg, model, tok, BigMultiplyTask(seed=cfg.seed, digits=cfg.digits), log)
    dst = Path(dst)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def task_rows(task, split: str, start: int, count: int) -> list[dict]:
    return [task.row(split, i) for i in range(start, start + count)]


def rl_step(cfg: ToolExperimentConfig, model, opt, agent: Agent, tok, task, step: int) -> dict[str, float]:
    """One GRPO step on agent rollouts: episodes -> rewards -> advantages -> one masked update."""
    rows = task_rows(task, "train", step * cfg.prompts_per_step, cfg.prompts_per_step)
    G = cfg.group_size
    t0 = time.perf_counter()
    reqs = [GenRequest(tok.encode(r["prompt"], add_special_tokens=False),
                       SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=G,
                                      seed=cfg.seed * 1_000_003 + step * 7919 + i, eos_token_id=tok.eos_token_id),
                       request_id=i, meta={"messages": r["messages"]}) for i, r in enumerate(rows)]
    model.eval()
    trajs = agent.generate(reqs)
    t_gen = time.perf_counter() - t0
    rewards = [tool_answer_reward(rows[i // G]["prompt"], t.text, rows[i // G]["answer"], **t.reward_fields())
               for i, t in enumerate(trajs)]
    adv, valid = algo.group_advantages(rewards, G)
    batch = TrainBatch(**batch_fields(trajs, valid=valid.tolist()), advantages=adv.tolist())
    mb = collate(batch, list(range(len(batch))), pad_id=tok.pad_token_id)
    model.train()
    logp = model.token_logprobs(mb.input_ids, mb.targets)                            # [B, L-1]
    loss_cfg = algo.LossConfig(clip_low=cfg.clip_low, clip_high=cfg.clip_high, tis_cap=cfg.tis_cap)
    loss, lm = algo.policy_loss(logp, logp.detach(), mb.advantages, mb.mask, loss_cfg,
                                rollout_logp=mb.rollout_logp)
    opt.zero_grad()
    grad_norm = 0.0
    if bool(mb.mask.sum() > 0):
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
    model.eval()
    m = {"step": step, "reward_mean": sum(rewards) / len(rewards), "time/generate": t_gen,
         "learn/grad_norm": grad_norm, "learn/trained_tokens": float(mb.mask.sum()),
         "tokens": float(sum(len(t.token_ids) for t in trajs)),
         "correct_with_tool": sum(r for r, t in zip(rewards, trajs) if any(c.status == "ok" for c in t.tool_calls))
         / max(1, sum(any(c.status == "ok" for c in t.tool_calls) for t in trajs))}
    m.update(agent_metrics(trajs))
    m.update({f"learn/{k}": v for k, v in lm.items()})
    return m


def run_experiment(cfg: ToolExperimentConfig, out: Path | None = None, log=print) -> list[dict[str, float]]:
    """Warm start, then `cfg.steps` GRPO steps; returns one metrics record per step."""
    torch.manual_seed(cfg.seed)
    tok = build_tiny_tokenizer(cfg.tokenizer_vocab)
    model = BitMambaLM(BitMambaConfig.preset(cfg.preset, **cfg.model_overrides))
    task = BigMultiplyTask(seed=cfg.seed, digits=cfg.digits)
    t0 = time.perf_counter()
    warm_start(cfg, model, tok, task, log)
    acfg = AgentConfig(**cfg.agent)
    tools = ToolSet(load_tools(cfg.tools), timeout_s=acfg.tool_timeout_s, max_result_chars=acfg.max_result_chars,
                    workers=acfg.tool_workers)
    agent = Agent(make_backend(model, "torch"), tok, tools, acfg, slots=cfg.slots, sync_every=8)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    records = []
    f = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / "metrics.jsonl", "w")
    try:
        for step in range(cfg.steps):
            m = rl_step(cfg, model, opt, agent, tok, task, step)
            records.append(m)
            if f is not None:
                f.write(json.dumps(m) + "\n")
                f.flush()
            log(f"step {step + 1}/{cfg.steps}: reward {m['reward_mean']:.3f} tool-use {m['agent/tool_use_rate']:.3f} "
                f"malformed/call {m['agent/malformed_per_call']:.2f} correct|tool {m['correct_with_tool']:.2f} "
                f"gen {m['time/generate']:.1f}s")
    finally:
        agent.close()
        if f is not None:
            f.close()
    if out is not None:
        k = max(1, min(5, len(records) // 4))
        summary = {"first_steps": _mean(records[:k]), "last_steps": _mean(records[-k:]),
                   "seconds": time.perf_counter() - t0, "config": cfg.__dict__}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return records


def _mean(recs: list[dict]) -> dict[str, float]:
    keys = ("reward_mean", "agent/tool_use_rate", "agent/malformed_per_call", "correct_with_tool")
    return {k: sum(r[k] for r in recs) / len(recs) for k in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rl.grpo.tool_tasks", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tools_experiment_tiny.yaml"))
    p.add_argument("--out", default="runs/tool_demo")
    p.add_argument("--warm-only", metavar="DIR", help="run only the warm start and save the model to DIR "
                   "(for python -m rl.grpo.driver --config configs/grpo_tools.yaml --init DIR)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(ToolExperimentConfig, args.config, args.overrides)
    if args.warm_only:
        dst = save_warm_start(cfg, args.warm_only, log=lambda s: print(s, file=sys.stderr, flush=True))
        print(f"warm start saved to {dst}", file=sys.stderr)
        return 0
    recs = run_experiment(cfg, Path(args.out), log=lambda s: print(s, file=sys.stderr, flush=True))
    a, b = _mean(recs[:5]), _mean(recs[-5:])
    print(json.dumps({"first_5": a, "last_5": b}), flush=True)
    return 0 if all(math.isfinite(v) for v in b.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
