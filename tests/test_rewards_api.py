"""Loading reward specs: built-ins, files, modules, signatures, batched and async functions."""

import textwrap

import pytest

import rewards
from rewards import CompositeReward, RewardSpec, RewardSpecError, load_reward, parse_reward_specs

USER = textwrap.dedent('''
    import asyncio
    import rewards

    def exact(prompt, completion, answer):
        return float(completion.strip() == str(answer))

    def needs_nothing(prompt, completion):
        return 0.25

    def scaled(prompt, completion, *, scale=1.0, **fields):
        return scale * len(completion)

    @rewards.batched
    def lengths(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    async def slow_len(prompt, completion, **fields):
        await asyncio.sleep(0.01)
        return float(len(completion))

    @rewards.batched
    async def batched_async(prompts, completions, **columns):
        await asyncio.sleep(0.01)
        return [1.0] * len(completions)

    def skip_odd(prompt, completion, idx):
        return None if idx % 2 else 1.0

    def one_arg(completion):
        return 1.0

    NOT_CALLABLE = 3
''')


@pytest.fixture
def user_file(tmp_path):
    p = tmp_path / "my_rewards.py"
    p.write_text(USER)
    return p


def test_builtin_by_name_and_options():
    fn = load_reward("format")
    assert fn.name == "format" and not fn.batched
    assert fn(["p", "p"], ["<think>a</think> 42", "42"]) == [1.0, 0.0]
    with pytest.raises(RewardSpecError, match="unknown built-in reward 'maths'"):
        load_reward("maths")
    with pytest.raises(RewardSpecError, match="'bogus'"):
        load_reward("math", bogus=1)
    with pytest.raises(RewardSpecError, match="extract"):
        load_reward("math", extract=["boxed", "guess"])
    with pytest.raises(RewardSpecError, match="buffer"):
        load_reward("overlong", max_len=10, buffer=20)


def test_file_spec_relative_and_absolute(user_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = load_reward("my_rewards.py:exact")
    ab = load_reward(f"{user_file}:exact")
    assert rel.spec == ab.spec == f"{user_file}:exact"   # resolved, so workers find the same file
    assert rel(["p", "p"], ["7", "8"], [{"answer": 7, "other": "ignored"}, {"answer": 7}]) == [1.0, 0.0]
    base = load_reward("my_rewards.py:exact", base_dir=str(tmp_path))
    assert base.spec == rel.spec


def test_spec_errors_name_the_problem(user_file, tmp_path):
    with pytest.raises(RewardSpecError, match="file not found: .*missing.py"):
        load_reward(f"{tmp_path}/missing.py:fn")
    with pytest.raises(RewardSpecError, match="has no function 'nope'.*exact"):
        load_reward(f"{user_file}:nope")
    with pytest.raises(RewardSpecError, match="my_rewards.py:one_arg'?: one_arg: wrong signature \\(completion\\)"):
        load_reward(f"{user_file}:one_arg")
    with pytest.raises(RewardSpecError, match="not a function"):
        load_reward(f"{user_file}:NOT_CALLABLE")
    with pytest.raises(RewardSpecError, match="cannot import module 'no_such_pkg_xyz.mod'"):
        load_reward("no_such_pkg_xyz.mod:fn")
    with pytest.raises(RewardSpecError, match="module 'json' has no function 'nope'"):
        load_reward("json:nope")
    with pytest.raises(RewardSpecError, match="options \\['scale'\\] are not parameters"):
        load_reward(f"{user_file}:exact", scale=2)
    broken = tmp_path / "broken.py"
    broken.write_text("def f(prompt, completion):\n  return (\n")
    with pytest.raises(RewardSpecError, match="importing .*broken.py failed: SyntaxError"):
        load_reward(f"{broken}:f")


def test_module_spec():
    fn = load_reward("rewards.builtin.length:completion_length")   # any importable callable
    assert fn.name == "completion_length"


def test_bound_options_and_field_filtering(user_file):
    fn = load_reward(f"{user_file}:scaled", scale=2.0)
    assert fn(["p"], ["abc"], [{"answer": 1}]) == [6.0]
    # a function without **fields only receives the fields it names
    assert load_reward(f"{user_file}:needs_nothing")(["p"], ["x"], [{"a": 1, "b": 2}]) == [0.25]


def test_batched_async_and_none(user_file):
    b = load_reward(f"{user_file}:lengths")
    assert b.batched and b(["p"] * 3, ["a", "bb", ""]) == [1.0, 2.0, 0.0]
    a = load_reward(f"{user_file}:slow_len")
    assert a.is_async and a(["p"] * 2, ["abc", "a"]) == [3.0, 1.0]
    ba = load_reward(f"{user_file}:batched_async")
    assert ba.batched and ba.is_async and ba(["p"] * 2, ["x", "y"]) == [1.0, 1.0]
    s = load_reward(f"{user_file}:skip_odd")
    assert s(["p"] * 3, ["a", "b", "c"], [{"idx": i} for i in range(3)]) == [1.0, None, 1.0]


def test_callable_and_decorator_exported():
    fn = load_reward(lambda prompt, completion, **f: 2.0, name="const")
    assert fn.name == "const" and fn(["p"], ["c"]) == [2.0]
    assert rewards.batched(lambda ps, cs: [0.0] * len(cs)).__reward_batched__
    with pytest.raises(RewardSpecError, match="wrong signature"):
        load_reward(lambda: 1.0)


def test_reward_spec_from_yaml_values(user_file):
    specs = parse_reward_specs(["math", {"spec": f"{user_file}:scaled", "weight": 0.5,
                                         "kwargs": {"scale": 3}, "timeout_s": 2, "fallback": -1}])
    assert specs[0] == RewardSpec(spec="math")
    assert specs[1].weight == 0.5 and specs[1].kwargs == {"scale": 3} and specs[1].timeout_s == 2
    with pytest.raises(RewardSpecError, match=r"rewards\[0\]: unknown keys \['wieght'\]"):
        parse_reward_specs([{"spec": "math", "wieght": 1}])
    with pytest.raises(RewardSpecError, match=r"rewards\[0\]: missing key 'spec'"):
        parse_reward_specs([{"weight": 1}])
    with pytest.raises(RewardSpecError, match=r"weight: expected a number"):
        parse_reward_specs({"spec": "math", "weight": "high"})
    with pytest.raises(RewardSpecError, match="no reward function"):
        parse_reward_specs(None)


def test_composite_weights_names_and_none(user_file):
    comp = CompositeReward([{"spec": f"{user_file}:scaled", "weight": 0.5},
                            {"spec": f"{user_file}:skip_odd", "weight": 2.0},
                            {"spec": f"{user_file}:scaled", "kwargs": {"scale": 10}}])
    assert comp.names == ["scaled", "skip_odd", "scaled#2"]
    total, per = comp(["p", "p"], ["ab", "abcd"], [{"idx": 0}, {"idx": 1}])
    assert per == {"scaled": [2.0, 4.0], "skip_odd": [1.0, None], "scaled#2": [20.0, 40.0]}
    assert total == [0.5 * 2 + 2.0 * 1 + 20.0, None]   # None in any function excludes the sample
    with pytest.raises(RewardSpecError, match="file not found"):
        CompositeReward(["math", "nowhere.py:f"])      # every function is checked at load


def test_driver_style_mappings_with_nulls():
    """rl/grpo/driver.py passes each YAML entry as a dict with every key, unset ones None."""
    specs = parse_reward_specs([{"spec": "math", "weight": 1.0, "kwargs": {}, "timeout_s": None,
                                 "fallback": None, "name": None}])
    assert specs == [RewardSpec(spec="math")]


def test_package_is_standalone():
    import subprocess
    import sys

    code = ("import sys, rewards, rewards.check, rewards.pool, rewards.builtin; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'model', 'rollout', 'rl', 'torch', 'ray'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
