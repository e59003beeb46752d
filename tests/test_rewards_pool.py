"""RewardPool: isolation, time limits, fallbacks, counting, worker replacement, clean shutdown."""

import gc
import os
import textwrap
import threading
import time

import pytest

from rewards import RewardPool, RewardPoolError, RewardSpec, RewardSpecError

BAD = textwrap.dedent('''
    import ctypes, math, os, signal, time
    import rewards

    def misbehave(prompt, completion, **fields):
        if completion == "raise":
            raise ValueError("user bug")
        if completion == "hang":
            while True:
                pass
        if completion == "sleep":
            time.sleep(60)
        if completion == "exit":
            os._exit(3)
        if completion == "segfault":
            ctypes.string_at(0)
        if completion == "nan":
            return math.nan
        if completion == "inf":
            return float("inf")
        if completion == "str":
            return "1.0"
        if completion == "list":
            return [1.0]
        if completion == "none":
            return None
        if completion == "memory":
            return len(bytearray(4 * 1024 ** 3))
        if completion == "swallow":        # catches everything and blocks the alarm signal
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(30)
        return 1.0

    def pid(prompt, completion, **fields):
        return float(os.getpid())

    @rewards.batched
    def short_batch(prompts, completions, **columns):
        return [1.0] * (len(completions) - 1)

    @rewards.batched
    def good_batch(prompts, completions, answer=None, **columns):
        return [float(c == str(a)) for c, a in zip(completions, answer)]

    async def async_len(prompt, completion, **fields):
        import asyncio
        if completion == "hang":
            await asyncio.sleep(60)
        await asyncio.sleep(0.05)
        return float(len(completion))
''')


@pytest.fixture
def bad_file(tmp_path):
    p = tmp_path / "bad_rewards.py"
    p.write_text(BAD)
    return str(p)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_every_failure_gives_fallback_is_counted_and_pool_continues(bad_file):
    cases = ["ok", "raise", "ok", "hang", "exit", "ok", "segfault", "nan", "inf", "str", "list", "none",
             "memory", "ok"]
    expected = {"ok": "ok", "raise": "error", "hang": "timeout", "exit": "crash", "segfault": "crash",
                "nan": "invalid", "inf": "invalid", "str": "invalid", "list": "invalid", "none": "none",
                "memory": "crash"}
    with RewardPool(f"{bad_file}:misbehave", num_workers=2, timeout_s=1, memory_limit_mb=1024,
                    fallback=-0.5, chunk_size=4) as pool:
        pids_before = set(pool.worker_pids())
        res = pool.score(["p"] * len(cases), cases, [{} for _ in cases])
        assert res.status == [expected[c] for c in cases], list(zip(cases, res.status, res.messages))
        assert res.rewards == [None if c == "none" else 1.0 if c == "ok" else -0.5 for c in cases]
        assert res.counts == {"ok": 4, "error": 1, "timeout": 1, "crash": 3, "invalid": 4, "none": 1}
        assert "user bug" in res.examples["error"] and "ValueError" in res.examples["error"]
        assert "within 1" in res.examples["timeout"]
        msgs = " | ".join(m for m in res.messages if m)
        assert "exited with code 3" in msgs and "SIGSEGV" in msgs and "MemoryError" in msgs
        assert "returned nan" in msgs and "returned str" in msgs
        # dead workers were replaced (replacements start when work is waiting); the pool keeps working
        assert set(pool.worker_pids()) != pids_before and all(_alive(p) for p in pool.worker_pids())
        again = pool.score(["p"] * 20, ["ok", "raise"] * 10)
        assert again.status == ["ok", "error"] * 10 and again.rewards == [1.0, -0.5] * 10
        pids = pool.worker_pids() + list(pids_before)
    assert not any(_alive(p) for p in pids)


def test_hard_timeout_kills_a_worker_that_ignores_the_alarm(bad_file):
    with RewardPool(f"{bad_file}:misbehave", num_workers=1, timeout_s=1) as pool:
        old = pool.worker_pids()[0]
        t0 = time.monotonic()
        res = pool.score(["p"] * 3, ["ok", "swallow", "ok"])
        assert time.monotonic() - t0 < 8
        assert res.status == ["ok", "timeout", "ok"] and res.rewards == [1.0, 0.0, 1.0]
        assert "killed" in res.messages[1]
        assert not _alive(old) and pool.worker_pids()[0] != old


def test_failure_logged_once_per_function_and_reason(bad_file, caplog):
    with RewardPool(f"{bad_file}:misbehave", num_workers=1, timeout_s=1) as pool:
        with caplog.at_level("WARNING", logger="rewards.pool"):
            pool.score(["p"] * 3, ["raise", "raise", "nan"])
            pool.score(["p"] * 2, ["raise", "nan"])
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2
    assert any("-> error" in m and "user bug" in m for m in logged)
    assert any("-> invalid" in m for m in logged)


def test_batched_wrong_length_and_weighted_composite(bad_file):
    specs = [RewardSpec(spec=f"{bad_file}:good_batch", weight=2.0),
             RewardSpec(spec=f"{bad_file}:short_batch", weight=1.0, fallback=0.25)]
    with RewardPool(specs, num_workers=1, timeout_s=2) as pool:
        res = pool.score(["p"] * 3, ["1", "2", "x"], [{"answer": 1}, {"answer": 5}, {"answer": "x"}])
    assert res.per_function["good_batch"] == [1.0, 0.0, 1.0]
    assert res.per_function["short_batch"] == [0.25] * 3
    assert res.per_function_status["short_batch"] == ["invalid"] * 3
    assert "returned 2 values for a batch of 3" in res.examples["invalid"]
    assert res.rewards == [2.25, 0.25, 2.25]


def test_async_functions_run_concurrently_with_per_call_timeout(bad_file):
    with RewardPool(f"{bad_file}:async_len", num_workers=1, timeout_s=1, chunk_size=64) as pool:
        t0 = time.monotonic()
        res = pool.score(["p"] * 41, ["abc"] * 40 + ["hang"])
        elapsed = time.monotonic() - t0
    assert res.rewards[:40] == [3.0] * 40 and res.status[40] == "timeout"
    assert elapsed < 4          # 40 x 50 ms sequentially would be 2 s plus the 1 s timeout


def test_chunks_spread_over_workers_and_order_is_kept(bad_file):
    with RewardPool(f"{bad_file}:pid", num_workers=2, timeout_s=5) as pool:
        res = pool.score(["p"] * 200, ["x"] * 200)
        workers = set(pool.worker_pids())
    assert {int(r) for r in res.rewards} == workers     # both workers did work
    with RewardPool("format", num_workers=2) as pool:
        comps = [f"<think>r</think> {i}" if i % 3 else str(i) for i in range(500)]
        res = pool.score(["p"] * 500, comps)
    assert res.rewards == [0.0 if i % 3 == 0 else 1.0 for i in range(500)]


def test_in_process_mode_matches_pool(bad_file):
    comps = ["ok", "raise", "nan", "none", "hang"]
    with RewardPool(f"{bad_file}:misbehave", num_workers=0, timeout_s=1) as pool:
        assert pool.worker_pids() == []
        res = pool.score(["p"] * 5, comps)
    assert res.status == ["ok", "error", "invalid", "none", "timeout"]
    assert res.rewards == [1.0, 0.0, 0.0, None, 0.0]


def test_close_and_garbage_collection_leave_no_processes(bad_file):
    pool = RewardPool(f"{bad_file}:misbehave", num_workers=2, timeout_s=1)
    pids = pool.worker_pids()
    assert all(_alive(p) for p in pids)
    pool.close()
    pool.close()   # idempotent
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RewardPoolError, match="closed"):
        pool.score(["p"], ["ok"])
    pool = RewardPool(f"{bad_file}:misbehave", num_workers=1)
    pids = pool.worker_pids()
    del pool
    gc.collect()
    assert not any(_alive(p) for p in pids)


def test_usable_from_a_non_main_thread(bad_file):
    """Ray actors call methods from worker threads: the pool must not depend on the main thread."""
    out = {}

    def run():
        with RewardPool(f"{bad_file}:misbehave", num_workers=1, timeout_s=1) as pool:
            out["res"] = pool.score(["p"] * 2, ["hang", "ok"])

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert out["res"].status == ["timeout", "ok"]


def test_bad_inputs_and_load_errors(bad_file, tmp_path):
    with pytest.raises(RewardSpecError, match="has no function 'nope'"):
        RewardPool(f"{bad_file}:nope", num_workers=1)
    with pytest.raises(ValueError, match="differ in length"):
        with RewardPool("format", num_workers=0) as pool:
            pool.score(["p"], ["a", "b"])
    with RewardPool("format", num_workers=0) as pool:
        empty = pool.score([], [])
    assert empty.rewards == [] and empty.counts["ok"] == 0
    # a worker that cannot load the functions fails at construction, naming the cause
    vanish = tmp_path / "vanish.py"
    vanish.write_text("import os\nif os.getpid() != %d:\n    raise ImportError('only in the parent')\n"
                      "def f(prompt, completion):\n    return 1.0\n" % os.getpid())
    with pytest.raises(RewardPoolError, match="only in the parent"):
        RewardPool(f"{vanish}:f", num_workers=1)


def test_metrics_for_logging(bad_file):
    with RewardPool(f"{bad_file}:misbehave", num_workers=0) as pool:
        res = pool.score(["p"] * 4, ["ok", "ok", "raise", "none"])
    m = res.metrics()
    assert m["reward/mean"] == pytest.approx(2 / 3)
    assert m["reward/frac_error"] == 0.25 and m["reward/frac_none"] == 0.25
    assert m["reward/misbehave/mean"] == pytest.approx(2 / 3)


def test_workers_exit_when_the_parent_is_killed(bad_file, tmp_path):
    """A SIGKILLed driver (OOM killer, Ray actor kill) must not leave busy workers behind."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "driver.py"
    script.write_text(
        "import sys\nfrom rewards import RewardPool\n"
        f"pool = RewardPool({bad_file + ':misbehave'!r}, num_workers=1, timeout_s=60)\n"
        "print(pool.worker_pids()[0], flush=True)\n"
        "pool.score(['p'], ['sleep'])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": root})
    worker = int(proc.stdout.readline())
    time.sleep(0.3)                        # the worker is now inside the 60 s call
    assert _alive(worker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 6
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def test_loaded_reward_fn_objects_are_accepted(bad_file):
    from rewards import load_reward

    fn = load_reward(f"{bad_file}:misbehave")
    with RewardPool([fn, RewardSpec(spec="format", weight=0.5)], num_workers=1, timeout_s=2) as pool:
        res = pool.score(["p"] * 2, ["ok", "raise"])
    assert pool.names == ["misbehave", "format"]
    assert res.per_function["misbehave"] == [1.0, 0.0] and res.status == ["ok", "error"]


@pytest.mark.timeout(60)
def test_interrupted_score_does_not_break_the_next_call(bad_file, monkeypatch):
    import rewards.pool as rp

    real_wait, calls = rp.wait, []

    def interrupting(conns, timeout=None):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt   # e.g. Ctrl-C while a chunk is out at a worker
        return real_wait(conns, timeout)

    with RewardPool(f"{bad_file}:misbehave", num_workers=1, timeout_s=2) as pool:
        monkeypatch.setattr(rp, "wait", interrupting)
        with pytest.raises(KeyboardInterrupt):
            pool.score(["p"] * 3, ["ok"] * 3)
        res = pool.score(["p"] * 3, ["ok", "raise", "ok"])
    assert res.status == ["ok", "error", "ok"]


def test_unpicklable_callable_needs_in_process_mode():
    fn = lambda prompt, completion, **f: 1.0  # noqa: E731
    with pytest.raises(RewardPoolError, match="cannot be sent to worker processes"):
        RewardPool(fn, num_workers=1)
    with RewardPool(fn, num_workers=0) as pool:
        assert pool.score(["p"], ["c"]).rewards == [1.0]


def test_function_from_main_script_gets_a_clear_error(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text("from rewards import RewardPool, RewardPoolError\n"
                      "def f(prompt, completion):\n    return 1.0\n"
                      "try:\n    RewardPool(f, num_workers=1)\nexcept RewardPoolError as e:\n    print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": root})
    assert "defined in the __main__ script" in out.stdout and "file.py:function" in out.stdout
