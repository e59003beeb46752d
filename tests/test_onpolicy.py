"""The learner optimises exactly the distribution the rollout sampled, checked numerically.

- log-probs are of log_softmax(logits / T), equal to the worker's sampled-token log-probs at T != 1;
- filters (top-p) show up as importance weights < 1 and a mismatch KL > 0, never silently;
- "old" and reference log-probs come from the loss's numerical path: first-update ratio 1, KL 0;
- the loss guards (row counting, clamps, dual clip), dynamic sampling on the task reward, the LR
  schedule and the configs that cannot work.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from model.errors import ConfigError
from rl.grpo import algo
from rl.grpo.algo import LossConfig
from rl.grpo.driver import Driver, PromptSource
from rl.grpo.config import build_model, load_grpo_config
from rl.grpo.learner import Learner, TrainBatch, micro_batches
from rollout.backends import make_backend
from rollout.engine import Engine
from rollout.types import GenRequest, GenResult, SamplingParams

TINY = {"preset": "tiny", "overrides": {"vocab_size": 384}, "max_seq_len": 64, "backend": "torch"}
BM2 = {"preset": "tiny-bitmamba2", "overrides": {"vocab_size": 384}, "max_seq_len": 64, "backend": "torch"}


def make_cfg(model=TINY, sampling=None, algo_=None, **learner):
    data = {"model": dict(model), "group_size": 2, "prompts_per_step": 2,
            "sampling": {"max_new_tokens": 12, **(sampling or {})}, "algo": dict(algo_ or {}),
            "learner": {"lr": 1.0e-3, "micro_batch_tokens": 256, **learner}}
    return load_grpo_config(data=data)


def perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def rollout_batch(learner: Learner, params: SamplingParams, n_prompts=2):
    """Sample from the learner's current weights with the torch engine; a TrainBatch as the driver builds it."""
    model = build_model(learner.cfg.model)
    model.load_state_dict({k: v.float() for k, v in learner.model.state_dict().items()})
    engine = Engine(make_backend(model.eval(), "torch"), slots=8)
    reqs = [GenRequest([5 + i, 17, 40 + i, 9], params, request_id=i) for i in range(n_prompts)]
    results = engine.generate(reqs)
    ro = SimpleNamespace(results=results, valid=[True] * len(results), advantages=[1.0, -1.0] * (len(results) // 2))
    fake = SimpleNamespace(cfg=learner.cfg)
    return Driver.train_batch(fake, ro), results


def perturbed_learner(cfg, tmp_path, scale=0.05) -> Learner:
    """A learner whose initial policy is a perturbed random model (peaked distributions), saved and loaded
    as `init_dir` so DeepSpeed's fp32 master weights start from it too."""
    model = build_model(cfg.model)
    perturb(model, scale=scale)
    model.save_pretrained(tmp_path / "init")
    return Learner(cfg, init_dir=str(tmp_path / "init"))


# ---------------------------------------------------------------------------------------------- temperature


def test_learner_scores_the_sampled_distribution_at_temperature(tmp_path):
    """At T = 0.7 the learner's log-probs of the sampled tokens equal the worker's sampled-distribution
    log-probs (fp32 CPU: kernel numerics only), and differ clearly from the T = 1 log-probs."""
    learner = perturbed_learner(make_cfg(sampling={"temperature": 0.7}), tmp_path)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, n=4, seed=3)
    batch, results = rollout_batch(learner, params)
    assert batch.rollout_logprobs == [r.logprobs for r in results]        # the sampled distribution's
    lp = learner.compute_logprobs(batch)
    diff = max(abs(a - b) for row, ref in zip(lp, batch.rollout_logprobs) for a, b in zip(row, ref))
    assert diff < 1e-4, diff
    t1 = max(abs(a - b) for r in results for a, b in zip(r.logprobs, r.model_logprobs))
    assert t1 > 0.05                                                      # T = 1 would be far off
    m = learner.update(batch)
    assert m["learn/mismatch_kl"] < 1e-8
    assert m["learn/tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)


def test_top_p_filter_is_corrected_by_importance_weights(tmp_path):
    """top_p = 0.8: the sampled distribution is renormalised over the nucleus, so pi_T / pi_sample < 1 on
    sampled tokens: the TIS weight shows it and the mismatch KL is clearly > 0."""
    learner = perturbed_learner(make_cfg(sampling={"temperature": 1.0, "top_p": 0.8}), tmp_path)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.8, n=4, seed=3)
    batch, _ = rollout_batch(learner, params)
    lp = learner.compute_logprobs(batch)
    gap = [b - a for row, ref in zip(lp, batch.rollout_logprobs) for a, b in zip(row, ref)]   # -log(nucleus mass)
    assert min(gap) > -1e-5 and max(gap) > 0.05
    m = learner.update(batch)
    assert m["learn/tis_weight_mean"] < 0.99
    assert m["learn/mismatch_min_ratio"] < 0.95 and m["learn/mismatch_max_ratio"] <= 1.0 + 1e-4
    assert m["learn/mismatch_kl"] > 1e-3


def test_filters_without_importance_correction_are_refused():
    with pytest.raises(ConfigError, match="algo.tis_cap"):
        make_cfg(sampling={"top_p": 0.9}, algo_={"tis_cap": None})
    make_cfg(sampling={"top_p": 0.9})                                     # corrected by TIS: accepted


# ---------------------------------------------------------------------------------------------- old / ref


@pytest.mark.parametrize("model", [TINY, BM2], ids=["tiny", "tiny-bitmamba2"])
def test_old_logprobs_come_from_the_loss_path(model, tmp_path):
    """compute_logprobs (the proximal policy) equals the loss path's log-probs (train mode, with grad)."""
    learner = perturbed_learner(make_cfg(model=model, minibatches=2), tmp_path, scale=0.2)
    batch, _ = rollout_batch(learner, SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=1))
    old = learner.compute_logprobs(batch)
    (mb,) = micro_batches(batch, list(range(len(batch))), learner.sec.micro_batch_tokens, learner.sec.packing)
    learner.model.train()
    with torch.enable_grad():
        lp = mb.view(learner.model.token_logprobs(mb.input_ids, mb.targets, seq_idx=mb.seq_idx, temperature=1.0))
    worst = 0.0
    for r, vals in zip(mb.index, mb.completion(lp.detach(), batch)):
        worst = max(worst, (torch.tensor(vals) - torch.tensor(old[r])).abs().max().item())
    assert worst <= 1e-6, worst


def test_first_update_ratio_is_one_with_several_minibatches(tmp_path):
    learner = perturbed_learner(make_cfg(model=BM2, minibatches=2, lr=1e-12, bf16=True), tmp_path, scale=0.2)
    batch, _ = rollout_batch(learner, SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=2))
    m = learner.update(batch)
    assert m["learn/optimizer_steps"] == 2.0
    assert m["learn/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["learn/clip_frac_low"] == 0.0 and m["learn/clip_frac_high"] == 0.0


def test_reference_kl_is_zero_at_step_zero_in_bf16():
    """A bf16 learner (the GPU default) keeps its reference in bf16 and scores it like the policy."""
    learner = Learner(make_cfg(bf16=True, algo_={"kl_coef": 0.1}))
    assert learner.ref is not None
    assert {p.dtype for p in learner.ref.parameters()} == {torch.bfloat16}
    P = [[5, 17, 40, 9], [6, 17, 41, 9]]
    C = [[20, 30, 40, 50, 60], [21, 31, 41, 51]]
    batch = TrainBatch(P, C, [[-5.0] * len(c) for c in C], [[1.0] * len(c) for c in C], [1.0, -1.0])
    assert learner.update(batch)["learn/kl"] == 0.0


# ---------------------------------------------------------------------------------------------- loss guards


def test_seq_mean_token_mean_ignores_rows_without_valid_tokens():
    per_tok = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert float(algo.aggregate(per_tok, mask, "seq-mean-token-mean")) == pytest.approx(1.0)


def test_masked_non_finite_positions_change_nothing():
    logp = torch.tensor([[-1.0, -2.0, -float("inf")]])
    old = torch.tensor([[-1.1, -1.9, 0.0]])
    roll = torch.tensor([[-1.0, -2.0, -float("inf")]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    cfg = LossConfig(kl_coef=0.1)
    ref = torch.tensor([[-1.0, -2.0, 50.0]])
    loss, m = algo.policy_loss(logp, old, torch.tensor([1.0]), mask, cfg, rollout_logp=roll, ref_logp=ref)
    loss2, _ = algo.policy_loss(logp[:, :2], old[:, :2], torch.tensor([1.0]), mask[:, :2], cfg,
                                rollout_logp=roll[:, :2], ref_logp=ref[:, :2])
    assert torch.isfinite(loss) and float(loss) == pytest.approx(float(loss2))
    assert all(math.isfinite(v) for v in m.values())


def test_log_ratio_and_k3_are_clamped():
    logp = torch.tensor([[-100.0]])
    ref = torch.tensor([[0.0]])
    assert float(algo.kl_k3(logp, ref)) == pytest.approx(10.0)           # exp(20) - 21 clamped to 10
    loss, m = algo.policy_loss(torch.tensor([[0.0]]), torch.tensor([[-100.0]]), torch.tensor([-1.0]),
                               torch.ones(1, 1), LossConfig(clip_ratio_c=3.0))
    assert torch.isfinite(loss)


def test_dual_clip_bounds_negative_advantage_tokens():
    # ratio 10, A = -1: clipped PPO gives max(10, 0.8) = 10; dual clip bounds it at c = 3
    logp, old = torch.tensor([[math.log(10.0)]]), torch.tensor([[0.0]])
    mask = torch.ones(1, 1)
    plain, _ = algo.policy_loss(logp, old, torch.tensor([-1.0]), mask, LossConfig())
    dual, _ = algo.policy_loss(logp, old, torch.tensor([-1.0]), mask, LossConfig(clip_ratio_c=3.0))
    assert float(plain) == pytest.approx(10.0) and float(dual) == pytest.approx(3.0)
    pos, _ = algo.policy_loss(logp, old, torch.tensor([1.0]), mask, LossConfig(clip_ratio_c=3.0))
    assert float(pos) == pytest.approx(-1.28)                              # positive A: untouched
    with pytest.raises(ConfigError, match="clip_ratio_c"):
        make_cfg(algo_={"clip_ratio_c": 1.0})


# ---------------------------------------------------------------------------------------------- dynamic sampling


class _Task:
    def row(self, split, i):
        return {"prompt": f"p{i}", "answer": "1"}


def fake_driver(cfg, score_fn):
    """A Driver without Ray: generate returns `len(rows) * G` results whose lengths vary, score_fn scores."""
    d = Driver.__new__(Driver)
    d.cfg = cfg
    tok = SimpleNamespace(encode=lambda text, add_special_tokens=False: [1, 2, 3])
    d.prompts = PromptSource(_Task(), tok, limit=50, policy="drop")
    d.drawn = []

    def generate(rows, n, salt=0, temperature=None, split="train"):
        d.drawn.append(len(rows))
        res = [GenResult(request_id=r.index, sample_index=j, prompt_ids=[1, 2, 3], token_ids=[7] * (2 + 3 * j),
                         text=f"{r.index}", logprobs=[-1.0] * (2 + 3 * j), model_logprobs=[-1.0] * (2 + 3 * j),
                         finish_reason="eos") for r in rows for j in range(n)]
        return res, {}

    d.generate = generate
    d.score = lambda rows, results, n: score_fn(rows, results)
    d.rewards = SimpleNamespace(weights={"math": 1.0, "format": 0.5})
    return d


def scored(rewards, per_function):
    return SimpleNamespace(rewards=rewards, per_function=per_function, metrics=lambda prefix: {})


def test_dynamic_sampling_decides_on_the_task_reward_not_the_length_shaping():
    """All-wrong groups with varied lengths: the overlong penalty makes their shaped rewards differ, but
    they carry no task signal and are dropped; even prompts are solved by half their samples."""
    cfg = load_grpo_config(data={"model": dict(TINY), "group_size": 4, "prompts_per_step": 2,
                                 "sampling": {"max_new_tokens": 12},
                                 "algo": {"dynamic_sampling": True, "overlong_buffer": 8, "max_resample_rounds": 3}})

    def score(rows, results):
        r = [1.0 if (res.request_id % 2 == 0 and res.sample_index % 2 == 0) else 0.0 for res in results]
        return scored(r, {"math": r})

    d = fake_driver(cfg, score)
    ro = d.rollout()
    assert all(p.index % 2 == 0 for p in ro.prompts) and len(ro.prompts) == 2
    assert d.drawn[0] == 2 and d.drawn[1] > 1        # the refill oversamples (half the groups were informative)


def test_dynamic_sampling_rewards_names_the_deciding_functions():
    cfg = load_grpo_config(data={"model": dict(TINY), "group_size": 2, "prompts_per_step": 1,
                                 "algo": {"dynamic_sampling": True, "dynamic_sampling_rewards": ["math"]}})

    def score(rows, results):   # math constant within a group, format varies: not informative for "math"
        fmt = [float(res.sample_index) for res in results]
        math_ = [float(res.request_id % 3 == 0 and res.sample_index == 0) for res in results]
        return scored([m + 0.5 * f for m, f in zip(math_, fmt)], {"math": math_, "format": fmt})

    d = fake_driver(cfg, score)
    ro = d.rollout()
    assert [p.index % 3 for p in ro.prompts] == [0]
    bad = load_grpo_config(data={"model": dict(TINY), "algo": {"dynamic_sampling": True,
                                                               "dynamic_sampling_rewards": ["nope"]}})
    with pytest.raises(ConfigError, match="nope"):
        fake_driver(bad, score).rollout()


# ---------------------------------------------------------------------------------------------- schedule, configs


def test_learning_rate_warmup_then_cosine_decay():
    cfg = make_cfg(lr=1e-3, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1, backend="torch")
    cfg.steps = 6
    learner = Learner(cfg)
    from rl.grpo.learner import lr_schedule
    learner.schedule = lr_schedule(learner.sec, 6)
    P = [[5, 17, 40, 9], [6, 17, 41, 9]]
    C = [[20, 30, 40], [21, 31, 41]]
    batch = TrainBatch(P, C, [[-5.0] * 3] * 2, [[1.0] * 3] * 2, [1.0, -1.0])
    lrs = [learner.update(batch)["learn/lr"] for _ in range(6)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)     # linear warmup
    assert lrs[-1] == pytest.approx(1e-4)                                        # cosine down to 0.1 x lr
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[-1])


@pytest.mark.parametrize("key,value,match", [
    ("zero_stage", 4, "learner.zero_stage"),
    ("num_gpus", 2.5, "learner.num_gpus"),
    ("num_ranks", 0, "learner.num_ranks"),
    ("lr_schedule", "step", "lr_schedule"),
    ("warmup_steps", -1, "learner.warmup_steps"),
])
def test_configs_that_cannot_work_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(**{key: value})
