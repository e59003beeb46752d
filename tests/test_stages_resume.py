"""A real `bitmamba pretrain` process killed with SIGKILL between checkpoints resumes to the same losses."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain_tiny.yaml"
ARGS = ["train.max_steps=16", "train.save_every=4", "train.log_every=1", "train.batch_size=4",
        "train.progress=false"]


def _cmd(out):
    return [sys.executable, "-m", "rl.cli", "pretrain", "--config", str(TINY), "--output-dir", str(out), *ARGS]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.long
@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    ref = subprocess.run(_cmd(tmp_path / "ref"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref")]

    out = tmp_path / "killed"
    p = subprocess.Popen(_cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill once step 6 is logged: after the step-4 checkpoint, before step 8's
            m = out / "metrics.jsonl"
            if m.is_file() and any('"step": 6,' in line for line in m.read_text().splitlines()):
                break
            if p.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert not (out / "final").exists()
    res = subprocess.run(_cmd(out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from" in res.stderr
    got = [(r["step"], r["loss"]) for r in read_metrics(out)]
    assert [s for s, _ in got] == list(range(1, 17))
    for (s, a), (_, b) in zip(want, got):
        assert a == pytest.approx(b, abs=1e-6, rel=0), f"step {s}: {a} vs {b}"
