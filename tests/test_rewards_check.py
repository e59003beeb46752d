"""`bitmamba reward-check` end to end on temporary JSONL files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.check import main

ROOT = Path(__file__).resolve().parents[1]

USER = '''
import time
def flaky(prompt, completion, answer=None, **fields):
    if completion == "raise":
        raise RuntimeError("flaky failed")
    if completion == "hang":
        time.sleep(60)
    if completion == "skip":
        return None
    return float(completion == str(answer))
'''


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": "4", "id": i} for i in range(5)]
    return write_jsonl(tmp_path / "data.jsonl", rows)


def test_end_to_end_with_completions_file_and_out(tmp_path, data, capsys):
    (tmp_path / "u.py").write_text(USER)
    comps = write_jsonl(tmp_path / "c.jsonl", [{"completion": c} for c in ["4", "5", "raise", "hang", "skip"]])
    out = tmp_path / "out.jsonl"
    rc = main([f"{tmp_path}/u.py:flaky", "--data", data, "--completions", comps, "--out", str(out),
               "--workers", "1", "--timeout", "1"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "samples: 5" in text
    assert "mean 0.2500" in text and "min 0.0000" in text and "max 1.0000" in text   # over 4 scored
    assert "none 1 (20.0%)" in text and "error 1 (20.0%)" in text and "timeout 1 (20.0%)" in text
    assert "flaky failed" in text and "slowest call: sample 3" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "timeout", "none"]
    assert [r["reward"] for r in rows] == [1.0, 0.0, 0.0, 0.0, None]
    assert rows[2]["message"].startswith("flaky: RuntimeError: flaky failed")
    assert rows[0]["scores"] == {"flaky": 1.0}


def test_builtin_with_kwargs_and_completion_field(tmp_path, capsys):
    rows = [{"prompt": "p", "completion": "w " * n} for n in (10, 95, 200)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "o.jsonl"
    rc = main(["overlong", "--data", data, "--kwargs", '{"max_len": 100, "buffer": 10}', "--workers", "0",
               "--out", str(out)])
    assert rc == 0
    assert [json.loads(x)["reward"] for x in out.read_text().splitlines()] == [0.0, -0.5, -1.0]


def test_broken_line_mismatch_and_bad_spec_are_clean_errors(tmp_path, data, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "x"}\n\n{"prompt": "b", "completion": \n')
    assert main(["format", "--data", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{broken}:3: not valid JSON" in err and err.count("\n") == 1
    comps = write_jsonl(tmp_path / "c3.jsonl", [{"completion": "x"}] * 3)
    assert main(["format", "--data", data, "--completions", comps]) == 2
    err = capsys.readouterr().err
    assert "has 5 rows" in err and "has 3" in err
    assert main(["format", "--data", data]) == 2
    assert "row 1 has no 'completion' field" in capsys.readouterr().err
    assert main(["nowhere.py:f", "--data", data]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["math", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err


def test_invalid_utf8_in_data_is_scored_not_fatal(tmp_path, capsys):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "p", "answer": "1", "completion": "\\\\boxed{1} \xff\xfe\xc3"}\n'
                     b'{"prompt": "p", "answer": "1", "completion": "\\\\boxed{\xed\xa0\x80} \\ud800"}\n')
    out = tmp_path / "o.jsonl"
    assert main(["math", "--data", str(path), "--workers", "1", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0, 0.0] and {r["status"] for r in rows} == {"ok"}


def test_console_router_reaches_reward_check(tmp_path, data):
    rows = [{"prompt": "p", "completion": "<think>r</think> 4"}]
    d = write_jsonl(tmp_path / "d.jsonl", rows)
    proc = subprocess.run([sys.executable, "-m", "rl.cli", "reward-check", "format", "--data", d, "--workers", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "reward: mean 1.0000" in proc.stdout


def test_config_file_rewards_list(tmp_path, capsys):
    (tmp_path / "u.py").write_text(USER)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\nrewards:\n  - math\n  - spec: {tmp_path}/u.py:flaky\n    weight: 0.5\n"
                   f"  - spec: format\n    weight: 0.25\n    kwargs: {{partial: true}}\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "4", "completion": "<think>r</think> 4"},
                                              {"prompt": "p", "answer": "4", "completion": "\\boxed{5}"}])
    out = tmp_path / "o.jsonl"
    assert main(["--config", str(cfg), "--data", data, "--workers", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "math: mean 0.5000" in text and "flaky: mean 0.0000" in text and "format: mean 0.5000" in text
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0 + 0.25, 0.0]
    cfg.write_text("rewards:\n  - spec: math\n    wieght: 2\n")
    assert main(["--config", str(cfg), "--data", data]) == 2
    assert "train.yaml: rewards[0]: unknown keys ['wieght']" in capsys.readouterr().err
    assert main(["math", "--config", str(cfg), "--data", data]) == 2
    assert "either reward SPECs or --config" in capsys.readouterr().err
