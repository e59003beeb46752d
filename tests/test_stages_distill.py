"""Distillation stage: a full-precision teacher, a ternary grouped-scale student initialized from it; KL falls."""

import warnings
from pathlib import Path

import pytest
import torch

from model.errors import ConfigError
from model.typed import load_config
from rl.train.data import DataSource, PackedLoader, load_records
from rl.train.distill import DistillConfig, ZeroRatioExceeded, load_teacher, make_student, mean_kl, run
from rl.train.metrics import read_metrics
from rl.train.pretrain import PretrainConfig
from rl.train.pretrain import run as pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "distill_tiny.yaml"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain_tiny_fp.yaml",
                      [f"output_dir={out}", "train.progress=false", "train.max_steps=40", "train.save_every=0"])
    return pretrain(cfg, str(ROOT / "configs" / "pretrain_tiny_fp.yaml")).final_dir


def _cfg(tmp_path, teacher_dir, *extra):
    return load_config(DistillConfig, TINY, [f"output_dir={tmp_path}", f"teacher.path={teacher_dir}",
                                             "train.progress=false", *extra])


@pytest.mark.slow
def test_distill_lowers_kl(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path, teacher_dir, "train.max_steps=30", "train.log_every=5")
    teacher = load_teacher(cfg.teacher)
    assert not teacher.zero_ratios()  # full precision
    student0 = make_student(teacher, cfg.student)
    assert all(m.ternary and m.group_size == 32 for n, m in student0.bitlinears() if "proj" in n)
    from rollout.tokenizer import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    src = DataSource(path=str(ROOT / "data" / "tiny" / "prose.jsonl"), max_records=200)
    batches = [b for b, _ in zip(PackedLoader([(src, load_records(src))], tok, 64, 8, seed=123), range(3))]
    kl0 = mean_kl(student0, teacher, batches)
    res = run(cfg, str(TINY))
    from model.lm import BitMambaLM

    student = BitMambaLM.from_pretrained(res.final_dir)
    assert student.config.quant.ternary and student.config.quant.weight_scale == "group"
    kl1 = mean_kl(student, teacher, batches)
    assert kl0 > 0 and kl1 < 0.6 * kl0, (kl0, kl1)
    recs = read_metrics(tmp_path)
    assert {"kl", "ce", "zero_ratio", "zero_ratio_max", "tokens_per_s"} <= set(recs[-1])
    assert recs[-1]["kl"] < recs[0]["kl"]


def test_student_init_from_teacher_and_group_check(teacher_dir):
    cfg = load_config(DistillConfig, TINY, [f"teacher.path={teacher_dir}"])
    teacher = load_teacher(cfg.teacher)
    student = make_student(teacher, cfg.student)
    for (n, a), (_, b) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert torch.equal(a, b), n
    cfg.student.group_size = 48
    with pytest.raises(ConfigError, match="student.group_size 48 does not divide"):
        make_student(teacher, cfg.student)


def test_zero_guard_warns_and_stops(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path, teacher_dir, "train.max_steps=4", "train.log_every=1", "zero_guard.threshold=0.05",
               "zero_guard.stop=true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ZeroRatioExceeded, match=r"layer layers\.\d\.mixer\.\w+_proj has .* zero weights at step 1"):
            run(cfg, str(TINY))


def test_distill_config_errors(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text(TINY.read_text().replace("  path: runs/pretrain_tiny_fp/final", "  path: a\n  hf_path: b"))
    with pytest.raises(ConfigError, match=r"d\.yaml: teacher.*exactly one of teacher.path / teacher.hf_path"):
        load_config(DistillConfig, p)
    p.write_text(TINY.read_text().replace("temperature: 1.0", "temperature: 0"))
    with pytest.raises(ConfigError, match=r"d\.yaml: loss.*temperature: must be > 0"):
        load_config(DistillConfig, p)


def test_distill_from_hf_mamba2_teacher(tmp_path):
    transformers = pytest.importorskip("transformers")
    hcfg = transformers.Mamba2Config(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                                     state_size=16, n_groups=1, chunk_size=16)
    transformers.Mamba2ForCausalLM(hcfg).eval().save_pretrained(tmp_path / "hf")
    cfg = load_config(DistillConfig, TINY, [f"output_dir={tmp_path / 'out'}", "teacher.path=null",
                                            f"teacher.hf_path={tmp_path / 'hf'}", "train.progress=false",
                                            "train.max_steps=3", "train.log_every=1", "data.seq_len=32"])
    res = run(cfg, str(TINY))
    from model.lm import BitMambaLM

    student = BitMambaLM.from_pretrained(res.final_dir)
    assert student.config.quant.ternary and student.config.d_model == 64
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [1, 2, 3]
    assert all(r["kl"] >= 0 for r in read_metrics(tmp_path / "out"))
