"""DeepSpeed's C++ ops: the tools a build needs are checked before anything compiles (one error naming the
missing one), a build says so before and after, and builds are cached per environment (rl/grpo/ds_ops.py)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from rl.grpo import ds_ops
from rl.args import run_main
from rl.grpo.config import LearnerSection
from rl.grpo.learner import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
CPU_OFFLOAD = deepspeed_config(LearnerSection(), on_gpu=False)          # the learner's default on CPU


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """PATH without a C++ compiler (nor ninja), CXX unset, an empty build cache."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path


class FakeBuilder:
    """Stands in for a DeepSpeed OpBuilder: `load` records that it ran (and writes the .so a build leaves)."""

    def __init__(self, name: str, root: Path, events: list, fail: bool = False):
        self.name, self.NAME, self.root, self.events, self.fail = name, name, root, events, fail
        self.error_log = None

    def is_compatible(self, verbose=False):
        return True

    def load(self, verbose=False):
        self.events.append(f"load {self.name}")
        if self.fail:
            raise RuntimeError("Error building extension 'cpu_adam': cpu_adam.cpp:1: error: boom")
        (self.root / self.name).mkdir(parents=True, exist_ok=True)
        (self.root / self.name / f"{self.name}.so").write_bytes(b"")


def test_needed_ops_follow_deepspeeds_choice_on_cpu():
    names = [b.name for b in ds_ops.needed_builders(CPU_OFFLOAD)]
    assert names == ["deepspeed_shm_comm", "cpu_adam"]                   # CPU accelerator: shm comm + CPU Adam
    no_offload = deepspeed_config(LearnerSection(offload_optimizer=False), on_gpu=False)
    assert [b.name for b in ds_ops.needed_builders(no_offload)] == ["deepspeed_shm_comm", "fused_adam"]
    torch_adam = {**CPU_OFFLOAD, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    assert [b.name for b in ds_ops.needed_builders(torch_adam)] == ["deepspeed_shm_comm"]


def test_no_compiler_is_one_clear_error_naming_it(no_compiler):
    with pytest.raises(ds_ops.OpBuildError) as e:
        ds_ops.check_ops(CPU_OFFLOAD)
    msg = str(e.value)
    assert "no C++ compiler" in msg and "`c++` is not on PATH" in msg and "apt-get install g++" in msg
    assert "CPU Adam" in msg and "learner.backend: torch" in msg
    assert "\n" not in msg


def test_a_cxx_that_does_not_exist_is_named(no_compiler, monkeypatch):
    monkeypatch.setenv("CXX", "/opt/nowhere/g++-99")
    with pytest.raises(ds_ops.OpBuildError, match=r"CXX='/opt/nowhere/g\+\+-99' is not an executable"):
        ds_ops.check_ops(CPU_OFFLOAD)


def test_the_environments_ninja_runs_the_builds(no_compiler, monkeypatch):
    """`.venv/bin/bitmamba` run without activating the venv: DeepSpeed's ninja (a pip package in the venv's
    bin/) is found, and builds always run it, never a system ninja of another version (whose build log
    hashes commands differently: every load would rebuild)."""
    env_bin = Path(sys.executable).parent
    if not (env_bin / "ninja").is_file():
        pytest.skip("no ninja next to this interpreter")
    assert ds_ops.ninja_available()
    system = no_compiler / "bin" / "ninja"                     # another ninja earlier on PATH
    system.write_text("#!/bin/sh\necho 1.11.1\n")
    system.chmod(0o755)
    events: list[str] = []
    root = no_compiler / "ext"
    monkeypatch.setattr(ds_ops, "missing_tools", lambda ops: [])
    builder = FakeBuilder("cpu_adam", root, events)
    builder.load = lambda verbose=False: events.append(shutil.which("ninja"))
    monkeypatch.setattr(ds_ops, "needed_builders", lambda cfg: [builder])
    ds_ops.build_ops(CPU_OFFLOAD, say=lambda msg: None)
    assert events == [str(env_bin / "ninja")]
    assert os.environ["PATH"] == str(no_compiler / "bin")                # restored after the build


def test_cached_ops_need_no_compiler(no_compiler):
    root = no_compiler / "ext"
    for name in ("deepspeed_shm_comm", "cpu_adam"):
        (root / name).mkdir(parents=True)
        (root / name / f"{name}.so").write_bytes(b"")
    assert ds_ops.check_ops(CPU_OFFLOAD) == []


def test_grpo_without_a_compiler_fails_before_ray_with_one_line(no_compiler, capsys):
    """The driver checks up front (preflight): no cluster started, nothing written, one `error:` line."""
    from rl.grpo.driver import main

    out = no_compiler / "run"
    rc = run_main(main, ["--config", str(ROOT / "configs" / "grpo_tiny.yaml"), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "no C++ compiler" in lines[0], err[-2000:]
    assert not out.exists()


def test_a_build_is_announced_before_and_timed_after(tmp_path, monkeypatch):
    events: list[str] = []
    root = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.setattr(ds_ops, "missing_tools", lambda ops: [])
    monkeypatch.setattr(ds_ops, "needed_builders", lambda cfg: [FakeBuilder("cpu_adam", root, events)])
    built = ds_ops.build_ops(CPU_OFFLOAD, say=events.append)
    assert [op.name for op in built] == ["cpu_adam"]
    assert events[0].startswith("building DeepSpeed's CPU Adam op (one-time for this environment")
    assert str(root / "cpu_adam") in events[0]
    assert events[1] == "load cpu_adam"
    assert events[2].startswith("built DeepSpeed's CPU Adam op in ") and events[2].endswith(" s")
    events.clear()
    assert ds_ops.build_ops(CPU_OFFLOAD, say=events.append) == []      # cached: loaded, nothing said
    assert events == ["load cpu_adam"]


def _fake_op(tmp_path, monkeypatch, events):
    root = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.setattr(ds_ops, "missing_tools", lambda ops: [])
    monkeypatch.setattr(ds_ops, "needed_builders", lambda cfg: [FakeBuilder("cpu_adam", root, events)])
    (root / "cpu_adam").mkdir(parents=True)
    return root / "cpu_adam" / "lock"


def test_a_lock_left_by_an_interrupted_build_is_removed_saying_so(tmp_path, monkeypatch):
    """torch waits for ever, silently, on a lock file that a killed build left behind."""
    events: list[str] = []
    lock = _fake_op(tmp_path, monkeypatch, events)
    lock.write_bytes(b"")
    old = time.time() - ds_ops.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    ds_ops.build_ops(CPU_OFFLOAD, say=events.append)
    assert events[0].startswith(f"removing {lock}: a build of DeepSpeed's CPU Adam op") and "interrupted" in events[0]
    assert not lock.exists() and "load cpu_adam" in events


def test_a_build_in_another_process_is_waited_for_with_a_message(tmp_path, monkeypatch):
    events: list[str] = []
    lock = _fake_op(tmp_path, monkeypatch, events)
    lock.write_bytes(b"")
    naps = []

    def other_process_finishes(seconds):                # the other build ends while we wait
        naps.append(seconds)
        lock.unlink()

    monkeypatch.setattr(ds_ops.time, "sleep", other_process_finishes)
    ds_ops.build_ops(CPU_OFFLOAD, say=events.append)
    assert events[0].startswith("waiting for another process that is building DeepSpeed's CPU Adam op")
    assert str(lock) in events[0] and len(naps) == 1
    assert events.index("load cpu_adam") > 0                              # loaded only after the lock was gone


def test_a_failed_build_is_one_error_after_the_compiler_output(tmp_path, monkeypatch):
    events: list[str] = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(ds_ops, "missing_tools", lambda ops: [])
    monkeypatch.setattr(ds_ops, "needed_builders",
                        lambda cfg: [FakeBuilder("cpu_adam", tmp_path / "ext", events, fail=True)])
    with pytest.raises(ds_ops.OpBuildError, match="building DeepSpeed's CPU Adam op failed") as e:
        ds_ops.build_ops(CPU_OFFLOAD, say=events.append)
    assert "error: boom" in events[-1]                                     # the compiler's output was shown
    assert str(tmp_path / "ext" / "cpu_adam") in str(e.value)


def test_the_build_cache_is_per_toolchain(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = ds_ops.extensions_dir()
    assert root.is_relative_to(tmp_path / "cache" / "bitmamba" / "torch_extensions")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(root)                 # what torch's JIT load will use
    import deepspeed
    import torch
    assert torch.__version__.split("+")[0] in root.name and f"ds{deepspeed.__version__}" in root.name
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in root.name
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))              # a set one is used as it is
    assert ds_ops.extensions_dir() == tmp_path


def test_the_learner_builds_the_ops_before_deepspeed_initialize(monkeypatch):
    """The learner's DeepSpeed path goes through build_ops with its own config, before the engine exists."""
    import rl.grpo.learner as learner_mod
    from rl.grpo.config import load_grpo_config

    seen = []

    class Stop(Exception):
        pass

    def fake_build(cfg, say=None):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(ds_ops, "build_ops", fake_build)
    cfg = load_grpo_config(ROOT / "configs" / "grpo_tiny.yaml")
    with pytest.raises(Stop):
        learner_mod.Learner(cfg)
    assert seen and seen[0]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
