"""Reward-vs-step plot of a GRPO run's metrics.jsonl (matplotlib, Agg backend: no display needed).

    python -m rl.plot runs/demo/metrics.jsonl runs/demo/reward.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from rl.metrics import read_metrics  # noqa: E402


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_reward(metrics_path: str | Path, png_path: str | Path, title: str = "GRPO: mean reward") -> Path:
    """Train reward_mean per step (raw + moving average) and eval reward where logged."""
    recs = [r for r in read_metrics(metrics_path) if "reward_mean" in r]
    steps = [r["step"] for r in recs]
    rew = [r["reward_mean"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, rew, color="#9ecae1", lw=1, label="train reward_mean")
    ax.plot(steps, smooth(rew, 10), color="#08519c", lw=2, label="train (moving avg, 10 steps)")
    ev = [(r["step"], r["eval/reward_mean"]) for r in recs if "eval/reward_mean" in r]
    if ev:
        ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", color="#e6550d", label="held-out eval reward")
    tools = [(r["step"], r["agent/tool_use_rate"]) for r in recs if "agent/tool_use_rate" in r]
    if tools:   # agent runs: share of completions that called a tool
        ax.plot([s for s, _ in tools], [v for _, v in tools], "--", color="#31a354", lw=1.5, label="tool-use rate")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


if __name__ == "__main__":
    print(plot_reward(sys.argv[1], sys.argv[2]))
