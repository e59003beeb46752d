"""Reward worker process: ``python -m rewards._worker SOCKET_FD MARKER_FD``.

Started by `rewards.pool.RewardPool` with one end of a socket pair and a 16-byte marker file
(an unlinked temporary file, mmap'ed by both: [position in chunk, start time of the current call
or 0]) the parent reads to find the call that hung or crashed. Protocol (pickled tuples):
  parent -> ("init", functions_pickle, timeouts, memory_limit_mb, parent_pid)
  worker -> ("ready", pid) | ("fatal", message)
  parent -> ("run", task_id, function_index, prompts, completions, rows) | ("stop",)
  worker -> ("done", task_id, [(status, value, message, seconds), ...])
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection


class _FileMarker:
    def __init__(self, fd: int):
        self.mm = mmap.mmap(fd, 16)
        os.close(fd)

    def set(self, pos: int) -> None:
        self.mm[0:8] = struct.pack("d", float(pos))
        self.mm[8:16] = struct.pack("d", time.monotonic())

    def clear(self) -> None:
        self.mm[8:16] = struct.pack("d", 0.0)


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the parent process is gone, so a busy worker never outlives a killed pool.

    A watchdog thread rather than PR_SET_PDEATHSIG: that signal follows the parent *thread*, and
    pools created from a worker thread (Ray actors) would lose their workers when it exits.
    """
    if os.getppid() != parent_pid:
        os._exit(0)

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="reward-parent-watchdog", daemon=True).start()


def _limit_memory(mb: int | None) -> None:
    if not mb:
        return
    import resource

    limit = int(mb) * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main() -> int:
    conn = Connection(int(sys.argv[1]))
    marker = _FileMarker(int(sys.argv[2]))
    try:
        _, payload, timeouts, memory_limit_mb, parent_pid = conn.recv()
        _die_with_parent(parent_pid)
        from rewards._exec import run_chunk

        functions = pickle.loads(payload)
        _limit_memory(memory_limit_mb)
    except BaseException as e:  # report anything that stops the worker from starting
        conn.send(("fatal", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"))
        return 1
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return 0
        if msg[0] == "stop":
            return 0
        _, task_id, f, prompts, completions, rows = msg
        out = run_chunk(functions[f], prompts, completions, rows, timeouts[f], marker)
        conn.send(("done", task_id, out))


if __name__ == "__main__":
    sys.exit(main())
