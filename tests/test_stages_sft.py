"""SFT stage end to end: assistant-token loss falls; stages chain (each starts from the previous final)."""

import json
from pathlib import Path

import pytest

from model.errors import ConfigError
from model.typed import load_config
from rl.train.metrics import read_metrics
from rl.train.sft import SFTConfig, assistant_loss, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "sft_tiny.yaml"


def _held_out_batches(tok, n=3):
    from rl.train.data import DataSource, SFTLoader, load_records

    ds = load_records(DataSource(path=str(ROOT / "data" / "tiny" / "sft.jsonl")))
    ds = ds.select(range(len(ds) - 24, len(ds)))
    ld = SFTLoader(ds, tok, batch_size=8, max_len=192, seed=99, shuffle=False)
    return [ld.next_batch() for _ in range(n)]


@pytest.mark.slow
def test_sft_stages_lower_assistant_loss_and_chain(tmp_path):
    over = [f"output_dir={tmp_path}", "train.progress=false", "train.log_every=5", "train.save_every=0"]
    cfg = load_config(SFTConfig, TINY, over)
    cfg.stages[0].max_steps, cfg.stages[1].max_steps, cfg.stages[2].max_steps = 40, 8, 6
    from model.lm import BitMambaLM
    from rl.train.stage import build_model_from_spec, seed_everything

    final = run(cfg, str(TINY))
    from rollout.tokenizer import load_tokenizer

    tok = load_tokenizer(final)
    batches = _held_out_batches(tok)
    seed_everything(cfg.train.seed)
    init = build_model_from_spec(cfg.model)  # the same initial weights as stage 0 (same seed)
    before = assistant_loss(init, batches)
    after_cold = assistant_loss(BitMambaLM.from_pretrained(tmp_path / "0_cold_start" / "final"), batches)
    after = assistant_loss(BitMambaLM.from_pretrained(final), batches)
    assert after_cold < 0.7 * before, (before, after_cold)
    assert after < 0.8 * before, (before, after)
    # each stage started from the previous stage's final model, with its own optimizer and schedule
    resolved = [json.loads((tmp_path / d / "checkpoints").joinpath(
        sorted(p.name for p in (tmp_path / d / "checkpoints").iterdir())[-1], "trainer_state.json").read_text())
        for d in ("0_cold_start", "1_mixed", "2_polish")]
    assert resolved[0]["config"]["init_from"] is None
    assert resolved[1]["config"]["init_from"] == str(tmp_path / "0_cold_start" / "final")
    assert resolved[2]["config"]["init_from"] == str(tmp_path / "1_mixed" / "final")
    m1 = read_metrics(tmp_path / "1_mixed")
    assert m1[0]["step"] == 1 and m1[0]["lr"] == pytest.approx(1.5e-3)  # 8 steps: a 1-step warmup, then the stage's peak LR
    assert m1[0]["loss"] < read_metrics(tmp_path / "0_cold_start")[0]["loss"] * 0.7  # not from scratch
    assert len(tok) == 384 and (final / "tokenizer.json").is_file()
    # rerun: finished stages are skipped, nothing retrained
    mtime = (tmp_path / "2_polish" / "final" / "model.safetensors").stat().st_mtime
    run(cfg, str(TINY))
    assert (tmp_path / "2_polish" / "final" / "model.safetensors").stat().st_mtime == mtime


def test_sft_config_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(TINY.read_text().replace("    max_steps: 60\n", "    max_steps: 60\n    epochs: 2\n"))
    with pytest.raises(ConfigError, match=r"s\.yaml: stages\[0\]\.?.*cold_start: give exactly one of epochs / max_steps"):
        load_config(SFTConfig, p)
    p.write_text(TINY.read_text().replace("reasoning_off_share: 0.3", "reasoning_off_share: 1.3"))
    with pytest.raises(ConfigError, match=r"s\.yaml: .*reasoning_off_share must be in \[0, 1\]"):
        load_config(SFTConfig, p)
    p.write_text(TINY.read_text().replace("name: polish", "name: mixed"))
    with pytest.raises(ConfigError, match=r"s\.yaml: stages: names must be unique"):
        load_config(SFTConfig, p)


def test_sft_epochs_define_steps(tmp_path):
    cfg = load_config(SFTConfig, TINY, [f"output_dir={tmp_path}", "train.progress=false", "train.batch_size=4"])
    cfg.stages = cfg.stages[2:]
    cfg.stages[0].max_steps, cfg.stages[0].epochs = None, 0.1   # 200 polish chats * 0.1 / 4 = 5 steps
    cfg.tokenizer.tiny_vocab_size = 300
    cfg.model.overrides = {"vocab_size": 300}
    run(cfg, str(TINY))
    assert [r["step"] for r in read_metrics(tmp_path / "0_polish")][-1] == 5
