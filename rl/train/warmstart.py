"""Supervised warm start: a few hundred steps of the shared training step (`rl.train.loop.Trainer`,
fp32, AdamW without weight decay, constant learning rate) on (token ids, loss mask) examples, before
GRPO. The demo (digits task) and the tool-use warm start (calculator demonstrations) use it.

    warm_start_steps(model, tok, examples, steps=900, batch_size=64, lr=3e-3, seed=0)

`examples(step)` returns the step's batch as `(ids, mask)` pairs (mask 1: the token gets loss).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from rl.train.data import collate_sft
from rl.train.loop import LossOut, TrainConfig, Trainer
from rl.train.optim import OptimConfig, build_optimizer
from rl.train.schedule import Schedule, ScheduleConfig

Examples = Callable[[int], list[tuple[list[int], list[int]]]]


def _loss(m, mb) -> LossOut:
    out = m(mb.input_ids, labels=mb.labels)
    return LossOut(out.loss_sum, out.n_tokens)


def warm_start_steps(model, tok, examples: Examples, steps: int, batch_size: int, lr: float, seed: int,
                     device: str = "cpu", log_every: int = 100,
                     log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> None:
    """`steps` optimizer steps on `examples(step)`; logs the loss every `log_every` steps and at the end."""
    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0, muon=False), verbose=False)
    tcfg = TrainConfig(max_steps=max(steps, 1), batch_size=batch_size, precision="fp32", device=device, seed=seed)
    trainer = Trainer(model, opt, Schedule(ScheduleConfig(kind="constant"), total_steps=max(steps, 1)), tcfg)
    for step in range(steps):
        res = trainer.step(step, [collate_sft(examples(step), pad=tok.pad_token_id)], _loss)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"warm start {step + 1}/{steps}: loss {res.loss:.3f}")
