"""Hostile model code against the jail (`sandbox: jail`, rollout.agent.jail), as a completion would try it
through the python tool. Each attempt must come back as the tool's error text before the timeout, leave
no process of the run behind, and change nothing outside the jail.

The attempts marked "host mode" in a comment succeed in `sandbox: host` (the plain process the tool
used before the jail): a planted secret, /root and the project tree are readable there, a ctypes fork
loop is unbounded, 1 GB of files land on the host disk, os.setuid(0) works inside `unshare -r`, and
/proc/self/root leads back to the host's root.
"""

import ast
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from rollout.agent.jail import jail_problem, reap_orphaned_jails
from rollout.agent.sandbox import SandboxConfig, SandboxResult, run_python
from rollout.agent.python_tool import PythonTool

ROOT = Path(__file__).resolve().parents[1]
NO_JAIL = jail_problem()
pytestmark = pytest.mark.skipif(NO_JAIL is not None, reason=f"no jail on this host: {NO_JAIL}")
SECRET = "planted-secret-" + uuid.uuid4().hex


def cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:                                       # gone meanwhile
        return b""


def leftovers(run_id: str) -> list[str]:
    """Host processes whose command line holds the run's id (every jailed process of the run does)."""
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and run_id.encode() in cmdline(pid)]


@pytest.fixture
def planted(tmp_path):
    """A secret file outside the jail; the test checks that it is unread and unchanged afterwards."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text(SECRET)
    yield d
    assert (d / "secret.txt").read_text() == SECRET
    assert sorted(p.name for p in d.iterdir()) == ["secret.txt"]


def run(code: str, **cfg) -> SandboxResult:
    r = run_python(textwrap.dedent(code), SandboxConfig(**{"timeout_s": 10, **cfg}))
    assert r.isolation == "jail+hook"
    assert not r.timed_out, r.text()                     # came back on its own, within the timeout
    assert leftovers(r.run_id) == []                      # no process of the run is left
    assert SECRET not in r.output
    return r


def test_planted_secret_outside_the_jail_is_unreadable_and_unwritable(planted):
    # host mode: prints the secret
    r = run(f"""
        print(open({str(planted / 'secret.txt')!r}).read())
        """)
    assert "FileNotFoundError" in r.text()
    r = run(f"""
        open({str(planted / 'pwned.txt')!r}, 'w').write('x')
        """)
    assert "FileNotFoundError" in r.text()


@pytest.mark.parametrize("path", ["/root", str(ROOT), "/home", "/etc", os.path.expanduser("~")])
def test_listing_home_project_tree_and_etc_fails(path):
    # host mode: lists them (and /etc/passwd is readable)
    r = run(f"""
        import os
        print(sorted(os.listdir({path!r})))
        """)
    assert "FileNotFoundError" in r.text(), r.text()


def test_the_jail_sees_only_the_interpreter_tmp_proc_and_dev():
    r = run("""
        import os
        print(sorted(os.listdir('/')))
        print(sorted(os.listdir('/python/lib/python3.%d/site-packages' % __import__('sys').version_info[1])))
        print(os.getuid(), os.getgid(), os.getgroups())
        print([l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1])
        import ctypes
        print(ctypes.CDLL(None).unshare(0x10000000 | 0x20000))   # CLONE_NEWUSER | CLONE_NEWNS
        """)
    lines = r.output.splitlines()
    top = set(ast.literal_eval(lines[0]))                 # lib64 or lib: where the ELF loader lives
    assert {"dev", "proc", "python", "tmp"} <= top <= {"dev", "proc", "python", "tmp", "lib", "lib64"}
    assert lines[1] == "[]"                               # third-party packages are hidden
    uid, gid, groups = lines[2].split(" ", 2)
    assert uid != "0" and gid != "0" and groups == "[]"
    assert int(lines[3], 16) == 0                         # no capabilities
    assert lines[4] == "-1"                               # no namespaces of its own


def test_ctypes_fork_loop_is_bounded():
    # the audit hook does not see ctypes; RLIMIT_NPROC of the jail's uid does. host mode: 200 forks
    r = run("""
        import ctypes, os, time
        libc = ctypes.CDLL(None, use_errno=True)
        n = 0
        for i in range(200):
            pid = libc.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            if pid < 0:
                e = ctypes.get_errno()
                raise OSError(e, f"fork failed after {n} children: {os.strerror(e)}")
            n += 1
        print("forked", n)
        """, max_processes=16)
    assert "Error: [Errno 11] fork failed after" in r.text(), r.text()     # EAGAIN (BlockingIOError)
    assert int(r.output.rsplit("fork failed after ", 1)[1].split()[0]) < 16


def test_ten_thousand_threads_fail_cleanly():
    r = run("""
        import threading, time
        ts = []
        for i in range(10_000):
            t = threading.Thread(target=time.sleep, args=(60,), daemon=True)
            t.start()
            ts.append(t)
        print("started", len(ts))
        """)
    assert "RuntimeError: can't start new thread" in r.text() and "started" not in r.output


def test_writing_1_gb_stops_at_the_file_and_tmpfs_limits(tmp_path):
    one = run("""
        with open('big', 'wb') as f:
            for i in range(1024):
                f.write(b'x' * (1 << 20))
        """)
    assert "OSError: [Errno 27] File too large" in one.text()
    # host mode: all 1,024 files (1 GB) are written to the host's temporary directory
    many = run("""
        n = 0
        try:
            for i in range(1024):
                with open(f'f{i}', 'wb') as f:
                    f.write(b'x' * (1000 << 10))
                n += 1
        finally:
            print('files', n)
        """, tmpfs_mb=16)
    assert "OSError: [Errno 28] No space left on device" in many.text()
    assert int(many.output.rsplit("files ", 1)[1].split()[0]) < 17


def test_socket_to_127_0_0_1_reaches_nothing():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        hooked = run(f"""
            import socket
            socket.create_connection(('127.0.0.1', {port}), timeout=2)
            """)
        assert "PermissionError: sandbox: socket" in hooked.text()
        raw = run(f"""
            import ctypes, os, struct
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.socket(2, 1, 0)
            addr = struct.pack('=H', 2) + struct.pack('!H4s8x', {port}, bytes([127, 0, 0, 1]))
            if libc.connect(fd, addr, len(addr)) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            print('connected')
            """)
        assert "ConnectionRefusedError" in raw.text() and "connected" not in raw.output
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):              # nobody knocked on the host's loopback
            srv.accept()


def test_proc_environ_shows_no_host_environment(monkeypatch):
    monkeypatch.setenv("BITMAMBA_JAIL_TEST_TOKEN", SECRET)    # in the trainer's environment
    r = run("""
        import glob
        for p in sorted(glob.glob('/proc/*/environ')):
            try:
                print(p, open(p, 'rb').read())
            except OSError as e:
                print(p, type(e).__name__)
        """)
    assert "/proc/self/environ" in r.output and "BITMAMBA_JAIL_TEST_TOKEN" not in r.output
    pids = {p.split("/")[2] for p in r.output.split() if p.startswith("/proc/") and p.split("/")[2].isdigit()}
    assert len(pids) <= 3                                 # the jail's own processes only


def test_setuid_root_is_refused():
    # host mode (unshare -r): uid 0 in the namespace, setuid(0) succeeds
    r = run("""
        import os
        os.setuid(0)
        print('became', os.getuid())
        """)
    assert "PermissionError" in r.text() or "Invalid argument" in r.text()     # root mode / user namespace
    assert not any(line.startswith("became") for line in r.output.splitlines())


def test_escape_through_proc_root_fails(planted):
    # host mode: /proc/self/root is the host's root, the secret prints
    secret = str(planted / "secret.txt")
    r = run(f"""
        import os
        print(sorted(os.listdir('/proc/self/root/')))
        for base in ('/proc/self/root', '/proc/1/root', '/proc/self/cwd/..', '/proc/1/cwd'):
            try:
                print(open(base + {secret!r}).read())
            except OSError as e:
                print(base, type(e).__name__)
        open('/proc/self/root' + {secret!r}).read()
        """)
    assert "FileNotFoundError" in r.text()
    assert "root" not in r.output.splitlines()[0] and "work" not in r.output.splitlines()[0]


def test_timeout_kills_every_process_of_the_jail():
    r = run_python(textwrap.dedent("""
        import ctypes, time
        libc = ctypes.CDLL(None)
        for i in range(5):
            if libc.fork() == 0:
                break
        while True:
            time.sleep(0.05)
        """), SandboxConfig(timeout_s=1))
    assert r.timed_out and "timed out" in r.text()
    assert leftovers(r.run_id) == []


@pytest.mark.parametrize("when", ["bwrap starting", "script running"])
def test_the_jail_dies_with_the_trainer(tmp_path, when):
    """The process that started the jail is SIGKILLed mid-run, while bwrap sets the jail up (the guard
    pipe ends it: bwrap's --die-with-parent is not armed yet) or while the script runs."""
    token = uuid.uuid4().hex
    run_id = "bitmamba-run-" + token[:16]
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, uuid
        sys.path.insert(0, {str(ROOT)!r})
        from rollout.agent import sandbox
        sandbox.uuid.uuid4 = lambda: uuid.UUID({token!r})
        print("start", flush=True)
        sandbox.run_python("import time\\nwhile True: time.sleep(0.05)", sandbox.SandboxConfig(timeout_s=60))
        """))

    def up() -> bool:
        pids = leftovers(run_id)
        if when == "bwrap starting":
            return bool(pids)
        return any(cmdline(p).startswith(b"/python/bin/python3") for p in pids)

    env = {**os.environ, "TMPDIR": str(tmp_path)}       # the killed trainer cannot remove its work dir
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "start"
        for _ in range(2000):                             # until the jail is that far (bounded)
            if up():
                break
            time.sleep(0.001)
        assert up()
    finally:
        proc.kill()
        proc.wait()
    for _ in range(200):                                  # the kernel takes the namespace down
        if not leftovers(run_id):
            break
        time.sleep(0.05)
    left = leftovers(run_id)
    # no model code survives; at most a bwrap stuck in its start-up, which the next start reaps
    assert not any(cmdline(p).startswith(b"/python/") for p in left)
    reap_orphaned_jails()
    for _ in range(200):
        if not leftovers(run_id):
            break
        time.sleep(0.05)
    assert leftovers(run_id) == []


def test_python_tool_returns_the_error_text():
    assert "FileNotFoundError" in PythonTool(timeout_s=5)(code=f"open({str(ROOT / 'README.md')!r}).read()")
