"""Baseline: the same GRPO step under Hugging Face TRL's `GRPOTrainer` (transformers generate).

    python bench/grpo_trl.py                 # mini-agent-scout shape on one GPU -> bench/results/grpo_trl.json
    python bench/grpo_trl.py --quick         # tiny shape of grpo.py --quick, CPU, seconds (-> grpo_trl_quick.json)
    python bench/grpo_trl.py --compare bench/results/grpo.json   # also print our step time and the ratio

What is compared: our GRPO step against this baseline, as a ratio of step times. Both scripts run
the same GRPO step shape: the `mini-agent-scout` dims (d_model 512, 24 layers, d_state 64, headdim 64,
ngroups 1, expand 2, vocab 50257), randomly initialised (timing only), groups of 8, 64 prompts per
step (512 completions), 512 new tokens per completion, arithmetic prompts ("12+34=") with a 0/1
reward, no KL term, one optimizer step per rollout batch, gradient checkpointing, lr 1e-6.
  - ours:  `python bench/grpo.py --only step` -> bench/results/grpo.json, key step.mean["time/step"]
           (mean seconds per GRPO step through the Ray driver, first step skipped as warm-up);
  - TRL:   this script -> bench/results/grpo_trl.json, key mean_s_per_step (mean seconds per
           `GRPOTrainer` optimizer step, which generates all 512 completions with `model.generate`,
           scores them and runs forward/backward over them in micro-batches; first step skipped).
The ratio is computed from the two JSON files: ratio = TRL mean_s_per_step / ours step.mean["time/step"]
(`--compare` prints it and checks that the shapes match). The model here is transformers'
`Mamba2ForCausalLM` of the same dims in bf16 (plain fp weights: transformers has no ternary layers).
With `--hf-kernels auto` (default) transformers uses mamba-ssm's Triton kernels where it can (the SSD
chunk scan in training, the state update in decode; without causal-conv1d the conv and the gated
norm stay in torch); `--hf-kernels torch` forces its pure-torch code. The JSON's
`hf_kernel_impls` records which function each hook called. `tokens_per_s` is defined as in
bench/grpo.py (completion tokens per second of generation); `tokens_per_s_step` divides by the step.

On a GPU machine: `pip install -e .[bench]` (pins trl==1.16.0; TRL is optional), then
`python bench/grpo_trl.py --compare bench/results/grpo.json`, or `bash bench/gpu_suite.sh trl`.
Measured on one H100 80GB (2026-11-22, `bench/results/grpo_trl.json`, rebuilt from the console log):
135.6 s for the first step, 24.21 s per step after it.
Nothing is downloaded at run time: the tokenizer is the repo's offline tiny BPE (rollout/tokenizer.py,
as bench/grpo.py uses) and the prompts come from rl/grpo/tasks.py's ArithmeticTask (max_operand 99).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import _mamba_ssm  # noqa: E402
from model.config import BitMambaConfig  # noqa: E402
from rl.grpo.tasks import ArithmeticTask, arithmetic_reward  # noqa: E402
from rollout.tokenizer import build_tiny_tokenizer  # noqa: E402

TRL_VERSION_TESTED = "1.16.0"


def shape_args(quick: bool) -> dict:
    """The GRPO step shape, as bench/grpo.py's step benchmark (full and --quick alike)."""
    if quick:
        return dict(preset="tiny", overrides={"vocab_size": 384}, group_size=8, prompts=8,
                    max_new_tokens=32, steps=2, micro_batch=16)
    return dict(preset="mini-agent-scout", overrides={}, group_size=8, prompts=64,
                max_new_tokens=512, steps=4, micro_batch=32)


# transformers' Mamba2 kernel hooks: each resolves at import to mamba-ssm / causal-conv1d or to torch
HF_KERNEL_FUNCS = ("mamba2_split_conv1d_scan_combined", "mamba2_chunk_scan", "mamba2_selective_state_update",
                   "causal_conv1d_fn", "causal_conv1d_update")


def prepare_hf_kernels(mode: str) -> None:
    """Before transformers' Mamba2 module is imported. `auto` on CUDA: make mamba-ssm importable when it
    was installed without its CUDA extension (the GPU machine's Triton-only install), so transformers
    picks its Triton kernels as it would for a user with a full install."""
    if mode == "auto" and torch.cuda.is_available():
        _mamba_ssm.available()


def route_hf_kernels(mode: str) -> dict[str, str]:
    """Fix which implementation each kernel hook calls; return {hook: module.function} as resolved.

    `torch`: every hook calls transformers' reference PyTorch code. `auto`: what transformers found,
    except that the fused training kernel (mamba-ssm's split-conv1d scan) needs causal-conv1d's CUDA ops
    and fails without them, so it is routed to the torch path (conv in torch, SSD scan still Triton)."""
    import transformers.models.mamba2.modeling_mamba2 as m

    for name in HF_KERNEL_FUNCS:
        if mode == "torch" or (name == "mamba2_split_conv1d_scan_combined"
                               and importlib.util.find_spec("causal_conv1d") is None):
            setattr(m, name, inspect.unwrap(getattr(m, name)))
    return {name: resolved_impl(getattr(m, name)) for name in HF_KERNEL_FUNCS}


def resolved_impl(fn) -> str:
    """`module.qualname` of what a transformers kernel hook calls (its closure's `implementation`)."""
    f = fn
    while f is not None:
        cells = dict(zip(f.__code__.co_freevars, f.__closure__ or ()))
        if "implementation" in cells:
            impl = cells["implementation"].cell_contents
            return f"{impl.__module__}.{impl.__qualname__}"
        f = getattr(f, "__wrapped__", None)
    return f"{fn.__module__}.{fn.__qualname__}"


def build_model(c: BitMambaConfig, tok, device: torch.device, dtype: torch.dtype):
    """transformers `Mamba2ForCausalLM` with the dims of `c`, random weights (as bench/decode.py's bench_hf)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    hc = Mamba2Config(num_heads=c.n_heads, head_dim=c.headdim, hidden_size=c.d_model, state_size=c.d_state,
                      expand=c.expand, n_groups=c.ngroups, conv_kernel=c.d_conv, num_hidden_layers=c.n_layers,
                      vocab_size=c.vocab_size, chunk_size=c.chunk_size, tie_word_embeddings=False,
                      layer_norm_epsilon=c.norm_eps, rms_norm=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    return Mamba2ForCausalLM(hc).to(device, dtype)


def make_trainer_class():
    """GRPOTrainer that times each generation call (seconds, completion tokens) for tokens/s."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gen_records: list[tuple[float, int]] = []   # (seconds, completion tokens) per call

        def _generate(self, prompts):
            sync()
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            sync()
            completion_ids = out[1]                       # (prompt_ids, completion_ids, ...) in trl 1.16
            self.gen_records.append((time.perf_counter() - t0, sum(len(c) for c in completion_ids)))
            return out

    return TimedGRPOTrainer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_step_timer():
    """A TrainerCallback recording wall seconds of each optimizer step (begin -> end, synchronized)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.logs: list[dict] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.seconds.append(time.perf_counter() - self._t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.logs.append(dict(logs))

    return StepTimer()


def run(quick: bool, steps: int | None, micro_batch: int | None, hf_kernels: str) -> dict:
    prepare_hf_kernels(hf_kernels)
    import datasets
    import transformers
    import trl
    from trl import GRPOConfig

    s = shape_args(quick)
    steps = steps or s["steps"]
    micro = micro_batch or s["micro_batch"]
    G, P, new = s["group_size"], s["prompts"], s["max_new_tokens"]
    total = G * P
    if total % micro:
        raise SystemExit(f"--micro-batch {micro} must divide group_size * prompts = {total}")
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32

    c = BitMambaConfig.preset(s["preset"], **s["overrides"])
    tok = build_tiny_tokenizer(384)
    model = build_model(c, tok, device, dtype)
    kernels = route_hf_kernels(hf_kernels)
    rows = ArithmeticTask(max_operand=99).rows("train", 0, max(256, P * (steps + 1)))
    dataset = datasets.Dataset.from_list(rows)

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo_trl_"), report_to="none", save_strategy="no",
        logging_steps=1, max_steps=steps, seed=0, learning_rate=1e-6,
        num_generations=G, max_completion_length=new, temperature=1.0, beta=0.0,
        # one optimizer step = one rollout batch of P prompts x G completions, learned in micro-batches
        per_device_train_batch_size=micro, gradient_accumulation_steps=total // micro,
        steps_per_generation=total // micro,
        gradient_checkpointing=True, bf16=gpu, use_cpu=not gpu, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    assert cfg.generation_batch_size == total, cfg.generation_batch_size
    timer = make_step_timer()
    trainer = make_trainer_class()(model=model, reward_funcs=arithmetic_reward, args=cfg,
                                   train_dataset=dataset, processing_class=tok, callbacks=[timer])
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    secs = timer.seconds
    timed = secs[1:] or secs                          # the first step includes warm-up (allocations, autotune)
    gens = trainer.gen_records[1:] or trainer.gen_records
    mean = sum(timed) / len(timed)
    gen_s = sum(g[0] for g in gens) / len(gens)
    tokens = sum(g[1] for g in gens) / len(gens)
    lens = [lg["completions/mean_length"] for lg in timer.logs if "completions/mean_length" in lg][1:]
    return {
        "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "datasets": datasets.__version__},
        "quick": quick, "dtype": str(dtype).removeprefix("torch."),
        "hf_kernels": hf_kernels, "hf_kernel_impls": kernels,
        "shape": {"preset": s["preset"], "d_model": c.d_model, "n_layers": c.n_layers, "d_state": c.d_state,
                  "headdim": c.headdim, "ngroups": c.ngroups, "expand": c.expand, "n_heads": c.n_heads,
                  "vocab_size": c.vocab_size, "group_size": G, "prompts": P, "max_new_tokens": new,
                  "micro_batch": micro, "gradient_accumulation_steps": total // micro},
        "params": sum(p.numel() for p in model.parameters()),
        "steps": len(secs), "steps_timed": len(timed),
        "step_s": secs, "first_step_s": secs[0] if secs else None,
        "mean_s_per_step": mean,
        "mean_generate_s": gen_s,
        "completion_tokens_per_step": tokens,
        "completion_len_mean": sum(lens) / len(lens) if lens else None,
        "tokens_per_s": tokens / gen_s if gen_s > 0 else 0.0,
        "tokens_per_s_step": tokens / mean if mean > 0 else 0.0,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
    }


def compare(res: dict, ours_path: Path) -> dict:
    """Ratio TRL mean s/step over ours (step.mean['time/step'] in bench/grpo.py's JSON)."""
    if not ours_path.is_file():
        raise SystemExit(f"--compare {ours_path}: no such file (run python bench/grpo.py --only step first; "
                         "this run's TRL numbers are saved)")
    ours = json.loads(ours_path.read_text())
    if "time/step" not in ours.get("step", {}).get("mean", {}):
        raise SystemExit(f"{ours_path}: no step.mean['time/step']; write it with python bench/grpo.py --only step")
    step = ours["step"]
    ours_s = step["mean"]["time/step"]
    sh = res["shape"]
    same = (step.get("shape") == sh["preset"] and step.get("group_size") == sh["group_size"]
            and step.get("prompts") == sh["prompts"] and step.get("max_new_tokens") == sh["max_new_tokens"])
    if not same:
        print(f"warning: shapes differ: ours {step.get('shape')} G={step.get('group_size')} "
              f"P={step.get('prompts')} new={step.get('max_new_tokens')} vs TRL {sh['preset']} "
              f"G={sh['group_size']} P={sh['prompts']} new={sh['max_new_tokens']}", file=sys.stderr)
    if ours.get("device") != res["device"]:
        print(f"warning: devices differ: ours {ours.get('device')} vs TRL {res['device']}", file=sys.stderr)
    ratio = res["mean_s_per_step"] / ours_s
    return {"ours_json": str(ours_path), "ours_device": ours.get("device"), "ours_s_per_step": ours_s,
            "trl_s_per_step": res["mean_s_per_step"], "ratio_trl_over_ours": ratio, "same_shape": same,
            "same_device": ours.get("device") == res["device"],
            "target_ratio": 10.0, "meets_target": ratio >= 10.0}


def print_table(res: dict) -> None:
    sh = res["shape"]
    print(f"TRL GRPOTrainer {res['versions']['trl']} on {res['device']} ({res['dtype']}): {sh['preset']}, "
          f"{sh['prompts']} prompts x {sh['group_size']}, {sh['max_new_tokens']} new tokens, "
          f"micro-batch {sh['micro_batch']} x {sh['gradient_accumulation_steps']}")
    print(f"{'step':>6} {'seconds':>10}")
    for i, s in enumerate(res["step_s"]):
        print(f"{i + 1:>6} {s:>10.3f}" + ("   (warm-up, not counted)" if i == 0 and res["steps"] > 1 else ""))
    print(f"{'mean':>6} {res['mean_s_per_step']:>10.3f}   generate {res['mean_generate_s']:.3f} s, "
          f"{res['tokens_per_s']:.1f} tok/s (generation), {res['tokens_per_s_step']:.1f} tok/s (whole step)")
    if "compare" in res:
        cmp = res["compare"]
        print(f"ours {cmp['ours_s_per_step']:.3f} s/step ({cmp['ours_device']}) -> TRL / ours = "
              f"{cmp['ratio_trl_over_ours']:.2f}x (target >= 10x: {'met' if cmp['meets_target'] else 'not met'})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny dims, 8 prompts x 8, 32 new tokens, 2 steps")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps, the first is warm-up (default 4, quick 2)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="per_device_train_batch_size (default 32, quick 16); must divide prompts x group")
    p.add_argument("--out", default=None)
    p.add_argument("--compare", type=Path, default=None, help="bench/grpo.py's JSON: print TRL / ours")
    p.add_argument("--hf-kernels", choices=("auto", "torch"), default="auto",
                   help="auto: mamba-ssm's Triton kernels where transformers can use them (CUDA); torch: none")
    args = p.parse_args(argv)
    if importlib.util.find_spec("trl") is None:
        print(f"bench/grpo_trl.py needs TRL: pip install trl=={TRL_VERSION_TESTED} (or pip install -e .[bench])",
              file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "bench" / "results" / ("grpo_trl_quick.json" if args.quick else "grpo_trl.json"))
    res = {"command": " ".join(["python bench/grpo_trl.py", *(sys.argv[1:] if argv is None else argv)])}
    res.update(run(args.quick, args.steps, args.micro_batch, args.hf_kernels))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))     # before --compare, which can fail
    if args.compare is not None:
        res["compare"] = compare(res, args.compare)
        out.write_text(json.dumps(res, indent=1, default=str))
    print_table(res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
