"""DeepSpeed learner (CPU accelerator, ZeRO-2 + CPU-offloaded AdamW) and packed weight sync."""

import pytest
import torch

from model.bitlinear import weight_quant
from rl.grpo.config import build_model, load_grpo_config, model_from_config
from rl.grpo.learner import Learner, TrainBatch, collate, pack_micro_batches
from rl.grpo.weight_sync import export_policy, load_into
from rl.grpo.workers import GenerationWorker, PromptJob
from rollout.backends import make_backend
from rollout.engine import Engine
from rollout.types import GenRequest, SamplingParams

TINY = {"preset": "tiny", "overrides": {"vocab_size": 384}, "max_seq_len": 64, "backend": "torch"}


def make_cfg(**learner):
    data = {"model": dict(TINY), "group_size": 2, "prompts_per_step": 2,
            "learner": {"lr": 1.0e-3, "micro_batch_tokens": 256, **learner}}
    return load_grpo_config(data=data)


def make_batch(n=4, p=5, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = [torch.randint(10, 300, (p,), generator=g).tolist() for _ in range(n)]
    C = [torch.randint(10, 300, (c + i % 2,), generator=g).tolist() for i in range(n)]
    return P, C


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def test_micro_batch_packing_respects_budget():
    P, C = make_batch(n=5)
    b = TrainBatch(P, C, [[0.0] * len(c) for c in C], [[1.0] * len(c) for c in C], [1.0] * 5)
    groups = pack_micro_batches(b, list(range(5)), token_budget=24)
    assert sorted(i for g in groups for i in g) == list(range(5))
    for g in groups:
        assert len(g) == 1 or len(g) * max(b.num_tokens(i) for i in g) <= 24
    mb = collate(b, [0, 1])
    # completion tokens of row 0 sit at targets[len(p)-1 : len(p)-1+len(c)]
    assert mb.targets[0, 4:10].tolist() == C[0]
    assert mb.mask[0].sum() == len(C[0]) and mb.mask[0, :4].sum() == 0


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", {}),
    ("tiny", {"quant": {"weight_scale": "group", "group_size": 16}}),
    ("tiny-bitmamba2", {}),              # BitLinear norms, ternary head
    ("tiny-hybrid", {}),                 # attention layer with ternary q/k/v/o
])
def test_export_load_reproduces_codes_and_logits(preset, overrides):
    cfg = load_grpo_config(data={"model": {"preset": preset, "overrides": {"vocab_size": 384, **overrides}}})
    src = build_model(cfg.model)
    perturb(src)
    w = export_policy(src, version=3)
    dst = model_from_config(src.config.to_dict())
    load_into(dst, w)
    for (name, a), (_, b) in zip(src.bitlinears(), dst.bitlinears()):
        ca, sa = weight_quant(a.weight, a.group_size)
        cb, sb = weight_quant(b.weight, b.group_size)
        assert torch.equal(ca, cb), name
        assert torch.allclose(sa, sb, rtol=1e-6), name
    ids = torch.randint(0, 384, (2, 12))
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.allclose(src(ids).logits, dst(ids).logits, atol=1e-5, rtol=1e-5)
    # ternary matrices travel as 2-bit codes: 1/16 of their fp32 bytes (+ one scale each)
    packed = sum(c.numel() for c, _ in w.packed.values())
    full = sum(m.weight.numel() * 4 for _, m in src.bitlinears() if m.ternary)
    assert packed == full // 16


@pytest.mark.slow
def test_deepspeed_learner_updates_and_syncs_worker():
    cfg = make_cfg(minibatches=2)
    learner = Learner(cfg)
    assert type(learner.optimizer).__name__ == "DeepSpeedZeroOptimizer"
    assert type(learner.optimizer.optimizer).__name__ == "DeepSpeedCPUAdam"
    P, C = make_batch()
    probe = TrainBatch(P, C, [[0.0] * len(c) for c in C], [[1.0] * len(c) for c in C], [0.0] * 4)
    before = learner.compute_logprobs(probe)
    batch = TrainBatch(P, C, before, [[1.0] * len(c) for c in C], [1.0, -1.0, 1.0, -1.0])
    for _ in range(3):
        m = learner.update(batch)
    after = learner.compute_logprobs(probe)
    delta = [sum(a) - sum(b) for a, b in zip(after, before)]
    assert delta[0] > 0 and delta[2] > 0 and delta[1] < 0 and delta[3] < 0
    assert m["learn/grad_norm"] > 0 and m["learn/optimizer_steps"] == 2
    for k in ("learn/pg_loss", "learn/clip_frac_low", "learn/clip_frac_high", "learn/entropy",
              "learn/mismatch_kl", "learn/mismatch_max_ratio"):
        assert k in m
    assert m["learn/mismatch_max_ratio"] > 1.0        # the policy moved away from the rollout log-probs

    # sync: a worker loading the export computes the learner's eval logits and greedy output
    worker = GenerationWorker(learner.get_model_config(), cfg.model, slots=4)
    assert worker.load_weights(learner.export_weights()) == learner.version == 3
    seq = P[0] + C[0]
    learner.model.eval()
    with torch.no_grad():
        ref = learner.model(torch.tensor([seq])).logits[0]
    assert torch.allclose(worker.logits(seq), ref, atol=1e-5, rtol=1e-5)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, n=1)
    got = worker.generate([PromptJob("a", P[1], seed=0)], params)[0].token_ids
    eng = Engine(make_backend(learner.model, "torch"), slots=1)
    want = eng.generate([GenRequest(P[1], params)])[0].token_ids
    assert got == want


@pytest.mark.slow
def test_micro_batch_accumulation_matches_one_big_batch_and_checkpoint_roundtrip(tmp_path):
    P, C = make_batch(n=4, seed=2)
    lp = [[-5.0] * len(c) for c in C]
    batch = TrainBatch(P, C, lp, [[1.0] * len(c) for c in C], [1.0, -0.5, 0.25, -0.75])
    small = Learner(make_cfg(micro_batch_tokens=8))      # one sample per micro-batch
    big = Learner(make_cfg(micro_batch_tokens=4096))     # all four in one
    small.update(batch)
    big.update(batch)
    # Adam's first step moves each weight by about lr * sign(grad): where a gradient is ~0, summation-order
    # noise (thread count, micro-batch split) can flip that sign, so allow a tiny share of such elements.
    # A lost or double-counted micro-batch changes the gradient everywhere and fails this.
    for (n, a), (_, b) in zip(small.model.named_parameters(), big.model.named_parameters()):
        off = ~torch.isclose(a, b, atol=1e-6, rtol=1e-5)
        assert off.float().mean().item() <= 2e-3, (n, off.sum().item(), off.numel())
    # checkpoint -> fresh learner -> the next update is identical
    path = big.save_checkpoint(str(tmp_path / "ckpt"), 1, {"step": 1}, keep=2)
    again = Learner(make_cfg(micro_batch_tokens=4096))
    extra = again.load_checkpoint(path)
    assert extra["step"] == 1 and again.version == 1
    big.update(batch)
    again.update(batch)
    for (n, a), (_, b) in zip(big.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.slow
def test_non_finite_micro_batch_is_left_out():
    learner = Learner(make_cfg(micro_batch_tokens=8))        # one sample per micro-batch
    P, C = make_batch(n=2, seed=4)
    lp = [[-5.0] * len(c) for c in C]
    lp[0][2] = float("nan")                                   # a broken rollout log-prob
    batch = TrainBatch(P, C, lp, [[1.0] * len(c) for c in C], [1.0, -1.0])
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    m = learner.update(batch)
    assert m["learn/bad_micro_batches"] == 1.0
    moved = False
    for n, p in learner.model.named_parameters():
        assert torch.isfinite(p).all(), n
        moved |= not torch.equal(p, before[n])
    assert moved                                              # the healthy sample was still applied


@pytest.mark.slow
def test_kl_to_frozen_reference():
    cfg = load_grpo_config(data={"model": dict(TINY), "group_size": 2, "prompts_per_step": 2,
                                 "algo": {"kl_coef": 0.1}, "learner": {"lr": 1.0e-2}})
    learner = Learner(cfg)
    assert learner.ref is not None
    P, C = make_batch(n=2, seed=5)
    lp = [[-5.0] * len(c) for c in C]
    batch = TrainBatch(P, C, lp, [[1.0] * len(c) for c in C], [1.0, -1.0])
    first = learner.update(batch)
    assert first["learn/kl"] == pytest.approx(0.0, abs=1e-6)   # policy == reference before any step
    second = learner.update(batch)
    assert second["learn/kl"] > 1e-6                            # the policy moved, the reference did not
    ref_p = dict(learner.ref.named_parameters())
    assert any(not torch.equal(p.detach().cpu(), ref_p[n].detach().cpu())
               for n, p in learner.model.named_parameters())


def test_bf16_learner_accumulates_gradients_in_fp32_on_the_device():
    """With bf16 (the GPU default) the DeepSpeed config asks for fp32 gradient accumulation, which puts
    ZeRO-2 with CPU offload on its device-side accumulation path (one copy to the CPU per optimizer
    step, not a round trip per micro-batch); several micro-batches then give the gradient of the
    whole batch, as in fp32."""
    from rl.grpo.learner import deepspeed_config

    assert deepspeed_config(make_cfg().learner, on_gpu=True)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in deepspeed_config(make_cfg().learner, on_gpu=False)
    P, C = make_batch(n=6, p=5, c=12)
    batch = TrainBatch(P, C, [[-3.0] * len(c) for c in C], [[1.0] * len(c) for c in C], [1.0, -1.0] * 3)
    norms = []
    for budget in (24, 4096):                      # 6 micro-batches vs one
        torch.manual_seed(0)
        lr = Learner(make_cfg(bf16=True, micro_batch_tokens=budget))
        assert lr.ds_config["data_types"] == {"grad_accum_dtype": "fp32"}
        assert lr.optimizer.gradient_accumulation_dtype == torch.float32
        assert lr.optimizer._use_compact_grad_partition_buffer(0)
        assert len(pack_micro_batches(batch, list(range(6)), budget)) == (6 if budget == 24 else 1)
        norms.append(lr.update(batch)["learn/grad_norm"])
    assert norms[0] == pytest.approx(norms[1], rel=2e-2)      # bf16 forward/backward, fp32 sums


def test_profile_env_writes_the_op_tables_of_the_chosen_update(tmp_path, monkeypatch):
    monkeypatch.setenv("BITMAMBA_PROFILE_LEARN", str(tmp_path))
    monkeypatch.setenv("BITMAMBA_PROFILE_STEP", "1")
    learner = Learner(make_cfg())
    P, C = make_batch(n=2, seed=5)
    batch = TrainBatch(P, C, [[-5.0] * len(c) for c in C], [[1.0] * len(c) for c in C], [1.0, -1.0])
    learner.update(batch)
    assert not (tmp_path / "learn_profile.txt").exists()        # update 0 (compiles) is not profiled
    m = learner.update(batch)
    text = (tmp_path / "learn_profile.txt").read_text()
    assert text.startswith("update 1:") and "Self CPU" in text and m["learn/optimizer_steps"] >= 1


def test_every_minibatch_applies_one_step_when_its_micro_batch_count_varies():
    """3 micro-batches in one minibatch, 1 in the next: DeepSpeed's modulo boundary would fall
    mid-minibatch (and the last step() would apply nothing); the learner marks the boundaries."""
    learner = Learner(make_cfg(micro_batch_tokens=12, minibatches=2))
    P, C = make_batch(n=4, p=5, c=6, seed=7)                 # 11-12 tokens each: one per micro-batch
    C[3] = C[3][:1]
    C[2] = C[2][:1]                                            # rows 2 and 3 share one micro-batch
    batch = TrainBatch(P, C, [[-5.0] * len(c) for c in C], [[1.0] * len(c) for c in C], [1.0, -1.0, 1.0, -1.0])
    for _ in range(3):
        m = learner.update(batch)
        assert m["learn/optimizer_steps"] == 2.0 and m["learn/skipped_steps"] == 0.0, m
    assert learner.engine.global_steps == 6
