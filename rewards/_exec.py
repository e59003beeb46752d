"""Running one reward function over a chunk of samples, with a per-call time limit.

Shared by the worker processes and the pool's in-process mode. Each call gets a soft limit
(SIGALRM raising `CallTimeout` inside the call; only in the main thread on POSIX); the pool adds a
hard limit from outside (kill the worker) for code that ignores or blocks the signal.
Every outcome becomes a tuple ``(status, value, message, seconds)``; nothing raises out of here
except `BaseException`s that are not ours (KeyboardInterrupt, SystemExit).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.api import InvalidReward, RewardFn, check_batch, to_reward

Outcome = tuple[str, "float | None", "str | None", float]


class CallTimeout(BaseException):
    """Raised inside a reward call when its time limit passes (BaseException: user code that
    catches `Exception` does not swallow it)."""


class Marker:
    """Where the executor is: written before/after each call so the parent can tell which call
    hung or crashed. ``pos`` is the sample's position in the chunk, -1 for a whole-chunk call."""

    def set(self, pos: int) -> None:
        pass

    def clear(self) -> None:
        pass


def _on_alarm(signum, frame):
    raise CallTimeout()


class _Alarm:
    """SIGALRM-based soft limit. The handler is installed once (``with``); `arm` / `disarm` around
    each call only set the interval timer, which keeps the per-call cost near a microsecond."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.enabled = (timeout_s is not None and hasattr(signal, "setitimer")
                        and threading.current_thread() is threading.main_thread())

    def __enter__(self):
        if self.enabled:
            self._old = signal.signal(signal.SIGALRM, _on_alarm)
        return self

    def arm(self) -> None:
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, self.timeout_s)

    def disarm(self) -> None:
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __exit__(self, *exc):
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)
        return False


def _describe(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {str(e)[:300]}{where}"


def _classify(value: Any) -> tuple[str, float | None, str | None]:
    try:
        v = to_reward(value)
    except InvalidReward as e:
        return "invalid", None, str(e)
    return ("none", None, None) if v is None else ("ok", v, None)


def _exception_outcome(e: BaseException, timeout_s: float | None) -> tuple[str, None, str]:
    if isinstance(e, (CallTimeout, asyncio.TimeoutError)):
        return "timeout", None, f"no result within {timeout_s} s"
    if isinstance(e, MemoryError):   # the worker's memory limit: counted with the crashes
        return "crash", None, f"{_describe(e)} (memory limit reached)"
    return "error", None, _describe(e)


def run_chunk(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
              rows: Sequence[Mapping[str, Any]], timeout_s: float | None,
              marker: Marker | None = None) -> list[Outcome]:
    marker = marker or Marker()
    n = len(prompts)
    if fn.batched:
        t0 = time.perf_counter()
        marker.set(-1)
        try:
            with _Alarm(timeout_s) as alarm:
                alarm.arm()
                out = fn.fn(list(prompts), list(completions), **fn.columns_for(rows))
                if fn.is_async:
                    out = asyncio.run(asyncio.wait_for(_await(out), timeout_s))
        except (Exception, CallTimeout) as e:
            st, v, msg = _exception_outcome(e, timeout_s)
            dt = (time.perf_counter() - t0) / max(n, 1)
            return [(st, v, msg, dt)] * n
        finally:
            marker.clear()
        dt = (time.perf_counter() - t0) / max(n, 1)
        try:
            values = check_batch(out, n, fn.name)
        except InvalidReward as e:
            return [("invalid", None, str(e), dt)] * n
        return [(*_classify(v), dt) for v in values]
    if fn.is_async:
        return _run_async_chunk(fn, prompts, completions, rows, timeout_s, marker)
    results: list[Outcome] = []
    with _Alarm(timeout_s) as alarm:
        for i in range(n):
            t0 = time.perf_counter()
            marker.set(i)
            try:
                try:
                    alarm.arm()
                    out = fn.fn(prompts[i], completions[i], **fn.kwargs_for(rows[i]))
                finally:
                    alarm.disarm()
                st, v, msg = _classify(out)
            except (Exception, CallTimeout) as e:
                st, v, msg = _exception_outcome(e, timeout_s)
            finally:
                marker.clear()
            results.append((st, v, msg, time.perf_counter() - t0))
    return results


async def _await(x):
    return await x


def _run_async_chunk(fn, prompts, completions, rows, timeout_s, marker) -> list[Outcome]:
    """Per-sample async functions run concurrently within the chunk, each with its own limit."""

    async def one(i):
        t0 = time.perf_counter()
        try:
            coro = fn.fn(prompts[i], completions[i], **fn.kwargs_for(rows[i]))
            out = await asyncio.wait_for(coro, timeout_s)
            st, v, msg = _classify(out)
        except Exception as e:
            st, v, msg = _exception_outcome(e, timeout_s)
        return st, v, msg, time.perf_counter() - t0

    async def all_():
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    marker.set(-1)
    # soft limit for the whole chunk in case a coroutine blocks the event loop
    chunk_limit = None if timeout_s is None else timeout_s * 1.5
    t0 = time.perf_counter()
    try:
        with _Alarm(chunk_limit) as alarm:
            alarm.arm()
            return list(asyncio.run(all_()))
    except (Exception, CallTimeout) as e:
        st, v, msg = _exception_outcome(e, timeout_s)
        dt = (time.perf_counter() - t0) / max(len(prompts), 1)
        return [(st, v, msg, dt)] * len(prompts)
    finally:
        marker.clear()
