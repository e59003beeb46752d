"""Learning-rate schedules with phases: warmup-stable-decay (WSD) and the four-phase FG-WSD.

    sched = Schedule(ScheduleConfig(kind="fg-wsd"), total_steps=10_000, base_seq_len=8192)
    mult = sched.lr_mult(step)        # multiplier of every group's peak LR at optimizer step `step` (0-based)
    ph = sched.phase_at(step)         # Phase(name, index, start, end, shape, mixture, seq_len)

FG-WSD (Mini-Mamba-Agent, ANCHORS §1), the default phases of kind "fg-wsd":
    warmup  5%  linear 0 -> 1             mixture: `mixture`      context: seq_len
    stable 40%  constant 1                mixture: `mixture`      context: seq_len
    stable 35%  constant 1 (new data mix) mixture: `new_mixture`  context: seq_len
    decay  20%  cosine 1 -> min_lr_ratio  mixture: `new_mixture`  context: decay_seq_len (8K -> 16K)
Kind "wsd": warmup `warmup`, stable, decay `decay` (one mixture, one context length unless
decay_seq_len is set). Kind "constant" / "cosine" for short runs. An explicit `phases:` list in YAML
replaces the defaults (fractions must sum to 1). The schedule is a pure function of the step, so
resuming restores it exactly from the step alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from model.errors import ConfigError

Shape = Literal["linear_warmup", "constant", "cosine", "linear"]


@dataclass
class PhaseConfig:
    name: str
    fraction: float                       # share of total steps
    shape: Shape = "constant"             # LR inside the phase
    mixture: dict[str, float] | None = None   # data-source weights (None: the schedule's `mixture`)
    seq_len: int | None = None            # context length (None: the base seq_len)

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction: must be in (0, 1], got {self.fraction} (phase {self.name})")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"seq_len: must be >= 1, got {self.seq_len} (phase {self.name})")


@dataclass
class ScheduleConfig:
    kind: Literal["wsd", "fg-wsd", "cosine", "constant"] = "wsd"
    warmup: float = 0.05                  # fractions of total steps (wsd / cosine)
    decay: float = 0.2
    min_lr_ratio: float = 0.01            # final LR / peak at the end of the decay
    decay_shape: Literal["cosine", "linear"] = "cosine"
    fg_fractions: tuple[float, float, float, float] = (0.05, 0.40, 0.35, 0.20)
    mixture: dict[str, float] = field(default_factory=dict)       # first mixture (empty: source weights)
    new_mixture: dict[str, float] = field(default_factory=dict)   # FG-WSD phases 3-4 (empty: same as mixture)
    decay_seq_len: int | None = None      # context length in the decay phase (None: unchanged)
    phases: list[PhaseConfig] = field(default_factory=list)      # explicit phases override `kind`

    def __post_init__(self):
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"schedule.warmup: must be in [0, 1), got {self.warmup}")
        if not 0 <= self.decay <= 1 or self.warmup + self.decay > 1:
            raise ConfigError(f"schedule.decay: must be in [0, 1] with warmup + decay <= 1, got {self.decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if abs(sum(self.fg_fractions) - 1) > 1e-6 or min(self.fg_fractions) < 0:
            raise ConfigError(f"schedule.fg_fractions: must be >= 0 and sum to 1, got {list(self.fg_fractions)}")
        if self.phases and abs(sum(p.fraction for p in self.phases) - 1) > 1e-6:
            raise ConfigError(f"schedule.phases: fractions must sum to 1, got "
                              f"{sum(p.fraction for p in self.phases):.4f}")
        if self.decay_seq_len is not None and self.decay_seq_len < 1:
            raise ConfigError(f"schedule.decay_seq_len: must be >= 1, got {self.decay_seq_len}")
        for key in ("mixture", "new_mixture"):
            if any(w < 0 for w in getattr(self, key).values()):
                raise ConfigError(f"schedule.{key}: weights must be >= 0")

    def phase_configs(self) -> list[PhaseConfig]:
        if self.phases:
            return list(self.phases)
        mix = dict(self.mixture) or None
        new = dict(self.new_mixture) or mix
        dshape = self.decay_shape
        if self.kind == "fg-wsd":
            w, s1, s2, d = self.fg_fractions
            out = [PhaseConfig("warmup", w, "linear_warmup", mix) if w else None,
                   PhaseConfig("stable", s1, "constant", mix) if s1 else None,
                   PhaseConfig("stable_new_mix", s2, "constant", new) if s2 else None,
                   PhaseConfig("decay", d, dshape, new, self.decay_seq_len) if d else None]
            return [p for p in out if p is not None]
        if self.kind == "wsd":
            stable = 1 - self.warmup - self.decay
            out = [PhaseConfig("warmup", self.warmup, "linear_warmup", mix) if self.warmup else None,
                   PhaseConfig("stable", stable, "constant", mix) if stable > 1e-9 else None,
                   PhaseConfig("decay", self.decay, dshape, mix, self.decay_seq_len) if self.decay else None]
            return [p for p in out if p is not None]
        if self.kind == "cosine":
            out = [PhaseConfig("warmup", self.warmup, "linear_warmup", mix) if self.warmup else None,
                   PhaseConfig("decay", 1 - self.warmup, "cosine", mix, self.decay_seq_len)]
            return [p for p in out if p is not None]
        return [PhaseConfig("constant", 1.0, "constant", mix)]


@dataclass
class Phase:
    name: str
    index: int
    start: int              # first step (inclusive)
    end: int                # last step + 1
    shape: str
    mixture: dict[str, float] | None
    seq_len: int


class Schedule:
    """Phases laid over `total_steps` optimizer steps; LR multiplier and phase lookup by step."""

    def __init__(self, cfg: ScheduleConfig, total_steps: int, base_seq_len: int = 0):
        if total_steps < 1:
            raise ConfigError(f"total steps must be >= 1, got {total_steps}")
        self.cfg, self.total = cfg, total_steps
        self.min_ratio = cfg.min_lr_ratio
        pcs = cfg.phase_configs()
        self.phases: list[Phase] = []
        start = 0
        acc = 0.0
        for i, pc in enumerate(pcs):
            acc += pc.fraction
            end = total_steps if i == len(pcs) - 1 else min(total_steps, round(acc * total_steps))
            self.phases.append(Phase(pc.name, i, start, max(end, start), pc.shape, pc.mixture,
                                     pc.seq_len or base_seq_len))
            start = max(end, start)

    def phase_at(self, step: int) -> Phase:
        for ph in self.phases:
            if step < ph.end:
                return ph if ph.end > ph.start else self.phases[-1]
        return self.phases[-1]

    def lr_mult(self, step: int) -> float:
        step = min(max(step, 0), self.total - 1)
        ph = self.phase_at(step)
        n = max(ph.end - ph.start, 1)
        if ph.shape == "linear_warmup":
            return (step - ph.start + 1) / n
        if ph.shape == "constant":
            return 1.0
        p = (step - ph.start) / max(n - 1, 1)  # 0 at the first decay step, 1 at the last
        if ph.shape == "cosine":
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        return 1 - (1 - self.min_ratio) * p  # linear

    __call__ = lr_mult  # usable as a LambdaLR lambda

    def describe(self) -> str:
        return "schedule: " + ", ".join(
            f"{p.name}[{p.start}:{p.end}] {p.shape}" + (f" ctx {p.seq_len}" if p.seq_len else "")
            + (f" mix {p.mixture}" if p.mixture else "") for p in self.phases)
