"""Running tool calls with the episode's guards: `ToolSet` holds loaded tools by name and runs one call.

Unknown tool / bad arguments / raising tool / timeout / non-text / oversized result all become an
error text for the model and a status for the counters (`ToolOutcome`), never an exception. Sync
tools run on a pool of daemon threads, async ones on one event-loop thread; one daemon thread fires
every pending call's timeout.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from model.errors import ConfigError
from rollout.agent.tools import Tool, check_tool, tool_schema


def _is_async(t: Any) -> bool:
    return any(inspect.iscoroutinefunction(f) for f in (t, getattr(t, "__call__", None), getattr(t, "fn", None))
               if f is not None)


@dataclass
class ToolOutcome:
    """The result of one call as the model will see it, and why.

    status: ok | unknown_tool | bad_arguments | error (raised) | timeout | bad_result (not text);
    truncated: the text was cut to max_result_chars.
    """

    text: str
    status: str
    truncated: bool = False
    seconds: float = 0.0


class ToolSet:
    """Loaded tools by name, and a guarded, asynchronous `submit(name, arguments) -> Future[ToolOutcome]`.

    Sync tools run on a thread pool (`workers` threads), async ones on one event-loop thread. The
    future always resolves by `timeout_s` after submission: a tool still running then is reported
    as a timeout (an async one is cancelled; a sync thread cannot be killed and keeps its pool
    thread until it returns; the python built-in kills its own process at its timeout).
    """

    def __init__(self, tools: list[Tool] | Mapping[str, Tool], timeout_s: float = 10.0,
                 max_result_chars: int = 2000, workers: int = 8, validate_arguments: bool = True):
        items = list(tools.values()) if isinstance(tools, Mapping) else list(tools)
        self.tools: dict[str, Tool] = {}
        for t in items:
            check_tool(t, getattr(t, "name", repr(t)))
            if t.name in self.tools:
                raise ConfigError(f"duplicate tool name {t.name!r}")
            self.tools[t.name] = t
        self.timeout_s = timeout_s
        self.max_result_chars = max_result_chars
        self.validate_arguments = validate_arguments
        self._pool = _DaemonPool(workers)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._validators: dict[str, Any] = {}

    def schemas(self) -> list[dict]:
        """OpenAI-style declarations of every tool (for prompts and the `tool_call` reward's `tools`)."""
        return [tool_schema(t) for t in self.tools.values()]

    def close(self) -> None:
        self._pool.shutdown()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- helpers
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="tool-async", daemon=True).start()
                self._loop = loop
            return self._loop

    def _check_arguments(self, t: Tool, args: dict) -> str | None:
        if not self.validate_arguments:
            return None
        try:
            import jsonschema
        except ImportError:
            req = [k for k in t.parameters.get("required", []) if k not in args]
            return f"missing required arguments {req}" if req else None
        v = self._validators.get(t.name)
        if v is None:
            v = jsonschema.validators.validator_for(t.parameters)(t.parameters)
            self._validators[t.name] = v
        err = jsonschema.exceptions.best_match(v.iter_errors(args))
        return None if err is None else err.message[:300]

    def _finish_text(self, value: Any) -> ToolOutcome:
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return ToolOutcome(f"error: the tool returned {type(value).__name__}, not text", "bad_result")
        if len(value) > self.max_result_chars:
            cut = len(value) - self.max_result_chars
            return ToolOutcome(value[:self.max_result_chars] + f"\n[truncated {cut} characters]", "ok", True)
        return ToolOutcome(value, "ok")

    # -- the call
    def call(self, name: str, arguments: dict) -> ToolOutcome:
        """Blocking form of `submit` (same guards and timeout)."""
        return self.submit(name, arguments).result()

    def submit(self, name: str | None, arguments: dict) -> Future:
        """Start a call; -> Future[ToolOutcome], resolved at the latest `timeout_s` after this call."""
        out: Future = Future()
        t0 = time.perf_counter()

        def resolve(o: ToolOutcome) -> None:
            o.seconds = time.perf_counter() - t0
            with self._lock:
                if not out.done():
                    out.set_result(o)

        t = self.tools.get(name) if name is not None else None
        if t is None:
            resolve(ToolOutcome(f"error: unknown tool {name!r} (available: {', '.join(self.tools)})",
                                "unknown_tool"))
            return out
        bad = self._check_arguments(t, arguments)
        if bad is not None:
            resolve(ToolOutcome(f"error: invalid arguments for {name}: {bad}", "bad_arguments"))
            return out

        def on_error(e: BaseException) -> ToolOutcome:
            return ToolOutcome(f"error: {type(e).__name__}: {str(e)[:500]}", "error")

        def run_sync():
            try:
                resolve(self._finish_text(t(**arguments)))
            except BaseException as e:   # the tool's own failure is text for the model
                resolve(on_error(e))

        is_async = _is_async(t)
        if getattr(t, "inline", False) is True and not is_async:   # cheap and bounded: right here
            run_sync()
            return out
        _DEADLINES.add(t0 + self.timeout_s, out, lambda: resolve(
            ToolOutcome(f"error: tool {name} timed out after {self.timeout_s:g} s", "timeout")))
        if is_async:
            async def run_async():
                return await asyncio.wait_for(t(**arguments), self.timeout_s)

            cf = asyncio.run_coroutine_threadsafe(run_async(), self._event_loop())

            def done_async(f):
                try:
                    resolve(self._finish_text(f.result()))
                except (asyncio.TimeoutError, TimeoutError):
                    resolve(ToolOutcome(f"error: tool {name} timed out after {self.timeout_s:g} s", "timeout"))
                except BaseException as e:   # the tool's own failure is text for the model
                    resolve(on_error(e))
            cf.add_done_callback(done_async)
            return out

        if not self._pool.submit(run_sync):
            resolve(ToolOutcome("error: the tool set is closed", "error"))
        return out


class _Deadlines:
    """One daemon thread firing the timeouts of all pending calls (a `threading.Timer` per call cost a
    thread start, ~1 ms of the decode thread's time, per tool call). `add(when, fut, fire)` calls
    `fire()` at `when` (perf_counter seconds) unless `fut` is done by then."""

    def __init__(self):
        self._heap: list[tuple[float, int, Future, Callable[[], None]]] = []
        self._cv = threading.Condition()
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, when: float, fut: Future, fire: Callable[[], None]) -> None:
        if self._pid != os.getpid():     # a forked child: the parent's thread did not come along
            self.__init__()
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, fut, fire))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tool-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0][1] == self._seq:    # the new one is the earliest: re-arm the wait
                self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][2].done():     # answered in time: drop
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                delay = self._heap[0][0] - time.perf_counter()
                if delay > 0:
                    self._cv.wait(min(delay, 1.0))   # wakes for an earlier deadline, or re-checks done ones
                    continue
                _, _, fut, fire = heapq.heappop(self._heap)
            if not fut.done():
                fire()


_DEADLINES = _Deadlines()


class _DaemonPool:
    """A fixed set of daemon threads over a queue: a tool that never returns holds one thread but
    cannot block interpreter exit (ThreadPoolExecutor joins its threads at exit). A thread is started
    only when no started one is idle (a thread start blocks the caller for ~1 ms)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False
        self._lock = threading.Lock()

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            with self._lock:
                self._idle -= 1
            if fn is None:
                return
            fn()
            with self._lock:
                self._idle += 1

    def submit(self, fn: Callable[[], None]) -> bool:
        with self._lock:
            if self._closed:
                return False
            if self._idle <= self._q.qsize() and len(self._threads) < self.workers:
                t = threading.Thread(target=self._run, name=f"tool-{len(self._threads)}", daemon=True)
                self._idle += 1
                t.start()
                self._threads.append(t)
        self._q.put(fn)
        return True

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._q.put(None)
