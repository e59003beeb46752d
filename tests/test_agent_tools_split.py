"""The agent's tool modules: the API's public entry point, loading through rewards.spec, the layering."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model.errors import ConfigError
from rollout.agent import tools
from rollout.agent.calculator import Calculator
from rollout.agent.loader import BUILTIN_TOOLS, load_tool
from rollout.agent.python_tool import PythonTool
from rollout.agent.runner import ToolSet

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_classes_load_through_the_public_entry_point():
    assert tools.Calculator is Calculator and tools.PythonTool is PythonTool
    assert set(BUILTIN_TOOLS.values()) <= {tools.Calculator, tools.PythonTool}
    calc = load_tool("rollout.agent.tools:Calculator", name="calc", decimals=3)
    assert isinstance(calc, Calculator) and calc.name == "calc" and calc(expression="1/3") == "0.333"


def test_the_moved_module_hint_for_old_tool_specs_names_a_loadable_spec():
    from rl.grpo.config import MOVED_MODULES

    assert isinstance(load_tool(f"{MOVED_MODULES['rollout.tools']}:Calculator"), Calculator)


def test_tool_spec_errors_come_from_the_shared_loader_and_name_spec_file_and_object(tmp_path):
    (tmp_path / "my_tools.py").write_text(textwrap.dedent('''
        from rollout.agent.tools import tool

        @tool
        def echo(text: str) -> str:
            "Echo."
            return text
    '''))
    assert load_tool("my_tools.py:echo", base_dir=str(tmp_path))(text="hi") == "hi"
    with pytest.raises(ConfigError) as e:
        load_tool("my_tools.py:nope", base_dir=str(tmp_path))
    assert str(e.value) == (f"tool spec 'my_tools.py:nope': {tmp_path / 'my_tools.py'} has no object 'nope' "
                            "(callables there: echo, tool)")
    with pytest.raises(ConfigError, match=r"^tool spec 'my_tools.py:echo!': expected NAME, "
                                          r"path/to/file.py:object or package.module:object$"):
        load_tool("my_tools.py:echo!", base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^unknown built-in tool 'calc' \(built-ins: calculator, python;"):
        load_tool("calc")


def test_a_tool_set_checks_the_interface_of_ready_objects():
    class NoSchema:
        name, description = "x", ""

        def __call__(self):
            return ""

    with pytest.raises(ConfigError, match="NoSchema has no parameters"):
        ToolSet([NoSchema()])
    with ToolSet([Calculator()]) as ts:
        assert ts.call("calculator", {"expression": "6*7"}).text == "42"


def test_layering_runner_needs_only_the_api_and_the_calculator_needs_nothing():
    code = ("import sys, rollout.agent.runner; "
            "print(sorted({'rollout.agent.loader', 'rewards.spec'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    calc_src = (ROOT / "rollout" / "agent" / "calculator.py").read_text()
    assert [ln for ln in calc_src.splitlines() if ln.startswith(("import ", "from "))] == \
        ["from __future__ import annotations", "from fractions import Fraction"]
