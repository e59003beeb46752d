"""Run model-written Python on a remote sandbox service (SandboxFusion's `/run_code` HTTP API).

    cfg = RemoteSandboxConfig(url="http://sandbox.internal:8080/run_code", timeout_s=5)
    res = run_remote("print(6 * 7)", cfg)     # a rollout.agent.sandbox.SandboxResult, isolation "remote"

For a cluster that already runs a sandbox service (veRL's SandboxFusion, or anything speaking its
API): the code never runs on the trainer's machine. The request is one JSON POST,

    {"code": ..., "language": "python", "run_timeout": timeout_s, "compile_timeout": timeout_s,
     "memory_limit_MB": memory_mb, "stdin": "", "files": {}, "fetch_files": []}

and the answer

    {"status": "Success" | "Failed" | "SandboxError", "message": str,
     "run_result": {"status": "Finished" | "TimeLimitExceeded" | "Error", "return_code": int | null,
                    "stdout": str, "stderr": str, "execution_time": float} | null}

A finished run (any return code) or a run over its time limit becomes a `SandboxResult` like a local
one. The service failing (`SandboxError`, HTTP error, no answer within `timeout_s + request_slack_s`,
a body that is not this JSON) raises `RemoteSandboxError`: the tool set reports it to the model as a
tool error (status "error"), never as the script's output. What the model's code can reach is up to
the service (docs/tools.md, threat model).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from model.errors import ConfigError
from rollout.agent.sandbox import SandboxResult


class RemoteSandboxError(RuntimeError):
    """The remote sandbox service did not run the code (unreachable, HTTP error, its own error)."""


@dataclass
class RemoteSandboxConfig:
    url: str                        # the run endpoint, e.g. http://host:8080/run_code
    timeout_s: float = 5.0          # the run's time limit, sent to the service
    memory_mb: int = 256            # sent as memory_limit_MB
    max_output_chars: int = 4000    # what the model sees
    request_slack_s: float = 10.0   # the HTTP request may take timeout_s + this (queueing, start-up)
    language: str = "python"

    def __post_init__(self):
        u = urllib.parse.urlparse(self.url or "")
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ConfigError(f"remote sandbox url: an http(s) URL of the run endpoint, got {self.url!r}")
        if self.timeout_s <= 0 or self.request_slack_s < 0:
            raise ConfigError("remote sandbox timeout_s must be > 0 and request_slack_s >= 0")
        if self.memory_mb < 0 or self.max_output_chars < 1:
            raise ConfigError("remote sandbox memory_mb must be >= 0 and max_output_chars >= 1")


def run_remote(code: str, cfg: RemoteSandboxConfig) -> SandboxResult:
    """POST `code` to the service; blocks until it answers or `timeout_s + request_slack_s` passes."""
    body = json.dumps({"code": code, "language": cfg.language, "run_timeout": cfg.timeout_s,
                       "compile_timeout": cfg.timeout_s, "memory_limit_MB": cfg.memory_mb, "stdin": "",
                       "files": {}, "fetch_files": []}).encode()
    req = urllib.request.Request(cfg.url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout_s + cfg.request_slack_s) as resp:
            raw = resp.read(16 << 20)
    except urllib.error.HTTPError as e:
        raise RemoteSandboxError(f"remote sandbox {cfg.url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:      # refused, unreachable, timed out
        reason = getattr(e, "reason", e)
        raise RemoteSandboxError(f"remote sandbox {cfg.url}: no answer: {reason}") from None
    seconds = time.perf_counter() - t0
    try:
        answer = json.loads(raw)
    except ValueError:
        raise RemoteSandboxError(f"remote sandbox {cfg.url}: the answer is not JSON: {raw[:200]!r}") from None
    return _to_result(answer, cfg, seconds)


def _to_result(answer: object, cfg: RemoteSandboxConfig, seconds: float) -> SandboxResult:
    """A SandboxFusion answer -> SandboxResult (RemoteSandboxError when the run did not happen)."""
    if not isinstance(answer, dict):
        raise RemoteSandboxError(f"remote sandbox {cfg.url}: expected a JSON object, got {type(answer).__name__}")
    status = answer.get("status")
    run = answer.get("run_result")
    if status == "SandboxError" or not isinstance(run, dict):
        msg = str(answer.get("message") or f"status {status!r} without a run_result")[:300]
        raise RemoteSandboxError(f"remote sandbox {cfg.url}: {msg}")
    run_status = run.get("status")
    if run_status not in ("Finished", "TimeLimitExceeded", "Error"):
        raise RemoteSandboxError(f"remote sandbox {cfg.url}: unknown run status {run_status!r}")
    out = (run.get("stdout") or "") + (run.get("stderr") or "")
    timed_out = run_status == "TimeLimitExceeded"
    rc = run.get("return_code")
    rc = None if timed_out or not isinstance(rc, int) else rc
    if run_status == "Error" and rc in (None, 0):
        rc = 1                                   # the service could not run it: never shown as success
    truncated = len(out) > cfg.max_output_chars
    took = run.get("execution_time")
    return SandboxResult(out[:cfg.max_output_chars], rc, timed_out, False, truncated,
                         float(took) if isinstance(took, (int, float)) else seconds, "remote")
