"""Curves of a GRPO run's metrics.jsonl (matplotlib, Agg backend: no display needed).

    python -m rl.plot runs/demo/metrics.jsonl runs/demo/reward.png

With held-out evals in the log (`eval/pass@1`, and a step-0 record for the policy before GRPO) the
figure has two panels: held-out pass@1 with its standard error (left) beside the training reward
(right); without them, the training reward alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from rl.train.metrics import read_metrics  # noqa: E402


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _heldout_panel(ax, recs: list[dict]) -> None:
    """Held-out pass@1 per eval (error bars: one standard error over prompts)."""
    ev = [r for r in recs if "eval/pass@1" in r]
    steps = [r["step"] for r in ev]
    p1 = [r["eval/pass@1"] for r in ev]
    se = [r.get("eval/pass@1_stderr", 0.0) for r in ev]
    ax.errorbar(steps, p1, yerr=se, fmt="o-", color="#e6550d", capsize=3, lw=2, label="held-out pass@1 (± 1 s.e.)")
    for s, v in ((steps[0], p1[0]), (steps[-1], p1[-1])):
        ax.annotate(f"{v:.2f}", (s, v), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_title("held-out problems (never trained on)")
    ax.set_ylabel("pass@1")


def _reward_panel(ax, recs: list[dict]) -> None:
    """Training reward_mean per step (raw + moving average), and the tool-use rate of agent runs."""
    tr = [r for r in recs if "reward_mean" in r]
    steps = [r["step"] for r in tr]
    rew = [r["reward_mean"] for r in tr]
    ax.plot(steps, rew, color="#9ecae1", lw=1, label="train reward_mean")
    ax.plot(steps, smooth(rew, 10), color="#08519c", lw=2, label="train (moving avg, 10 steps)")
    if not any("eval/pass@1" in r for r in recs):
        ev = [(r["step"], r["eval/reward_mean"]) for r in tr if "eval/reward_mean" in r]
        if ev:
            ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", color="#e6550d", label="held-out eval reward")
    tools = [(r["step"], r["agent/tool_use_rate"]) for r in tr if "agent/tool_use_rate" in r]
    if tools:   # agent runs: share of completions that called a tool
        ax.plot([s for s, _ in tools], [v for _, v in tools], "--", color="#31a354", lw=1.5, label="tool-use rate")
    ax.set_title("training prompts (sampled groups)")
    ax.set_ylabel("mean reward")


def figure(recs: list[dict], title: str = "GRPO"):
    """The matplotlib figure for metrics records: [held-out pass@1, training reward] panels when the
    records hold held-out evals, else [training reward]."""
    heldout = any("eval/pass@1" in r for r in recs)
    fig, axes = plt.subplots(1, 2 if heldout else 1, figsize=(11 if heldout else 7, 4), dpi=110, squeeze=False)
    panels = [_heldout_panel, _reward_panel] if heldout else [_reward_panel]
    for ax, draw in zip(axes[0], panels):
        draw(ax, recs)
        ax.set_xlabel("GRPO step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_reward(metrics_path: str | Path, png_path: str | Path, title: str = "GRPO") -> Path:
    """Held-out pass@1 beside the training reward (or the training reward alone); returns the PNG path."""
    fig = figure(read_metrics(metrics_path), title)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


if __name__ == "__main__":
    print(plot_reward(sys.argv[1], sys.argv[2]))
