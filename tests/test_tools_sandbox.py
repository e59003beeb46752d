"""The Python sandbox: a separate process with timeout, memory limit, output cap and no network."""

import os
import time

import pytest

from rollout.sandbox import SandboxConfig, run_python, unshare_available
from rollout.tools import PythonTool


def test_runs_code_in_a_fresh_temp_dir_that_is_removed():
    r = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\nopen('f.txt','w').write('x')")
    assert r.exit_code == 0 and not r.timed_out
    cwd = r.output.splitlines()[0]
    assert "bitmamba-sandbox-" in cwd and cwd != os.getcwd()
    assert not os.path.exists(cwd)                      # cleaned up afterwards


def test_errors_are_text_for_the_model():
    r = run_python("1 / 0")
    assert r.exit_code == 1 and "ZeroDivisionError" in r.text()


def test_timeout_kills_the_process_group():
    t0 = time.perf_counter()
    r = run_python("import time\nprint('started', flush=True)\nwhile True: time.sleep(0.01)",
                   SandboxConfig(timeout_s=0.5))
    assert r.timed_out and r.exit_code is None
    assert time.perf_counter() - t0 < 3.0
    assert "started" in r.text() and "timed out" in r.text()


def test_cpu_bound_loop_is_stopped():
    r = run_python("while True: pass", SandboxConfig(timeout_s=1.0))
    assert r.timed_out and "timed out" in r.text()


def test_memory_limit():
    r = run_python("x = bytearray(800 << 20)\nprint('allocated')", SandboxConfig(memory_mb=200))
    assert r.memory_exceeded and "allocated" not in r.output
    assert "memory limit exceeded" in r.text()
    ok = run_python("x = bytearray(20 << 20)\nprint('allocated')", SandboxConfig(memory_mb=200))
    assert ok.output.strip() == "allocated"


def test_output_is_capped():
    r = run_python("print('z' * 5_000_000)", SandboxConfig(max_output_chars=1000, max_file_bytes=100_000))
    assert r.truncated and len(r.output) == 1000 and "[output truncated]" in r.text()


def test_sockets_and_subprocesses_are_refused_by_the_audit_hook():
    for code in ("import socket\nsocket.socket()", "import socket\nsocket.getaddrinfo('example.com', 80)",
                 "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)",
                 "import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')"):
        r = run_python(code, SandboxConfig(network="hook"))
        assert r.exit_code != 0 and "PermissionError: sandbox:" in r.output, (code, r.output)


@pytest.mark.skipif(not unshare_available(), reason="unshare -rn does not work on this host")
def test_network_namespace_has_no_usable_interface():
    # ctypes bypasses the audit hook; the namespace still leaves nothing to connect to
    code = ("import ctypes\nrows = open('/proc/self/net/dev').read().splitlines()[2:]\n"
            "print(sorted(r.split(':')[0].strip() for r in rows))\n"
            "libc = ctypes.CDLL(None)\n"
            "fd = libc.socket(2, 1, 0)\n"   # AF_INET, SOCK_STREAM, through libc (not audited)
            "import struct\naddr = struct.pack('!HH4s8x', 2, 80, bytes([1, 1, 1, 1]))\n"
            "print('connect', libc.connect(fd, addr, len(addr)))\n")
    r = run_python(code, SandboxConfig(network="unshare", timeout_s=5))
    assert r.isolation == "unshare+hook"
    lines = r.output.splitlines()
    assert lines[0] == "['lo']"                   # only the (down) loopback of a new namespace
    assert lines[1] == "connect -1"               # network unreachable


def test_python_tool_returns_the_script_output():
    t = PythonTool(timeout_s=2)
    assert t(code="print(2 ** 100)") == str(2 ** 100) + "\n"
    assert "timed out" in t(code="while True: pass")
