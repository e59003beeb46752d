"""rewards.spec: the one spec grammar and user-code importer behind reward and tool specs."""

import json
import os
import textwrap

import pytest

from model.errors import ConfigError
from rewards.errors import RewardSpecError
from rewards.spec import SpecLoader, UserSpec

REWARDS = SpecLoader(label="reward spec", noun="function", error=RewardSpecError)
TOOLS = SpecLoader(label="tool spec", noun="object", error=ConfigError)


@pytest.fixture
def user_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "code.py").write_text(textwrap.dedent('''
        LOADS = []
        LOADS.append(1)

        def score(prompt, completion):
            return 1.0

        class Thing:
            pass

        _private = 3
    '''))
    return tmp_path


def test_parse_both_grammars_and_builtin_names(user_dir):
    assert REWARDS.parse("  math ") == UserSpec("math", "builtin", "math")
    rel = REWARDS.parse("sub/code.py:score", base_dir=str(user_dir))
    assert rel == UserSpec("sub/code.py:score", "file", str(user_dir / "sub" / "code.py"), "score")
    assert REWARDS.parse(f"{user_dir}/sub/code.py:score").target == rel.target      # absolute path kept
    assert REWARDS.parse("code.py:score", base_dir=str(user_dir / "sub")).target == rel.target
    assert REWARDS.parse("pkg.mod:attr") == UserSpec("pkg.mod:attr", "module", "pkg.mod", "attr")


def test_relative_file_defaults_to_the_cwd(user_dir, monkeypatch):
    monkeypatch.chdir(user_dir)
    us = REWARDS.parse("sub/code.py:score")
    assert us.target == os.path.join(str(user_dir), "sub", "code.py")
    assert REWARDS.load(us)("p", "c") == 1.0


@pytest.mark.parametrize("spec", [":score", "code.py:", "code.py:1bad", "pkg.mod:a-b"])
def test_bad_grammar_names_the_spec_and_the_forms(spec):
    with pytest.raises(RewardSpecError) as e:
        REWARDS.parse(spec)
    assert str(e.value) == (f"reward spec {spec!r}: expected NAME, path/to/file.py:function "
                            "or package.module:function")


def test_load_a_file_relative_to_base_dir_and_a_module(user_dir):
    fn = TOOLS.load("sub/code.py:score", base_dir=str(user_dir))
    assert fn("p", "c") == 1.0
    assert TOOLS.load("json:dumps") is json.dumps
    assert TOOLS.load(TOOLS.parse("sub/code.py:Thing", str(user_dir))).__name__ == "Thing"


def test_missing_attribute_in_a_file_is_one_error_naming_spec_file_and_attribute(user_dir):
    path = user_dir / "sub" / "code.py"
    with pytest.raises(RewardSpecError) as e:
        REWARDS.load("sub/code.py:nope", base_dir=str(user_dir))
    assert str(e.value) == (f"reward spec 'sub/code.py:nope': {path} has no function 'nope' "
                            "(callables there: Thing, score)")
    with pytest.raises(ConfigError, match=r"^tool spec 'sub/code.py:nope': .*code.py has no object 'nope'"):
        TOOLS.load("sub/code.py:nope", base_dir=str(user_dir))


def test_missing_file_is_one_error_naming_spec_and_path(user_dir):
    with pytest.raises(ConfigError) as e:
        TOOLS.load("gone.py:f", base_dir=str(user_dir))
    assert str(e.value) == f"tool spec 'gone.py:f': file not found: {user_dir / 'gone.py'}"


def test_missing_module_and_module_attribute():
    with pytest.raises(RewardSpecError, match=r"^reward spec 'no_such_pkg_xyz.mod:f': cannot import module "
                                              r"'no_such_pkg_xyz.mod'"):
        REWARDS.load("no_such_pkg_xyz.mod:f")
    with pytest.raises(RewardSpecError) as e:
        REWARDS.load("json:nope")
    assert str(e.value) == "reward spec 'json:nope': module 'json' has no function 'nope'"


def test_a_builtin_name_is_not_loadable_code():
    with pytest.raises(ConfigError, match="tool spec 'calculator': a built-in name"):
        TOOLS.load("calculator")


def test_a_file_is_imported_once_per_process_for_every_loader(user_dir):
    a = REWARDS.load("sub/code.py:score", base_dir=str(user_dir))
    b = TOOLS.load(f"{user_dir}/sub/code.py:score")
    assert a is b
    assert a.__globals__["LOADS"] == [1]


def test_a_failing_import_is_an_error_and_a_fixed_file_then_loads(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("def f(:\n")
    with pytest.raises(RewardSpecError, match=r"^reward spec 'broken.py:f': importing .*broken.py failed: SyntaxError"):
        REWARDS.load("broken.py:f", base_dir=str(tmp_path))
    f.write_text("def f():\n    return 7\n")
    assert REWARDS.load("broken.py:f", base_dir=str(tmp_path))() == 7
