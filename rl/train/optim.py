"""Optimizer routing: Muon for the 2-D ternary matrices, AdamW for the rest, a slow group for SSM scalars.

    opt = build_optimizer(model, OptimConfig(lr=3e-3))   # prints the groups with parameter counts
    opt.step(); opt.zero_grad(); opt.set_lr_mult(0.5); opt.state_dict()

Groups (Mini-Mamba-Agent recipe, ANCHORS §1/§5):
- `muon`:      weights of ternary BitLinears (in_proj, out_proj, q/k/v/o_proj, lm_head when ternary);
               all 2-D. `torch.optim.Muon` (momentum 0.95, Nesterov, Newton-Schulz 5 steps).
- `adamw`:     embedding, a full-precision head, conv1d weights; weight decay.
- `adamw_no_decay`: norm weights and biases (1-D), no weight decay.
- `ssm`:       A_log, dt_bias, D at `ssm_lr_mult` x lr (default 0.1), no weight decay.
With `muon: false` the Muon group goes to AdamW (with weight decay). Every parameter lands in exactly
one group (checked); Muon never receives a non-2-D tensor (checked before construction).

`HybridOptimizer` holds the underlying optimizers and applies the schedule's LR multiplier to every
group's base LR (`base_lr` in each param group), so one multiplier drives Muon and AdamW alike.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from model.errors import ConfigError

SSM_SUFFIXES = ("A_log", "dt_bias", "D")


@dataclass
class OptimConfig:
    lr: float = 1e-3                      # peak LR of the AdamW groups
    muon_lr: float | None = None          # peak LR of Muon (default: lr; with adjust "match_rms_adamw" the same LR fits both)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    muon: bool = True                     # False: AdamW for the ternary matrices too
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "match_rms_adamw"
    ssm_lr_mult: float = 0.1              # A_log, dt_bias, D
    grad_clip: float = 1.0                # 0 disables clipping
    fused: bool = False                   # fused AdamW kernel (CUDA)
    cpu_offload: bool = False             # fp32 master weights + optimizer state on the CPU (saves GPU memory)

    def __post_init__(self):
        for k in ("lr", "weight_decay", "eps", "ssm_lr_mult", "grad_clip"):
            if getattr(self, k) < 0:
                raise ConfigError(f"optim.{k}: must be >= 0, got {getattr(self, k)}")
        if self.muon_lr is not None and self.muon_lr < 0:
            raise ConfigError(f"optim.muon_lr: must be >= 0, got {self.muon_lr}")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ConfigError(f"optim.betas: each must be in [0, 1), got {list(self.betas)}")
        if self.muon_ns_steps < 1:
            raise ConfigError(f"optim.muon_ns_steps: must be >= 1, got {self.muon_ns_steps}")


def _ternary_weight_names(model: nn.Module) -> set[str]:
    """Names of the latent weights of ternary BitLinears (model.bitlinears() if present, else by name)."""
    if hasattr(model, "bitlinears"):
        return {f"{name}.weight" for name, m in model.bitlinears() if getattr(m, "ternary", True)}
    head_ternary = bool(getattr(getattr(model, "config", None), "ternary_head", False))
    return {n for n, p in model.named_parameters()
            if p.ndim == 2 and (n.endswith("_proj.weight") or (head_ternary and n == "lm_head.weight"))}


def route_parameters(model: nn.Module, use_muon: bool = True) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """group name -> [(param name, param)] for trainable parameters; each parameter exactly once."""
    ternary = _ternary_weight_names(model)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": [], "adamw_no_decay": [], "ssm": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # tied weights appear once (the first name, e.g. embedding)
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        if leaf in SSM_SUFFIXES:
            groups["ssm"].append((name, p))
        elif name in ternary and p.ndim == 2 and use_muon:
            groups["muon"].append((name, p))
        elif p.ndim >= 2:
            groups["adamw"].append((name, p))
        else:
            groups["adamw_no_decay"].append((name, p))
    bad = [(n, tuple(p.shape)) for n, p in groups["muon"] if p.ndim != 2]
    if bad:  # Muon rejects these; routing must never produce one
        raise AssertionError(f"non-2-D parameters routed to Muon: {bad}")
    return groups


class HybridOptimizer:
    """Muon + AdamW behind one optimizer-like interface (step, zero_grad, state_dict, param_groups)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], group_names: list[str]):
        self.optimizers = optimizers
        self.group_names = group_names

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def parameters(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def step(self) -> None:
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def set_lr_mult(self, mult: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * mult

    @property
    def lr(self) -> float:
        """Current LR of the main AdamW group (what the logs call `lr`)."""
        for g in self.param_groups:
            if g["name"] == "adamw":
                return g["lr"]
        return self.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ConfigError(f"optimizer state holds {sorted(state)}, this run uses {sorted(self.optimizers)} "
                              "(was `optim.muon` changed between runs?)")
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])

    def describe(self) -> str:
        lines = ["optimizer groups:"]
        for g in self.param_groups:
            n = sum(p.numel() for p in g["params"])
            lines.append(f"  {g['name']:<15} {g['kind']:<6} tensors {len(g['params']):>4}  params {n:>13,}  "
                         f"lr {g['base_lr']:.2e}  wd {g['weight_decay']}")
        return "\n".join(lines)


def build_optimizer(model: nn.Module, cfg: OptimConfig, verbose: bool = True) -> HybridOptimizer:
    """Route parameters and build Muon/AdamW; print the groups with counts unless verbose=False.

    With cfg.cpu_offload the optimizer runs on CPU copies of the parameters (`CPUOffloadOptimizer`)."""
    routed = route_parameters(model, cfg.muon)
    if cfg.cpu_offload:
        opt = CPUOffloadOptimizer(routed, cfg)
    else:
        opt = _build_from_routed(routed, cfg)
    if verbose:
        print(opt.describe(), file=sys.stderr, flush=True)
    return opt


def _build_from_routed(routed: dict[str, list[tuple[str, nn.Parameter]]], cfg: OptimConfig) -> HybridOptimizer:
    adamw_groups = []
    spec = {
        "adamw": dict(lr=cfg.lr, weight_decay=cfg.weight_decay),
        "adamw_no_decay": dict(lr=cfg.lr, weight_decay=0.0),
        "ssm": dict(lr=cfg.lr * cfg.ssm_lr_mult, weight_decay=0.0),
    }
    for name, kw in spec.items():
        if routed[name]:
            adamw_groups.append({"params": [p for _, p in routed[name]], "name": name, "kind": "adamw",
                                 "base_lr": kw["lr"], "param_names": [n for n, _ in routed[name]], **kw})
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if routed["muon"]:
        mlr = cfg.lr if cfg.muon_lr is None else cfg.muon_lr
        optimizers["muon"] = torch.optim.Muon(
            [{"params": [p for _, p in routed["muon"]], "name": "muon", "kind": "muon", "base_lr": mlr,
              "param_names": [n for n, _ in routed["muon"]]}],
            lr=mlr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
            ns_steps=cfg.muon_ns_steps, adjust_lr_fn=cfg.muon_adjust_lr)
    if adamw_groups:
        kw: dict[str, Any] = {"fused": True} if cfg.fused and not cfg.cpu_offload else {}
        optimizers["adamw"] = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kw)
    if not optimizers:
        raise ConfigError("the model has no trainable parameters")
    return HybridOptimizer(optimizers, [g["name"] for o in optimizers.values() for g in o.param_groups])


class CPUOffloadOptimizer(HybridOptimizer):
    """The same Muon/AdamW groups, run on fp32 CPU copies of the parameters.

    The GPU keeps only the parameters and their gradients; optimizer state (Muon momentum, AdamW
    moments) and the fp32 master weights live in (pinned) CPU memory. step(): gradients GPU -> CPU,
    optimizer step on the CPU, updated weights CPU -> GPU. Slower per step, but the optimizer state
    costs no GPU memory (what lets a 1B model with 16K context fit a 24 GB card). Not for fp16 +
    GradScaler (the scaler unscales GPU gradients of a GPU optimizer).
    """

    def __init__(self, routed: dict[str, list[tuple[str, nn.Parameter]]], cfg: OptimConfig):
        pin = torch.cuda.is_available()
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        cpu_routed: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for g, items in routed.items():
            cpu_routed[g] = []
            for n, p in items:
                buf = torch.empty(p.shape, dtype=torch.float32, device="cpu", pin_memory=pin)
                cp = nn.Parameter(buf.copy_(p.detach()))
                cp.grad = torch.zeros_like(cp, pin_memory=pin) if pin else torch.zeros_like(cp)
                self.pairs.append((p, cp))
                cpu_routed[g].append((n, cp))
        inner = _build_from_routed(cpu_routed, cfg)
        super().__init__(inner.optimizers, inner.group_names)

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Copy the live parameters into the CPU masters (after loading weights into the model)."""
        for p, cp in self.pairs:
            cp.copy_(p)

    def parameters(self) -> list[Tensor]:
        return [p for p, _ in self.pairs]  # the live (GPU) parameters: clipping and zero_grad act on these

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _ in self.pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for p, cp in self.pairs:
            if p.grad is None:
                cp.grad.zero_()
            else:
                cp.grad.copy_(p.grad, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for o in self.optimizers.values():
            o.step()
        for p, cp in self.pairs:
            p.copy_(cp, non_blocking=True)

    def describe(self) -> str:
        return super().describe() + "\n  (optimizer state and fp32 master weights on the CPU)"
