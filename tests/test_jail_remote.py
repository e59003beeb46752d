"""The python tool's remote runner (`sandbox: remote`, rollout.agent.remote_sandbox) against a stub of
SandboxFusion's /run_code API on 127.0.0.1. The stub runs the code locally (host mode: the test's own
snippets) or answers as a failing service would."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from model.errors import ConfigError
from rollout.agent.remote_sandbox import RemoteSandboxConfig, RemoteSandboxError, run_remote
from rollout.agent.sandbox import SandboxConfig, run_python
from rollout.agent.loader import load_tools
from rollout.agent.python_tool import PythonTool
from rollout.agent.runner import ToolSet


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.mode = "run"                                 # run | sandbox_error | http_500 | not_json | hang
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/run_code"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        srv: Stub = self.server
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append({"path": self.path, **req})
        if srv.mode == "http_500":
            return self.send_error(500, "boom")
        if srv.mode == "hang":                            # the client gives up first
            time.sleep(3)
            return
        if srv.mode == "not_json":
            return self._send(b"<html>gateway</html>")
        if srv.mode == "sandbox_error":
            return self._send(json.dumps({"status": "SandboxError", "message": "no executor pod available",
                                          "run_result": None}).encode())
        r = run_python(req["code"], SandboxConfig(sandbox="host", network="hook", timeout_s=req["run_timeout"]))
        run = {"status": "TimeLimitExceeded" if r.timed_out else "Finished", "execution_time": r.seconds,
               "return_code": r.exit_code, "stdout": r.output, "stderr": ""}
        self._send(json.dumps({"status": "Success" if r.exit_code == 0 else "Failed", "message": "",
                               "compile_result": None, "run_result": run}).encode())

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.shutdown()
    s.server_close()


def test_python_tool_runs_code_on_the_service(stub):
    t = PythonTool(sandbox="remote", url=stub.url, timeout_s=3, memory_mb=128)
    assert t(code="print(6 * 7)") == "42\n"
    req = stub.requests[-1]
    assert req["path"] == "/run_code" and req["code"] == "print(6 * 7)" and req["language"] == "python"
    assert req["run_timeout"] == 3 and req["memory_limit_MB"] == 128
    assert "ZeroDivisionError" in t(code="1 / 0")


def test_a_run_over_its_time_limit_reads_as_timed_out(stub):
    r = run_remote("while True: pass", RemoteSandboxConfig(stub.url, timeout_s=0.5))
    assert r.timed_out and r.exit_code is None and r.isolation == "remote" and "timed out" in r.text()


def test_output_is_capped(stub):
    r = run_remote("print('z' * 10_000)", RemoteSandboxConfig(stub.url, max_output_chars=100))
    assert r.truncated and len(r.output) == 100 and "[output truncated]" in r.text()


@pytest.mark.parametrize("mode, message", [("sandbox_error", "no executor pod available"),
                                           ("http_500", "HTTP 500"),
                                           ("not_json", "the answer is not JSON")])
def test_a_failing_service_is_a_tool_error_not_script_output(stub, mode, message):
    stub.mode = mode
    with pytest.raises(RemoteSandboxError, match=message):
        run_remote("print(1)", RemoteSandboxConfig(stub.url))
    with ToolSet([PythonTool(sandbox="remote", url=stub.url)], timeout_s=10) as ts:
        out = ts.call("python", {"code": "print(1)"})
    assert out.status == "error" and "RemoteSandboxError" in out.text and message in out.text


def test_a_hung_service_gives_up_after_timeout_plus_slack(stub):
    stub.mode = "hang"
    t0 = time.perf_counter()
    with pytest.raises(RemoteSandboxError, match="no answer"):
        run_remote("print(1)", RemoteSandboxConfig(stub.url, timeout_s=0.2, request_slack_s=0.3))
    assert time.perf_counter() - t0 < 2.5


def test_nothing_listening_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                         # closed again: nothing listens there
    with pytest.raises(RemoteSandboxError, match=f"127.0.0.1:{port}/run_code: no answer"):
        run_remote("print(1)", RemoteSandboxConfig(f"http://127.0.0.1:{port}/run_code"))


def test_remote_config_from_yaml_and_its_errors(stub):
    (t,) = load_tools([{"spec": "python", "kwargs": {"sandbox": "remote", "url": stub.url, "timeout_s": 2}}])
    assert isinstance(t.config, RemoteSandboxConfig) and t.config.timeout_s == 2
    assert t(code="print('yaml')") == "yaml\n"
    with pytest.raises(ConfigError, match="remote sandbox url"):
        PythonTool(sandbox="remote")
    with pytest.raises(ConfigError, match="remote sandbox url"):
        PythonTool(sandbox="remote", url="ftp://host/run_code")
    with pytest.raises(ConfigError, match=r"\['max_processes', 'network'\] apply to `sandbox: jail \| host`"):
        PythonTool(sandbox="remote", url=stub.url, network="hook", max_processes=4)
