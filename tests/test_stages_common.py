"""rl.train.loop.Trainer: gradient accumulation equals one big batch, gradient checkpointing changes
nothing, a non-finite gradient skips the step without touching the weights."""

import pytest
import torch

from model.config import BitMambaConfig
from model.errors import ConfigError
from model.lm import BitMambaLM
from rl.train.data import PackedBatch, pack_documents
from rl.train.optim import OptimConfig, build_optimizer
from rl.train.schedule import Schedule, ScheduleConfig
from rl.train.loop import LossOut, TrainConfig, Trainer


def _loss(model, b):
    out = model(b.input_ids, seq_idx=b.seq_idx, labels=b.labels, return_logits=False)
    return LossOut(out.loss_sum, out.n_tokens)


def _batches():
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 256, (int(n),), generator=g).tolist() for n in torch.randint(5, 40, (30,), generator=g)]
    rows = pack_documents(docs, seq_len=32, eos=0)[:4]
    return [PackedBatch(*(torch.stack(x) for x in zip(*rows[i:i + 2]))) for i in (0, 2)]


def _setup(**train):
    torch.manual_seed(0)
    m = BitMambaLM(BitMambaConfig.preset("tiny"))
    opt = build_optimizer(m, OptimConfig(lr=1e-2), verbose=False)
    cfg = TrainConfig(max_steps=10, batch_size=2, device="cpu", progress=False, **train)
    return m, Trainer(m, opt, Schedule(ScheduleConfig(kind="constant"), 10), cfg)


def test_grad_accum_equals_one_big_batch():
    b1, b2 = _batches()
    big = PackedBatch(*(torch.cat([getattr(b1, k), getattr(b2, k)]) for k in ("input_ids", "labels", "seq_idx")))
    ma, ta = _setup(grad_accum=2)
    mb, tb = _setup()
    ra = ta.step(0, [b1, b2], _loss)
    rb = tb.step(0, [big], _loss)
    assert ra.loss == pytest.approx(rb.loss, abs=1e-6) and ra.grad_norm == pytest.approx(rb.grad_norm, rel=1e-5)
    # gradients (clipped the same way) agree; weights after Muon's bf16 Newton-Schulz would amplify rounding
    for (n, a), b in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_gradient_checkpointing_same_step():
    b1, _ = _batches()
    ma, ta = _setup(gradient_checkpointing=True)
    mb, tb = _setup()
    assert ma.gradient_checkpointing and not mb.gradient_checkpointing
    ra, rb = ta.step(0, [b1], _loss), tb.step(0, [b1], _loss)
    assert ra.loss == pytest.approx(rb.loss, abs=1e-6) and ra.grad_norm == pytest.approx(rb.grad_norm, rel=1e-5)


def test_nonfinite_gradient_skips_step():
    b1, _ = _batches()
    m, t = _setup(max_bad_steps=3)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    hook = m.embedding.weight.register_hook(lambda g: g * float("inf"))
    r = t.step(0, [b1], _loss)
    hook.remove()
    assert r.skipped and "gradient norm is" in r.reason
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    r = t.step(1, [b1], _loss)
    assert not r.skipped and t.bad_in_a_row == 0
    assert not torch.equal(m.embedding.weight, before["embedding.weight"])


def test_train_config_conflicts():
    with pytest.raises(ConfigError, match="train.grad_accum: must be >= 1"):
        TrainConfig(grad_accum=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.precision: fp16 needs a CUDA device"):
            TrainConfig(precision="fp16")
        with pytest.raises(ConfigError, match="train.device: 'cuda' asked for"):
            TrainConfig(device="cuda")
    assert TrainConfig(device="cpu").autocast_dtype() is None
    assert TrainConfig(device="cpu", precision="bf16").autocast_dtype() == torch.bfloat16
