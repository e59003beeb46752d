"""Run untrusted Python (model-written code) in a jail, or in a plain process when asked to.

    res = run_python("print(sum(range(10)))", SandboxConfig(timeout_s=5, memory_mb=256))
    res.output       # "45\\n"
    res.text()       # what the model sees: output, or an error / timeout / limit message

Two modes (`SandboxConfig.sandbox`; the threat model per mode is in docs/tools.md):
- `jail` (the default): bubblewrap around the interpreter (`rollout.agent.jail`): a read-only view of only the
  interpreter, its stdlib and the shared libraries they load; a private tmpfs /tmp of `tmpfs_mb` as the
  working directory; new PID, network, IPC and UTS namespaces; an unprivileged uid with no capabilities;
  `--die-with-parent`. If the jail cannot be set up, `require_jail` (called by the python tool at start)
  raises ConfigError naming the missing piece; nothing falls back silently.
- `host`: today's plain process (`python -I` in a fresh temporary directory on the host, a network
  namespace when `unshare -rn` works, the audit hook). It can read every file the trainer's user can
  read; a warning says so once per process.

Limits in both modes, set by the boot script before the user's code runs:
- wall-clock timeout (`timeout_s`: the jail's PID namespace, or the host process group, is killed) and
  RLIMIT_CPU;
- memory: RLIMIT_AS; an allocation past it raises MemoryError, reported as "memory limit exceeded";
- output: stdout+stderr go to a host file (the jail only holds its descriptor) capped by RLIMIT_FSIZE,
  which also caps every file the code writes; the model sees at most `max_output_chars`;
- processes (jail only): RLIMIT_NPROC = `max_processes` processes and threads of the jail's uid (not
  in host mode, where it would count every process of the trainer's user);
- an audit hook (PEP 578) refuses sockets, DNS and process spawning (`socket.*`, `subprocess.Popen`,
  `os.system`, `os.exec*`, `os.posix_spawn`, `os.fork`). It is a second layer, not a boundary: ctypes
  calls to libc bypass it. In the jail, the namespaces and limits above are the boundary.
`SandboxResult.isolation` says which layers were active: "jail+hook", "unshare+hook" or "hook".
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

from model.errors import ConfigError
from rollout.agent.jail import bwrap_path, jail_argv, jail_uid, require_jail

log = logging.getLogger(__name__)

# The child's bootstrap: limits and the audit hook first, then the user's file. Kept small and
# self-contained (it runs under `python -I`, importing only the standard library). argv: memory bytes,
# CPU seconds, file bytes, process count (0: no limit), guard fd (-1: none), the run's id (unused here:
# it names the process, so that tests can find leftovers).
# The guard (jail only) is the read end of a pipe whose write end only the trainer holds: it reads EOF
# when the trainer is gone, and then kills every process of the jail's uid. bwrap's --die-with-parent
# does the same, except when the trainer dies during bwrap's start-up (before its prctl).
_BOOT = r"""
import os, resource, signal, sys
mem, cpu, fsize, nproc, guard = (int(a) for a in sys.argv[1:6])
if guard >= 0:
    import threading
    def _guard():
        try:
            os.read(guard, 1)
        finally:
            try:
                os.kill(-1, signal.SIGKILL)        # every other process of the jail's uid
            except OSError:                        # ESRCH: there is none
                pass
            os._exit(137)
    threading.Thread(target=_guard, daemon=True).start()
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
if cpu > 0:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
if nproc > 0:
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
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

SANDBOX_MODES = ("jail", "host")


@dataclass
class SandboxConfig:
    """Limits of one run (see the module doc for what each one does and does not guarantee)."""

    timeout_s: float = 5.0          # wall clock; the jail (or host process group) is killed after it
    memory_mb: int = 256            # RLIMIT_AS of the child (0 = no limit)
    cpu_s: int = 0                  # RLIMIT_CPU (0: ceil(timeout_s) + 1)
    max_output_chars: int = 4000    # what the model sees
    max_file_bytes: int = 1 << 20   # RLIMIT_FSIZE: per file, the captured output included
    sandbox: str = "jail"           # jail (bubblewrap) | host (no filesystem isolation, warned once)
    max_processes: int = 32         # jail: RLIMIT_NPROC, processes + threads of the jail's uid
    tmpfs_mb: int = 64              # jail: size of the private /tmp (all files written together)
    network: str = "auto"           # host only: auto (unshare -rn when it works, else hook) | unshare | hook
    python: str = sys.executable    # the interpreter (a venv's base binary runs in the jail)

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ConfigError(f"sandbox timeout_s: must be > 0, got {self.timeout_s}")
        if self.memory_mb < 0 or self.cpu_s < 0 or self.max_output_chars < 1 or self.max_file_bytes < 1:
            raise ConfigError("sandbox memory_mb / cpu_s must be >= 0, max_output_chars / max_file_bytes >= 1")
        if self.sandbox not in SANDBOX_MODES:
            raise ConfigError(f"sandbox: {' | '.join(SANDBOX_MODES)}, got {self.sandbox!r}")
        if self.max_processes < 1 or self.tmpfs_mb < 1:
            raise ConfigError(f"sandbox max_processes / tmpfs_mb must be >= 1, got {self.max_processes} / "
                              f"{self.tmpfs_mb}")
        if self.network not in ("auto", "unshare", "hook"):
            raise ConfigError(f"sandbox network: auto | unshare | hook, got {self.network!r}")
        if self.sandbox == "jail" and self.network != "auto":
            raise ConfigError(f"sandbox network: {self.network!r} applies to `sandbox: host` only (the jail "
                              "always has its own network namespace)")


@dataclass
class SandboxResult:
    output: str            # stdout and stderr interleaved, cut to max_output_chars
    exit_code: int | None  # None when killed at the timeout
    timed_out: bool
    memory_exceeded: bool
    truncated: bool
    seconds: float
    isolation: str         # "jail+hook", "unshare+hook", "hook" or "remote"
    run_id: str = ""       # names the run's processes (their command line holds it)

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


_host_warned = False


def warn_host_mode() -> None:
    """Log once per process that model code runs without a jail (`sandbox: host`)."""
    global _host_warned
    if not _host_warned:
        _host_warned = True
        log.warning("python sandbox: `sandbox: host` - model-written code runs WITHOUT a jail: it can read "
                    "every file this user can read (home, project tree, /etc) and is bounded only by rlimits, "
                    "a timeout, the audit hook and (when unshare works) a network namespace")


_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}


def run_python(code: str, cfg: SandboxConfig | None = None) -> SandboxResult:
    """Run `code` as a script in a fresh jail (or host process); blocks until it ends or is killed."""
    cfg = cfg or SandboxConfig()
    run_id = "bitmamba-run-" + uuid.uuid4().hex[:16]
    nproc = cfg.max_processes if cfg.sandbox == "jail" else 0
    limits = [str(cfg.memory_mb << 20), str(cfg.cpu_s or int(cfg.timeout_s) + 1), str(cfg.max_file_bytes),
              str(nproc)]
    work = tempfile.mkdtemp(prefix="bitmamba-sandbox-")
    t0 = time.perf_counter()
    try:
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        out_path = os.path.join(work, ".output")
        with open(out_path, "wb") as out:
            if cfg.sandbox == "jail":
                rc, timed_out = _run_jailed(cfg, limits, run_id, work, out)
                isolation = "jail+hook"
            else:
                warn_host_mode()
                prefix, isolation = _isolation(cfg)
                boot = [cfg.python, "-I", "-c", _BOOT, *limits, "-1", run_id]
                rc, timed_out = _run_on_host(cfg, prefix + boot, work, out)
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
        return SandboxResult(text, rc, timed_out, mem_hit, truncated, seconds, isolation, run_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_on_host(cfg: SandboxConfig, cmd: list[str], work: str, out) -> tuple[int | None, bool]:
    """-> (exit code or None when killed at the timeout, timed out); a signal from RLIMIT_CPU counts as
    timed out."""
    env = {**_ENV, "HOME": work}
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, True
    return rc, rc < 0 and -rc in (signal.SIGXCPU, signal.SIGKILL)


def _run_jailed(cfg: SandboxConfig, limits: list[str], run_id: str, work: str, out) -> tuple[int | None, bool]:
    """Like `_run_on_host`, in the jail; returns only when no process of the jail is left. bwrap exits
    with the script's code, or 128 + the signal that killed it (SIGXCPU / SIGKILL from RLIMIT_CPU: timed
    out)."""
    view = require_jail(cfg.python)
    code_fd = os.open(os.path.join(work, "main.py"), os.O_RDONLY)
    info_r, info_w = os.pipe()
    guard_r, guard_w = os.pipe()
    try:
        boot = ["-I", "-c", _BOOT, *limits, str(guard_r), run_id]
        argv = jail_argv(view, boot, code_fd=code_fd, info_fd=info_w, tmpfs_bytes=cfg.tmpfs_mb << 20,
                         uid=jail_uid(), bwrap=bwrap_path())
        proc = subprocess.Popen(argv, cwd=work, env=dict(_ENV), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, pass_fds=(code_fd, info_w, guard_r),
                                start_new_session=True)
    except BaseException:
        os.close(info_r)
        os.close(guard_w)
        raise
    finally:
        os.close(code_fd)
        os.close(info_w)
        os.close(guard_r)
    try:
        try:
            rc: int | None = proc.wait(timeout=cfg.timeout_s)
            timed_out = rc in (128 + signal.SIGXCPU, 128 + signal.SIGKILL)
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        _end_jail(proc, _read_info(info_r))
    finally:
        os.close(info_r)
        os.close(guard_w)
    return rc, timed_out


def _read_info(fd: int) -> dict:
    """bwrap's `--info-fd` JSON ({"child-pid": host pid of the jail's init, "pid-namespace": inode, ...});
    {} when bwrap wrote none (it failed before starting the jail). bwrap writes it right after the
    clone and closes it, so this waits at most for bwrap's start-up."""
    data = b""
    while select.select([fd], [], [], 5.0)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        info = json.loads(data) if data else {}
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _init_state(pid: int, pid_ns: int | None) -> str | None:
    """The state letter of the jail's init (R, S, Z...), or None when that process is gone (a pid
    reused by a process outside the jail's PID namespace counts as gone)."""
    try:
        if pid_ns is not None and os.stat(f"/proc/{pid}/ns/pid").st_ino != pid_ns:
            return None
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def _end_jail(proc: subprocess.Popen, info: dict) -> None:
    """Take the jail down and wait until it is gone. SIGKILL to the jail's init makes the kernel kill
    every process of its PID namespace; the init turns into a zombie (state Z) only after they are all
    reaped. (bwrap itself exits as soon as the script does, while processes the script forked may still
    run; --die-with-parent then kills the init, but not before bwrap has returned to us.)"""
    pid, pid_ns = info.get("child-pid"), info.get("pid-namespace")
    if not isinstance(pid, int):
        if proc.poll() is None:
            _kill_group(proc)
        return
    deadline = time.monotonic() + 10.0
    while (state := _init_state(pid, pid_ns)) not in (None, "Z"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            log.warning("python sandbox: the jail's init (pid %d, state %s) outlived SIGKILL for 10 s", pid, state)
            break
        time.sleep(0.002)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
