"""The jail for model-written Python: bubblewrap (`bwrap`) around one interpreter.

    view = interpreter_view(sys.executable)          # found once per interpreter: its files and libraries
    argv = jail_argv(view, boot_args, code_fd=..., info_fd=..., tmpfs_bytes=64 << 20, uid=jail_uid())
    reason = jail_problem(sys.executable)            # None when a trial run in the jail works here

What the jailed process sees (everything else on the host does not exist for it):
- `/python/bin/python3`: the real interpreter binary (a venv's base interpreter), read-only;
- `/python/lib/pythonX.Y`: its standard library, read-only, with `site-packages` / `dist-packages`
  covered by an empty tmpfs (no third-party packages, no `.pth` files run at start-up);
- `/python/lib/*.so*`: exactly the shared libraries that `ldd` lists for the binary and the stdlib's
  extension modules (plus `libgcc_s`, which glibc loads for thread exit), read-only, flat, found through
  `LD_LIBRARY_PATH`; the ELF loader at its own path (e.g. `/lib64/ld-linux-x86-64.so.2`);
- `/tmp`: a private tmpfs of `tmpfs_bytes` (the working directory; the script is `/tmp/main.py`);
- `/proc` of a new PID namespace (only the jail's own processes), a minimal `/dev`.
No home, no project tree, no `/etc`, no `/usr`, no `/sys`. Namespaces: new PID, network (only its own
loopback), IPC, UTS and (when the kernel has them) cgroup. `--die-with-parent`: the jail dies with the
process that started it.

Who runs inside, and what bounds the number of processes:
- as root on the host (CI machines, containers): bwrap runs privileged (no user namespace), keeps only
  CAP_SETUID/CAP_SETGID/CAP_SETPCAP, and `setpriv` (util-linux) switches to an unprivileged uid/gid that
  no host account uses (`jail_uid()`, one per run) with no groups, no capabilities and an empty bounding
  set before Python starts (bwrap also sets no_new_privs).
  RLIMIT_NPROC then counts that uid only. (Inside a user namespace that maps to host root, RLIMIT_NPROC
  is never enforced: the kernel exempts kuid 0, so a ctypes fork loop would be unbounded.)
- as any other user: bwrap creates a user namespace (`--unshare-user`, `--disable-userns`); the jail uid
  maps to the caller's own non-root uid, so RLIMIT_NPROC applies inside that namespace.
The limits themselves (RLIMIT_NPROC, _AS, _CPU, _FSIZE) are set by the boot script in `rollout.agent.sandbox`
before the model's code runs.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

from model.errors import ConfigError

JAIL_PREFIX = "/python"
JAIL_UID_BASE = 1 << 20      # root mode: jail uids are JAIL_UID_BASE + ... (no host account lives there)
USERNS_UID = 65534           # user-namespace mode: the uid inside (maps to the caller's uid)

_INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install -y bubblewrap)"
_USERNS_HINT = ("bwrap needs user namespaces when not run as root: check `sysctl user.max_user_namespaces` "
                "(> 0), `kernel.unprivileged_userns_clone` (= 1, Debian kernels before 5.10), "
                "`kernel.apparmor_restrict_unprivileged_userns` (= 0, Ubuntu 23.10+), or in a container "
                "a seccomp profile that allows clone/unshare of namespaces; as root it needs CAP_SYS_ADMIN")


@dataclass(frozen=True)
class InterpreterView:
    """The host files one Python interpreter needs, and where they appear in the jail."""

    version: str                               # "3.11"
    executable: str                            # host path of the real binary (a venv resolved to its base)
    stdlib: str                                # host dir, shown as /python/lib/pythonX.Y
    dynload: str | None                        # host lib-dynload dir when it is not inside stdlib
    libraries: tuple[tuple[str, str], ...]     # (soname, host file), shown as /python/lib/<soname>
    loader: str                                # the ELF interpreter, shown at the same path
    hidden: tuple[str, ...]                    # stdlib subdirs covered by an empty tmpfs (site-packages)
    setpriv: str | None                        # host setpriv binary (root mode), shown as /python/bin/setpriv

    @property
    def jail_stdlib(self) -> str:
        return f"{JAIL_PREFIX}/lib/python{self.version}"


_QUERY = r"""
import json, os, sys, sysconfig
exe = getattr(sys, "_base_executable", None) or sys.executable
print(json.dumps({"exe": os.path.realpath(exe), "version": "%d.%d" % sys.version_info[:2],
                  "stdlib": sysconfig.get_path("stdlib"), "dynload": sysconfig.get_config_var("DESTSHARED")}))
"""

_LDD_LIB = re.compile(r"^\s*(\S+) => (/\S+) \(0x")
_LDD_LOADER = re.compile(r"^\s*(/\S+) \(0x")


def _ldd(files: list[str]) -> tuple[dict[str, str], str | None]:
    """sonames -> host paths of every library `files` load, and the ELF loader's path."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise ConfigError("python sandbox: `ldd` (glibc's libc-bin) is not installed; the jail uses it to "
                          "find the interpreter's shared libraries")
    out = subprocess.run([ldd, *files], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}).stdout
    libs: dict[str, str] = {}
    loader = None
    for line in out.splitlines():
        m = _LDD_LIB.match(line)
        if m:
            libs.setdefault(m.group(1), m.group(2))
            continue
        m = _LDD_LOADER.match(line)
        if m:
            loader = m.group(1)
    return libs, loader


@functools.lru_cache(maxsize=None)
def interpreter_view(python: str, privileged: bool | None = None) -> InterpreterView:
    """Ask `python` where its binary and stdlib are, and `ldd` which libraries they load (once per
    interpreter and mode: about 0.2 s). Raises ConfigError naming what is missing."""
    privileged = os.geteuid() == 0 if privileged is None else privileged
    try:
        r = subprocess.run([python, "-I", "-c", _QUERY], capture_output=True, text=True, timeout=60)
        info = json.loads(r.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise ConfigError(f"python sandbox: cannot query the interpreter {python!r}: {e}") from None
    stdlib = os.path.realpath(info["stdlib"])
    dynload = os.path.realpath(info["dynload"]) if info.get("dynload") else None
    if dynload and not os.path.isdir(dynload):
        dynload = None
    modules = sorted(os.path.join(dynload, f) for f in os.listdir(dynload) if f.endswith(".so")) if dynload else []
    setpriv = None
    if privileged:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise ConfigError("python sandbox: `setpriv` (util-linux) is not installed; as root the jail uses it "
                              "to drop to an unprivileged uid")
        setpriv = os.path.realpath(setpriv)
    libs, loader = _ldd([info["exe"], *modules, *([setpriv] if setpriv else [])])
    if loader is None:
        raise ConfigError(f"python sandbox: `ldd {info['exe']}` names no ELF loader (a static or non-ELF "
                          "interpreter is not supported by the jail)")
    libc = libs.get("libc.so.6")
    gcc_s = os.path.join(os.path.dirname(libc), "libgcc_s.so.1") if libc else ""
    if gcc_s and os.path.exists(gcc_s):
        libs.setdefault("libgcc_s.so.1", gcc_s)
    hidden = tuple(d for d in ("site-packages", "dist-packages") if os.path.isdir(os.path.join(stdlib, d)))
    return InterpreterView(
        version=info["version"], executable=info["exe"], stdlib=stdlib,
        dynload=dynload if dynload and not dynload.startswith(stdlib + os.sep) else None,
        libraries=tuple(sorted((name, os.path.realpath(p)) for name, p in libs.items())),
        loader=loader, hidden=hidden, setpriv=setpriv)


_uid_counter = itertools.count()
_uid_lock = threading.Lock()


def jail_uid() -> int:
    """A uid for one jailed run as root: fresh per run (64 in a row per process) so that RLIMIT_NPROC
    counts only that run's processes; above any host account (JAIL_UID_BASE = 2^20)."""
    with _uid_lock:
        n = next(_uid_counter)
    return JAIL_UID_BASE + (os.getpid() % (1 << 16)) * 64 + n % 64


def _dirs(paths: list[str]) -> list[str]:
    """`--perms 0755 --dir` for every parent of `paths` (bwrap would make them 0700 as root, which the
    unprivileged jail uid could not traverse)."""
    out: list[str] = []
    seen: set[str] = set()
    for p in paths:
        parts = p.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if d not in seen:
                seen.add(d)
                out += ["--perms", "0755", "--dir", d]
    return out


def jail_argv(view: InterpreterView, python_args: list[str], *, code_fd: int, info_fd: int,
              tmpfs_bytes: int, uid: int, privileged: bool | None = None, bwrap: str = "bwrap") -> list[str]:
    """The bwrap command line running `/python/bin/python3 *python_args` in /tmp of the jail, with the
    file behind `code_fd` copied to /tmp/main.py and bwrap's JSON info (`child-pid`) written to `info_fd`."""
    privileged = os.geteuid() == 0 if privileged is None else privileged
    lib = f"{JAIL_PREFIX}/lib"
    binds = [(view.executable, f"{JAIL_PREFIX}/bin/python3"), (view.stdlib, view.jail_stdlib)]
    if view.dynload:
        binds.append((view.dynload, f"{view.jail_stdlib}/lib-dynload"))
    binds += [(host, f"{lib}/{name}") for name, host in view.libraries]
    binds.append((os.path.realpath(view.loader), view.loader))
    if privileged:
        binds.append((view.setpriv, f"{JAIL_PREFIX}/bin/setpriv"))
    a = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
         "--hostname", "sandbox", "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
    if privileged:
        a += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        a += ["--unshare-user", "--disable-userns", "--uid", str(USERNS_UID), "--gid", str(USERNS_UID)]
    a += _dirs([dst for _, dst in binds] + ["/tmp/x"])
    for src, dst in binds:
        a += ["--ro-bind", src, dst]
    for d in view.hidden:
        a += ["--tmpfs", f"{view.jail_stdlib}/{d}"]
    a += ["--proc", "/proc", "--dev", "/dev",
          "--perms", "1777", "--size", str(tmpfs_bytes), "--tmpfs", "/tmp",
          "--perms", "0644", "--file", str(code_fd), "/tmp/main.py", "--chdir", "/tmp",
          "--clearenv", "--setenv", "PATH", f"{JAIL_PREFIX}/bin", "--setenv", "HOME", "/tmp",
          "--setenv", "LANG", "C.UTF-8", "--setenv", "LD_LIBRARY_PATH", lib, "--"]
    if privileged:
        a += [f"{JAIL_PREFIX}/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
              "--inh-caps=-all", "--bounding-set=-all", "--"]
    return a + [f"{JAIL_PREFIX}/bin/python3", *python_args]


def bwrap_path() -> str:
    """The bwrap binary, or ConfigError saying how to install it."""
    exe = shutil.which("bwrap")
    if exe is None:
        raise ConfigError(f"python sandbox: bubblewrap (`bwrap`) is not installed: {_INSTALL_HINT}, or set "
                          "`sandbox: host` to run model code without a jail")
    return exe


@functools.lru_cache(maxsize=None)
def _probe(python: str) -> None:
    bwrap = bwrap_path()
    reap_orphaned_jails()
    view = interpreter_view(python)
    with tempfile.TemporaryFile() as code:
        code.write(b"print(6 * 7)\n")
        code.flush()
        code.seek(0)
        r_fd, w_fd = os.pipe()
        try:
            argv = jail_argv(view, ["-I", "main.py"], code_fd=code.fileno(), info_fd=w_fd,
                             tmpfs_bytes=1 << 20, uid=jail_uid(), bwrap=bwrap)
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                               pass_fds=(code.fileno(), w_fd), env={"PATH": "/usr/bin:/bin"})
        finally:
            os.close(w_fd)
            os.close(r_fd)
    if r.returncode != 0 or r.stdout.strip() != "42":
        err = (r.stderr.strip() or r.stdout.strip() or f"exit code {r.returncode}").splitlines()[-1][:300]
        hint = "" if os.geteuid() == 0 else f" ({_USERNS_HINT})"
        raise ConfigError(f"python sandbox: the jail cannot be set up on this host: {err}{hint}; "
                          "or set `sandbox: host` to run model code without a jail")


def reap_orphaned_jails() -> list[int]:
    """SIGKILL jails whose starter is gone: a bwrap that is the init of a PID namespace (its `NSpid` has
    two entries) for a run `bitmamba-run-*` whose parent is not that run's outer bwrap. It happens when
    the trainer is killed in the few ms between bwrap arming --die-with-parent and releasing its child
    (bubblewrap 0.8-0.11): the child then waits forever, before any model code has started. Called once
    per process when the jail is first checked; returns the pids killed."""
    killed = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        run = next((a for a in argv if a.startswith(b"bitmamba-run-")), None)
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        if run is None or os.path.basename(argv[0]) != b"bwrap" or len(nspid) < 2:
            continue
        ppid = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:"))
        try:
            parent = open(f"/proc/{ppid}/cmdline", "rb").read()
        except OSError:
            parent = b""
        if run not in parent:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except OSError:
                pass
    return killed


def require_jail(python: str = sys.executable) -> InterpreterView:
    """The interpreter's view after one trial run in the jail worked (cached per interpreter);
    ConfigError naming the missing piece otherwise."""
    _probe(python)
    return interpreter_view(python)


def jail_problem(python: str = sys.executable) -> str | None:
    """None when the jail works here, else the reason (for skips and messages)."""
    try:
        require_jail(python)
    except ConfigError as e:
        return str(e)
    return None
