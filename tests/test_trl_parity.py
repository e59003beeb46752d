"""One GRPO update on identical tensors: our loss and gradients equal TRL's `GRPOTrainer._compute_loss`.

A small random transformers `Mamba2ForCausalLM` is converted to ours (quantization off, so both compute the
same function); both score the same prompts / completions at the same temperature against the same "old"
log-probs and advantages. TRL's loss types map to our aggregations: bnpo = token-mean, grpo =
seq-mean-token-mean, dr_grpo = seq-sum-const (constant = max completion length).
"""

import pytest
import torch

from model.convert import import_hf
from model.hf_mamba2 import hf_weight_map
from rl.grpo import algo
from rl.grpo.algo import LossConfig
from rollout.tokenizer import build_tiny_tokenizer

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

V, P, C, B = 384, 6, 9, 4
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    cfg = transformers.Mamba2Config(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                                    state_size=16, n_groups=1, expand=2, chunk_size=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith((".D", "dt_bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.3)
            if name.endswith("lm_head.weight"):
                p.mul_(8.0)                       # peaked distributions: ratios and clipping matter
    hf.save_pretrained(d)
    ours = import_hf(d, no_quant=True)
    return hf, ours


def make_trainer(hf, tmp_path, loss_type: str):
    tok = build_tiny_tokenizer(V)
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=B, num_generations=2,
                          max_completion_length=C, temperature=TEMPERATURE, epsilon=0.2, epsilon_high=0.28, beta=0.0,
                          loss_type=loss_type, report_to=[], bf16=False, logging_steps=1000)
    data = datasets.Dataset.from_dict({"prompt": ["1+2="] * B})
    return trl.GRPOTrainer(model=hf, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                           args=args, train_dataset=data, processing_class=tok)


def inputs():
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(5, V, (B, P), generator=g)
    comp = torch.randint(5, V, (B, C), generator=g)
    cmask = torch.ones(B, C, dtype=torch.long)
    cmask[1, 6:] = 0                                   # ragged completions (right padding)
    cmask[3, 3:] = 0
    adv = torch.tensor([1.0, -0.5, 0.8, -1.3])
    return prompt, comp, cmask, adv


def our_logps(ours, prompt, comp):
    ids = torch.cat([prompt, comp], 1)
    lp = ours.token_logprobs(ids[:, :-1], ids[:, 1:], temperature=TEMPERATURE)     # [B, P+C-1]
    return lp[:, P - 1:]                                                            # [B, C]


@pytest.mark.parametrize("loss_type,aggregation", [("bnpo", "token-mean"), ("grpo", "seq-mean-token-mean"),
                                                    ("dr_grpo", "seq-sum-const")])
def test_one_update_loss_and_gradient_equal_trl(models, tmp_path, loss_type, aggregation):
    hf, ours = models
    trainer = make_trainer(hf, tmp_path, loss_type)
    prompt, comp, cmask, adv = inputs()
    ours.train()
    with torch.no_grad():
        cur = our_logps(ours, prompt, comp)
    noise = torch.randn(B, C, generator=torch.Generator().manual_seed(2)) * 0.3
    old = (cur + noise).detach()                                        # ratios spread over both clip bounds

    hf.zero_grad(set_to_none=True)
    hf.train()
    batch = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": comp,
             "completion_mask": cmask, "advantages": adv, "old_per_token_logps": old,
             "num_items_in_batch": cmask.sum()}
    trainer.current_gradient_accumulation_steps = 1          # set by Trainer.training_step in a real run
    trl_loss = trainer._compute_loss(hf, batch)
    trl_loss.backward()

    ours.zero_grad(set_to_none=True)
    logp = our_logps(ours, prompt, comp)
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, aggregation=aggregation, seq_sum_const=float(C), tis_cap=None)
    loss, m = algo.policy_loss(logp, old, adv, cmask.float(), cfg)
    loss.backward()

    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0            # both clip bounds exercised
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), rtol=1e-5, atol=1e-6)
    hf_params = dict(hf.named_parameters())
    n = 0
    for our_name, hf_name in hf_weight_map(ours.config).items():
        g_ours = dict(ours.named_parameters())[our_name].grad
        g_hf = hf_params[hf_name].grad
        if g_hf is None and g_ours is None:
            continue
        rel = float((g_ours.reshape(g_hf.shape) - g_hf).norm() / g_hf.norm().clamp(min=1e-12))
        assert rel < 1e-4, (our_name, rel)                               # fp32 summation order only
        n += 1
    assert n >= 10
