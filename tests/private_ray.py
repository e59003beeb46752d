"""Helpers for tests that start a Ray instance of their own: free ports, finding that instance's
processes by its private RAY_TMPDIR, and stopping exactly those by PID (never `ray stop`, which ends
every Ray process of the user)."""

from __future__ import annotations

import os
import signal
import socket

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_of(ray_tmpdir: str) -> list[int]:
    """Processes whose environment or command line names `ray_tmpdir` (a Ray instance started under it,
    including agents that renamed themselves `ray::...`)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] == os.getpid():
                continue
            if (p.environ().get("RAY_TMPDIR") == ray_tmpdir
                    or any(ray_tmpdir in a for a in p.info["cmdline"] or [])):
                out.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def stop(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL after 10 s, for exactly these processes."""
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.send_signal(signal.SIGTERM)
            procs.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()
