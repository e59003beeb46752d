"""Bad inputs: each gives one clear error naming the problem, no traceback, and writes nothing.

A few go through the real `bitmamba` console entry in a subprocess (exit code 2, one `error:` line on
stderr, no "Traceback"); the rest call the stage's `main` in-process and check the exception, that
no Ray cluster was started, and that the output directory does not exist afterwards.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from model.config import BitMambaConfig
from model.errors import BitMambaError, CheckpointError, ConfigError, DataError
from model.lm import BitMambaLM
from rewards.errors import RewardSpecError

ROOT = Path(__file__).resolve().parents[2]
GRPO_CFG = str(ROOT / "configs" / "grpo_tiny.yaml")
PRETRAIN_CFG = str(ROOT / "configs" / "pretrain_tiny.yaml")


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("BITMAMBA_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "rl.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=180)


def assert_one_clean_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errs = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errs) == 1, res.stderr[-2000:]
    for n in needles:
        assert n in errs[0], (n, errs[0])
    return errs[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "model"
    torch.manual_seed(0)
    BitMambaLM(BitMambaConfig.preset("tiny", vocab_size=384)).save_pretrained(d)
    return d


# ------------------------------------------------------------------ through the real CLI (subprocess)


def test_cli_grpo_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: tiny\n  overrides: {vocab_size: 384\nsteps: 2\n")
    out = tmp_path / "out"
    err = assert_one_clean_error(cli("grpo", "--config", str(bad), "--output-dir", str(out)), "bad.yaml")
    assert "yaml" in err.lower() or "line" in err.lower(), err
    assert not out.exists()


def test_cli_grpo_reward_spec_missing_file_fails_at_config_load(tmp_path):
    out = tmp_path / "out"
    res = cli("grpo", "--config", GRPO_CFG, "--output-dir", str(out), "wandb=false",
              f"rewards=[{{spec: '{tmp_path}/no_such_rewards.py:score'}}]")
    assert_one_clean_error(res, "no_such_rewards.py")
    assert not out.exists()
    assert "Started a local Ray instance" not in res.stderr      # failed before any cluster was started


def test_cli_pretrain_broken_jsonl_line_names_the_line(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n{"text": broken\n{"text": "four"}\n')
    out = tmp_path / "out"
    res = cli("pretrain", "--config", PRETRAIN_CFG, "--output-dir", str(out), "--no-wandb",
              f"data.sources=[{{path: '{data}', name: prose}}]", "schedule.kind=constant")
    assert_one_clean_error(res, "corpus.jsonl:3")
    assert not out.exists()


def test_cli_convert_bin_wrong_magic_or_truncated_writes_nothing(tmp_path):
    """(Every truncation point and header field is covered in-process by tests/test_convert_bin.py.)"""
    import struct

    from model.binfile import MAGIC

    src, dst = tmp_path / "bad.bin", tmp_path / "converted"
    src.write_bytes(struct.pack("<i", 0x12345678) + bytes(64))
    assert_one_clean_error(cli("convert", "--from", "bitmamba2-bin", str(src), str(dst)), "bad.bin", "magic")
    assert not dst.exists()
    src.write_bytes(struct.pack("<i", MAGIC) + bytes(6))          # the header cut short
    assert_one_clean_error(cli("convert", "--from", "bitmamba2-bin", str(src), str(dst)), "bad.bin", "truncated")
    assert not dst.exists()


def test_cli_generate_checkpoint_of_another_architecture_names_the_shape(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "mixed"
    d.mkdir()
    (d / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())     # says d_state=16
    other = BitMambaLM(BitMambaConfig.preset("tiny", vocab_size=384, d_state=32))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(d / "model.safetensors"))
    res = cli("generate", str(d), "--prompt-ids", "1 2 3", "--max-new-tokens", "2", "--backend", "torch")
    assert_one_clean_error(res, "model.safetensors", "shape")


def test_cli_generate_prompt_longer_than_context(tiny_dir):
    res = cli("generate", str(tiny_dir), "--prompt-ids", " ".join(["5"] * 100), "--max-new-tokens", "8",
              "--max-len", "64", "--backend", "torch")
    assert_one_clean_error(res, "100 tokens", "--max-len 64")


# ------------------------------------------------------------------ GRPO in-process: fails before Ray, writes nothing


def grpo_fails(tmp_path, *overrides: str, exc=BitMambaError, match: str = "") -> None:
    from rl.grpo import driver as grpo

    assert not ray.is_initialized()
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        grpo.main(["--config", GRPO_CFG, "--output-dir", str(out), "wandb=false", *overrides])
    assert not out.exists()
    assert not ray.is_initialized()          # preflight failed before connecting to / starting a cluster


@pytest.mark.parametrize("override,needle", [
    ("learner.bogus=1", r"grpo_tiny\.yaml.*learner\.bogus"),                 # unknown key
    ("group_size=eight", r"grpo_tiny\.yaml.*group_size"),                    # wrong type
    ("sampling.max_new_tokens=64", r"max_new_tokens.*must be < model\.max_seq_len"),   # conflicting options
    ("model.path=/x", r"exactly one of model\.path and model\.preset"),      # conflicting options
])
def test_grpo_config_errors(tmp_path, override, needle):
    grpo_fails(tmp_path, override, exc=ConfigError, match=needle)


def _jsonl(tmp_path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_grpo_dataset_missing_empty_and_broken_line(tmp_path):
    task = ["task.name=null", "task.kwargs={}"]
    grpo_fails(tmp_path, *task, f"task.path={tmp_path / 'nope.jsonl'}", exc=DataError,
               match=r"dataset not found: .*nope\.jsonl")
    grpo_fails(tmp_path, *task, "task.path=" + _jsonl(tmp_path, "empty.jsonl", "\n\n"), exc=DataError,
               match=r"empty\.jsonl: empty dataset")
    broken = _jsonl(tmp_path, "broken.jsonl", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=\n')
    grpo_fails(tmp_path, *task, f"task.path={broken}", exc=DataError, match=r"broken\.jsonl:2: not valid JSON")


def test_grpo_reward_spec_errors_at_config_load(tmp_path):
    grpo_fails(tmp_path, f"rewards=[{{spec: '{tmp_path}/missing.py:fn'}}]", exc=RewardSpecError, match="missing.py")
    rew = _jsonl(tmp_path, "r.py", "def other(prompt, completion, **f):\n    return 0.0\n")
    grpo_fails(tmp_path, f"rewards=[{{spec: '{rew}:score'}}]", exc=RewardSpecError, match="score")
    grpo_fails(tmp_path, "rewards=[{spec: no_such_builtin}]", exc=RewardSpecError, match="no_such_builtin")


def test_grpo_tokenizer_larger_than_model_vocab(tmp_path):
    grpo_fails(tmp_path, "model.overrides={vocab_size: 256}", exc=ConfigError, match="vocab_size is 256")


def test_grpo_init_checkpoint_missing_or_not_ours(tmp_path, tiny_dir):
    grpo_fails(tmp_path, "model.preset=null", f"model.path={tmp_path / 'none'}", exc=CheckpointError,
               match="checkpoint directory not found")
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    grpo_fails(tmp_path, "model.preset=null", f"model.path={d}", exc=CheckpointError, match="format")


def test_grpo_prompt_longer_than_context_truncate_and_drop_are_counted():
    """The policy itself (the end-to-end drop count is in tests/test_grpo_e2e.py)."""
    from rl.grpo.driver import PromptSource
    from rl.grpo.config import TINY_TOKENIZER_VOCAB
    from rl.grpo.tasks import make_task
    from rollout.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(TINY_TOKENIZER_VOCAB)
    task = make_task("arithmetic", seed=0, max_operand=9, ops="+")
    long_row = {"prompt": "9" * 300 + "+1=", "answer": "0"}

    class Mixed:   # every 3rd row too long
        def row(self, split, i):
            return long_row if i % 3 == 1 else task.row(split, i)

    limit = 20
    src = PromptSource(Mixed(), tok, limit, "truncate")
    rows = src.take(6)
    assert [r.index for r in rows] == [0, 1, 2, 3, 4, 5] and src.truncated == 2 and src.dropped == 0
    full = tok.encode(long_row["prompt"], add_special_tokens=False)
    assert rows[1].ids == full[-limit:]                     # the end (the question) is kept
    src = PromptSource(Mixed(), tok, limit, "drop")
    rows = src.take(4)
    assert [r.index for r in rows] == [0, 2, 3, 5] and src.dropped == 2 and src.pos == 6


# ------------------------------------------------------------------ pretraining in-process


def pretrain_fails(tmp_path, *overrides: str, exc=BitMambaError, match: str = "") -> None:
    from rl.train import pretrain

    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        pretrain.main(["--config", PRETRAIN_CFG, "--output-dir", str(out), "--no-wandb",
                       "schedule.kind=constant", *overrides])
    assert not out.exists()


def test_pretrain_dataset_missing_and_empty(tmp_path):
    pretrain_fails(tmp_path, f"data.sources=[{{path: '{tmp_path}/nope.jsonl', name: prose}}]", exc=DataError,
                   match="not found")
    empty = _jsonl(tmp_path, "empty.jsonl", "")
    pretrain_fails(tmp_path, f"data.sources=[{{path: '{empty}', name: prose}}]", exc=DataError,
                   match="empty dataset")


def test_pretrain_tokenizer_does_not_fit_model(tmp_path):
    pretrain_fails(tmp_path, "model.overrides={vocab_size: 256}", exc=ConfigError, match="vocab_size 256")


def test_pretrain_config_errors(tmp_path):
    pretrain_fails(tmp_path, "train.bogus=1", exc=ConfigError, match=r"pretrain_tiny\.yaml.*train\.bogus")
    pretrain_fails(tmp_path, "train.grad_accum=0", exc=ConfigError, match="grad_accum")
    pretrain_fails(tmp_path, "train.max_steps=[1]", exc=ConfigError, match="max_steps")


def test_sft_missing_dataset_in_a_later_stage_writes_nothing(tmp_path):
    from rl.train import sft

    out = tmp_path / "out"
    stages = ("stages=[{name: a, data: [{path: data/tiny/sft.jsonl}], max_steps: 1}, "
              f"{{name: b, data: [{{path: '{tmp_path}/nope.jsonl'}}], max_steps: 1}}]")
    with pytest.raises(DataError, match="not found"):
        sft.main(["--config", str(ROOT / "configs" / "sft_tiny.yaml"), "--output-dir", str(out), "--no-wandb",
                  stages])
    assert not out.exists()                      # stage a did not run first


def test_distill_missing_teacher_writes_nothing(tmp_path):
    from rl.train import distill

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="no such model directory.*pretrain_tiny_fp"):
        distill.main(["--config", str(ROOT / "configs" / "distill_tiny.yaml"), "--output-dir", str(out),
                      "--no-wandb", f"teacher.path={tmp_path / 'no_teacher'}"])
    assert not out.exists()
