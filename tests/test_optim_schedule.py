"""Optimizer routing (Muon / AdamW / SSM group) and the WSD / FG-WSD schedules."""

import math

import pytest
import torch

from model.config import BitMambaConfig
from model.errors import ConfigError
from model.lm import BitMambaLM
from model.typed import load_config
from rl.train.optim import OptimConfig, build_optimizer, route_parameters
from rl.train.schedule import Schedule, ScheduleConfig


def _model(preset="tiny", **kw):
    return BitMambaLM(BitMambaConfig.preset(preset, **kw))


@pytest.mark.parametrize("preset", ["tiny", "tiny-hybrid", "tiny-bitmamba2"])
def test_routing_covers_every_parameter_once(preset):
    m = _model(preset)
    g = route_parameters(m)
    names = [n for group in g.values() for n, _ in group]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters())
    assert all(p.ndim == 2 for _, p in g["muon"])
    muon = {n for n, _ in g["muon"]}
    assert muon == {f"{n}.weight" for n, b in m.bitlinears() if b.ternary}
    assert all(n.endswith("_proj.weight") or n == "lm_head.weight" for n in muon)
    assert {n.rsplit(".", 1)[-1] for n, _ in g["ssm"]} == {"A_log", "dt_bias", "D"}
    assert "embedding.weight" in {n for n, _ in g["adamw"]}
    assert all(p.ndim == 1 for _, p in g["adamw_no_decay"])
    if m.config.ternary_head:
        assert "lm_head.weight" in muon
    else:
        assert "lm_head.weight" in {n for n, _ in g["adamw"]}


def test_build_optimizer_groups_and_step(capsys):
    m = _model("tiny")
    opt = build_optimizer(m, OptimConfig(lr=1e-2, ssm_lr_mult=0.1))
    err = capsys.readouterr().err
    assert "muon" in err and "ssm" in err and "params" in err
    assert isinstance(opt.optimizers["muon"], torch.optim.Muon)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["ssm"]["lr"] == pytest.approx(1e-3) and groups["ssm"]["weight_decay"] == 0
    assert groups["adamw_no_decay"]["weight_decay"] == 0 and groups["adamw"]["weight_decay"] == 0.1
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x = torch.randint(0, 256, (2, 16))
    m(x, labels=x).loss.backward()
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert "layers.0.mixer.in_proj.weight" in changed and "layers.0.mixer.A_log" in changed
    opt.set_lr_mult(0.5)
    assert groups["ssm"]["lr"] == pytest.approx(5e-4) and opt.lr == pytest.approx(5e-3)
    # state roundtrip through weights_only load
    import io

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = build_optimizer(m, OptimConfig(lr=1e-2), verbose=False)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(opt2.optimizers["muon"].state_dict()["state"][0]["momentum_buffer"],
                       opt.optimizers["muon"].state_dict()["state"][0]["momentum_buffer"])


def test_muon_off_and_tied_embeddings():
    m = _model("tiny", tie_embeddings=True)
    g = route_parameters(m, use_muon=False)
    assert not g["muon"]
    names = [n for group in g.values() for n, _ in group]
    assert len(names) == len(set(id(p) for p in m.parameters()))


def test_wsd_schedule_shape():
    s = Schedule(ScheduleConfig(kind="wsd", warmup=0.1, decay=0.2, min_lr_ratio=0.01), total_steps=100)
    assert [p.name for p in s.phases] == ["warmup", "stable", "decay"]
    assert s.lr_mult(0) == pytest.approx(0.1) and s.lr_mult(9) == pytest.approx(1.0)
    assert s.lr_mult(50) == 1.0 and s.lr_mult(80) == pytest.approx(1.0)
    assert s.lr_mult(99) == pytest.approx(0.01)
    mults = [s.lr_mult(i) for i in range(80, 100)]
    assert all(a >= b for a, b in zip(mults, mults[1:]))


def test_fg_wsd_phases_mixture_and_context():
    cfg = ScheduleConfig(kind="fg-wsd", mixture={"web": 0.7, "code": 0.3}, new_mixture={"web": 0.3, "math": 0.7},
                         decay_seq_len=16384)
    s = Schedule(cfg, total_steps=1000, base_seq_len=8192)
    assert [(p.name, p.start, p.end) for p in s.phases] == [
        ("warmup", 0, 50), ("stable", 50, 450), ("stable_new_mix", 450, 800), ("decay", 800, 1000)]
    assert s.phase_at(10).mixture == {"web": 0.7, "code": 0.3} and s.phase_at(10).seq_len == 8192
    assert s.phase_at(500).mixture == {"web": 0.3, "math": 0.7} and s.phase_at(500).seq_len == 8192
    assert s.phase_at(900).seq_len == 16384 and s.phase_at(999).name == "decay"
    assert s.lr_mult(0) == pytest.approx(1 / 50) and s.lr_mult(49) == 1.0 and s.lr_mult(600) == 1.0
    assert s.lr_mult(800) == pytest.approx(1.0) and s.lr_mult(999) == pytest.approx(0.01)
    mid = s.lr_mult(800 + 199 // 2)
    assert mid == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 99 / 199)))


def test_schedule_from_yaml_and_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("kind: wsd\nphases:\n  - {name: a, fraction: 0.5, shape: linear_warmup, seq_len: 32}\n"
                 "  - {name: b, fraction: 0.5, shape: linear, mixture: {x: 1.0}, seq_len: 64}\n")
    s = Schedule(load_config(ScheduleConfig, p), total_steps=10)
    assert s.phase_at(7).seq_len == 64 and s.phase_at(7).mixture == {"x": 1.0} and s.lr_mult(4) == 1.0
    p.write_text("kind: wsd\nphases:\n  - {name: a, fraction: 0.5}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml.*phases: fractions must sum to 1"):
        load_config(ScheduleConfig, p)
    p.write_text("kind: wsd\nwarmpu: 0.1\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: unknown key warmpu"):
        load_config(ScheduleConfig, p)
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(OptimConfig, data={"lr": -1.0})


def test_cpu_offload_matches_plain_optimizer():
    torch.manual_seed(0)
    m1, m2 = _model("tiny"), _model("tiny")
    m2.load_state_dict(m1.state_dict())
    o1 = build_optimizer(m1, OptimConfig(lr=1e-2), verbose=False)
    o2 = build_optimizer(m2, OptimConfig(lr=1e-2, cpu_offload=True), verbose=False)
    assert {id(p) for p in o2.parameters()} == {id(p) for p in m2.parameters()}  # clipping acts on live params
    x = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x, labels=x).loss.backward()
            o.step()
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n
    assert not torch.equal(next(m1.parameters()), _model("tiny").embedding.weight)
