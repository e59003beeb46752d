"""Security: no pickle for checkpoints, model output never reaches eval/exec in a built-in
reward, a local Ray cluster binds its dashboard / job server to 127.0.0.1.

(`tests/test_checkpoint.py::test_pickle_with_code_refused` checks that `safe_torch_load` refuses a code
pickle; here the payload writes a sentinel file, is planted where each loader looks, with a manifest
rewritten to match so that only the loader stands in the way, and the sentinel must not appear.)
"""

import builtins
import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from model.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this runs `open(path, "w")`: the sentinel exists iff the pickle's code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickle(path: Path, sentinel: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"state": _Payload(sentinel)}, f, protocol=2)


def rewrite_manifest(ckpt: Path) -> None:
    """What an attacker who can write the directory can do: make the checksums match again."""
    mf = ckpt / "manifest.json"
    m = json.loads(mf.read_text())
    for name in m["files"]:
        data = (ckpt / name).read_bytes()
        m["files"][name] = {**m["files"][name], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mf.write_text(json.dumps(m))


# ------------------------------------------------------------------ checkpoints without pickle


def test_no_unsafe_deserialisation_in_the_code():
    """Every torch.load passes weights_only=True; nothing of ours calls pickle.load(s) or numpy allow_pickle."""
    # the reward pool pickles function specs to its own worker over the worker's stdin pipe (a
    # parent it started itself): never a file, never model output
    ipc = {ROOT / "rewards" / "_worker.py"}
    bad = []
    for pkg in ("model", "rollout", "rl", "rewards"):
        for f in (ROOT / pkg).rglob("*.py"):
            text = f.read_text()
            if f in ipc:
                text = text.replace("pickle.loads(payload)", "")
            for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in m.group(1):
                    bad.append(f"{f}: {m.group(0)}")
            for pat in (r"pickle\.loads?\(", r"allow_pickle\s*=\s*True", r"yaml\.load\(", r"yaml\.unsafe_load"):
                if re.search(pat, text):
                    bad.append(f"{f}: {pat}")
    assert not bad, bad


def test_malicious_optimizer_pt_refused_and_its_code_never_runs(tmp_path):
    from rl.train.checkpoint import CheckpointManager, load_checkpoint

    sentinel = tmp_path / "PWNED"
    mgr = CheckpointManager(tmp_path / "ckpts")
    good = mgr.save(1, {"w": torch.ones(2)}, optimizer_state={"state": {}, "param_groups": []})
    evil = mgr.save(2, {"w": torch.ones(2)}, optimizer_state={"state": {}, "param_groups": []})
    plant_pickle(evil / "optimizer.pt", sentinel)
    rewrite_manifest(evil)
    assert mgr.latest() == evil                          # the manifest says intact: only the loader refuses
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="refused"):
        mgr.load()
    assert not sentinel.exists()
    assert mgr.load(good)[0]["w"].sum() == 2            # the older checkpoint still loads


def test_malicious_optimizer_pt_refused_by_the_grpo_learner(tmp_path):
    from rl.grpo.config import load_grpo_config
    from rl.grpo.learner import Learner

    cfg = load_grpo_config(data={"model": {"preset": "tiny", "overrides": {"vocab_size": 384}},
                                 "group_size": 2, "prompts_per_step": 2, "learner": {"backend": "torch"}})
    with pytest.warns(UserWarning, match="learner.backend is 'torch'"):
        learner = Learner(cfg)
    path = Path(learner.save_checkpoint(str(tmp_path / "ckpts"), 1, {"step": 1}, keep=2))
    sentinel = tmp_path / "PWNED"
    plant_pickle(path / "optimizer.pt", sentinel)
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match="refused"):
        learner.load_checkpoint(str(path))
    assert not sentinel.exists()


def test_pickled_model_checkpoint_is_not_loaded(tmp_path):
    """A `.pt` / `pytorch_model.bin` model is never unpickled: only safetensors are read."""
    from model.config import BitMambaConfig
    from model.lm import BitMambaLM

    d = tmp_path / "model"
    BitMambaLM(BitMambaConfig.preset("tiny", vocab_size=384)).save_pretrained(d)
    (d / "model.safetensors").unlink()
    sentinel = tmp_path / "PWNED"
    for name in ("model.pt", "pytorch_model.bin", "model.bin"):
        plant_pickle(d / name, sentinel)
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        BitMambaLM.from_pretrained(d)
    from model.hf_mamba2 import load_safetensors_dir

    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_safetensors_dir(d)
    assert not sentinel.exists()


# ------------------------------------------------------------------ rewards never eval model output

MARK = "PWNMARK"


def payloads(sentinel: Path) -> list[str]:
    s = str(sentinel)
    code = f"__import__('os').system('touch {s}') or open('{s}', 'w') or '{MARK}'"
    return [
        code,
        f"The answer is \\boxed{{{code}}}",
        f"<think>{MARK}</think><answer>{code}</answer>",
        f"#### {code}",
        f"<answer>exec(\"open('{s}','w')\") # {MARK}</answer>",
        f"\\boxed{{__import__('os').system('touch {s}') + 1}} {MARK}",
        f"\\boxed{{{MARK}.__class__.__mro__[1].__subclasses__()}}",
        f"\\boxed{{lambda: open('{s}','w')}} {MARK}",
        f"```json\n{{\"__import__\": \"os\", \"cmd\": \"{code}\"}}\n```",
        f'{{"a": "{MARK}", "b": !!python/object/apply:os.system ["touch {s}"]}}',
        f'<tool_call>{{"name": "run", "arguments": {{"cmd": "{code}"}}}}</tool_call>',
        f'<tool_call>{{"name": "__import__(\'os\').system(\'touch {s}\')", "arguments": "{MARK}"}}</tool_call>',
        f"{MARK} " * 50 + code,
    ]


BUILTINS = {
    "math": {},
    "format": {"partial": True, "answer_tag": "answer"},
    "json": {"schema": {"type": "object", "properties": {"cmd": {"type": "string"}}}},
    "tool_call": {},
    "overlong": {"max_len": 40, "buffer": 10},
    "length": {"target": 10},
}
FIELDS = {"answer": "42", "tools": [{"name": "run", "parameters": {"type": "object",
                                                                      "properties": {"cmd": {"type": "string"}}}}]}


def test_planted_code_in_completions_reaches_no_eval_in_any_builtin(tmp_path, monkeypatch):
    """In-process (num_workers=0): eval/exec/compile and sympy's parsers are wrapped to record their
    arguments; none may ever see a completion's text (the marker), and the sentinel never appears."""
    import sympy
    from sympy.parsing import sympy_parser

    from rewards import RewardPool

    specs = [{"spec": k, "kwargs": v} for k, v in BUILTINS.items()]
    sentinel = tmp_path / "PWNED"
    texts = payloads(sentinel)
    with RewardPool(specs, num_workers=0, timeout_s=30) as pool:
        pool.score(["1+1="], ["\\boxed{2}"], [FIELDS])            # warm up: imports, lazy compiles
        seen: list[str] = []

        def spy(real):
            def wrapped(*a, **k):
                seen.append(repr(a)[:10000])
                return real(*a, **k)
            return wrapped

        for mod, name in ((builtins, "eval"), (builtins, "exec"), (builtins, "compile"),
                          (sympy, "sympify"), (sympy_parser, "parse_expr")):
            monkeypatch.setattr(mod, name, spy(getattr(mod, name)))
        res = pool.score(["q"] * len(texts), texts, [FIELDS] * len(texts))
    assert set(res.per_function) == set(BUILTINS)
    leaked = [s for s in seen if MARK in s or str(sentinel) in s]
    assert not leaked, leaked[:3]
    assert not sentinel.exists()
    for name, scores in res.per_function.items():       # every payload was scored as plain text
        assert all(v is None or isinstance(v, float) for v in scores), (name, scores)
    assert res.status.count("ok") == len(texts), res.counts


def test_planted_code_in_completions_has_no_side_effect_in_pool_workers(tmp_path):
    """The same payloads through real worker processes (`python -m rewards._worker`)."""
    from rewards import RewardPool

    specs = [{"spec": k, "kwargs": v} for k, v in BUILTINS.items()]
    sentinel = tmp_path / "PWNED"
    texts = payloads(sentinel)
    with RewardPool(specs, num_workers=1, timeout_s=30) as pool:
        res = pool.score(["q"] * len(texts), texts, [FIELDS] * len(texts))
    assert res.status.count("ok") == len(texts), res.counts
    assert not sentinel.exists()


# ------------------------------------------------------------------ Ray binds to 127.0.0.1


def test_local_ray_binds_dashboard_and_job_server_to_localhost(monkeypatch):
    import ray

    from rl.grpo import driver as grpo
    from rl.grpo.config import load_grpo_config

    base = {"model": {"preset": "tiny", "overrides": {"vocab_size": 384}}}
    cfg = load_grpo_config(data=base)
    kw = grpo.local_ray_kwargs(cfg)
    assert kw["dashboard_host"] == "127.0.0.1" and kw["include_dashboard"] is False
    on = load_grpo_config(data={**base, "workers": {"local_dashboard": True}})
    kw = grpo.local_ray_kwargs(on)
    assert kw["dashboard_host"] == "127.0.0.1" and kw["include_dashboard"] is True
    # opting out is explicit
    assert grpo.local_ray_kwargs(load_grpo_config(
        data={**base, "workers": {"dashboard_host": "0.0.0.0"}}))["dashboard_host"] == "0.0.0.0"

    # connect_ray passes exactly these to ray.init when it starts the local cluster
    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **k: calls.append(k))
    assert grpo.connect_ray(on) is True
    assert calls == [grpo.local_ray_kwargs(on)]


# ------------------------------------------------------------------ model-written code runs in a jail


def test_python_tool_from_a_yaml_spec_runs_model_code_in_the_jail(tmp_path):
    """The `python` built-in as a config loads it (no sandbox key): a planted secret, the project tree and
    /root are out of reach, and it runs as an unprivileged uid (tests/test_jail.py has the full list)."""
    from rollout.agent.jail import jail_problem
    from rollout.agent.loader import load_tools

    reason = jail_problem()
    if reason is not None:
        pytest.skip(f"no jail on this host: {reason}")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-" + os.urandom(8).hex())
    (tool,) = load_tools([{"spec": "python", "kwargs": {"timeout_s": 5}}])
    code = (f"import os\nfor p in ({str(secret)!r}, {str(ROOT / 'pyproject.toml')!r}, '/root/.bashrc'):\n"
            "    try:\n        print(open(p).read())\n    except OSError as e:\n        print(type(e).__name__)\n"
            "print('uid', os.getuid())")
    out = tool(code=code)
    assert out.splitlines()[:3] == ["FileNotFoundError"] * 3, out
    assert secret.read_text() not in out and out.splitlines()[3] != "uid 0"
