"""Built-in tool `python`: runs the model's script in a bubblewrap jail (`rollout.agent.sandbox`),
as a plain host process, or on a remote sandbox service, with timeout, memory, process and output
limits and no network."""

from __future__ import annotations

from model.errors import ConfigError
from rollout.agent.jail import require_jail
from rollout.agent.remote_sandbox import RemoteSandboxConfig, run_remote
from rollout.agent.sandbox import SANDBOX_MODES, SandboxConfig, run_python, warn_host_mode


class PythonTool:
    """Run a Python script the model wrote; the tool's text is its stdout/stderr (or the error/limit message).

    `sandbox`: `jail` (default; bubblewrap, `rollout.agent.jail`: the tool refuses to start, naming the missing
    piece, where the jail cannot be set up), `host` (a plain process that can read what the trainer's user
    can; warned once per process) or `remote` (a SandboxFusion-style service at `url`,
    `rollout.agent.remote_sandbox`). The threat model of each mode is in docs/tools.md."""

    name = "python"
    description = "Run a Python 3 script and return what it prints (no network, limited time and memory)."
    parameters = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 256, max_output_chars: int = 4000,
                 network: str = "auto", sandbox: str = "jail", max_processes: int = 32, tmpfs_mb: int = 64,
                 url: str | None = None):
        self.config: SandboxConfig | RemoteSandboxConfig
        if sandbox == "remote":
            local = {"network": (network, "auto"), "max_processes": (max_processes, 32), "tmpfs_mb": (tmpfs_mb, 64)}
            bad = sorted(k for k, (v, default) in local.items() if v != default)
            if bad:
                raise ConfigError(f"python tool: {bad} apply to `sandbox: jail | host`, not `remote`")
            self.config = RemoteSandboxConfig(url or "", timeout_s=timeout_s, memory_mb=memory_mb,
                                              max_output_chars=max_output_chars)
            return
        if url is not None:
            raise ConfigError(f"python tool: `url` is for `sandbox: remote`, got sandbox {sandbox!r}")
        if sandbox not in SANDBOX_MODES:
            raise ConfigError(f"python tool sandbox: jail | host | remote, got {sandbox!r}")
        self.config = SandboxConfig(timeout_s=timeout_s, memory_mb=memory_mb, max_output_chars=max_output_chars,
                                    network=network, sandbox=sandbox, max_processes=max_processes,
                                    tmpfs_mb=tmpfs_mb)
        if sandbox == "jail":
            require_jail(self.config.python)     # refuse to start without a working jail
        else:
            warn_host_mode()

    def __call__(self, code: str) -> str:
        if isinstance(self.config, RemoteSandboxConfig):
            return run_remote(code, self.config).text()
        return run_python(code, self.config).text()

