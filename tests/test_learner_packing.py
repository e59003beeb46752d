"""Packed learner micro-batches (`learner.packing`): samples end to end with `seq_idx` boundaries.

- the layout: each sample shifted on its own, no target in another sample, the budget respected;
- packed == padded: per-token log-probs (fp32, 1e-5) and the policy loss's gradients (relative 1e-4) for a
  Mamba-2, a BitMamba-2 and a hybrid (attention) model, and one learner update (parameters after the step).
  These run the presets with 16-bit activations (W1.58A16): int8 per-token activation codes are a step
  function, and the packed row's different fp32 summation order (a sample's position inside the SSD's
  chunks, the masked conv) moves values by ~1e-7, which now and then flips one code by one step and a
  log-prob by up to ~1e-2. With the presets' int8 activations the test bounds that: almost every token
  agrees to 1e-5, none is off by more than a flip's size;
- no leak across a boundary: changing sample A changes nothing of sample B packed after it, and each
  mixer's reset is needed (a conv, scan or attention that ignores seq_idx makes the same check fail).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from model.attention import Attention
from model.ssd import ssd_scan as real_ssd_scan
from rl.grpo import algo
from rl.grpo.config import build_model, load_grpo_config
from rl.grpo.learner import Learner, TrainBatch, collate, collate_packed, micro_batches, pack_samples

PRESETS = ["tiny", "tiny-bitmamba2", "tiny-hybrid"]


A16 = {"quant": {"activation": "none"}}          # ternary weights, 16-bit activations


def make_cfg(preset="tiny", algo_=None, model=None, **learner):
    over = {"vocab_size": 384, **(model or {})}
    data = {"model": {"preset": preset, "overrides": over, "max_seq_len": 128, "backend": "torch"},
            "group_size": 2, "prompts_per_step": 2, "sampling": {"temperature": 0.7},
            "algo": {"aggregation": "seq-mean-token-mean", **(algo_ or {})},
            "learner": {"lr": 1.0e-3, "micro_batch_tokens": 4096, **learner}}
    return load_grpo_config(data=data)


def make_batch(lengths, seed=0, prompt_len=(3, 9)):
    """Samples with the given completion lengths; prompts of varied length; some masked tokens."""
    g = torch.Generator().manual_seed(seed)
    P = [torch.randint(10, 380, (int(torch.randint(*prompt_len, (1,), generator=g)),), generator=g).tolist()
         for _ in lengths]
    C = [torch.randint(10, 380, (c,), generator=g).tolist() for c in lengths]
    mask = [[float(torch.rand(1, generator=g) > 0.15) for _ in c] for c in C]
    lp = [(-torch.rand(len(c), generator=g) * 3).tolist() for c in C]
    adv = (torch.randn(len(lengths), generator=g)).tolist()
    return TrainBatch(P, C, lp, mask, adv)


# lengths straddle the presets' 16-token SSD chunks: boundaries inside chunks, at chunk edges, a 1-token one
LENGTHS = [7, 1, 19, 12, 3, 30, 9]


def perturbed(model, scale=0.1, seed=1):
    """Peaked distributions (a random init is near uniform and hides differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def torch_learner(preset, model=None, **learner) -> Learner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # learner.backend: torch warns by design
        lr = Learner(make_cfg(preset, model=model, backend="torch", **learner))
    perturbed(lr.model)
    return lr


def in_view(mb, batch, per_token) -> torch.Tensor:
    """Per-completion-token values [N][C_i] placed in the micro-batch's sample view [N, W]."""
    out = torch.zeros(mb.mask.shape)
    for r, i in enumerate(mb.index):
        s = len(batch.prompt_ids[i]) - 1 if mb.first is None else mb.first[r]
        out[r, s:s + len(per_token[i])] = torch.tensor(per_token[i])
    return out


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- layout


def test_packed_layout_shifts_each_sample_on_its_own():
    b = make_batch(LENGTHS)
    mb = collate_packed(b, list(range(len(b))))
    n_pos = sum(b.num_tokens(i) - 1 for i in range(len(b)))
    assert mb.input_ids.shape == mb.targets.shape == mb.seq_idx.shape == (1, n_pos)
    assert mb.mask.shape == mb.rollout_logp.shape == mb.gather.shape == (len(b), max(LENGTHS))
    ids, tg, seq = mb.input_ids[0].tolist(), mb.targets[0].tolist(), mb.seq_idx[0].tolist()
    off = 0
    for j in range(len(b)):
        toks = b.prompt_ids[j] + b.completion_ids[j]
        n = len(toks) - 1
        assert ids[off:off + n] == toks[:-1] and tg[off:off + n] == toks[1:] and set(seq[off:off + n]) == {j}
        off += n                     # the sample's last target is its own last token: nothing crosses a boundary
    # the sample view reads exactly the completion targets, with their mask and rollout log-probs
    flat_tg = mb.targets.reshape(-1)
    for j in range(len(b)):
        c = len(b.completion_ids[j])
        assert flat_tg[mb.gather[j, :c]].tolist() == b.completion_ids[j]
        assert mb.mask[j, :c].tolist() == b.loss_mask[j] and mb.mask[j, c:].sum() == 0
        assert torch.equal(mb.rollout_logp[j, :c], torch.tensor(b.rollout_logprobs[j]))
    assert mb.view(mb.targets).shape == (len(b), max(LENGTHS))


def test_pack_samples_respects_the_budget_and_keeps_every_sample():
    b = make_batch(LENGTHS)
    for budget in (1, 20, 40, 4096):
        groups = pack_samples(b, list(range(len(b))), budget)
        assert [i for g in groups for i in g] == list(range(len(b)))
        for g in groups:
            assert len(g) == 1 or sum(b.num_tokens(i) for i in g) <= budget
        assert len(micro_batches(b, list(range(len(b))), budget, packing=True)) == len(groups)
    assert len(pack_samples(b, list(range(len(b))), 4096)) == 1


# ---------------------------------------------------------------------------------------------- packed == padded


def packed_vs_padded(lr: Learner, b: TrainBatch):
    """Same samples, one packed row vs right-padded rows, through the learner's `_logprobs`: per-token
    log-prob and entropy differences [n_tokens], the losses, and the norm-wise relative gradient difference
    per parameter of a seq-mean-token-mean policy loss with a k3 KL term (ratios away from 1)."""
    idx = list(range(len(b)))
    packed, padded = collate_packed(b, idx), collate(b, idx)
    assert padded.input_ids.shape[0] == len(b) and packed.input_ids.shape[0] == 1
    shift = [(0.3 * torch.sin(torch.arange(len(c)) + i)).tolist() for i, c in enumerate(b.completion_ids)]
    cfg = algo.LossConfig(aggregation="seq-mean-token-mean", kl_coef=0.1)
    res = {}
    for name, mb in (("packed", packed), ("padded", padded)):
        lr.model.zero_grad(set_to_none=True)
        logp, ent = lr._logprobs(lr.model, mb, entropy=True)                 # [N, W]
        old = logp.detach() + in_view(mb, b, shift)
        loss, _ = algo.policy_loss(logp, old, mb.advantages, mb.mask, cfg, rollout_logp=mb.rollout_logp,
                                   ref_logp=old - 0.1, entropy=ent)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in lr.model.named_parameters() if p.grad is not None}
        flat = lambda rows: torch.tensor([v for row in rows for v in row])  # noqa: E731
        lp, en = mb.completion(logp.detach(), b), mb.completion(ent, b)
        assert [len(r) for r in lp] == [len(c) for c in b.completion_ids]
        res[name] = (flat(lp), flat(en), loss.item(), grads)
    (lp_k, ent_k, loss_k, g_k), (lp_d, ent_d, loss_d, g_d) = res["packed"], res["padded"]
    assert g_k.keys() == g_d.keys() and len(g_d) == len(list(lr.model.parameters()))
    assert all(g_d[n].abs().sum() > 0 for n in g_d)
    return (lp_k - lp_d).abs(), (ent_k - ent_d).abs(), (loss_k, loss_d), {n: rel(g_k[n], g_d[n]) for n in g_d}


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_logprobs_and_gradients_equal_padded(preset):
    lr = torch_learner(preset, model=A16)
    d_lp, d_ent, (loss_k, loss_d), g_rel = packed_vs_padded(lr, make_batch(LENGTHS, seed=3))
    assert d_lp.max() < 1e-5 and d_ent.max() < 1e-5, (d_lp.max(), d_ent.max())
    assert loss_k == pytest.approx(loss_d, rel=1e-5, abs=1e-6)          # O(1) terms of both signs
    assert max(g_rel.values()) < 1e-4, g_rel


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_matches_padded_with_int8_activations_up_to_code_flips(preset):
    """The presets as shipped (int8 activations): almost all tokens agree to 1e-5; a flipped activation code
    moves a few by at most ~1e-2 (a leak or a misaligned target moves most of them by O(1))."""
    lr = torch_learner(preset)
    lengths = torch.randint(1, 40, (16,), generator=torch.Generator().manual_seed(7)).tolist()
    d_lp, _, _, g_rel = packed_vs_padded(lr, make_batch(lengths, seed=7))
    assert (d_lp > 1e-5).float().mean() < 0.03 and d_lp.max() < 5e-2, ((d_lp > 1e-5).float().mean(), d_lp.max())
    assert max(g_rel.values()) < 2e-2, g_rel


@pytest.mark.parametrize("preset", ["tiny", "tiny-hybrid"])
def test_compute_logprobs_packed_equals_padded_over_several_micro_batches(preset):
    lr = torch_learner(preset, model=A16, micro_batch_tokens=40)
    b = make_batch(LENGTHS, seed=4)
    assert len(pack_samples(b, list(range(len(b))), 40)) > 2
    packed = lr.compute_logprobs(b)
    lr.sec.packing = False
    padded = lr.compute_logprobs(b)
    for i in range(len(b)):
        assert len(packed[i]) == len(b.completion_ids[i])
        torch.testing.assert_close(torch.tensor(packed[i]), torch.tensor(padded[i]), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_learner_update_with_packing_equals_update_without(tmp_path):
    """The DeepSpeed learner (ZeRO-2, CPU-offloaded AdamW, fp32 on CPU), 2 minibatches (old log-probs
    computed once), a frozen reference (k3 KL), several micro-batches each: packed and padded give the
    same parameters after the update and the same metrics."""
    cfg0 = make_cfg("tiny-hybrid", model=A16)
    model = perturbed(build_model(cfg0.model))
    model.save_pretrained(tmp_path / "init")
    b = make_batch(LENGTHS + [5, 14, 2], seed=5)
    out = {}
    for packing in (True, False):
        cfg = make_cfg("tiny-hybrid", algo_={"kl_coef": 0.05}, model=A16, micro_batch_tokens=48, minibatches=2,
                       packing=packing)
        lr = Learner(cfg, init_dir=str(tmp_path / "init"))
        m1 = lr.update(b)
        m2 = lr.update(b)                        # the second update's ratios move away from 1
        out[packing] = ({n: p.detach().clone() for n, p in lr.model.named_parameters()}, m1, m2)
    (pk, mk1, mk2), (pd, md1, md2) = out[True], out[False]
    init = {n: p.detach() for n, p in model.named_parameters()}
    for n in pd:
        assert not torch.equal(pd[n], init[n]), n                            # every parameter moved
        # AdamW moves an element by ~lr * m / sqrt(v): one whose gradient is ~1e-8 moves by up to lr either
        # way on fp32 noise, so elementwise 3e-5 (lr 1e-3, 4 steps) and norm-wise 1e-4 of the update
        torch.testing.assert_close(pk[n], pd[n], rtol=1e-5, atol=3e-5, msg=n)
        assert rel(pk[n] - init[n], pd[n] - init[n]) < 1e-4, (n, rel(pk[n] - init[n], pd[n] - init[n]))
    for key in ("learn/pg_loss", "learn/kl", "learn/entropy", "learn/ratio_mean", "learn/mismatch_kl",
                "learn/grad_norm"):
        assert mk1[key] == pytest.approx(md1[key], rel=1e-4, abs=1e-7), key
        assert mk2[key] == pytest.approx(md2[key], rel=1e-4, abs=1e-7), key
    assert mk1["learn/optimizer_steps"] == md1["learn/optimizer_steps"] == 2.0


# ---------------------------------------------------------------------------------------------- no leaks


def _ssd_without_seq_idx(*args, seq_idx=None, **kw):
    return real_ssd_scan(*args, **kw)


def _conv_without_seq_idx(xs, weight, bias, history, seq_idx):
    K = weight.shape[-1]
    out = F.conv1d(F.pad(xs.transpose(1, 2), (K - 1, 0)), weight, bias, groups=xs.shape[-1])
    return out.transpose(1, 2), xs[:, -(K - 1):].transpose(1, 2)


def _attention_across_samples(self, q, k, v, seq_idx):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=self.n_kv != self.n_heads)
    return o.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


LEAKS = {"conv": ("model.mamba2.causal_conv", _conv_without_seq_idx),
         "ssm": ("model.mamba2.ssd_scan", _ssd_without_seq_idx),
         "attention": (Attention, "_packed_attention", _attention_across_samples)}


def _b_after_changing_a(lr: Learner, change_last: int):
    """Log-probs of sample B packed right after sample A, before and after A's last `change_last` tokens
    change (A's completion is long enough for those to be completion tokens only)."""
    b = make_batch([20, 15], seed=6)
    assert len(pack_samples(b, [0, 1], lr.sec.micro_batch_tokens)) == 1          # A and B share one row
    before = lr.compute_logprobs(b)[1]
    b.completion_ids[0][-change_last:] = [(t + 101) % 384 for t in b.completion_ids[0][-change_last:]]
    return torch.tensor(before), torch.tensor(lr.compute_logprobs(b)[1])


@pytest.mark.parametrize("preset", PRESETS)
def test_changing_a_sample_leaves_the_next_packed_sample_unchanged(preset):
    lr = torch_learner(preset)
    for change_last in (2, 3, 10):               # A's last inputs (its last token is a target only)
        before, after = _b_after_changing_a(lr, change_last)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset, leak", [("tiny", "conv"), ("tiny-bitmamba2", "conv"), ("tiny", "ssm"),
                                          ("tiny-bitmamba2", "ssm"), ("tiny-hybrid", "attention")])
def test_the_leak_check_catches_a_mixer_that_ignores_boundaries(preset, leak, monkeypatch):
    """The check above is sharp: with one mixer's seq_idx handling removed, B's log-probs move."""
    lr = torch_learner(preset)
    monkeypatch.setattr(*LEAKS[leak])
    before, after = _b_after_changing_a(lr, 2)                 # A's last input token
    assert (after - before).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- CUDA (Triton SSD)


def _cuda_model(preset):
    from model.config import BitMambaConfig, QuantConfig
    from model.lm import BitMambaLM

    cfg = BitMambaConfig.preset(preset, vocab_size=384, chunk_size=64, quant=QuantConfig(activation="none"))
    torch.manual_seed(0)
    return perturbed(BitMambaLM(cfg)).cuda().train()


def _cuda_logprobs(model, mb, weights=None):
    seq = None if mb.seq_idx is None else mb.seq_idx.cuda()
    lp = mb.view(model.token_logprobs(mb.input_ids.cuda(), mb.targets.cuda(), seq_idx=seq, fused=True))
    if weights is not None:
        model.zero_grad(set_to_none=True)
        (lp * weights.cuda()).sum().backward()
    return lp.detach().cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-bitmamba2", "tiny-hybrid"])
def test_cuda_triton_packed_equals_padded_and_does_not_leak(preset, monkeypatch):
    """On CUDA with mamba-ssm's Triton SSD (fp32 model, 16-bit activations, chunk 64): packed == padded up to
    the kernels' TF32 dot products (norm-wise 1e-3 on log-probs, 1e-2 on gradients, as tests/test_gpu_model.py),
    boundaries inside chunks and exactly at a chunk edge; and B's log-probs do not move when A changes."""
    monkeypatch.setenv("BITMAMBA_SSD", "triton")
    model = _cuda_model(preset)
    # sample 0: 4 + 61 tokens -> 64 positions, so sample 1 starts exactly at the second chunk
    b = make_batch([61, 1, 77, 130, 3, 40, 90], seed=8, prompt_len=(4, 5))
    b2 = make_batch([30, 200, 9, 64], seed=9)
    b = TrainBatch(*(getattr(b, f) + getattr(b2, f) for f in
                     ("prompt_ids", "completion_ids", "rollout_logprobs", "loss_mask", "advantages")))
    idx = list(range(len(b)))
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(len(c), generator=g).tolist() for c in b.completion_ids]
    out = {}
    for name, mb in (("packed", collate_packed(b, idx)), ("padded", collate(b, idx))):
        lp = _cuda_logprobs(model, mb, in_view(mb, b, w) * mb.mask)
        out[name] = (torch.tensor([v for row in mb.completion(lp, b) for v in row]),
                     {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()})
    (lk, gk), (ld, gd) = out["packed"], out["padded"]
    assert rel(lk, ld) < 1e-3, rel(lk, ld)
    for n in gd:
        assert torch.isfinite(gk[n]).all() and rel(gk[n], gd[n]) < 1e-2, (n, rel(gk[n], gd[n]))
    # no leak: A's last inputs change, B (packed after A, crossing chunk edges) keeps its log-probs
    ab = make_batch([100, 90], seed=10)
    before = _cuda_logprobs(model, collate_packed(ab, [0, 1]))[1]
    ab.completion_ids[0][-3:] = [(t + 101) % 384 for t in ab.completion_ids[0][-3:]]
    after = _cuda_logprobs(model, collate_packed(ab, [0, 1]))[1]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
