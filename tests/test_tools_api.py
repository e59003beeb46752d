"""Tools: the calculator, tool-call parsing, loading specs from YAML, and ToolSet's guards."""

import asyncio
import json
import textwrap
import threading
import time

import pytest

from model.errors import ConfigError
from rollout.agent.toolcall import ToolCallStream, find_calls, last_call, parse_call_body
from rollout.agent.calculator import CalcError, Calculator
from rollout.agent.loader import load_tool, load_tools
from rollout.agent.python_tool import PythonTool
from rollout.agent.runner import ToolSet
from rollout.agent.tools import FunctionTool, tool, tool_schema


# ----------------------------------------------------------------------------- calculator
@pytest.mark.parametrize("expr,want", [
    ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("-3 ** 2", "-9"), ("2 ** 3 ** 2", "512"),
    ("7 / 2", "3.5"), ("1 / 3", "0.333333333333"), ("10 // 3", "3"), ("-7 % 3", "2"), ("2 ** -2", "0.25"),
    ("123456789123456789 * 987654321987654321", str(123456789123456789 * 987654321987654321)),
    ("0.1 + 0.2", "0.3"), ("48213 × 9917", str(48213 * 9917)), ("2^10", "1024"),
])
def test_calculator_exact_results(expr, want):
    assert Calculator()(expr) == want


@pytest.mark.parametrize("expr,msg", [
    ("1 / 0", "division by zero"), ("2 +", "end of expression"), ("__import__('os')", "unexpected character"),
    ("9 ** 9 ** 9", "exponent"), ("10 ** 5000", "digits"), ("(" * 150 + "1" + ")" * 150, "nested"),
    ("1" * 2000, "longer than"), ("2 ** 0.5", "integer exponents"), ("(1 + 2", "end of expression"),
])
def test_calculator_refuses_with_a_message_and_never_hangs(expr, msg):
    t0 = time.perf_counter()
    with pytest.raises(CalcError, match=msg):
        Calculator()(expr)
    assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------- parsing
def test_parse_call_body_good_and_malformed():
    c = parse_call_body(' {"name": "calculator", "arguments": {"expression": "1+1"}} ')
    assert c.ok and c.name == "calculator" and c.arguments == {"expression": "1+1"}
    c = parse_call_body('{"function": {"name": "f", "arguments": "{\\"x\\": 1}"}}')   # OpenAI form
    assert c.ok and c.name == "f" and c.arguments == {"x": 1}
    for body, msg in [("", "empty"), ("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                      ('{"arguments": {}}', "no 'name'"), ('{"name": "f", "arguments": [1]}', "must be a JSON object"),
                      ('{"name": "f", "arguments": "x=1"}', "not JSON")]:
        c = parse_call_body(body)
        assert not c.ok and msg in c.error, (body, c.error)


def test_stream_parser_handles_tags_split_across_chunks():
    text = 'think <tool_call>{"name": "a", "arguments": {}}</tool_call> and <tool_call>{"name": "b"}</tool_call>!'
    for size in (1, 3, 7, len(text)):
        s = ToolCallStream()
        got = []
        for i in range(0, len(text), size):
            got += s.feed(text[i:i + size])
        assert [c.name for c in got] == ["a", "b"], size
        assert not s.open
    assert [c.name for c in find_calls(text)] == ["a", "b"]


def test_stream_parser_bounds_an_unclosed_call():
    s = ToolCallStream(max_call_chars=50)
    assert s.feed("<tool_call>{") == [] and s.open
    out = s.feed("x" * 100)
    assert len(out) == 1 and not out[0].ok and "longer than 50" in out[0].error and not s.open


def test_last_call_takes_the_call_closed_at_the_end():
    assert last_call('<tool_call>{"name": "x"}</tool_call>').name == "x"
    c = last_call('no opening tag</tool_call>')
    assert not c.ok and "without a preceding" in c.error


# ----------------------------------------------------------------------------- loading
def test_load_builtin_file_and_module_specs(tmp_path):
    (tmp_path / "my_tools.py").write_text(textwrap.dedent('''
        from rollout.agent.tools import tool

        @tool(parameters={"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]})
        def search(q):
            "Search the corpus."
            return "found " + q

        def echo(text: str, times: int = 1):
            "Echo."
            return text * times

        class Lookup:
            name = "lookup"
            description = "table lookup"
            parameters = {"type": "object", "properties": {"key": {"type": "string"}}}
            def __init__(self, table):
                self.table = table
            def __call__(self, key):
                return self.table.get(key, "missing")

        not_a_tool = 42
    '''))
    tools = load_tools(["calculator", {"spec": "python", "kwargs": {"timeout_s": 2}},
                        {"spec": "my_tools.py:search"}, {"spec": "my_tools.py:echo"},
                        {"spec": "my_tools.py:Lookup", "kwargs": {"table": {"a": "1"}}, "name": "kv"},
                        {"spec": "rollout.agent.tools:Calculator", "name": "calc2"}], base_dir=str(tmp_path))
    by = {t.name: t for t in tools}
    assert sorted(by) == ["calc2", "calculator", "echo", "kv", "python", "search"]
    assert isinstance(by["python"], PythonTool) and by["python"].config.timeout_s == 2
    assert by["search"](q="x") == "found x" and by["kv"](key="a") == "1" and by["calc2"](expression="6*7") == "42"
    assert by["echo"].parameters == {"type": "object", "properties": {"text": {"type": "string"},
                                                                     "times": {"type": "integer"}},
                                     "required": ["text"]}
    assert tool_schema(by["search"])["function"]["description"] == "Search the corpus."


@pytest.mark.parametrize("spec,msg", [
    ("no_such_builtin", "unknown built-in tool 'no_such_builtin'"),
    ("missing.py:f", "file not found"),
    ("my_tools.py:nope", "has no object 'nope'"),
    ("my_tools.py:not_a_tool", "int has no name"),
    ("my_tools.py:NoSchema", "has no parameters"),
    ("my_tools.py:BadSchema", "parameters must be a JSON Schema"),
    ("my_tools.py:Needs", "cannot construct"),
    ("no_such_pkg_xyz.mod:f", "cannot import module"),
    ("broken.py:f", "importing"),
])
def test_bad_specs_fail_at_load_naming_the_spec(tmp_path, spec, msg):
    (tmp_path / "my_tools.py").write_text(textwrap.dedent('''
        not_a_tool = 42
        class NoSchema:
            name = "x"; description = ""
            def __call__(self): return ""
        class BadSchema:
            name = "x"; description = ""; parameters = {"type": "string"}
            def __call__(self): return ""
        class Needs:
            name = "x"; description = ""; parameters = {"type": "object"}
            def __init__(self, required_option): pass
            def __call__(self): return ""
    '''))
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(ConfigError, match=msg) as e:
        load_tools([spec], base_dir=str(tmp_path))
    assert spec.split(":")[0] in str(e.value)


def test_duplicate_names_and_bad_yaml_entries_are_config_errors():
    with pytest.raises(ConfigError, match="duplicate tool names"):
        load_tools(["calculator", "calculator"])
    with pytest.raises(ConfigError, match=r"tools\[0\]: unknown keys \['weight'\]"):
        load_tools([{"spec": "calculator", "weight": 1}])


# ----------------------------------------------------------------------------- ToolSet guards
def test_toolset_turns_failures_into_text_and_status():
    release = threading.Event()

    @tool
    def raises(x: int):
        "raises"
        raise ValueError(f"bad x {x}")

    @tool
    def hangs():
        "never returns (until the test ends)"
        release.wait(60)
        return "late"

    @tool
    def huge():
        "1 MB of text"
        return "y" * (1 << 20)

    @tool
    def not_text():
        "returns an object"
        return object()

    @tool
    async def slow_async():
        "async, too slow"
        await asyncio.sleep(30)
        return "never"

    @tool
    async def fine_async(x: int):
        "async, fine"
        await asyncio.sleep(0.01)
        return {"double": 2 * x}

    ts = ToolSet([raises, hangs, huge, not_text, slow_async, fine_async, Calculator()], timeout_s=0.5,
                 max_result_chars=1000, workers=2)
    try:
        t0 = time.perf_counter()
        futs = {k: ts.submit(*a) for k, a in {
            "raises": ("raises", {"x": 3}), "hangs": ("hangs", {}), "huge": ("huge", {}),
            "not_text": ("not_text", {}), "slow_async": ("slow_async", {}), "fine_async": ("fine_async", {"x": 4}),
            "unknown": ("nope", {}), "bad_args": ("raises", {"x": "three"}),
            "calc_error": ("calculator", {"expression": "1/0"})}.items()}
        out = {k: f.result(timeout=5) for k, f in futs.items()}
        assert time.perf_counter() - t0 < 3.0            # all resolved by the timeout, none blocked
        assert out["raises"].status == "error" and "ValueError: bad x 3" in out["raises"].text
        assert out["hangs"].status == "timeout" and "timed out after 0.5 s" in out["hangs"].text
        assert out["huge"].status == "ok" and out["huge"].truncated
        assert out["huge"].text.startswith("y" * 1000) and len(out["huge"].text) < 1100
        assert "[truncated 1047576 characters]" in out["huge"].text
        assert out["not_text"].status == "bad_result"
        assert out["slow_async"].status == "timeout"
        assert out["fine_async"].status == "ok" and json.loads(out["fine_async"].text) == {"double": 8}
        assert out["unknown"].status == "unknown_tool" and "available" in out["unknown"].text
        assert out["bad_args"].status == "bad_arguments" and "'three' is not of type 'integer'" in out["bad_args"].text
        assert out["calc_error"].status == "error" and "division by zero" in out["calc_error"].text
        # a hung sync tool holds one of the 2 threads; the other still serves calls
        assert ts.call("calculator", {"expression": "2+2"}).text == "4"
    finally:
        release.set()
        ts.close()


def test_toolset_starts_no_thread_per_call_and_keeps_each_calls_own_deadline(monkeypatch):
    """Fast calls reuse idle pool threads (no thread start, no timer thread per call); a short
    deadline submitted after a long one still fires on time."""
    release = threading.Event()
    starts = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (starts.append(self.name), real_start(self))[1])

    @tool
    def hangs():
        "never returns (until the test ends)"
        release.wait(60)
        return "late"

    slow = ToolSet([hangs], timeout_s=30, workers=2)
    fast = ToolSet([Calculator(), hangs], timeout_s=0.3, workers=8)
    try:
        long_wait = slow.submit("hangs", {})        # 30 s deadline, queued first
        starts.clear()
        outs = [fast.call("calculator", {"expression": f"{i}*3"}) for i in range(50)]
        assert [o.text for o in outs] == [str(3 * i) for i in range(50)]
        assert len(starts) <= 1, starts                  # at most one pool thread for 50 sequential calls
        t0 = time.perf_counter()
        short = fast.submit("hangs", {})
        assert short.result(timeout=5).status == "timeout"
        assert 0.25 < time.perf_counter() - t0 < 2.0
        assert not long_wait.done()
    finally:
        release.set()
        slow.close()
        fast.close()


def test_function_tool_and_interface_check():
    ft = FunctionTool(lambda a, b=2: str(a * b), name="mul", description="multiply")
    assert ft(a=3) == "6" and ft.parameters["required"] == ["a"]
    with pytest.raises(ConfigError, match="name must be an identifier"):
        load_tool(FunctionTool(lambda: "", name="bad name"))


def test_inline_tools_run_on_the_calling_thread_and_the_others_on_tool_threads():
    """`inline = True` (the calculator): the Future is resolved when submit returns, computed on the
    caller's thread, failures still text; other sync tools run on the pool's threads."""
    import threading

    from rollout.agent.calculator import Calculator
    from rollout.agent.runner import ToolSet
    from rollout.agent.tools import FunctionTool

    seen = {}

    class Where(Calculator):
        name = "where"

        def __call__(self, expression: str) -> str:
            seen["inline"] = threading.get_ident()
            return super().__call__(expression)

    def pooled(x: str) -> str:
        seen["pooled"] = threading.get_ident()
        return x

    with ToolSet([Where(), FunctionTool(pooled)]) as ts:
        f = ts.submit("where", {"expression": "6 * 7"})
        assert f.done() and f.result().text == "42" and f.result().status == "ok"
        assert seen["inline"] == threading.get_ident()
        bad = ts.submit("where", {"expression": "1 / 0"})
        assert bad.done() and bad.result().status == "error" and "division by zero" in bad.result().text
        assert ts.call("pooled", {"x": "hi"}).text == "hi" and seen["pooled"] != threading.get_ident()
    assert Calculator().inline is True and Calculator(inline=False).inline is False
    with ToolSet([Calculator(inline=False)]) as ts:
        assert ts.call("calculator", {"expression": "2 ** 10"}).text == "1024"
