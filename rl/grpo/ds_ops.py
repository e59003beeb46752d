"""DeepSpeed's C++ ops: built once per environment, with a message, after a check for the build tools.

DeepSpeed compiles some of its ops from C++ the first time a process needs them (just-in-time, through
`torch.utils.cpp_extension.load`: ninja driving the host C++ compiler), which takes one to a few minutes
on a small machine and prints nothing while it runs. The learner's DeepSpeed config needs:

- CPU Adam (`cpu_adam`) when the optimizer state is offloaded to the CPU (`learner.offload_optimizer`,
  the default), or fused Adam (`fused_adam`) without offload (a CUDA op on GPU: it needs nvcc too);
- the shared-memory collective op (`deepspeed_shm_comm`) whenever DeepSpeed's CPU accelerator is in use
  (a machine without a GPU), built when DeepSpeed sets up its process group.

`build_ops(ds_config)` runs before `deepspeed.initialize` (`rl.grpo.learner.Learner`):
1. the build cache: when `TORCH_EXTENSIONS_DIR` is unset it is set to
   `~/.cache/bitmamba/torch_extensions/py<ver>_torch<ver>_ds<ver>_<cpu|cuXY>` (`XDG_CACHE_HOME` respected),
   so builds are kept per toolchain: an environment with other Python, torch, DeepSpeed or CUDA versions
   gets its own (torch's default, `~/.cache/torch_extensions/py<ver>_<cpu|cuXY>`, mixes them), and a
   fresh checkout or virtual environment with the same versions reuses them; a set
   `TORCH_EXTENSIONS_DIR` is used as it is;
2. the ops this config needs that are neither compiled into the DeepSpeed install nor in the cache;
3. for those, the tools a build needs (a C++ compiler, ninja, Python's headers, nvcc for a CUDA op):
   a missing one is one `OpBuildError` naming it and how to install it, before anything is compiled;
4. each is built with a line before ("building DeepSpeed's CPU Adam op ...") and after ("built in N s"),
   cached ones are loaded; DeepSpeed then finds the loaded modules in its own cache
   (`OpBuilder._loaded_ops`) and builds nothing. torch's build lock (`<build dir>/lock`) is waited for
   with a message, and one left by an interrupted build (older than STALE_LOCK_S) is removed, saying so
   (torch itself would wait for it for ever, silently).
`check_ops(ds_config)` does steps 1-3 alone (the GRPO driver calls it before Ray starts).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from model.errors import BitMambaError

PRETTY = {"cpu_adam": "CPU Adam", "fused_adam": "fused Adam", "deepspeed_shm_comm": "shared-memory communication"}
INSTALL_CXX = ("install one (Debian/Ubuntu: `apt-get install g++`; Fedora/RHEL: `dnf install gcc-c++`; "
               "conda: `conda install -c conda-forge cxx-compiler`) or point CXX at it")
AVOID = ("or avoid the build: `learner.backend: torch` in the GRPO config (plain torch AdamW, no DeepSpeed)")


STALE_LOCK_S = 1200          # a build lock older than this was left by an interrupted build
REBUILT_AFTER_S = 10.0       # loading a cached op for longer than this means ninja rebuilt it


class OpBuildError(BitMambaError):
    """A DeepSpeed op must be compiled for this environment and a tool the build needs is missing."""


@dataclass
class OpToBuild:
    """One op DeepSpeed will compile: its builder (a DeepSpeed `OpBuilder`) and where the build goes."""

    builder: Any
    build_dir: Path

    @property
    def name(self) -> str:
        return self.builder.name

    @property
    def cached(self) -> bool:
        return (self.build_dir / f"{self.name}.so").is_file()

    @property
    def label(self) -> str:
        return f"DeepSpeed's {PRETTY.get(self.name, self.name)} op"


def extensions_dir() -> Path:
    """The root torch builds extensions under, after pointing it at the per-toolchain cache when unset."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(toolchain_cache())
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def toolchain_cache() -> Path:
    """~/.cache/bitmamba/torch_extensions/py<ver>_torch<ver>_ds<ver>_<cpu|cuXY>."""
    import deepspeed
    import torch

    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    tag = (f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.split('+')[0]}"
           f"_ds{deepspeed.__version__}_{accel}")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bitmamba" / "torch_extensions" / tag


def needed_builders(ds_config: dict) -> list:
    """The op builders DeepSpeed loads for this config on this machine's accelerator, in load order:
    the shared-memory comm op (DeepSpeed's own condition, deepspeed/comm/torch.py `build_shm_op`), then
    the optimizer's (DeepSpeed's `get_optimizer_configuration`: CPU Adam with a CPU/NVMe-offloaded
    optimizer, fused Adam otherwise, nothing for `torch_adam` or a non-Adam optimizer)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    out = []
    shm = acc.create_op_builder("ShareMemCommBuilder")
    if shm is not None and deepspeed.ops.__compatible_ops__.get(shm.NAME, False):
        out.append(shm)
    opt = ds_config.get("optimizer") or {}
    if str(opt.get("type", "")).lower() in ("adam", "adamw") and not (opt.get("params") or {}).get("torch_adam"):
        offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
        cpu_opt = str(offload.get("device", "none")).lower() in ("cpu", "nvme")
        builder = acc.create_op_builder("CPUAdamBuilder" if cpu_opt else "FusedAdamBuilder")
        if builder is not None:
            out.append(builder)
    return out


def is_prebuilt(builder) -> bool:
    """True when the op was compiled into the DeepSpeed install for this accelerator (no JIT build)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    return bool(installed_ops.get(builder.name, False)) and accelerator_name == get_accelerator()._name


def jit_ops(ds_config: dict, root: Path) -> list[OpToBuild]:
    """The needed ops that are not compiled into the DeepSpeed install (built, or loaded, from `root`)."""
    return [OpToBuild(b, root / b.name) for b in needed_builders(ds_config) if not is_prebuilt(b)]


def ops_to_build(ds_config: dict, root: Path) -> list[OpToBuild]:
    """The needed ops that are neither prebuilt nor already built under `root` (a `<name>/<name>.so`)."""
    return [op for op in jit_ops(ds_config, root) if not op.cached]


def missing_tools(ops: list[OpToBuild]) -> list[str]:
    """What the builds of `ops` need and this machine lacks, each with how to get it ([] when none)."""
    if not ops:
        return []
    names = ", ".join(op.label for op in ops)
    problems = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        which = f"CXX={cxx!r} is not an executable" if "CXX" in os.environ else "`c++` is not on PATH"
        problems.append(f"no C++ compiler ({which}): {INSTALL_CXX}")
    if not ninja_available():
        problems.append("ninja is not on PATH: `pip install ninja` into this environment")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        problems.append(f"Python's headers are missing ({header}): install python{ver}-dev "
                        f"(Debian/Ubuntu: `apt-get install python{ver}-dev`)")
    for op in ops:
        if needs_nvcc(op.builder) and not nvcc_path():
            problems.append(f"{op.label} is a CUDA op and nvcc was not found (CUDA_HOME or PATH): install the "
                            "CUDA toolkit matching torch's CUDA, or use learner.offload_optimizer: true (CPU Adam)")
        if not op.builder.is_compatible(False):
            log = "; ".join(str(x) for x in getattr(op.builder, "error_log", None) or []) or "no reason given"
            problems.append(f"DeepSpeed reports {op.label} as not buildable here: {log}")
    return [f"building {names} (once per environment) needs: {p}" for p in problems]


def ninja_available() -> bool:
    """ninja on PATH, or this environment's own (the `ninja` pip package, a DeepSpeed dependency, which
    `ninja_of_this_environment` puts first on PATH during a build)."""
    return shutil.which("ninja") is not None or env_ninja_dir() is not None


def env_ninja_dir() -> Path | None:
    d = Path(sys.executable).parent
    return d if (d / "ninja").is_file() else None


@contextmanager
def ninja_of_this_environment():
    """PATH with this environment's ninja first while ops load, also when the environment is used
    without being activated (`.venv/bin/bitmamba ...`). One ninja per cache matters: ninja 1.12 changed
    the command hash of its build log, so loads alternating between two versions (a system 1.11 and the
    venv's 1.13) rebuild every op each time."""
    d = env_ninja_dir()
    old = os.environ.get("PATH", "")
    if d is not None:
        os.environ["PATH"] = f"{d}{os.pathsep}{old}"
    try:
        yield
    finally:
        os.environ["PATH"] = old


def needs_nvcc(builder) -> bool:
    import torch
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    return isinstance(builder, CUDAOpBuilder) and torch.cuda.is_available()


def nvcc_path() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def check_ops(ds_config: dict) -> list[OpToBuild]:
    """Steps 1-3 of the module docstring: the ops still to build; `OpBuildError` when a tool is missing."""
    ops = ops_to_build(ds_config, extensions_dir())
    problems = missing_tools(ops)
    if problems:
        raise OpBuildError("; ".join(problems) + f"; {AVOID}")
    return ops


def build_ops(ds_config: dict, say: Callable[[str], None] | None = None) -> list[OpToBuild]:
    """Check, then load each JIT op this config needs, building the ones not cached and saying so before
    and after (`say`, default: a flushed line on stderr, which Ray forwards to the driver's console); a
    cached op that takes long to load was rebuilt (DeepSpeed's sources changed) and is reported too.
    Returns the ops built."""
    say = say or _stderr
    check_ops(ds_config)
    built = []
    for op in jit_ops(ds_config, extensions_dir()):
        wait_for_lock(op, say)
        cached = op.cached
        if not cached:
            say(f"building {op.label} (one-time for this environment, a few minutes on a small CPU; "
                f"cached in {op.build_dir})...")
        t0 = time.perf_counter()
        try:
            with ninja_of_this_environment():
                op.builder.load(verbose=False)
        except Exception as e:                   # the compiler's own output is the diagnosis: show it
            say(str(e))
            raise OpBuildError(f"building {op.label} failed after {time.perf_counter() - t0:.0f} s "
                               f"({type(e).__name__}, compiler output above; build files in {op.build_dir}); "
                               f"{AVOID}") from e
        seconds = time.perf_counter() - t0
        if not cached or seconds > REBUILT_AFTER_S:
            say(f"{'built' if not cached else 'rebuilt'} {op.label} in {seconds:.0f} s")
            built.append(op)
    return built


def wait_for_lock(op: OpToBuild, say: Callable[[str], None], poll_s: float = 5.0) -> None:
    """torch's JIT build holds `<build dir>/lock` while it compiles and waits, silently and for ever,
    while another process holds it; a build killed midway leaves it behind. Say that we wait (and for
    whom), and remove a lock older than STALE_LOCK_S (no build takes that long: an interrupted one)."""
    lock = op.build_dir / "lock"
    said = False
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_S:
            say(f"removing {lock}: a build of {op.label} that started {age / 60:.0f} min ago was interrupted")
            lock.unlink(missing_ok=True)
            return
        if not said:
            say(f"waiting for another process that is building {op.label} (lock file {lock}; a build "
                f"interrupted less than {STALE_LOCK_S // 60} min ago leaves it too: delete it if no build runs)")
            said = True
        time.sleep(poll_s)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
