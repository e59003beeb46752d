"""rl/grpo/algo.py on hand-computed cases."""

import math
import sys

import pytest
import torch

from rl.grpo import algo
from rl.grpo.algo import LossConfig


def test_algo_imports_neither_ray_nor_deepspeed():
    import subprocess

    code = "import sys, rl.grpo.algo; print('ray' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_group_advantages_grpo_hand_computed():
    # group 1: [1,0,0,0] mean .25, unbiased std .5 -> [1.5, -.5, -.5, -.5]; group 2 all equal -> 0
    adv, valid = algo.group_advantages([1, 0, 0, 0, 2, 2, 2, 2], 4, eps=0.0)
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]))
    assert valid.all()


def test_group_advantages_drgrpo_no_std():
    adv, _ = algo.group_advantages([1.0, 0.0, 0.0, 0.0], 4, mode="drgrpo")
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_group_advantages_excludes_none():
    # valid [3, 1] -> mean 2, std sqrt(2); the None sample gets 0 and valid False
    adv, valid = algo.group_advantages([3.0, None, 1.0, float("nan")], 4, eps=0.0)
    s = math.sqrt(2.0)
    assert torch.allclose(adv, torch.tensor([1 / s, 0.0, -1 / s, 0.0]))
    assert valid.tolist() == [True, False, True, False]
    # a group left with one valid reward has no baseline: all zero
    adv, _ = algo.group_advantages([5.0, None, None, None], 4)
    assert torch.equal(adv, torch.zeros(4))


def test_group_advantages_rejects_bad_split():
    with pytest.raises(ValueError):
        algo.group_advantages([1.0, 2.0, 3.0], 2)


def test_informative_groups():
    keep = algo.informative_groups([1, 1, 0, 1, 0, 0, None, 1.0], 2)
    # groups: [1,1] same; [0,1] differ; [0,0] same; [None,1] one valid
    assert keep.tolist() == [False, True, False, False]


def test_overlong_penalty_ramp():
    pen = algo.overlong_penalty([10, 12, 14, 16, 17], max_len=16, buffer=4, factor=1.0)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    pen = algo.overlong_penalty([14], max_len=16, buffer=4, factor=0.5)
    assert torch.allclose(pen, torch.tensor([-0.25]))


def test_truncation_mask_and_pass_at_k():
    assert algo.truncation_mask(["stop", "length", "stop"]).tolist() == [1.0, 0.0, 1.0]
    assert algo.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert algo.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert algo.pass_at_k(4, 0, 4) == 0.0
    assert algo.pass_at_k(4, 3, 2) == 1.0


def test_kl_k3_hand():
    logp = torch.tensor([[0.0, math.log(0.5)]])
    ref = torch.tensor([[0.0, 0.0]])
    # r = ref - logp = [0, log 2]: exp(r) - r - 1 = [0, 2 - log2 - 1]
    assert torch.allclose(algo.kl_k3(logp, ref), torch.tensor([[0.0, 1 - math.log(2)]]))


def test_aggregation_modes():
    l = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # token-mean: (1+2+3+4)/4
    assert float(algo.aggregate(l, m, "token-mean")) == pytest.approx(2.5)
    # seq-mean-token-mean: (2 + 4) / 2
    assert float(algo.aggregate(l, m, "seq-mean-token-mean")) == pytest.approx(3.0)
    # Dr. GRPO: 10 / (2 * 5)
    assert float(algo.aggregate(l, m, "seq-sum-const", seq_sum_const=5.0)) == pytest.approx(1.0)
    # micro-batch accumulation equals the full batch with explicit totals
    a = algo.aggregate(l[:1], m[:1], "token-mean", n_tokens=4.0)
    b = algo.aggregate(l[1:], m[1:], "token-mean", n_tokens=4.0)
    assert float(a + b) == pytest.approx(2.5)


def test_policy_loss_clip_higher_hand_computed():
    # token ratios exp(logp - old): [1.5, 0.5, 1.1] ; advantages per sequence
    old = torch.zeros(3, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [1.1]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0])
    mask = torch.ones(3, 1)
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, tis_cap=None)
    loss, m = algo.policy_loss(logp, old, adv, mask, cfg)
    # A>0, r=1.5: max(-1.5, -1.28) = -1.28 (clipped high)
    # A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped low)
    # A>0, r=1.1: max(-1.1, -1.1) = -1.1
    assert float(loss.detach()) == pytest.approx((-1.28 + 0.8 - 1.1) / 3, abs=1e-6)
    assert m["clip_frac_high"] == pytest.approx(1 / 3)
    assert m["clip_frac_low"] == pytest.approx(1 / 3)
    loss.backward()
    # clipped tokens carry no gradient; the unclipped one: d/dlogp (-A r)/3 = -1.1/3
    assert torch.allclose(logp.grad.flatten(), torch.tensor([0.0, 0.0, -1.1 / 3]), atol=1e-6)


def test_policy_loss_asymmetric_bounds_matter():
    # ratio 1.25 with A>0: inside clip-higher (1.28) but outside symmetric 0.2 (1.2)
    logp = torch.log(torch.tensor([[1.25]]))
    old = torch.zeros(1, 1)
    adv, mask = torch.tensor([1.0]), torch.ones(1, 1)
    l_high, m_high = algo.policy_loss(logp, old, adv, mask, LossConfig(tis_cap=None))
    l_sym, m_sym = algo.policy_loss(logp, old, adv, mask, LossConfig(clip_high=0.2, tis_cap=None))
    assert float(l_high) == pytest.approx(-1.25)
    assert float(l_sym) == pytest.approx(-1.2)
    assert m_high["clip_frac_high"] == 0.0 and m_sym["clip_frac_high"] == 1.0


def test_policy_loss_masks_tokens():
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -5.0]], requires_grad=True)
    old = logp.detach().clone()
    adv = torch.tensor([1.0, 2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = algo.policy_loss(logp, old, adv, mask, LossConfig(tis_cap=None))
    # ratio 1 everywhere: -(1 + 1 + 2) / 3
    assert float(loss.detach()) == pytest.approx(-4 / 3)
    loss.backward()
    assert float(logp.grad[1, 1]) == 0.0


def test_truncated_is_and_mismatch():
    old = torch.zeros(1, 3)
    logp = old.clone().requires_grad_(True)
    rollout = torch.log(torch.tensor([[1.0, 0.5, 0.1]]))      # IS ratio old/rollout = [1, 2, 10]
    adv, mask = torch.tensor([1.0]), torch.ones(1, 3)
    loss, m = algo.policy_loss(logp, old, adv, mask, LossConfig(tis_cap=3.0), rollout_logp=rollout)
    # weights [1, 2, 3] (capped), ratio 1: -(1+2+3)/3
    assert float(loss.detach()) == pytest.approx(-2.0)
    assert m["tis_weight_mean"] == pytest.approx(2.0)
    assert m["tis_clip_frac"] == pytest.approx(1 / 3)
    assert m["mismatch_max_ratio"] == pytest.approx(10.0, rel=1e-5)
    d = torch.log(torch.tensor([1.0, 2.0, 10.0]))
    assert m["mismatch_kl"] == pytest.approx(float((torch.exp(d) - d - 1).mean()), rel=1e-5)
    loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([[1.0, 2.0, 3.0]]) / 3)


def test_policy_loss_kl_term_and_entropy():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old = logp.detach().clone()
    ref = torch.zeros(1, 1)
    adv, mask = torch.tensor([0.0]), torch.ones(1, 1)
    loss, m = algo.policy_loss(logp, old, adv, mask, LossConfig(kl_coef=0.5, tis_cap=None),
                               ref_logp=ref, entropy=torch.tensor([[0.7]]))
    assert float(loss.detach()) == pytest.approx(0.5 * (1 - math.log(2)))
    assert m["kl"] == pytest.approx(1 - math.log(2))
    assert m["entropy"] == pytest.approx(0.7)
    with pytest.raises(ValueError):
        algo.policy_loss(logp, old, adv, mask, LossConfig(kl_coef=0.1))
