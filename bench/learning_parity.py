"""Learning parity: the same GRPO from the same weights in TRL's GRPOTrainer and in ours, judged on held-out.

    python bench/learning_parity.py --stage sft  --work DIR     # our SFT warm start, then the HF export
    python bench/learning_parity.py --stage trl  --work DIR --seeds 0 1 2
    python bench/learning_parity.py --stage ours --work DIR --seeds 0 1 2
    python bench/learning_parity.py --stage report --work DIR   # -> bench/results/learning_parity.{json,png}

The model is a small Mamba-2 with quantization off (TRL cannot run ternary layers) in the standard layout
that transformers' `Mamba2ForCausalLM` computes; our supervised warm start brings it to a starting
competence on the `digits` task (multi-digit addition / subtraction, held out by operand pair), then
`bitmamba convert --to hf-mamba2` exports it for TRL. Both runs use the same group size, prompts per step,
learning rate (constant), clip bounds (0.2 / 0.28), no KL, temperature, max new tokens, steps and token-mean
loss (TRL's `bnpo`), one optimizer step per generated batch, bf16 on GPU. Every `--eval-every` steps the
policy (TRL's converted back to ours) is scored by one evaluator: held-out pass@1 over `--eval-prompts`
problems x `--eval-samples` samples at the training temperature, with our engine and the task's checker.
Seconds per step exclude the evals. Each stage writes DIR/<stage>_seed<k>.json; `report` merges them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.lm import BitMambaLM  # noqa: E402
from rl.grpo.tasks import exact_digits, make_task  # noqa: E402


@dataclass
class Setup:
    """Everything both trainers share."""

    preset: str = "tiny"
    overrides: tuple = (("d_model", 256), ("n_layers", 4), ("vocab_size", 272), ("quant", {"ternary": False}))
    task_kwargs: tuple = (("min_digits", 1), ("max_digits", 3), ("ops", "+-"))
    warm_steps: tuple = (150, 300, 600, 1200)   # tried in order until held-out pass@1 >= warm_target
    warm_target: float = 0.2
    warm_lr: float = 2e-3
    group_size: int = 8
    prompts_per_step: int = 32
    steps: int = 60
    lr: float = 1e-4
    temperature: float = 1.0
    max_new_tokens: int = 8
    eval_every: int = 15
    eval_prompts: int = 256
    eval_samples: int = 4


def grpo_config(s: Setup, work: Path, seed: int, on_gpu: bool):
    from rl.grpo.config import load_grpo_config

    return load_grpo_config(data={
        "model": {"path": str(work / "warmstart"), "tokenizer": str(work / "warmstart"), "max_seq_len": 32,
                  "backend": "auto"},
        "task": {"name": "digits", "kwargs": dict(s.task_kwargs), "eval_size": s.eval_prompts},
        "rewards": [{"spec": "rl.grpo.tasks:exact_digits"}], "reward_pool": {"num_workers": 1},
        "group_size": s.group_size, "prompts_per_step": s.prompts_per_step, "steps": s.steps,
        "sampling": {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature},
        "algo": {"clip_low": 0.2, "clip_high": 0.28, "aggregation": "token-mean", "kl_coef": 0.0},
        "learner": {"lr": s.lr, "micro_batch_tokens": 16384, "num_gpus": 0.5 if on_gpu else 0,
                    "offload_optimizer": False, "deepspeed": {"optimizer": {"params": {"torch_adam": True}}}},
        "workers": {"num_workers": 1, "num_gpus": 0.5 if on_gpu else 0},
        "checkpoint_every": s.eval_every, "keep_checkpoints": 100, "eval_every": 0,
        "seed": seed, "output_dir": str(work / f"ours_seed{seed}"), "wandb": False})


# ---------------------------------------------------------------------------------------------- eval


def heldout(model: BitMambaLM, tok, s: Setup, seed: int = 0) -> dict[str, float]:
    """Held-out pass@1 (and its standard error over prompts) of `model` with our engine."""
    from rewards import RewardPool
    from rl.eval.gen import evaluate_generation
    from rollout.backends import make_backend
    from rollout.engine import Engine
    from rollout.types import SamplingParams

    task = make_task("digits", seed=0, **dict(s.task_kwargs))
    rows = [task.row("eval", i) for i in range(s.eval_prompts)]
    engine = Engine(make_backend(model.eval(), "torch"), slots=256)
    with RewardPool([{"spec": "rl.grpo.tasks:exact_digits"}], num_workers=0) as pool:
        m = evaluate_generation(engine, tok, rows, pool, s.eval_samples, k_values=[1], seed=seed,
                                params=SamplingParams(temperature=s.temperature, max_new_tokens=s.max_new_tokens),
                                return_samples=True)
    per_prompt = [sum(1 for v in smp["rewards"] if v is not None and v >= 1.0) / s.eval_samples
                  for smp in m["samples"]]
    mean = sum(per_prompt) / len(per_prompt)
    var = sum((p - mean) ** 2 for p in per_prompt) / max(len(per_prompt) - 1, 1)
    return {"pass@1": m["pass@1"], "stderr": math.sqrt(var / len(per_prompt))}


# ---------------------------------------------------------------------------------------------- stages


def stage_sft(s: Setup, work: Path) -> dict:
    """Our supervised warm start, the shortest of `warm_steps` that reaches `warm_target` held-out pass@1
    (GRPO needs groups with mixed rewards), then the HF export."""
    from model.convert import export_hf
    from rl.demo import warm_start
    from rollout.tokenizer import load_tokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = grpo_config(s, work, 0, dev == "cuda")
    cfg.model.path, cfg.model.preset = None, s.preset
    cfg.model.overrides = dict(s.overrides)
    t0 = time.perf_counter()
    tried = []
    for steps in s.warm_steps:
        src = warm_start(cfg, work, steps, lr=s.warm_lr, device=dev)
        model = BitMambaLM.from_pretrained(src).to(dev)
        tried.append({"steps": steps, **heldout(model, load_tokenizer(str(src)), s)})
        print("warm start", tried[-1], flush=True)
        if tried[-1]["pass@1"] >= s.warm_target:
            break
    export_hf(src, work / "hf")
    out = {"warm_start_s": time.perf_counter() - t0, "tried": tried, "heldout": tried[-1],
           "params": sum(p.numel() for p in model.parameters())}
    (work / "sft.json").write_text(json.dumps(out, indent=1))
    return out


def trl_to_ours(hf_model, cfg) -> BitMambaLM:
    from model.hf_mamba2 import hf_state_dict_to_ours

    sd = hf_state_dict_to_ours({k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}, cfg, "trl")
    model = BitMambaLM(cfg)
    model.load_state_dict(sd)
    return model.to(next(hf_model.parameters()).device)


def stage_trl(s: Setup, work: Path, seed: int) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from grpo_trl import prepare_hf_kernels, route_hf_kernels   # transformers' Mamba2 kernel routing

    prepare_hf_kernels("auto")      # mamba-ssm's Triton kernels, as a user with a full install gets them
    import datasets
    import transformers
    import trl

    route_hf_kernels("auto")        # without causal-conv1d the fused training kernel takes the torch path

    from rollout.tokenizer import load_tokenizer

    tok = load_tokenizer(str(work / "warmstart"))
    ours_cfg = BitMambaLM.from_pretrained(work / "warmstart").config
    task = make_task("digits", seed=seed, **dict(s.task_kwargs))
    rows = [task.row("train", i) for i in range(s.steps * s.prompts_per_step)]
    data = datasets.Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})

    def reward(prompts, completions, answer, **_):
        return [exact_digits(p, c, a) for p, c, a in zip(prompts, completions, answer)]

    on_gpu = torch.cuda.is_available()
    args = trl.GRPOConfig(
        output_dir=str(work / f"trl_seed{seed}"), per_device_train_batch_size=s.prompts_per_step * s.group_size,
        num_generations=s.group_size, gradient_accumulation_steps=1, num_iterations=1,
        max_completion_length=s.max_new_tokens, temperature=s.temperature, learning_rate=s.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        epsilon=0.2, epsilon_high=0.28, beta=0.0, loss_type="bnpo", scale_rewards="group",
        max_steps=s.steps, bf16=on_gpu, use_cpu=not on_gpu, report_to=[], logging_steps=1, save_strategy="no",
        seed=seed, shuffle_dataset=False)
    model = transformers.Mamba2ForCausalLM.from_pretrained(work / "hf", torch_dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tok)
    curve, step_times = [], []

    class Evals(transformers.TrainerCallback):
        t = None

        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)
            if state.global_step % s.eval_every == 0:
                curve.append({"step": state.global_step, **heldout(trl_to_ours(trainer.model, ours_cfg), tok, s)})

    curve.append({"step": 0, **heldout(trl_to_ours(model, ours_cfg), tok, s)})
    trainer.add_callback(Evals())
    trainer.train()
    return {"curve": curve, "seconds_per_step": step_times}


def stage_ours(s: Setup, work: Path, seed: int) -> dict:
    from rl.grpo.driver import Driver
    from rollout.tokenizer import load_tokenizer

    on_gpu = torch.cuda.is_available()
    cfg = grpo_config(s, work, seed, on_gpu)
    driver = Driver(cfg, None)
    try:
        driver.run()
    finally:
        driver.close()
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    tok = load_tokenizer(str(work / "warmstart"))
    dev = "cuda" if on_gpu else "cpu"
    curve = [{"step": 0, **heldout(BitMambaLM.from_pretrained(work / "warmstart").to(dev), tok, s)}]
    for ck in sorted((Path(cfg.output_dir) / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:])):
        curve.append({"step": int(ck.name[5:]), **heldout(BitMambaLM.from_pretrained(ck).to(dev), tok, s)})
    return {"curve": curve, "seconds_per_step": [r["time/step"] for r in rows if "time/step" in r]}


def stage_report(work: Path, out: Path) -> dict:
    runs = {k: [json.loads(p.read_text()) for p in sorted(work.glob(f"{k}_seed*.json"))] for k in ("trl", "ours")}
    summary = {"sft": json.loads((work / "sft.json").read_text()) if (work / "sft.json").exists() else None}
    for k, rs in runs.items():
        steps = [pt["step"] for pt in rs[0]["curve"]] if rs else []
        summary[k] = {"seeds": len(rs), "steps": steps,
                      "pass@1": [[pt["pass@1"] for pt in r["curve"]] for r in rs],
                      "stderr": [[pt["stderr"] for pt in r["curve"]] for r in rs],
                      "s_per_step_median": [sorted(r["seconds_per_step"][1:])[len(r["seconds_per_step"][1:]) // 2]
                                            for r in rs if len(r["seconds_per_step"]) > 1]}
    if runs["trl"] and runs["ours"]:
        t = sum(summary["trl"]["s_per_step_median"]) / len(summary["trl"]["s_per_step_median"])
        o = sum(summary["ours"]["s_per_step_median"]) / len(summary["ours"]["s_per_step_median"])
        summary["speedup_per_step"] = t / o
    print(f"{'trainer':<6} {'seed':>4}  held-out pass@1 at steps {summary.get('ours', {}).get('steps')}   s/step")
    for k in ("trl", "ours"):
        for i, (p, sps) in enumerate(zip(summary[k]["pass@1"], summary[k]["s_per_step_median"])):
            print(f"{k:<6} {i:>4}  " + " ".join(f"{v:.3f}" for v in p) + f"   {sps:.3f}")
    if "speedup_per_step" in summary:
        print(f"ours is {summary['speedup_per_step']:.1f}x faster per step (median step, same run)")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, out.with_suffix(".png"))
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, color in (("trl", "tab:orange"), ("ours", "tab:blue")):
        for i, p in enumerate(summary.get(k, {}).get("pass@1", [])):
            ax.plot(summary[k]["steps"], p, color=color, alpha=0.8, label=f"{k}" if i == 0 else None, marker="o")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out pass@1")
    ax.set_title("Same model, task and GRPO settings: TRL vs ours")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=["sft", "trl", "ours", "report"], required=True)
    ap.add_argument("--work", required=True, help="working directory shared by the stages")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench/results/learning_parity"))
    ap.add_argument("--quick", action="store_true", help="a CPU smoke run of every stage at toy sizes")
    args = ap.parse_args()
    s = Setup()
    if args.quick:
        s.warm_steps, s.steps, s.eval_every, s.eval_prompts, s.prompts_per_step = (10,), 2, 1, 8, 2
        s.overrides = (("d_model", 64), ("n_layers", 2), ("vocab_size", 272), ("quant", {"ternary": False}))
    if args.steps is not None:
        s.steps = args.steps
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "sft":
        print(json.dumps(stage_sft(s, work)))
    elif args.stage == "report":
        stage_report(work, Path(args.out))
    else:
        for seed in args.seeds:
            res = (stage_trl if args.stage == "trl" else stage_ours)(s, work, seed)
            res["setup"] = {k: getattr(s, k) for k in s.__dataclass_fields__}
            (work / f"{args.stage}_seed{seed}.json").write_text(json.dumps(res, indent=1, default=list))
            print(args.stage, seed, [round(p["pass@1"], 3) for p in res["curve"]], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
