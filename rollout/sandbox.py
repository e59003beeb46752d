"""Run untrusted Python (model-written code) in a separate process with limits.

    res = run_python("print(sum(range(10)))", SandboxConfig(timeout_s=5, memory_mb=256))
    res.output       # "45\\n"
    res.text()       # what the model sees: output, or an error / timeout / limit message

What the limits are, honestly:
- separate process: `python -I` (isolated mode: no user site, no PYTHON* env vars), a fresh empty
  temporary working directory that is deleted afterwards, a minimal environment, its own process
  group (killed as a group at the timeout, so children die too).
- wall-clock timeout (`timeout_s`, the process group gets SIGKILL) and CPU-time limit (RLIMIT_CPU).
- memory: RLIMIT_AS (address space) set in the child before the user's code runs; an allocation
  past it raises MemoryError, reported as "memory limit exceeded".
- output: stdout+stderr go to a file capped by RLIMIT_FSIZE; the model sees at most
  `max_output_chars` of it, with a truncation note.
- network: two layers. (1) When `unshare -rn` works on the host (a new user + network namespace
  with only a down loopback; checked once), the child runs inside it: no interface can reach
  anything, whatever the code does (ctypes, subprocesses). (2) Always: an audit hook (PEP 578)
  installed before the user's code refuses socket creation/connection/DNS and process spawning
  (`socket.*`, `subprocess.Popen`, `os.system`, `os.exec*`, `os.posix_spawn`, `os.fork`).
  Audit hooks are NOT a security boundary on their own: code using ctypes to call libc directly
  bypasses them. Without `unshare` (network="hook" or the host forbids namespaces) the sandbox
  is therefore "no network for ordinary Python code", not a jail. `SandboxResult.isolation`
  says which layers were active. For hostile code use a container/VM runner behind the same
  `Tool` interface.
- no filesystem isolation beyond the temporary cwd: the code can read what the user running the
  trainer can read. RLIMIT_FSIZE bounds each file it writes.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from model.errors import ConfigError

# The child's bootstrap: limits and the audit hook first, then the user's file. Kept small and
# self-contained (it runs under `python -I`, importing only the standard library).
_BOOT = r"""
import os, resource, signal, sys
mem, cpu, fsize = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
if cpu > 0:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_BLOCK = ("socket.", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork",
          "os.forkpty", "pty.spawn")
def _hook(event, args):
    if event.startswith(_BLOCK):
        raise PermissionError(f"sandbox: {event} is not allowed (no network, no subprocesses)")
src = open("main.py", encoding="utf-8").read()
code = compile(src, "main.py", "exec")
sys.addaudithook(_hook)
sys.argv = ["main.py"]
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except MemoryError:
    sys.stdout.flush()
    os.write(2, b"\nMemoryError: memory limit exceeded\n")
    os._exit(3)
except SystemExit as e:
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
"""


@dataclass
class SandboxConfig:
    """Limits of one run (see the module doc for what each one does and does not guarantee)."""

    timeout_s: float = 5.0          # wall clock; the process group is killed after it
    memory_mb: int = 256            # RLIMIT_AS of the child (0 = no limit)
    cpu_s: int = 0                  # RLIMIT_CPU (0: ceil(timeout_s) + 1)
    max_output_chars: int = 4000    # what the model sees
    max_file_bytes: int = 1 << 20   # RLIMIT_FSIZE: per file, the captured output included
    network: str = "auto"           # auto: unshare -rn when it works, else hook only | unshare | hook
    python: str = sys.executable

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ConfigError(f"sandbox timeout_s: must be > 0, got {self.timeout_s}")
        if self.memory_mb < 0 or self.cpu_s < 0 or self.max_output_chars < 1 or self.max_file_bytes < 1:
            raise ConfigError("sandbox memory_mb / cpu_s must be >= 0, max_output_chars / max_file_bytes >= 1")
        if self.network not in ("auto", "unshare", "hook"):
            raise ConfigError(f"sandbox network: auto | unshare | hook, got {self.network!r}")


@dataclass
class SandboxResult:
    output: str            # stdout and stderr interleaved, cut to max_output_chars
    exit_code: int | None  # None when killed at the timeout
    timed_out: bool
    memory_exceeded: bool
    truncated: bool
    seconds: float
    isolation: str         # "unshare+hook" or "hook"

    def text(self) -> str:
        """What the model is shown."""
        out = self.output
        if self.truncated:
            out += "\n[output truncated]"
        if self.timed_out:
            return (out + "\n" if out else "") + f"error: timed out after {self.seconds:.1f} s"
        if self.memory_exceeded:
            return (out + "\n" if out else "") + "error: memory limit exceeded"
        if self.exit_code not in (0, None) and not out.strip():
            return f"error: exit code {self.exit_code}"
        return out


@functools.lru_cache(maxsize=None)
def unshare_available() -> bool:
    """True when `unshare -rn` (user + network namespace, no root needed where allowed) works here."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _isolation(cfg: SandboxConfig) -> tuple[list[str], str]:
    if cfg.network == "hook":
        return [], "hook"
    if unshare_available():
        return [shutil.which("unshare") or "unshare", "-rn"], "unshare+hook"
    if cfg.network == "unshare":
        raise ConfigError("sandbox network: 'unshare' asked for, but `unshare -rn` does not work on this host")
    return [], "hook"


def run_python(code: str, cfg: SandboxConfig | None = None) -> SandboxResult:
    """Run `code` as a script in a fresh sandboxed process; blocks until it ends or is killed."""
    cfg = cfg or SandboxConfig()
    prefix, isolation = _isolation(cfg)
    cpu = cfg.cpu_s or int(cfg.timeout_s) + 1
    mem = cfg.memory_mb << 20
    work = tempfile.mkdtemp(prefix="bitmamba-sandbox-")
    t0 = time.perf_counter()
    try:
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        out_path = os.path.join(work, ".output")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": work}
        cmd = prefix + [cfg.python, "-I", "-c", _BOOT, str(mem), str(cpu), str(cfg.max_file_bytes)]
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                rc: int | None = proc.wait(timeout=cfg.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = None
        seconds = time.perf_counter() - t0
        with open(out_path, "rb") as f:
            data = f.read(4 * cfg.max_output_chars + 4)
        size = os.path.getsize(out_path)
        text = data.decode("utf-8", errors="replace")
        truncated = size > len(data) or len(text) > cfg.max_output_chars or size >= cfg.max_file_bytes
        text = text[:cfg.max_output_chars]
        mem_hit = rc == 3 and "MemoryError: memory limit exceeded" in text
        if mem_hit:
            text = text.replace("\nMemoryError: memory limit exceeded\n", "")
        if rc is not None and rc < 0 and -rc in (signal.SIGXCPU, signal.SIGKILL):
            timed_out = True       # killed by RLIMIT_CPU
        return SandboxResult(text, rc, timed_out, mem_hit, truncated, seconds, isolation)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
