"""CheckpointManager (atomic save, manifest verification, safe loading), RNG helpers, MetricsWriter."""

import json
import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from model.errors import CheckpointError
from rl.train.checkpoint import (
    CheckpointManager,
    CheckpointWarning,
    capture_rng_state,
    generator_state,
    read_file,
    restore_rng_state,
    safe_torch_load,
    set_generator_state,
)
from rl.train.metrics import MetricsWriter, read_metrics


def _model_and_opt():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def test_roundtrip_model_optimizer_extra_files(tmp_path):
    model, opt = _model_and_opt()
    mgr = CheckpointManager(tmp_path / "ck", keep=3)
    extra = {"scheduler": {"last_epoch": 5}, "data": {"epoch": 1, "index": 7}, "rng": capture_rng_state()}
    p = mgr.save(5, model, optimizer_state=opt.state_dict(), extra=extra, files={"config.json": b'{"a": 1}'})
    assert p.name == "step_00000005"
    assert mgr.latest() == p
    tensors, opt_state, extra2 = mgr.load()
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v)
    assert extra2 == json.loads(json.dumps(extra))
    assert read_file(p, "config.json") == b'{"a": 1}'
    opt2 = torch.optim.AdamW(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).parameters(), lr=1)
    opt2.load_state_dict(opt_state)
    assert opt2.param_groups[0]["lr"] == 1e-2
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"])
    manifest = json.loads((p / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "trainer_state.json", "config.json"}
    assert not [x for x in (tmp_path / "ck").iterdir() if x.name.startswith(".")]  # no temp leftovers


def test_tied_weights_and_keep(tmp_path):
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # shared storage: safetensors would refuse without the copy
    m = nn.ModuleDict({"emb": emb, "head": head})
    mgr = CheckpointManager(tmp_path, keep=2)
    for s in (1, 2, 3):
        mgr.save(s, m)
    assert [s for s, _ in mgr.checkpoints()] == [3, 2]
    t, opt, extra = mgr.load()
    assert opt is None and extra == {}
    assert torch.equal(t["emb.weight"], t["head.weight"])


def test_partial_dir_skipped_with_warning(tmp_path):
    mgr = CheckpointManager(tmp_path)
    good = mgr.save(1, {"w": torch.ones(3)})
    partial = mgr.path_for(2)
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"garbage")  # killed mid-save: no manifest
    with pytest.warns(CheckpointWarning, match="missing manifest.json"):
        assert mgr.latest() == good
    with pytest.raises(CheckpointError, match="missing manifest"):
        mgr.load(partial)


def test_corrupt_checksum_and_truncation_skipped(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=None)
    good = mgr.save(1, {"w": torch.ones(64)})
    bad = mgr.save(2, {"w": torch.zeros(64)})
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match="sha256 mismatch"):
        assert mgr.latest() == good
    f.write_bytes(bytes(data[:-10]))
    with pytest.warns(CheckpointWarning, match="truncated"):
        assert mgr.latest() == good
    t, _, _ = mgr.load()
    assert torch.equal(t["w"], torch.ones(64))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_dir_raises_and_previous_intact(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck")
    prev = mgr.save(1, {"w": torch.ones(4)})
    os.chmod(tmp_path / "ck", 0o500)
    try:
        with pytest.raises(CheckpointError, match="could not write checkpoint .*step_00000002.*previous checkpoint intact"):
            mgr.save(2, {"w": torch.zeros(4)})
    finally:
        os.chmod(tmp_path / "ck", 0o700)
    assert mgr.latest() == prev
    assert torch.equal(mgr.load()[0]["w"], torch.ones(4))


def test_unwritable_root_raises_checkpoint_error(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        CheckpointManager(tmp_path / "afile" / "ck").save(1, {"w": torch.ones(1)})
    # permission denied when creating the temp dir (works as root too, unlike chmod)
    mgr = CheckpointManager(tmp_path / "ck")
    prev = mgr.save(1, {"w": torch.ones(4)})
    from pathlib import Path

    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if self.name.startswith(".tmp_"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(CheckpointError, match="Permission denied.*previous checkpoint intact"):
        mgr.save(2, {"w": torch.zeros(4)})
    monkeypatch.undo()
    assert mgr.latest() == prev


def test_disk_full_raises_and_previous_intact(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    prev = mgr.save(1, {"w": torch.ones(4)})
    import rl.train.checkpoint as ck

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "_write_bytes", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        mgr.save(2, {"w": torch.zeros(4)}, extra={"a": 1})
    assert mgr.latest() == prev
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # temp dir cleaned up


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_refused(tmp_path):
    mgr = CheckpointManager(tmp_path)
    p = mgr.save(1, {"w": torch.ones(2)}, optimizer_state={"state": {}, "param_groups": []})
    opt_file = p / "optimizer.pt"
    with open(opt_file, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        safe_torch_load(opt_file)
    # through the manager: checksum check catches the tampering first; without it, the loader refuses
    with pytest.raises(CheckpointError):
        mgr.load(p)
    with pytest.raises(CheckpointError, match="refused"):
        mgr.load(p, verify=False)


def test_unjsonable_extra_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        CheckpointManager(tmp_path).save(1, {"w": torch.ones(1)}, extra={"x": object()})
    assert CheckpointManager(tmp_path).latest() is None


def test_rng_capture_restore():
    state = capture_rng_state()
    state = json.loads(json.dumps(state))  # must survive JSON
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    g = torch.Generator().manual_seed(3)
    s = generator_state(g)
    x = torch.rand(4, generator=g)
    set_generator_state(g, s)
    assert torch.equal(x, torch.rand(4, generator=g))


def test_metrics_writer_jsonl_and_resume(tmp_path):
    with MetricsWriter(tmp_path, wandb=False, console=False) as mw:
        for s in range(1, 6):
            mw.log(s, loss=torch.tensor(1.0 / s), lr=1e-3, bad=float("nan"))
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[1]["loss"] == pytest.approx(0.5) and recs[0]["bad"] == "nan"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn line of a killed run
    with MetricsWriter(tmp_path, console=False, resume_step=3) as mw:
        mw.log(4, loss=9.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)][-2:] == [(3, pytest.approx(1 / 3)), (4, 9.0)]


def test_metrics_console_line(tmp_path, capsys):
    with MetricsWriter(tmp_path, console=True) as mw:
        mw.log(7, loss=2.5, lr=3e-4, tokens_per_s=12345.0)
    err = capsys.readouterr().err
    assert "step 7" in err and "loss 2.5" in err and "lr 3.00e-04" in err and "tok/s 12345" in err


def test_metrics_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mw = MetricsWriter(tmp_path, wandb=True, run_name="t", config={"a": 1}, console=False)
        assert mw.wandb_run is not None and mw.wandb_run.settings.mode == "offline"
        mw.log(1, loss=1.0)
        mw.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert read_metrics(tmp_path)[0]["loss"] == 1.0


def test_killed_save_leftovers_cleaned(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mgr = CheckpointManager(tmp_path)
    prev = mgr.save(1, {"w": torch.ones(2)})
    stale = tmp_path / f".tmp_step_00000002_{dead.pid}_deadbeef"  # a save killed midway
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".tmp_step_00000002_{os.getppid()}_cafecafe"  # a live writer's: left alone
    live.mkdir()
    assert mgr.latest() == prev  # hidden temp dirs are never candidates
    mgr.save(2, {"w": torch.zeros(2)})
    assert not stale.exists() and live.exists()
    assert mgr.latest().name == "step_00000002"
