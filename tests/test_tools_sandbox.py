"""The Python sandbox: limits (timeout, memory, output), the audit hook, the two local modes (jail and
host) and the python tool refusing to start without a jail. Hostile code against the jail: test_jail.py."""

import logging
import os
import time

import pytest

from model.errors import ConfigError
from rollout.agent import jail
from rollout.agent import sandbox
from rollout.agent.jail import jail_problem
from rollout.agent.sandbox import SandboxConfig, run_python, unshare_available
from rollout.agent.python_tool import PythonTool

NO_JAIL = jail_problem()
needs_jail = pytest.mark.skipif(NO_JAIL is not None, reason=f"no jail on this host: {NO_JAIL}")
# the limits hold in both modes; host mode is warned about once per process
MODES = [pytest.param("jail", marks=needs_jail), "host"]


@needs_jail
def test_jail_runs_code_in_a_private_tmp_that_is_gone_afterwards():
    r = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\nopen('f.txt','w').write('x')")
    assert r.exit_code == 0 and not r.timed_out and r.isolation == "jail+hook"
    assert r.output.splitlines() == ["/tmp", "['main.py']"]
    again = run_python("import os\nprint(sorted(os.listdir('.')))")
    assert again.output.strip() == "['main.py']"          # a fresh tmpfs each run


def test_host_mode_runs_code_in_a_fresh_temp_dir_that_is_removed():
    r = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\nopen('f.txt','w').write('x')",
                   SandboxConfig(sandbox="host"))
    assert r.exit_code == 0 and not r.timed_out and r.isolation in ("unshare+hook", "hook")
    cwd = r.output.splitlines()[0]
    assert "bitmamba-sandbox-" in cwd and cwd != os.getcwd()
    assert not os.path.exists(cwd)                      # cleaned up afterwards


@pytest.mark.parametrize("mode", MODES)
def test_errors_are_text_for_the_model(mode):
    r = run_python("1 / 0", SandboxConfig(sandbox=mode))
    assert r.exit_code == 1 and "ZeroDivisionError" in r.text()


@pytest.mark.parametrize("mode", MODES)
def test_timeout_kills_the_process_group(mode):
    t0 = time.perf_counter()
    r = run_python("import time\nprint('started', flush=True)\nwhile True: time.sleep(0.01)",
                   SandboxConfig(timeout_s=0.5, sandbox=mode))
    assert r.timed_out and r.exit_code is None
    assert time.perf_counter() - t0 < 3.0
    assert "started" in r.text() and "timed out" in r.text()


@pytest.mark.parametrize("mode", MODES)
def test_cpu_bound_loop_is_stopped(mode):
    r = run_python("while True: pass", SandboxConfig(timeout_s=1.0, sandbox=mode))
    assert r.timed_out and "timed out" in r.text()


@needs_jail
def test_cpu_limit_signal_from_the_jail_reads_as_timed_out():
    # RLIMIT_CPU (1 s) fires long before the 20 s wall clock; bwrap exits with 128 + SIGXCPU
    r = run_python("while True: pass", SandboxConfig(timeout_s=20.0, cpu_s=1))
    assert r.timed_out and r.exit_code is not None and r.seconds < 15


@pytest.mark.parametrize("mode", MODES)
def test_memory_limit(mode):
    r = run_python("x = bytearray(800 << 20)\nprint('allocated')", SandboxConfig(memory_mb=200, sandbox=mode))
    assert r.memory_exceeded and "allocated" not in r.output
    assert "memory limit exceeded" in r.text()
    ok = run_python("x = bytearray(20 << 20)\nprint('allocated')", SandboxConfig(memory_mb=200, sandbox=mode))
    assert ok.output.strip() == "allocated"


@pytest.mark.parametrize("mode", MODES)
def test_output_is_capped(mode):
    r = run_python("print('z' * 5_000_000)", SandboxConfig(max_output_chars=1000, max_file_bytes=100_000,
                                                            sandbox=mode))
    assert r.truncated and len(r.output) == 1000 and "[output truncated]" in r.text()


@pytest.mark.parametrize("cfg", [pytest.param({}, marks=needs_jail, id="jail"),
                                 pytest.param({"sandbox": "host", "network": "hook"}, id="host-hook")])
def test_sockets_and_subprocesses_are_refused_by_the_audit_hook(cfg):
    for code in ("import socket\nsocket.socket()", "import socket\nsocket.getaddrinfo('example.com', 80)",
                 "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)",
                 "import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')"):
        r = run_python(code, SandboxConfig(**cfg))
        assert r.exit_code != 0 and "PermissionError: sandbox:" in r.output, (code, r.output)


@pytest.mark.skipif(not unshare_available(), reason="unshare -rn does not work on this host")
def test_host_mode_network_namespace_has_no_usable_interface():
    # ctypes bypasses the audit hook; the namespace still leaves nothing to connect to
    code = ("import ctypes\nrows = open('/proc/self/net/dev').read().splitlines()[2:]\n"
            "print(sorted(r.split(':')[0].strip() for r in rows))\n"
            "libc = ctypes.CDLL(None)\n"
            "fd = libc.socket(2, 1, 0)\n"   # AF_INET, SOCK_STREAM, through libc (not audited)
            "import struct\naddr = struct.pack('!HH4s8x', 2, 80, bytes([1, 1, 1, 1]))\n"
            "print('connect', libc.connect(fd, addr, len(addr)))\n")
    r = run_python(code, SandboxConfig(sandbox="host", network="unshare", timeout_s=5))
    assert r.isolation == "unshare+hook"
    lines = r.output.splitlines()
    assert lines[0] == "['lo']"                   # only the (down) loopback of a new namespace
    assert lines[1] == "connect -1"               # network unreachable


@needs_jail
def test_python_tool_returns_the_script_output():
    t = PythonTool(timeout_s=2)
    assert t.config.sandbox == "jail"
    assert t(code="print(2 ** 100)") == str(2 ** 100) + "\n"
    assert "timed out" in t(code="while True: pass")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="sandbox: jail | host"):
        SandboxConfig(sandbox="docker")
    with pytest.raises(ConfigError, match="applies to `sandbox: host` only"):
        SandboxConfig(network="hook")
    with pytest.raises(ConfigError, match="max_processes"):
        SandboxConfig(max_processes=0)
    with pytest.raises(ConfigError, match="jail | host | remote"):
        PythonTool(sandbox="docker")
    with pytest.raises(ConfigError, match="`url` is for `sandbox: remote`"):
        PythonTool(sandbox="host", url="http://127.0.0.1:1/run_code")


def test_host_mode_is_logged_loudly_once(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_host_warned", False)
    with caplog.at_level(logging.WARNING, logger="rollout.agent.sandbox"):
        t = PythonTool(sandbox="host", network="hook")
        assert t(code="print(1)") == "1\n"
        PythonTool(sandbox="host", network="hook")(code="print(2)")
    warned = [r for r in caplog.records if "WITHOUT a jail" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


def _fresh_probe(monkeypatch, path: str):
    """PATH = `path` and no cached probe, for this test only (the real probe is re-run later)."""
    monkeypatch.setenv("PATH", path)
    jail._probe.cache_clear()


def test_python_tool_refuses_to_start_without_bwrap(monkeypatch, tmp_path):
    _fresh_probe(monkeypatch, str(tmp_path))                  # no bwrap on PATH
    try:
        with pytest.raises(ConfigError, match=r"bubblewrap \(`bwrap`\) is not installed: install it .*"
                                              r"apt-get install -y bubblewrap.*`sandbox: host`"):
            PythonTool()
        with pytest.raises(ConfigError, match="not installed"):
            run_python("print(1)")                             # nothing runs without the jail
        assert PythonTool(sandbox="host", network="hook")(code="print(3)") == "3\n"   # the explicit opt-out
    finally:
        jail._probe.cache_clear()


def test_python_tool_names_the_reason_when_bwrap_cannot_build_the_jail(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"     # what bwrap says where user namespaces are forbidden
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the "
                    "kernel does not allow non-privileged user namespaces.' >&2\nexit 1\n")
    fake.chmod(0o755)
    _fresh_probe(monkeypatch, f"{tmp_path}:/usr/bin:/bin")
    try:
        with pytest.raises(ConfigError, match="the jail cannot be set up on this host: bwrap: No permissions "
                                              "to create new namespace.*`sandbox: host`"):
            PythonTool()
    finally:
        jail._probe.cache_clear()
