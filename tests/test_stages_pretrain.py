"""Pretraining stage end to end on the embedded tiny corpus: loss drops, exact resume, NaN guard, config errors."""

from pathlib import Path

import pytest
import torch

from model.errors import ConfigError
from model.typed import load_config
from rl.train.metrics import read_metrics
from rl.train.pretrain import PretrainConfig, run
from rl.train.loop import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain_tiny.yaml"


def _cfg(tmp_path, **train):
    over = [f"output_dir={tmp_path}", "train.progress=false"] + [f"train.{k}={v}" for k, v in train.items()]
    return load_config(PretrainConfig, TINY, over)


@pytest.mark.slow
def test_pretrain_tiny_config_lowers_loss(tmp_path):
    res = run(_cfg(tmp_path / "run", max_steps=60), str(TINY))  # the tiny config, shortened for CI time
    recs = read_metrics(tmp_path / "run")
    first, last = recs[0], recs[-1]
    assert first["step"] == 1 and last["step"] == 60
    assert last["loss"] < 0.7 * first["loss"], (first["loss"], last["loss"])
    assert {"lr", "tokens_per_s", "zero_ratio", "grad_norm", "phase"} <= set(last)
    assert [r["seq_len"] for r in recs][-1] == 128  # FG-WSD decay phase raised the context
    # the final directory is a from_pretrained model with its tokenizer
    from model.lm import BitMambaLM
    from rollout.tokenizer import load_tokenizer

    m = BitMambaLM.from_pretrained(res.final_dir)
    tok = load_tokenizer(res.final_dir)
    ids = torch.tensor([tok.encode("12 + 35 = ", add_special_tokens=False)])
    assert m(ids).logits.shape == (1, ids.shape[1], 384)
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_resume_after_crash_logs_identical_losses(tmp_path, monkeypatch):
    import rl.train.pretrain as pt

    steps = dict(max_steps=12, save_every=4, log_every=1, batch_size=4)
    run(_cfg(tmp_path / "a", **steps), str(TINY))
    ref = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "a")]
    assert len(ref) == 12

    real = pt.pretrain_loss
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # dies during step 7, after the step-4 checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real(model, batch)

    monkeypatch.setattr(pt, "pretrain_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tmp_path / "b", **steps), str(TINY))
    monkeypatch.setattr(pt, "pretrain_loss", real)
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    run(_cfg(tmp_path / "b", **steps), str(TINY))  # resumes from step_00000004
    got = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "b")]
    assert [s for s, _ in got] == list(range(1, 13))
    for (s1, l1), (s2, l2) in zip(ref, got):
        assert l1 == pytest.approx(l2, abs=1e-6, rel=0), f"step {s1}: {l1} vs {l2}"
    from safetensors.torch import load_file

    A = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    B = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(A[k], B[k]) for k in A)


def test_stop_after_then_resume(tmp_path):
    run(_cfg(tmp_path, max_steps=6, stop_after=3, log_every=1, batch_size=2), str(TINY))
    assert not (tmp_path / "final").exists()
    assert (tmp_path / "checkpoints" / "step_00000003" / "manifest.json").is_file()
    res = run(_cfg(tmp_path, max_steps=6, log_every=1, batch_size=2), str(TINY))
    assert res.final_dir is not None and [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_nan_steps_skipped_then_stop(tmp_path, monkeypatch):
    import rl.train.pretrain as pt

    real = pt.pretrain_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = real(model, batch)
        if calls["n"] in (2,) or calls["n"] >= 5:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(pt, "pretrain_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"stopping at step 7: 3 consecutive steps skipped \(loss is nan\)"):
        run(_cfg(tmp_path, max_steps=20, log_every=1, batch_size=2, max_bad_steps=3), str(TINY))
    recs = read_metrics(tmp_path)
    assert recs[1]["skipped"] is True and recs[1]["loss"] == "nan"
    assert "skipped" not in recs[2] and recs[2]["step"] == 3  # step 3 trained normally after the skip


def test_config_errors_name_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    base = TINY.read_text()
    bad.write_text(base + "\nbogus_key: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key bogus_key"):
        load_config(PretrainConfig, bad)
    bad.write_text(base.replace("max_steps: 150", "max_steps: lots"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.max_steps: expected an integer"):
        load_config(PretrainConfig, bad)
    bad.write_text(base.replace("grad_accum: 1", "grad_accum: 0"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.grad_accum: must be >= 1"):
        load_config(PretrainConfig, bad)
    if not torch.cuda.is_available():
        bad.write_text(base.replace("grad_accum: 1", "grad_accum: 1\n  precision: fp16"))
        with pytest.raises(ConfigError, match=r"bad\.yaml: train\.precision: fp16 needs a CUDA device"):
            load_config(PretrainConfig, bad)
    bad.write_text(base.replace("{vocab_size: 384}", "{vocab_size: 300}"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: model vocab_size 300 is smaller"):
        run(load_config(PretrainConfig, bad, [f"output_dir={tmp_path / 'o'}"]), str(bad))


def test_cli_main_reports_config_error(tmp_path, capsys):
    from rl.cli import main

    rc = main(["pretrain", "--config", str(TINY), "--output-dir", str(tmp_path), "train.nope=1"])
    assert rc == 2
    assert "unknown key train.nope" in capsys.readouterr().err


def test_every_yaml_in_configs_loads():
    from rl.train.distill import DistillConfig
    from rl.train.sft import SFTConfig

    kinds = {"pretrain": PretrainConfig, "sft": SFTConfig, "distill": DistillConfig}
    seen = 0
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        stage = p.stem.split("_")[0]
        if stage in kinds:
            load_config(kinds[stage], p)
            seen += 1
    assert seen >= 3
