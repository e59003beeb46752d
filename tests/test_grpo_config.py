"""GRPO config loading/validation and the synthetic task."""

from pathlib import Path

import pytest

from model.errors import ConfigError, DataError
from rl.grpo.config import GRPOConfig, load_grpo_config
from rl.grpo.tasks import ArithmeticTask, arithmetic_reward, first_integer, make_task

ROOT = Path(__file__).resolve().parents[1]


# the configs of `python -m rl.grpo` (configs/tool_warmstart_tiny.yaml belongs to rl.grpo.tool_warmstart, another
# schema: tests/test_agent_tool_task.py loads it)
GRPO_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("grpo_*.yaml"))


def test_the_grpo_configs_are_all_found():
    assert {"grpo_tiny.yaml", "grpo_demo.yaml", "grpo_tools.yaml"} <= set(GRPO_CONFIGS)


@pytest.mark.parametrize("name", GRPO_CONFIGS)
def test_every_grpo_config_loads(name):
    path = ROOT / "configs" / name
    cfg = load_grpo_config(path)
    assert isinstance(cfg, GRPOConfig)
    assert cfg.group_size >= 2 and cfg.rewards


def test_overrides_and_typed_values(tmp_path):
    cfg = load_grpo_config(ROOT / "configs/grpo_tiny.yaml", ["learner.lr=3.0e-5", "algo.clip_high=0.3"])
    assert cfg.learner.lr == pytest.approx(3e-5)
    assert cfg.algo.clip_high == pytest.approx(0.3)
    assert cfg.seq_sum_const == cfg.sampling.max_new_tokens


@pytest.mark.parametrize("override,needle", [
    (["learner.lrr=1"], "learner.lrr"),
    (["group_size=one"], "group_size"),
    (["group_size=1"], "group_size"),
    (["task.prompt_too_long=cut"], "prompt_too_long"),
    (["learner.minibatches=3"], "learner.minibatches"),
    (["sampling.max_new_tokens=64"], "max_seq_len"),
    (["eval_k=8"], "eval_k"),
    (["algo.tis_cap=0.5"], "algo.tis_cap"),
    (["workers.weight_sync=nccl"], "workers.weight_sync"),
    (["model.ssm_dtype=float16"], "model.ssm_dtype"),
    (["model.ssm_state=bfloat16"], "key model.ssm_state is now model.ssm_dtype"),
    (["rewards=[{spec: 'rl.tasks:exact_digits'}]"], "module 'rl.tasks' is now 'rl.grpo.tasks'"),
])
def test_config_errors_name_key_and_file(override, needle):
    path = ROOT / "configs/grpo_tiny.yaml"
    with pytest.raises(ConfigError) as e:
        load_grpo_config(path, override)
    assert needle in str(e.value)
    assert "grpo_tiny.yaml" in str(e.value)


def test_model_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of model.path and model.preset"):
        load_grpo_config(data={"model": {"preset": "tiny", "path": "x"}})


def test_arithmetic_task_is_deterministic_and_split():
    t = ArithmeticTask(seed=3, max_operand=9)
    assert t.row("train", 5) == t.row("train", 5)
    train = {t.row("train", i)["prompt"] for i in range(400)}
    held = {t.row("eval", i)["prompt"] for i in range(100)}
    assert train and held and not (train & held)
    r = t.row("train", 0)
    a, b = r["prompt"].rstrip("=").split("+")
    assert int(a) + int(b) == int(r["answer"])


def test_arithmetic_reward_and_parsing():
    assert first_integer("x -12 then 3") == -12
    assert arithmetic_reward(["1+1="] * 3, ["2", " 3", "nope"], ["2", "3", "4"]) == [1.0, 1.0, 0.0]


def test_jsonl_task_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{broken\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        make_task(path=str(bad))
    with pytest.raises(DataError, match="not found"):
        make_task(path=str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        make_task(path=str(empty))
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p0", "answer": "1"}\n{"prompt": "p1", "answer": "2"}\n')
    t = make_task(path=str(good))
    assert [t.row("train", i)["prompt"] for i in range(3)] == ["p0", "p1", "p0"]


def test_cli_config_error_is_one_clean_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rl.grpo.driver", "--config", str(ROOT / "configs/grpo_tiny.yaml"),
                          "learner.bogus=1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    err = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "learner.bogus" in err[0] and "grpo_tiny.yaml" in err[0]
    assert "Traceback" not in out.stderr


def test_tools_section_loads_and_resolves_files_against_the_config_dir(tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text(
        "from rollout.agent.tools import tool\n\n@tool\ndef echo(text: str) -> str:\n    'Echo.'\n    return text\n")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model: {preset: tiny}\ntools: [calculator, {spec: my_tools.py:echo, name: say}]\n"
                        "agent: {max_tool_calls: 3, tool_timeout_s: 2.5}\n")
    monkeypatch.chdir(ROOT)                       # not the config's directory
    cfg = load_grpo_config(cfg_file)
    assert cfg.tools_base_dir == str(tmp_path) and cfg.agent.max_tool_calls == 3
    assert load_grpo_config(ROOT / "configs/grpo_tiny.yaml").tools == []     # default: no tools, no agent
    with pytest.raises(ConfigError, match="my_tools.py:nope") as e:
        load_grpo_config(cfg_file, ["tools=[my_tools.py:nope]"])
    assert "run.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="agent.max_tool_calls"):
        load_grpo_config(cfg_file, ["agent.max_tool_calls=-1"])
    with pytest.raises(ConfigError, match="duplicate tool names"):
        load_grpo_config(cfg_file, ["tools=[calculator, calculator]"])


def test_a_tool_spec_naming_a_moved_module_names_the_new_one(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text((ROOT / "configs/grpo_tiny.yaml").read_text() + "\ntools: ['rollout.tools:Calculator']\n")
    with pytest.raises(ConfigError, match="'rollout.tools' is now 'rollout.agent.tools'"):
        load_grpo_config(cfg)
