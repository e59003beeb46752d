"""The README's and the docs' command recipes, executed as written.

Every command line in a code block of README.md, docs/training.md and docs/grpo.md is listed in
`COVERAGE` with the test that runs or checks it; `test_every_recipe_command_is_covered` fails on a
command that is not (a new or edited recipe) and on an entry no block holds any more. Commands run in a
scratch working directory that mirrors the checkout (symlinks), so `runs/...` lands there, exactly as
written, with only overrides appended that make them tiny (`steps=1`, `train.max_steps=2`,
`DEMO_ARGS=...`); the cluster block gets free ports and a scratch output directory in place of 8265 and
`/shared/runs/...`, so that it never meets another cluster on the machine. What a test cannot run (package installs, `make test` itself, `ray stop`, lm-eval's Hub datasets) is checked against
what it names: the pinned versions, the extras, the Makefile, the flags in `--help`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from private_ray import free_port, pids_of, stop
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = ("README.md", "docs/training.md", "docs/grpo.md")
PROGRAMS = {"make", "pip", "bitmamba", "python", "ray", "export", ".venv/bin/bitmamba"}
ASSIGN = re.compile(r"^[A-Z_][A-Z0-9_]*=")
MIRROR_SKIP = {".git", "runs", "outputs", "wandb", ".pytest_cache", "build", ".device"}

# every command of the three documents -> the test that runs (or, where it cannot run, checks) it
COVERAGE = {
    "make demo": "test_make_demo (slow); test_make_demo_twice (long); test_make_demo_starts_its_scratch_dir_over",
    "make test": "test_make_test_is_the_ci_command (not run: it is the suite this test is part of)",
    "make test-long": "test_make_test_is_the_ci_command (not run: the long tests are run in their own tests)",
    "pip install torch==2.13.0": "test_install_pins_match_the_environment (not run: network install)",
    "pip install -e .[dev]": "test_install_pins_match_the_environment",
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu":
        "test_install_pins_match_the_environment",
    "MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps "
    "mamba-ssm==2.3.2.post1": "test_install_pins_match_the_environment",
    "export RAY_AUTH_MODE=disabled": "test_ray_job_submit_block (long)",
    "ray start --head --dashboard-host 127.0.0.1": "test_ray_job_submit_block (long)",
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m rl.demo --output-dir "
    "/shared/runs/demo": "test_ray_job_submit_block (long)",
    "ray stop": "test_ray_job_submit_block stops its own cluster by PID (not run: it ends every Ray "
                "process of the user)",
    "bitmamba pretrain --config configs/pretrain_tiny.yaml [--output-dir DIR] [key=value ...]":
        "test_training_recipes (long)",
    "bitmamba sft --config configs/sft_tiny.yaml [--output-dir DIR] [key=value ...]": "test_training_recipes (long)",
    "bitmamba distill --config configs/distill_tiny.yaml [--output-dir DIR] [key=value ...]":
        "test_training_recipes (long)",
    "bitmamba pretrain --config configs/pretrain_tiny_fp.yaml --output-dir runs/pretrain_tiny_fp":
        "test_training_recipes (long)",
    "bitmamba distill --config configs/distill_tiny.yaml": "test_training_recipes (long)",
    "OMP_NUM_THREADS=2 python -m pytest -q tests/test_checkpoint.py tests/test_data.py "
    "tests/test_optim_schedule.py tests/test_stages_common.py tests/test_stages_pretrain.py "
    "tests/test_stages_sft.py tests/test_stages_distill.py tests/test_stages_resume.py":
        "test_listed_test_files_exist (not run: part of this suite)",
    "bitmamba demo --output-dir runs/demo": "test_make_demo_twice (slow; make demo runs it with --overwrite)",
    "python -m rl.grpo --config configs/grpo_tiny.yaml --output-dir runs/grpo_tiny": "test_grpo_quick_start (long)",
    "bitmamba grpo --config configs/grpo_tiny.yaml --output-dir runs/grpo_lr3e-4 learner.lr=3.0e-4 steps=50":
        "test_grpo_quick_start (long; parsed and its config loaded, not run: the same code as the line before)",
    "python -m rl.grpo --config configs/grpo_tiny.yaml --output-dir runs/grpo_tiny --resume":
        "test_grpo_quick_start (long)",
    "bitmamba tool-warmstart --output-dir runs/tool_warm": "test_tool_use_recipe_arguments (not run: minutes)",
    "bitmamba grpo --config configs/grpo_tools.yaml --init runs/tool_warm --output-dir runs/grpo_tools":
        "test_tool_use_recipe_arguments",
}


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    tokens: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every fenced block and every 4-space indented block."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append((i + 2, lines[i + 1:j]))
            i = j + 1
        elif lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            out.append((i + 1, [x[4:] for x in lines[i:j]]))
            i = j
        else:
            i += 1
    return out


def doc_commands(doc: str) -> list[Command]:
    """The shell commands of a document's code blocks (continuation lines joined, comments dropped)."""
    out = []
    for start, block in code_blocks((ROOT / doc).read_text(encoding="utf-8")):
        k = 0
        while k < len(block):
            first, line = k, block[k]
            while line.rstrip().endswith("\\") and k + 1 < len(block):
                k += 1
                line = line.rstrip()[:-1] + " " + block[k].strip()
            k += 1
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue                                   # prose or code with unbalanced quotes
            program = [t for t in tokens if not ASSIGN.match(t)][:1]
            if program and program[0] in PROGRAMS:
                out.append(Command(doc, start + first, tuple(tokens)))
    return out


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in doc_commands(doc)]


def recipe(text: str, doc: str | None = None) -> list[str]:
    """The tokens of the documented command `text` (failing when no document holds it as written)."""
    found = [c for c in all_commands() if c.text == text and (doc is None or c.doc == doc)]
    assert found, f"no code block of {doc or DOCS} holds the command {text!r}"
    return list(found[0].tokens)


def readme_table() -> dict[str, list[str]]:
    """The README's command table: sub-command -> the backticked commands of its row."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        cmds = re.findall(r"`([^`]+)`", cell)                 # the command and its variants (`--prompt-ids ...`)
        sub = cmds[0].split()[1] if cmds[0].startswith("bitmamba") else "grpo"
        rows.setdefault(sub, []).extend(cmds)
    return rows


# ------------------------------------------------------------------------------------------ helpers
def tool_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell has after activating the venv; no user Ray cluster, no debug."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BITMAMBA_DEBUG")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def sh(tokens: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    """Run a command; fail with its output's tail unless it exits 0. Returns stdout + stderr."""
    r = subprocess.run(tokens, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{shlex.join(tokens)} exited {r.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture
def shell():
    """`run(tokens, cwd, **env)` with the environment of an activated venv and a private RAY_TMPDIR; at
    the end every process left under that RAY_TMPDIR (a Ray instance of a killed or timed-out command, the
    test's own cluster) is stopped by PID. Nothing else on the machine is touched."""
    tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")      # short: Ray's socket paths must stay < 108 chars

    def run(tokens: list[str], cwd: Path, timeout: int = 900, **extra: str) -> str:
        return sh(tokens, cwd, tool_env(RAY_TMPDIR=tmp, **extra), timeout)

    run.ray_tmpdir = tmp
    try:
        yield run
    finally:
        for _ in range(3):                                 # workers may still be starting: sweep again
            stop(pids_of(tmp))
            time.sleep(0.5)
        leftover = pids_of(tmp)
        subprocess.run(["rm", "-rf", tmp], check=False)
        assert not leftover, f"processes under {tmp} survived: {leftover}"


@pytest.fixture
def box(tmp_path) -> Path:
    """A scratch working directory mirroring the checkout (a symlink per top-level entry, .venv included)."""
    d = tmp_path / "checkout"
    d.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in MIRROR_SKIP:
            (d / entry.name).symlink_to(entry)
    return d


def metrics_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [int(r["step"]) for r in rows if "step" in r]


def run_cli(argv: list[str], cwd: Path, monkeypatch, capsys) -> str:
    """`bitmamba ARGS` in this process (what the console script calls), from `cwd`; exit 0 or fail."""
    from rl.cli import main

    monkeypatch.chdir(cwd)
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, f"bitmamba {shlex.join(argv)} -> {rc}\n{out.err[-3000:]}"
    return out.out + out.err


# ------------------------------------------------------------------------------------------ coverage
def test_every_recipe_command_is_covered():
    found = {c.text: c for c in all_commands()}
    unknown = [f"{c.doc}:{c.line}: {t}" for t, c in found.items() if t not in COVERAGE]
    assert not unknown, "recipe commands no test runs or checks (add them to COVERAGE):\n" + "\n".join(unknown)
    stale = [t for t in COVERAGE if t not in found]
    assert not stale, f"COVERAGE names commands no document holds any more: {stale}"


def test_the_extractor_reads_blocks_as_a_shell_would():
    cmds = doc_commands("README.md")
    submit = next(c for c in cmds if c.tokens[:3] == ("ray", "job", "submit"))
    assert submit.tokens[-4:] == ("-m", "rl.demo", "--output-dir", "/shared/runs/demo")
    assert "#" not in " ".join(t for c in cmds for t in c.tokens)          # comments dropped
    assert any(c.text == "make demo" for c in cmds)


def test_readme_table_flags_exist_in_each_commands_help(capsys):
    """Each row of the README's command table: the sub-command exists and every flag it names is in its
    `--help` (a renamed flag fails here)."""
    from rl.cli import COMMANDS, run_main

    rows = readme_table()
    assert {"demo", "pretrain", "sft", "distill", "grpo", "generate", "reward-check", "eval", "convert",
            "info"} <= set(rows)
    for sub, cmds in rows.items():
        assert sub in COMMANDS, f"README command table names `bitmamba {sub}`, which does not exist"
        with pytest.raises(SystemExit) as e:
            run_main(COMMANDS[sub][0], ["--help"])
        assert e.value.code == 0
        help_text = capsys.readouterr().out
        for flag in sorted({f for c in cmds for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", c)}):
            assert flag in help_text, f"README: `bitmamba {sub}` with {flag}, missing from `bitmamba {sub} --help`"


# ------------------------------------------------------------------------------------------ install
def test_install_pins_match_the_environment():
    """The install recipes name the torch this environment runs (and the Makefile installs), the extras
    pyproject.toml declares and the mamba-ssm pin of the `gpu` extra."""
    import torch

    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    torch_pins = {t.split("==")[1] for c in all_commands() for t in c.tokens if t.startswith("torch==")}
    assert torch_pins == {torch.__version__.split("+")[0]}, (torch_pins, torch.__version__)
    assert f'"torch=={torch_pins.pop()}"' in (ROOT / "Makefile").read_text(encoding="utf-8")
    cpu = recipe("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    assert cpu[-1] == "https://download.pytorch.org/whl/cpu"               # PyTorch's own CPU wheel index
    extras = re.search(r"\[project\.optional-dependencies\](.*?)\n\[", pyproject, re.S).group(1)
    for extra in re.findall(r"\.\[([a-z,]+)\]", " ".join(t for c in all_commands() for t in c.tokens)):
        for name in extra.split(","):
            assert re.search(rf"^{name} = \[", extras, re.M), f"extra [{name}] is not in pyproject.toml"
    mamba = next(t for c in all_commands() for t in c.tokens if t.startswith("mamba-ssm=="))
    assert f'gpu = ["{mamba}"]' in pyproject


def make_dry_run(target: str) -> list[str]:
    """The commands `make TARGET` would run, as this checkout's Makefile says; run outside any parent make
    (CI calls the suite from `make test`, whose MAKEFLAGS/MAKELEVEL would add directory lines)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", target], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()


def test_make_test_is_the_ci_command():
    out = "\n".join(make_dry_run("test"))
    assert "pytest -q tests -m \"not long\"" in out                 # CI: fast and slow, not long
    assert "pytest -q tests -m long" in "\n".join(make_dry_run("test-long"))
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_listed_test_files_exist():
    cmd = next(c for c in all_commands() if "pytest" in c.tokens)
    files = [t for t in cmd.tokens if t.startswith("tests/")]
    assert files and all((ROOT / f).is_file() for f in files), [f for f in files if not (ROOT / f).is_file()]


# ------------------------------------------------------------------------------------------ make demo
def test_make_demo_starts_its_scratch_dir_over():
    """`make demo` a second time starts runs/demo over (--overwrite): never a refusal, never a mix."""
    out = make_dry_run("demo")
    assert out[-1].split() == [".venv/bin/bitmamba", "demo", "--output-dir", "runs/demo", "--overwrite"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "--overwrite" in readme.split("## Install by hand")[0]          # said where make demo is


def make_demo(box: Path) -> list[str]:
    """`make demo` as written in the mirror, tiny (DEMO_ARGS); the venv's install step is not re-run when
    pyproject.toml is newer than the venv (a test never installs packages)."""
    cmd = recipe("make demo", "README.md")
    fresh = subprocess.run(["make", "-q", ".venv/.installed"], cwd=box).returncode == 0
    return cmd + ([] if fresh else ["-o", ".venv/.installed"]) + ["DEMO_ARGS=--warm-steps 2 --steps 1 task.eval_size=8"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_make_demo(box, shell):
    """`make demo` as written (tiny: DEMO_ARGS) runs to the end and writes its metrics and curves."""
    out = shell(make_demo(box), box)
    assert metrics_steps(box / "runs" / "demo")[-1] == 1 and (box / "runs" / "demo" / "reward.png").is_file()
    assert "held-out pass@1" in out


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(1800)
def test_make_demo_twice(box, shell):
    cmd = make_demo(box)
    shell(cmd, box)
    first = sorted(p.name for p in (box / "runs" / "demo").iterdir())
    assert metrics_steps(box / "runs" / "demo")[-1] == 1 and (box / "runs" / "demo" / "reward.png").is_file()
    out = shell(cmd, box)                                # the second run starts runs/demo over
    assert "error:" not in out
    assert sorted(p.name for p in (box / "runs" / "demo").iterdir()) == first
    steps = metrics_steps(box / "runs" / "demo")
    assert steps == sorted(steps) and steps.count(1) == 1, steps      # one run's rows, not two mixed


# ------------------------------------------------------------------------------------------ training
@pytest.mark.long
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_training_recipes(box, shell):
    """docs/training.md: the three stage commands (templates) and the distillation recipe, tiny; then
    the SFT-from-pretraining recipe the doc gives and `bitmamba generate DIR/final`."""
    tiny = ["train.max_steps=2", "train.log_every=1", "train.save_every=2"]
    fp = recipe("bitmamba pretrain --config configs/pretrain_tiny_fp.yaml --output-dir runs/pretrain_tiny_fp")
    shell(fp + tiny, box)
    shell(recipe("bitmamba distill --config configs/distill_tiny.yaml") + tiny, box)   # teacher: runs/pretrain_tiny_fp/final
    assert metrics_steps(box / "runs" / "distill_tiny")[-1] == 2
    template = recipe("bitmamba pretrain --config configs/pretrain_tiny.yaml [--output-dir DIR] [key=value ...]")
    shell(template[:4] + ["--output-dir", "runs/pretrain_tiny"] + tiny, box)
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    init = re.search(r"`(model\.init_from=[^`]+)`", text).group(1)
    assert init == "model.init_from=runs/pretrain_tiny/final"
    sft = recipe("bitmamba sft --config configs/sft_tiny.yaml [--output-dir DIR] [key=value ...]")[:4]
    stage = "stages=[{name: s, data: [{path: data/tiny/sft.jsonl}], max_steps: 2}]"
    shell(sft + ["--output-dir", "runs/sft_tiny", init, stage, "train.log_every=1"], box)
    out = shell(["bitmamba", "generate", "runs/sft_tiny/final", "--prompt", "Hi", "--max-new-tokens", "4"], box)
    assert "--- sample 0" in out
    template = recipe("bitmamba distill --config configs/distill_tiny.yaml [--output-dir DIR] [key=value ...]")
    assert template[:4] == recipe("bitmamba distill --config configs/distill_tiny.yaml")


# ------------------------------------------------------------------------------------------ GRPO
@pytest.mark.long
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_grpo_quick_start(box, shell):
    """docs/grpo.md's quick start in order, one step each: a run, `--resume` of it to step 2; the line
    between them (another learning rate) is not run, but must name its own output directory."""
    from rl.args import grpo_parser
    from rl.grpo.config import load_grpo_config

    first = recipe("python -m rl.grpo --config configs/grpo_tiny.yaml --output-dir runs/grpo_tiny")
    out = shell(first + ["steps=1"], box)
    assert metrics_steps(box / "runs" / "grpo_tiny") == [1]
    assert (box / "runs" / "grpo_tiny" / "final").is_dir()
    assert "Traceback" not in out
    other = recipe("bitmamba grpo --config configs/grpo_tiny.yaml --output-dir runs/grpo_lr3e-4 "
                   "learner.lr=3.0e-4 steps=50")
    args = grpo_parser().parse_args(other[2:])
    cfg = load_grpo_config(box / args.config, list(args.overrides) + [f"output_dir={args.output_dir}"])
    assert cfg.learner.lr == 3.0e-4 and cfg.steps == 50
    assert not (box / args.output_dir).exists()          # its own directory: not refused as a reused one
    resume = recipe("python -m rl.grpo --config configs/grpo_tiny.yaml --output-dir runs/grpo_tiny --resume")
    shell(resume + ["steps=2"], box)
    assert metrics_steps(box / "runs" / "grpo_tiny") == [1, 2]


def test_tool_use_recipe_arguments():
    """docs/grpo.md's tool-use recipe (minutes of CPU, not run): both commands parse, the config loads."""
    from rl.args import grpo_parser
    from rl.grpo.config import load_grpo_config

    from rl.args import tool_warmstart_parser
    from rl.grpo.tool_warmstart import ToolWarmStartConfig

    warm = recipe("bitmamba tool-warmstart --output-dir runs/tool_warm")
    assert tool_warmstart_parser().parse_args(warm[2:]).output_dir == "runs/tool_warm"
    assert ToolWarmStartConfig().output_dir == "runs/tool_warm"
    grpo = recipe("bitmamba grpo --config configs/grpo_tools.yaml --init runs/tool_warm --output-dir runs/grpo_tools")
    args = grpo_parser().parse_args(grpo[2:])
    assert args.init == "runs/tool_warm"
    assert load_grpo_config(ROOT / args.config).tools


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_job_submit_block(tmp_path, shell):
    """The README's cluster block as pasted: `export RAY_AUTH_MODE=disabled`, `ray start --head`, `ray job
    submit` of one GRPO step. The cluster is this test's own: free ports (not 6379 / 8265, which another
    cluster may hold) and its own RAY_TMPDIR on 127.0.0.1; only its processes are stopped, by PID
    (`shell`), never with `ray stop`."""
    export = recipe("export RAY_AUTH_MODE=disabled", "README.md")
    start = recipe("ray start --head --dashboard-host 127.0.0.1", "README.md")
    submit = recipe("ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m rl.demo "
                    "--output-dir /shared/runs/demo", "README.md")
    auth = dict([export[1].split("=", 1)])
    dash = free_port()
    ports = [f"--port={free_port()}", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
             "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    out_dir = tmp_path / "demo"
    submit = [str(out_dir) if t == "/shared/runs/demo" else
              t.replace(":8265", f":{dash}") for t in submit] + ["--warm-steps", "2", "steps=1", "task.eval_size=8"]
    shell(start + ports, ROOT, timeout=180, **auth)
    log = shell(submit, ROOT, timeout=900, **auth)
    assert "succeeded" in log, log[-3000:]
    assert metrics_steps(out_dir) == [0, 1]                  # the held-out eval before GRPO, then the step


# ------------------------------------------------------------------------------------------ model tools
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny quant-off model of ours with the tiny tokenizer (exportable to Hugging Face)."""
    import torch

    from model.config import BitMambaConfig
    from model.lm import BitMambaLM
    from rollout.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(384)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    BitMambaLM(BitMambaConfig.preset("tiny", vocab_size=len(tok), quant={"ternary": False})).save_pretrained(d)
    tok.save_pretrained(str(d))
    return d


def test_readme_table_model_commands_run(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """The README table's info / generate / convert rows, with DIR, SRC, DST, FILE.bin and TEXT filled in."""
    rows = readme_table()
    assert "bitmamba info DIR" in rows["info"]
    out = run_cli(["info", str(tiny_ckpt)], tmp_path, monkeypatch, capsys)
    assert "vocab_size" in out or "parameters" in out
    assert {"bitmamba generate DIR --prompt TEXT", '--prompt-ids "1 2 3"'} <= set(rows["generate"])
    out = run_cli(["generate", str(tiny_ckpt), "--prompt", "1+1=", "--max-new-tokens", "3"], tmp_path, monkeypatch,
                  capsys)
    assert "--- sample 0 (length, 3 tokens)" in out
    out = run_cli(["generate", str(tiny_ckpt), "--prompt-ids", "1 2 3", "--max-new-tokens", "3"], tmp_path,
                  monkeypatch, capsys)
    assert "--- sample 0 (length, 3 tokens)" in out
    convert = " ".join(rows["convert"])
    assert "--to hf-mamba2 SRC DST" in convert and "--from hf-mamba2 SRC DST [--no-quant]" in convert
    run_cli(["convert", "--to", "hf-mamba2", str(tiny_ckpt), "hf"], tmp_path, monkeypatch, capsys)
    assert (tmp_path / "hf" / "config.json").is_file()
    run_cli(["convert", "--from", "hf-mamba2", "hf", "back", "--no-quant"], tmp_path, monkeypatch, capsys)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["quant"]["ternary"] is False
    assert "--from bitmamba2-bin FILE.bin DST" in convert and "--to bitmamba2-bin SRC FILE.bin" in convert
    fixture = ROOT / "tests" / "fixtures" / "bitmamba2" / "tiny.bin"
    run_cli(["convert", "--from", "bitmamba2-bin", str(fixture), "from_bin"], tmp_path, monkeypatch, capsys)
    run_cli(["convert", "--to", "bitmamba2-bin", "from_bin", "again.bin"], tmp_path, monkeypatch, capsys)
    assert (tmp_path / "again.bin").read_bytes() == fixture.read_bytes()


def test_reward_function_recipe(box, monkeypatch, capsys):
    """README's `my_rewards.py` block, saved as named, checked with docs/grpo.md's `bitmamba reward-check`
    line, and the README's `rewards:` list loads into the GRPO config."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(# my_rewards\.py\n.*?)```", readme, re.S).group(1)
    (box / "my_rewards.py").write_text(code, encoding="utf-8")
    rows = [{"prompt": "2+3=", "answer": "5", "completion": "5"}, {"prompt": "1+1=", "answer": "2", "completion": "3"}]
    (box / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    grpo_md = (ROOT / "docs" / "grpo.md").read_text(encoding="utf-8")
    check = re.search(r"`(bitmamba reward-check my_rewards\.py:exact --data rows\.jsonl)`", grpo_md).group(1)
    out = run_cli(shlex.split(check)[1:], box, monkeypatch, capsys)
    assert re.search(r"mean\D+0\.5", out), out[-2000:]
    listed = re.search(r"`(rewards: \[.*?\])`", readme).group(1)
    from rewards import RewardSpec
    from rl.grpo.config import load_grpo_config
    from model.typed import to_dict

    cfg = load_grpo_config(box / "configs" / "grpo_tiny.yaml", [listed.replace(": ", "=", 1)])
    specs = [RewardSpec.from_config(to_dict(r), f"rewards[{i}]") for i, r in enumerate(cfg.rewards)]
    assert [s.load() is not None for s in specs] == [True, True]
    assert [r.weight for r in cfg.rewards] == [1.0, 0.2]
    assert yaml.safe_load(listed)["rewards"][0]["spec"] == "my_rewards.py:exact"
