"""`RewardPool`: score completions in isolated worker processes with time and memory limits.

    pool = RewardPool(["math", {"spec": "my_rewards.py:brevity", "weight": 0.2}], num_workers=2)
    res = pool.score(prompts, completions, fields)    # fields: the dataset rows (dicts), one per sample
    res.rewards        # list[float | None], weighted total; None = exclude the sample
    res.per_function   # {name: list[float | None]}
    res.status         # per sample: ok / none / error / timeout / crash / invalid
    pool.close()       # or `with RewardPool(...) as pool:`

Workers are plain subprocesses (``python -m rewards._worker``), so the pool works the same from a
script, a notebook or a Ray actor, without fork. Work goes out in chunks (one message per chunk,
not per sample). A call that raises, returns NaN/inf/a wrong type/a wrong batch length, runs past
its time limit, or takes its worker down (os._exit, segfault, MemoryError at the memory limit)
gets the fallback reward; the reason is counted and logged once with an example. Dead or hung
workers are killed and the rest of their chunk is re-run on a replacement (started when work is
waiting for it), so scoring always finishes.
"""

from __future__ import annotations

import collections
import logging
import math
import mmap
import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from rewards.api import STATUSES, CompositeReward, RewardFn, RewardSpec, combine
from rewards.errors import RewardPoolError

log = logging.getLogger("rewards.pool")

FAILURES = ("crash", "timeout", "error", "invalid")


@dataclass
class ScoreResult:
    """Result of `RewardPool.score` for n samples."""

    rewards: list[float | None]                 # [n] weighted total (fallbacks included); None = exclude
    per_function: dict[str, list[float | None]]  # name -> [n] score used (fallback where the call failed)
    status: list[str]                           # [n] worst status over the functions
    per_function_status: dict[str, list[str]]   # name -> [n]
    counts: dict[str, int]                      # status -> number of samples (every status, 0 included)
    examples: dict[str, str]                    # non-ok status -> one example message
    durations: list[float]                      # [n] seconds spent in reward calls for the sample
    seconds: float = 0.0                        # wall time of the whole score() call
    messages: list[str | None] = field(default_factory=list)  # [n] first failure message, if any

    def slowest(self) -> tuple[int, float]:
        """(sample index, seconds) of the slowest sample."""
        if not self.durations:
            return -1, 0.0
        i = max(range(len(self.durations)), key=self.durations.__getitem__)
        return i, self.durations[i]

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat numbers for a metrics log: mean/std of the total and of each function, shares."""
        out: dict[str, float] = {}
        n = max(len(self.status), 1)

        def stats(key, vals):
            v = [x for x in vals if x is not None]
            if v:
                m = sum(v) / len(v)
                out[f"{prefix}{key}mean"] = m
                out[f"{prefix}{key}std"] = math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

        stats("", self.rewards)
        for name, vals in self.per_function.items():
            stats(f"{name}/", vals)
        for st in STATUSES:
            if st != "ok":
                out[f"{prefix}frac_{st}"] = self.counts.get(st, 0) / n
        out[f"{prefix}seconds"] = self.seconds
        return out


@dataclass
class _Task:
    f: int              # function index
    idx: list[int]      # sample indices
    attempt: int = 0


class _Worker:
    """One subprocess, its connection and its marker file."""

    def __init__(self, payload: bytes, timeouts: list[float | None], memory_limit_mb: int | None,
                 start_timeout_s: float):
        # the marker lives in an unlinked temporary file shared by fd: nothing on disk to leak
        with tempfile.TemporaryFile() as f:
            f.write(b"\0" * 16)
            f.flush()
            self.mm = mmap.mmap(f.fileno(), 16)
            parent_sock, child_sock = socket.socketpair()
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "rewards._worker", str(child_sock.fileno()), str(f.fileno())],
                    pass_fds=[child_sock.fileno(), f.fileno()], env=env, stdin=subprocess.DEVNULL)
            finally:
                child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.task: _Task | None = None
        self.task_id = -1
        self.conn.send(("init", payload, timeouts, memory_limit_mb, os.getpid()))
        if not self.conn.poll(start_timeout_s):
            self.kill()
            raise RewardPoolError(f"reward worker did not start within {start_timeout_s} s")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise RewardPoolError(f"reward worker exited at start (exit code {self.proc.wait()})") from None
        if msg[0] != "ready":
            self.kill()
            raise RewardPoolError(f"reward worker failed to load the reward functions: {msg[1]}")

    def where(self) -> tuple[int, float]:
        """(position in the chunk, start time of the current call; 0 when between calls)."""
        pos, start = struct.unpack("dd", self.mm[:16])
        return int(pos), start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.close_handles()

    def stop(self, wait_s: float = 2.0) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        try:
            self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def close_handles(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        try:
            self.mm.close()
        except (BufferError, ValueError):
            pass


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "worker died"
    if code < 0:
        try:
            import signal

            return f"worker killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"worker killed by signal {-code}"
    return f"worker exited with code {code}"


def _shutdown(workers: list) -> None:
    for w in workers:
        if w is not None:
            w.stop(wait_s=1.0)


class RewardPool:
    """Score (prompt, completion, fields) samples with one or more reward functions.

    functions: a spec string, a `RewardSpec`, a YAML-style mapping, a `CompositeReward`, a callable,
        or a list of those (each with its weight; total = sum(weight * score)).
    num_workers: worker processes; 0 runs in this process (debugging: no crash isolation, time
        limits only in the main thread).
    timeout_s: per call (per sample; per chunk for batched functions), unless a spec sets its own.
    memory_limit_mb: address-space limit (RLIMIT_AS) of each worker; None for none.
    fallback: reward for a failed call (None: exclude the sample); a spec's own fallback wins.
    chunk_size: samples per message to a worker (default: n / (4 * workers), between 8 and 256);
        a batched function is called once per chunk.
    """

    def __init__(self, functions: Any, num_workers: int = 2, timeout_s: float | None = 10.0,
                 memory_limit_mb: int | None = 4096, fallback: float | None = 0.0,
                 chunk_size: int | None = None, base_dir: str | None = None,
                 start_timeout_s: float = 120.0):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if isinstance(functions, CompositeReward):
            self.composite = functions
        else:
            if isinstance(functions, (str, RewardSpec, Mapping, RewardFn)) or callable(functions):
                functions = [functions]
            specs = [f if isinstance(f, RewardSpec) else
                     RewardSpec(spec=f, name=f.name) if isinstance(f, RewardFn) else RewardSpec.from_config(f)
                     for f in functions]
            self.composite = CompositeReward(specs, base_dir=base_dir)
        self.functions = self.composite.functions
        self.names = self.composite.names
        self.weights = dict(zip(self.names, self.composite.weights))
        self.timeouts = [s.timeout_s if s.timeout_s is not None else timeout_s for s in self.composite.specs]
        self.fallbacks = [s.fallback if s.fallback is not None else fallback for s in self.composite.specs]
        self.num_workers = num_workers
        self.memory_limit_mb = memory_limit_mb
        self.chunk_size = chunk_size
        self.start_timeout_s = start_timeout_s
        self._logged: set[tuple[str, str]] = set()
        self._workers: list[_Worker | None] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        if num_workers:
            in_main = [f.name for f in self.functions if f.spec is None and getattr(f.fn, "__module__", "") == "__main__"]
            if in_main:
                self.close()
                raise RewardPoolError(f"reward functions {in_main} are defined in the __main__ script, which "
                                      "worker processes cannot import; load them by spec (file.py:function) "
                                      "or use num_workers=0")
            try:
                self._payload = pickle.dumps(self.functions)
            except Exception as e:
                self.close()
                raise RewardPoolError(f"reward functions cannot be sent to worker processes ({e}); "
                                      "define them in a file or module and load them by spec") from e
            try:
                for _ in range(num_workers):
                    self._workers.append(self._spawn())
            except BaseException:
                self.close()
                raise

    # -- lifecycle ----------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        return _Worker(self._payload, self.timeouts, self.memory_limit_mb, self.start_timeout_s)

    def close(self) -> None:
        """Stop and reap every worker (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w is not None]

    # -- scoring ------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], completions: Sequence[str],
              fields: Sequence[Mapping[str, Any]] | None = None) -> ScoreResult:
        """Score n samples with every function. `fields[i]` is sample i's dataset row (its other
        columns, e.g. ``answer``; add ``completion_tokens`` for token-based length rewards).
        Always returns a value or fallback for every sample; raises only on mismatched lengths or
        when a replacement worker cannot start."""
        if self._closed:
            raise RewardPoolError("score() on a closed RewardPool")
        n = len(completions)
        fields = [dict(r) for r in fields] if fields is not None else [{} for _ in range(n)]
        if not (len(prompts) == n == len(fields)):
            raise ValueError(f"prompts, completions and fields differ in length: "
                             f"{len(prompts)}, {n}, {len(fields)}")
        t0 = time.perf_counter()
        F = len(self.functions)
        out: list[list[tuple | None]] = [[None] * n for _ in range(F)]
        if n:
            if self.num_workers == 0:
                from rewards._exec import run_chunk

                for f, fn in enumerate(self.functions):
                    out[f] = run_chunk(fn, list(prompts), list(completions), fields, self.timeouts[f])
            else:
                for k, w in enumerate(self._workers):   # left busy by an interrupted call
                    if w is not None and w.task is not None:
                        w.kill()
                        self._workers[k] = None
                self._run_pool(prompts, completions, fields, out)
        return self._assemble(out, completions, time.perf_counter() - t0)

    def _chunks(self, n: int) -> list[list[int]]:
        size = self.chunk_size or max(8, min(256, math.ceil(n / (4 * max(self.num_workers, 1)))))
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def _run_pool(self, prompts, completions, fields, out) -> None:
        queue = collections.deque(_Task(f, idx) for f in range(len(self.functions)) for idx in self._chunks(len(prompts)))
        task_ids = iter(range(1 << 62))

        def record_failure(task: _Task, w: _Worker, status: str, msg: str) -> None:
            pos, start = w.where()
            if start > 0 and pos >= 0:            # died / hung inside one per-sample call
                bad = [task.idx[pos]]
            elif start > 0 or task.attempt > 0:   # inside a whole-chunk call, or failed twice
                bad = list(task.idx)
            else:                                 # between calls: retry the chunk once
                bad = []
            for i in bad:
                out[task.f][i] = (status, None, msg, time.monotonic() - start if start > 0 else 0.0)
            bad_set = set(bad)
            rest = [i for i in task.idx if i not in bad_set]
            if rest:
                queue.appendleft(_Task(task.f, rest, task.attempt + (0 if bad else 1)))

        while True:
            for k, w in enumerate(self._workers):
                if not queue:
                    break
                if w is None:
                    w = self._workers[k] = self._spawn()
                if w.task is None:
                    task = queue.popleft()
                    w.task, w.task_id = task, next(task_ids)
                    try:
                        w.conn.send(("run", w.task_id, task.f, [prompts[i] for i in task.idx],
                                     [completions[i] for i in task.idx], [fields[i] for i in task.idx]))
                    except OSError:
                        pass   # found dead below
            busy = [w for w in self._workers if w is not None and w.task is not None]
            if not busy:
                if not queue:
                    return
                continue
            ready = wait([w.conn for w in busy], timeout=0.05)
            now = time.monotonic()
            for w in busy:
                k = self._workers.index(w)
                task = w.task
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is not None and msg[0] == "done" and msg[1] == w.task_id:
                        for i, o in zip(task.idx, msg[2]):
                            out[task.f][i] = o
                        w.task = None
                        continue
                    if msg is not None:
                        continue
                    try:
                        code = w.proc.wait(5)
                    except subprocess.TimeoutExpired:   # connection lost but still running
                        code = None
                    record_failure(task, w, "crash", _exit_reason(code))
                    w.kill()
                    self._workers[k] = None
                    continue
                if w.proc.poll() is not None:
                    record_failure(task, w, "crash", _exit_reason(w.proc.returncode))
                    w.kill()
                    self._workers[k] = None
                    continue
                pos, start = w.where()
                limit = self.timeouts[task.f]
                if limit is not None and start > 0 and now - start > 2 * limit + 1:
                    record_failure(task, w, "timeout",
                                   f"no result within {limit} s; worker killed and replaced")
                    w.kill()
                    self._workers[k] = None

    def _assemble(self, out, completions, seconds: float) -> ScoreResult:
        n = len(completions)
        per_function: dict[str, list] = {}
        per_status: dict[str, list[str]] = {}
        durations = [0.0] * n
        messages: list[str | None] = [None] * n
        examples: dict[str, str] = {}
        for f, name in enumerate(self.names):
            vals, sts = [], []
            for i in range(n):
                st, v, msg, dt = out[f][i]
                durations[i] += dt
                if st in FAILURES:
                    v = self.fallbacks[f]
                    text = f"{name}: sample {i}: {msg}; completion {completions[i][:120]!r}"
                    if messages[i] is None:
                        messages[i] = f"{name}: {msg}"
                    examples.setdefault(st, text)
                    if (name, st) not in self._logged:
                        self._logged.add((name, st))
                        log.warning("reward %s -> %s (fallback %s): %s. Further %s results of %s are "
                                    "counted, not logged.", name, st, self.fallbacks[f], text, st, name)
                elif st == "none":
                    examples.setdefault("none", f"{name}: sample {i} returned None; completion "
                                                f"{completions[i][:120]!r}")
                vals.append(v)
                sts.append(st)
            per_function[name] = vals
            per_status[name] = sts
        rank = {s: k for k, s in enumerate(STATUSES)}
        status = [min((per_status[nm][i] for nm in self.names), key=rank.__getitem__) for i in range(n)]
        counts = {s: 0 for s in STATUSES}
        for s in status:
            counts[s] += 1
        return ScoreResult(rewards=combine(per_function, self.weights), per_function=per_function,
                           status=status, per_function_status=per_status, counts=counts,
                           examples=examples, durations=durations, seconds=seconds, messages=messages)
