"""How exactly on-policy is the learner's first update? (GPU: bf16 DeepSpeed learner, like a real run.)

    python bench/onpolicy_check.py --preset bitmamba2-255m [--rows 16 --prompt 64 --completion 256]

For a policy of the given preset (random init; the check is about numerical paths, not quality) the
DeepSpeed learner (ZeRO-2, bf16 on GPU) gets one rollout batch with 2 minibatches and a frozen reference
(kl_coef > 0). Reported:
- max |logp_old - logp| over valid tokens, where logp_old is the learner's proximal log-probs (no grad,
  same path) and logp the loss's (with grad), before any step: the first-update ratio error;
- the same for the eval-path log-probs (BitLinears' exact int8 path, eval mode), the path "old"
  log-probs came from before they shared the loss's;
- learn/ratio_mean and learn/kl of the update (ratio 1 and KL 0 expected on the first minibatch).
Writes bench/results/onpolicy_check.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.grpo.config import load_grpo_config  # noqa: E402
from rl.grpo import algo  # noqa: E402
from rl.grpo.learner import Learner, TrainBatch  # noqa: E402


def first_minibatch_gaps(learner: Learner, batch: TrainBatch) -> tuple[float, float, float]:
    """Over the first minibatch's micro-batches, exactly as the update sees them: max |logp_old - logp|,
    max |logp_evalpath - logp| (what old log-probs were before), max k3 KL(policy, reference)."""
    plan = learner._plan(batch)
    old = learner._frozen_logprobs(learner.model, plan)
    ref = learner._frozen_logprobs(learner.ref, plan)
    same = evalp = kl = 0.0
    for j, mb in enumerate(plan[0].micro):
        valid = mb.mask.to(learner.device) > 0
        learner.model.eval()
        with torch.no_grad():
            lp_eval, _ = learner._logprobs(learner.model, mb, entropy=False)    # eval-mode BitLinears: exact int8
        learner.model.train()
        learner._drop_eval_caches()
        with torch.enable_grad():
            lp, _ = learner._logprobs(learner.model, mb, entropy=True)
        lp = lp.detach()
        same = max(same, (lp - old[0][j])[valid].abs().max().item())
        evalp = max(evalp, (lp - lp_eval)[valid].abs().max().item())
        kl = max(kl, algo.kl_k3(lp, ref[0][j])[valid].max().item())
    return same, evalp, kl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bitmamba2-255m")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--out", default=str(ROOT / "bench/results/onpolicy_check.json"))
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    cfg = load_grpo_config(data={
        "model": {"preset": args.preset, "max_seq_len": args.prompt + args.completion + 1},
        "group_size": 2, "prompts_per_step": args.rows // 2,
        "sampling": {"max_new_tokens": args.completion, "temperature": args.temperature},
        "algo": {"kl_coef": 0.05},
        "learner": {"lr": 1.0e-6, "minibatches": 2, "micro_batch_tokens": 8 * (args.prompt + args.completion),
                    "num_gpus": 1 if on_gpu else 0, "gradient_checkpointing": True}})
    t0 = time.perf_counter()
    learner = Learner(cfg)
    t_init = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    V = learner.model.config.vocab_size
    P = [torch.randint(0, V, (args.prompt,), generator=g).tolist() for _ in range(args.rows)]
    C = [torch.randint(0, V, (max(1, args.completion - 7 * (i % 5)),), generator=g).tolist() for i in range(args.rows)]
    batch = TrainBatch(P, C, [[-5.0] * len(c) for c in C], [[1.0] * len(c) for c in C],
                       [1.0 if i % 2 else -1.0 for i in range(args.rows)])
    gap_same, gap_eval, kl_max = first_minibatch_gaps(learner, batch)
    m = learner.update(batch)
    dtype = str(next(learner.model.parameters()).dtype).replace("torch.", "")
    out = {"preset": args.preset, "device": torch.cuda.get_device_name() if on_gpu else "cpu", "dtype": dtype,
           "rows": args.rows, "prompt": args.prompt, "completion": args.completion,
           "temperature": args.temperature, "learner_init_s": round(t_init, 1),
           "max_abs_old_minus_loss_logp": gap_same, "max_abs_evalpath_minus_loss_logp": gap_eval,
           "first_update_ratio_mean": m["learn/ratio_mean"], "first_minibatch_max_k3_kl_to_reference": kl_max,
           "ref_dtype": str(next(learner.ref.parameters()).dtype).replace("torch.", ""),
           "command": "python bench/onpolicy_check.py " + " ".join(sys.argv[1:])}
    print(f"{'quantity':<48} {'value':>12}")
    for k in ("max_abs_old_minus_loss_logp", "max_abs_evalpath_minus_loss_logp", "first_update_ratio_mean",
              "first_minibatch_max_k3_kl_to_reference"):
        print(f"{k:<48} {out[k]:>12.3e}")
    print(f"({args.preset}, {dtype} learner, reference in {out['ref_dtype']}, {out['device']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
